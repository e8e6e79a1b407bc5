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
import tempfile
from pathlib import Path

import pytest
import torch
from checkpoint_tools import (
    SmallCheckpoint,
    make_model,
    metadata_of,
    reseal,
    reseal_config_json,
    scratch_copy,
)
from fuzz_strategies import (
    apply_byte_edits,
    byte_edits,
    edit_header_fields,
    edit_raw_bytes,
    fuzz_settings,
    json_edits,
)
from hypothesis import event, given
from hypothesis import strategies as st
from safetensors.torch import save_file

from torchquant import QuantConfig, TorchquantError
from torchquant.serialization import INDEX_FILE, KEY_LAYERS, SINGLE_FILE
from torchquant.streaming import convert_from_safetensors


def check(source: SmallCheckpoint, directory: Path, *, must_match: bool = True) -> str:
    """Load ``directory``: our own error, or (if ``must_match``) the pristine tensors."""
    try:
        model = source.load(directory)
    except TorchquantError as exc:
        event(f"refused: {str(exc).split(':')[0][:40]}")
        return "refused"
    event("loaded")
    if must_match:
        state = model.state_dict()
        assert state.keys() == source.state.keys()
        for name, want in source.state.items():
            assert torch.equal(state[name], want), name
    return "loaded"


def _check_raw_byte_edits(source: SmallCheckpoint, data) -> None:
    with scratch_copy(source.directory) as directory:
        edit_raw_bytes(data, data.draw(st.sampled_from(sorted(directory.glob("*.safetensors")))))
        check(source, directory)


@fuzz_settings
@given(data=st.data(), kind=st.sampled_from(["single", "sharded"]))
def test_raw_byte_edits_load_identically_or_raise_our_error(pristine, data, kind):
    _check_raw_byte_edits(pristine[kind], data)


@fuzz_settings
@given(data=st.data())
def test_raw_byte_edits_of_a_hf_checkpoint_load_identically_or_raise_our_error(pristine_hf, data):
    _check_raw_byte_edits(pristine_hf, data)


@fuzz_settings
@given(data=st.data())
def test_header_field_edits_load_identically_or_raise_our_error(pristine, data):
    with scratch_copy(pristine["single"].directory) as directory:
        edit_header_fields(data, directory / SINGLE_FILE)
        check(pristine["single"], directory)


@fuzz_settings
@given(data=st.data())
def test_resealed_layer_metadata_loads_or_raises_our_error(pristine, data):
    """A tamperer who rewrites the layer descriptions and recomputes the digests."""
    with scratch_copy(pristine["single"].directory) as directory:
        path = directory / SINGLE_FILE
        meta = metadata_of(path)
        layers = data.draw(json_edits(json.loads(meta[KEY_LAYERS])))
        reseal(path, metadata={**meta, KEY_LAYERS: json.dumps(layers)})
        check(pristine["single"], directory, must_match=False)


@fuzz_settings
@given(data=st.data(), raw=st.booleans())
def test_index_edits_load_identically_or_raise_our_error(pristine, data, raw):
    with scratch_copy(pristine["sharded"].directory) as directory:
        index_path = directory / INDEX_FILE
        if raw:
            text = index_path.read_bytes()
            index_path.write_bytes(apply_byte_edits(text, data.draw(byte_edits(len(text), 64))))
        else:
            index = data.draw(json_edits(json.loads(index_path.read_text())))
            index_path.write_text(json.dumps(index))
        check(pristine["sharded"], directory)


@fuzz_settings
@given(data=st.data(), sealed=st.booleans())
def test_config_json_edits_load_or_raise_our_error(pristine_hf, data, sealed):
    """Unsealed edits must be refused or harmless; sealed ones may load a different model."""
    with scratch_copy(pristine_hf.directory) as directory:
        config = json.loads((directory / "config.json").read_text())
        (directory / "config.json").write_text(json.dumps(data.draw(json_edits(config))))
        if sealed:
            reseal_config_json(directory)
        check(pristine_hf, directory, must_match=not sealed)


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
        path.write_bytes(float_file)
        (edit_raw_bytes if raw else edit_header_fields)(data, path)
        try:
            convert_from_safetensors(
                make_model().to("meta"), [path], QuantConfig("w4a16", ignore=()), progress=False
            )
        except TorchquantError as exc:
            event(f"refused: {type(exc).__name__}")
            return
        event("converted")
