"""Fuzzing checkpoint bytes: a damaged checkpoint loads identically or raises our own error.

Starting from real small checkpoints (single file, sharded, and a tiny Hugging Face
model with ``config.json``), hypothesis edits raw bytes of the safetensors file,
fields of its parsed header, the shard index and ``config.json``.  Loading must
then either give exactly the saved tensors or raise a ``TorchquantError``; any
other exception type (or a crash of the process) fails the test.  Edits that
recompute the digests play a deliberate tamperer: those may load a different
model, but still never fail with a foreign exception.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from checkpoint_tools import (
    make_model,
    metadata_of,
    read_safetensors,
    reseal,
    reseal_config_json,
    save_small_checkpoint,
    save_small_hf_checkpoint,
    write_safetensors,
)
from fuzz_strategies import apply_byte_edits, byte_edits, fuzz_settings, json_edits
from hypothesis import event, given
from hypothesis import strategies as st
from safetensors.torch import save_file

from torchquant import QuantConfig, TorchquantError
from torchquant.serialization import INDEX_FILE, KEY_LAYERS, SINGLE_FILE, load_quantized
from torchquant.streaming import convert_from_safetensors


class Pristine:
    """One saved checkpoint of each kind, with its files' bytes and its state for comparison."""

    def __init__(self, root: Path, kind: str) -> None:
        self.kind = kind
        self.directory = root / kind
        if kind == "hf":
            model = save_small_hf_checkpoint(self.directory)
        else:
            kwargs = {"max_shard_size": 20_000} if kind == "sharded" else {}
            model = save_small_checkpoint(self.directory, **kwargs)
        self.state = {k: v.clone() for k, v in model.state_dict().items()}

    def copy(self, into: Path) -> Path:
        target = into / "ck"
        shutil.copytree(self.directory, target)
        return target

    def load(self, directory: Path):
        return load_quantized(directory, None if self.kind == "hf" else make_model(1))

    def check(self, directory: Path, *, must_match: bool = True) -> str:
        """Load ``directory``: our own error, or (if ``must_match``) the pristine tensors."""
        try:
            model = self.load(directory)
        except TorchquantError as exc:
            event(f"refused: {str(exc).split(':')[0][:40]}")
            return "refused"
        event("loaded")
        if must_match:
            state = model.state_dict()
            assert state.keys() == self.state.keys()
            for name, want in self.state.items():
                assert torch.equal(state[name], want), name
        return "loaded"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("pristine")
    return {kind: Pristine(root, kind) for kind in ("single", "sharded")}


@pytest.fixture(scope="module")
def pristine_hf(tmp_path_factory):
    return Pristine(tmp_path_factory.mktemp("pristine_hf"), "hf")


def _header_end(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def _edit_raw_bytes(source: Pristine, data, tmp: str) -> Path:
    directory = source.copy(Path(tmp))
    path = data.draw(st.sampled_from(sorted(directory.glob("*.safetensors"))))
    raw = path.read_bytes()
    path.write_bytes(apply_byte_edits(raw, data.draw(byte_edits(len(raw), _header_end(path)))))
    return directory


@fuzz_settings
@given(data=st.data(), kind=st.sampled_from(["single", "sharded"]))
def test_raw_byte_edits_load_identically_or_raise_our_error(pristine, data, kind):
    with tempfile.TemporaryDirectory() as tmp:
        pristine[kind].check(_edit_raw_bytes(pristine[kind], data, tmp))


@fuzz_settings
@given(data=st.data())
def test_raw_byte_edits_of_a_hf_checkpoint_load_identically_or_raise_our_error(pristine_hf, data):
    with tempfile.TemporaryDirectory() as tmp:
        pristine_hf.check(_edit_raw_bytes(pristine_hf, data, tmp))


@fuzz_settings
@given(data=st.data())
def test_header_field_edits_load_identically_or_raise_our_error(pristine, data):
    source = pristine["single"]
    with tempfile.TemporaryDirectory() as tmp:
        directory = source.copy(Path(tmp))
        header, payload = read_safetensors(directory / SINGLE_FILE)
        edited = data.draw(json_edits(header))
        edited = edited if isinstance(edited, dict) else {"__metadata__": edited}
        write_safetensors(directory / SINGLE_FILE, edited, payload)
        source.check(directory)


@fuzz_settings
@given(data=st.data())
def test_resealed_layer_metadata_loads_or_raises_our_error(pristine, data):
    """A tamperer who rewrites the layer descriptions and recomputes the digests."""
    source = pristine["single"]
    with tempfile.TemporaryDirectory() as tmp:
        directory = source.copy(Path(tmp))
        path = directory / SINGLE_FILE
        meta = metadata_of(path)
        layers = data.draw(json_edits(json.loads(meta[KEY_LAYERS])))
        reseal(path, metadata={**meta, KEY_LAYERS: json.dumps(layers)})
        source.check(directory, must_match=False)


@fuzz_settings
@given(data=st.data(), raw=st.booleans())
def test_index_edits_load_identically_or_raise_our_error(pristine, data, raw):
    source = pristine["sharded"]
    with tempfile.TemporaryDirectory() as tmp:
        directory = source.copy(Path(tmp))
        index_path = directory / INDEX_FILE
        if raw:
            text = index_path.read_bytes()
            index_path.write_bytes(apply_byte_edits(text, data.draw(byte_edits(len(text), 64))))
        else:
            index = data.draw(json_edits(json.loads(index_path.read_text())))
            index_path.write_text(json.dumps(index))
        source.check(directory)


@fuzz_settings
@given(data=st.data(), sealed=st.booleans())
def test_config_json_edits_load_or_raise_our_error(pristine_hf, data, sealed):
    """Unsealed edits must be refused or harmless; sealed ones may load a different model."""
    source = pristine_hf
    with tempfile.TemporaryDirectory() as tmp:
        directory = source.copy(Path(tmp))
        config = json.loads((directory / "config.json").read_text())
        (directory / "config.json").write_text(json.dumps(data.draw(json_edits(config))))
        if sealed:
            reseal_config_json(directory)
        source.check(directory, must_match=not sealed)


@pytest.fixture(scope="module")
def float_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("float") / "float.safetensors"
    save_file(make_model().state_dict(), str(path))
    return path.read_bytes()


@fuzz_settings
@given(data=st.data(), raw=st.booleans())
def test_float_weight_edits_convert_or_raise_our_error(float_file, data, raw):
    """Streamed conversion reads foreign float files (no digests): any result but a crash."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "float.safetensors"
        if raw:
            edits = data.draw(
                byte_edits(len(float_file), 8 + int.from_bytes(float_file[:8], "little"))
            )
            path.write_bytes(apply_byte_edits(float_file, edits))
        else:
            path.write_bytes(float_file)
            header, payload = read_safetensors(path)
            edited = data.draw(json_edits(header))
            edited = edited if isinstance(edited, dict) else {"__metadata__": edited}
            write_safetensors(path, edited, payload)
        try:
            convert_from_safetensors(
                make_model().to("meta"), [path], QuantConfig("w4a16", ignore=()), progress=False
            )
        except TorchquantError as exc:
            event(f"refused: {type(exc).__name__}")
            return
        event("converted")
