"""Fuzzing the command line, save targets and model folders.

- The CLI, given any mix of flags and hostile values, exits 0, 1 with one line on
  stderr, or 2 (argparse's usage error), and never prints a traceback.
- A save into a random folder tree either refuses and leaves every file as it was,
  or succeeds and leaves every file that is not a checkpoint file as it was.
- Plain model folders with edited ``config.json``/``tokenizer_config.json`` load or
  raise our own error; code planted beside them never runs.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import tempfile
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from unittest import mock

import pytest
from fuzz_strategies import fuzz_settings, json_edits
from hypothesis import event, given
from hypothesis import strategies as st
from tiny_models import tiny_llama, tiny_llama_folder, tiny_text

from torchquant import QuantConfig, TorchquantError, convert_model, scheme_from_name
from torchquant.checkpoint.save_guard import CHECKPOINT_FILES, is_checkpoint_file
from torchquant.cli import main
from torchquant.formats.dispatch import FORMATS, save_checkpoint
from torchquant.tools.models import load_model

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")


def no_stdin():
    """Reading stdin (a prompt) fails instead of waiting."""
    return mock.patch.object(sys, "stdin", None)


EVIL = "import pathlib\npathlib.Path(__file__).with_name('RAN').write_text('ran')\n"


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """A tiny Llama folder with a tokenizer, a text, a native checkpoint and planted code."""
    root = tmp_path_factory.mktemp("fuzz-cli")
    folder = tiny_llama_folder(root / "plain")
    (folder / "evil.py").write_text(EVIL)
    tiny_text(root / "text.txt")
    (root / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 50)
    assert main(["quantize", str(folder), "--group-size", "32", "--out", str(root / "ck")]) == 0
    return root


def _value(root: Path):
    names = ("text.txt", "latin1.txt", "plain", "ck", "nowhere", "plain/evil.py")
    files = [root / n for n in names]
    return st.one_of(
        st.sampled_from(["0", "-3", "1", "2", "16", "1e9", "nan", "", "cpu", "tpu", "cuda:x"]),
        st.sampled_from(["20000", "2GB", "-1MB", "0", "w4a16", "w3a16", "fp8", "w8a8", "rtn"]),
        st.sampled_from([str(p) for p in files]),
        st.text(max_size=6),
    )


def _argv(root: Path):
    model = st.sampled_from([str(root / n) for n in ("plain", "ck", "nowhere", "text.txt")])
    flags = {
        "quantize": ["--scheme", "--group-size", "--format", "--max-shard-size", "--calib",
                     "--calib-samples", "--calib-seq-len", "--algorithm", "--act-order"],
        "eval": ["--text", "--max-tokens", "--seq-len"],
        "inspect": [],
        "bench": ["--device", "--batch", "--prompt-len", "--new-tokens", "--repeats", "--dtype"],
    }  # fmt: skip

    @st.composite
    def build(draw):
        command = draw(st.sampled_from(sorted(flags)))
        argv = [command, draw(model)]
        for flag in draw(st.lists(st.sampled_from(flags[command] or ["--json"]), max_size=4)):
            argv += [flag] if flag == "--json" else [flag, draw(_value(root))]
        if command == "quantize":
            argv += ["--out", str(Path(tempfile.mkdtemp(dir=root)) / "out")]
        if command == "eval" and "--text" not in argv:
            argv += ["--text", str(root / "text.txt")]
        if command in ("eval", "bench"):  # keep the runs short
            argv += ["--max-tokens", "32", "--seq-len", "16"] if command == "eval" else []
            argv += ["--prompt-len", "4", "--new-tokens", "2", "--repeats", "1"] * (
                command == "bench"
            )
        return argv

    return build()


@fuzz_settings
@given(data=st.data())
def test_any_command_line_exits_cleanly(plain, data):
    argv = data.draw(_argv(plain))
    err, out = io.StringIO(), io.StringIO()
    with no_stdin(), redirect_stderr(err), redirect_stdout(out):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
    err = err.getvalue()
    event(f"exit {code}")
    assert code in (0, 1, 2), (argv, code)
    assert "Traceback" not in err, (argv, err)
    if code == 1:
        last = err.strip().split("\n")[-1]  # not splitlines: a path may hold \x1e
        assert last.startswith("torchquant: error: "), (argv, err)
    assert not (plain / "plain" / "RAN").exists()


@pytest.fixture(scope="module")
def quantized():
    scheme = scheme_from_name("w4a16", group_size=32, symmetric=True)
    model, _ = convert_model(tiny_llama(), QuantConfig(default=scheme), progress=False)
    return model


entry_names = st.one_of(
    st.sampled_from([*CHECKPOINT_FILES, "model-00001-of-00002.safetensors", "notes.md", "src"]),
    st.text(alphabet="abcdefgh._-", min_size=1, max_size=8),
).filter(lambda n: n not in (".", ".."))


@st.composite
def folder_trees(draw):
    """A list of (name, kind) entries: files, folders with a file, symlinks."""
    names = draw(st.lists(entry_names, max_size=6, unique=True))
    kinds = st.sampled_from(["file", "file", "dir", "link"])
    return [(name, draw(kinds)) for name in names]


def _snapshot(folder: Path) -> dict[str, bytes | str]:
    out: dict[str, bytes | str] = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            out[rel] = "link->" + os.readlink(p)
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = p.read_bytes()
    return out


@fuzz_settings
@given(tree=folder_trees(), fmt=st.sampled_from(FORMATS), overwrite=st.booleans())
def test_a_save_never_loses_a_file_that_is_not_a_checkpoint_file(quantized, tree, fmt, overwrite):
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "target"
        target.mkdir()
        outside = Path(tmp) / "outside.txt"
        outside.write_text("outside")
        for name, kind in tree:
            if kind == "file":
                (target / name).write_text(f"user {name}")
            elif kind == "dir":
                (target / name).mkdir()
                (target / name / "inner.txt").write_text("inner")
            else:
                (target / name).symlink_to(outside)
        before = _snapshot(target)
        try:
            save_checkpoint(quantized, target, fmt, overwrite=overwrite)
        except TorchquantError:
            event("refused")
            assert _snapshot(target) == before
        else:
            event("saved")
            after = _snapshot(target)
            for rel, content in before.items():
                if not is_checkpoint_file(rel.split("/")[0]) or content == "dir":
                    assert after.get(rel) == content, rel
        assert outside.read_text() == "outside"
        assert [p.name for p in Path(tmp).iterdir() if p.name.startswith(".")] == []


@fuzz_settings
@given(data=st.data(), name=st.sampled_from(["config.json", "tokenizer_config.json"]))
def test_edited_model_folders_load_or_raise_our_error(plain, data, name):
    with no_stdin(), tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "m"
        shutil.copytree(plain / "plain", folder)
        doc = json.loads((folder / name).read_text())
        if data.draw(st.booleans()):
            doc["auto_map"] = {"AutoTokenizer": ["evil.T", None], "AutoConfig": "evil.C"}
        (folder / name).write_text(json.dumps(data.draw(json_edits(doc))))
        try:
            load_model(folder)
            event("loaded")
        except TorchquantError:
            event("refused")
        assert not (folder / "RAN").exists()
