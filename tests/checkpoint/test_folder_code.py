"""Loading a folder never runs, imports or fetches code from it, and never prompts."""

import json
import os
import shutil
import sys

import pytest
import torch
from tiny_models import tiny_llama, tiny_llama_folder, tiny_text

from torchquant import CheckpointError, QuantConfig, convert_model, scheme_from_name
from torchquant.cli import main
from torchquant.formats.dispatch import load_checkpoint, save_checkpoint

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")

EVIL = "import pathlib\npathlib.Path(__file__).with_name('RAN').write_text('ran')\n"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return tiny_llama_folder(tmp_path_factory.mktemp("plain"))


@pytest.fixture
def folder(pristine, tmp_path, monkeypatch):
    """A fresh copy of the plain folder; reading stdin (a prompt) fails the test."""
    copy = tmp_path / "model"
    shutil.copytree(pristine, copy)
    monkeypatch.setattr(sys, "stdin", None)
    return copy


def edit_json(path, **fields):
    """Set ``fields`` in a JSON file; a field set to ``None`` is removed."""
    data = json.loads(path.read_text())
    data.update(fields)
    path.write_text(json.dumps({k: v for k, v in data.items() if v is not None}))


def eval_args(folder):
    text = tiny_text(folder.parent / "text.txt")
    return ["eval", str(folder), "--text", str(text), "--max-tokens", "32", "--seq-len", "16"]


def refused(capsys, argv, match):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert match in err, err
    return err


def plant_code(folder):
    (folder / "evil.py").write_text(EVIL)
    return {"AutoTokenizer": ["evil.EvilTokenizer", None], "AutoConfig": "evil.EvilConfig"}


def test_the_plain_folder_loads(folder, capsys):
    assert main(eval_args(folder)) == 0


def test_auto_map_in_the_tokenizer_config_is_refused(folder, capsys):
    edit_json(folder / "tokenizer_config.json", auto_map=plant_code(folder))
    refused(capsys, eval_args(folder), "auto_map")
    refused(capsys, ["quantize", str(folder), "--out", str(folder.parent / "q")], "auto_map")
    assert not (folder / "RAN").exists() and not (folder.parent / "q").exists()


def test_auto_map_in_config_json_is_refused(folder, capsys):
    edit_json(folder / "config.json", auto_map=plant_code(folder), model_type="evil")
    refused(capsys, eval_args(folder), "auto_map")
    assert not (folder / "RAN").exists()


@pytest.mark.parametrize(
    "field",
    [
        {"_attn_implementation": "kernels-community/flash-attn"},
        {"attn_implementation": {"": "sdpa", "text_config": "someone/kernel"}},
        {"experts_implementation": "org/experts@main"},
        {"text_config": {"_attn_implementation": "org/kernel"}},
    ],
)
def test_a_hub_kernel_named_by_config_json_is_refused(folder, capsys, field):
    edit_json(folder / "config.json", **field)
    refused(capsys, eval_args(folder), "not an implementation transformers ships")


def test_a_folder_holding_a_gguf_is_checked_too(folder, capsys):
    (folder / "model.gguf").write_bytes(b"GGUF not really")
    edit_json(folder / "tokenizer_config.json", auto_map=plant_code(folder))
    refused(capsys, ["eval", str(folder / "model.gguf")], "auto_map")
    assert not (folder / "RAN").exists()


def test_exchange_checkpoints_with_code_fields_are_refused(tmp_path):
    scheme = scheme_from_name("w4a16", group_size=32, symmetric=True)
    model, _ = convert_model(tiny_llama(), QuantConfig(default=scheme), progress=False)
    for fmt in ("gptq", "awq", "compressed-tensors"):
        out = tmp_path / fmt
        save_checkpoint(model, out, fmt)
        edit_json(out / "config.json", auto_map={"AutoModelForCausalLM": "evil.Model"})
        with pytest.raises(CheckpointError, match="auto_map"):
            load_checkpoint(out)
        edit_json(out / "config.json", auto_map=None, _attn_implementation="org/kernel")
        with pytest.raises(CheckpointError, match="org/kernel"):
            load_checkpoint(out)


def test_a_tokenizer_file_leading_outside_is_refused(folder, tmp_path, capsys):
    outside = tmp_path / "outside.json"
    shutil.move(folder / "tokenizer.json", outside)
    os.symlink(outside, folder / "tokenizer.json")
    refused(capsys, eval_args(folder), "symlink leading outside")


def test_a_tokenizer_file_that_is_a_fifo_is_refused_without_hanging(folder, capsys):
    (folder / "tokenizer.json").unlink()
    os.mkfifo(folder / "tokenizer.json")
    refused(capsys, eval_args(folder), "not a regular file")


def test_a_tokenizer_config_naming_a_file_elsewhere_is_refused(folder, capsys):
    edit_json(folder / "tokenizer_config.json", tokenizer_file="../../etc/passwd")
    refused(capsys, eval_args(folder), "tokenizer_file")


def test_a_corrupt_tokenizer_is_one_line(folder, capsys):
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Nope"')
    refused(capsys, eval_args(folder), "cannot load its tokenizer")


def test_no_tokenizer_is_refused_where_one_is_needed_only(folder, capsys):
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    refused(capsys, eval_args(folder), "no tokenizer files")
    out = folder.parent / "q"
    argv = ["quantize", str(folder), "--group-size", "32", "--symmetric", "--out", str(out)]
    assert main(argv) == 0
    assert load_checkpoint(out) is not None


def test_pickled_weights_are_never_read(folder, capsys):
    weights = tiny_llama(vocab=64).state_dict()
    (folder / "model.safetensors").unlink()
    torch.save(weights, folder / "pytorch_model.bin")
    refused(capsys, eval_args(folder), "pickle")


@pytest.mark.parametrize(
    "field", [{"vocab_size": 2**26}, {"hidden_size": 2**16}, {"intermediate_size": 2**24}]
)
def test_a_config_larger_than_its_files_is_refused_before_allocating(folder, capsys, field):
    edit_json(folder / "config.json", **field)
    refused(capsys, eval_args(folder), "hold only")
