"""Fuzzing the exchange-format loaders (compressed-tensors, GPTQ, AWQ) with damaged folders.

These formats carry no digests, so a damaged payload can load as different
numbers; what must hold is that ``load_checkpoint`` either returns a model or
raises a ``TorchquantError``, never another exception type and never a crash.
Edits of the headers and JSON files that a loader must notice are covered in
the checkpoint catalogue and the format tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from checkpoint_tools import make_hf_model, scratch_copy
from fuzz_strategies import edit_header_fields, edit_raw_bytes, fuzz_settings, json_edits
from hypothesis import event, given
from hypothesis import strategies as st

from torchquant import QuantConfig, TorchquantError, convert_model, scheme_from_name
from torchquant.formats.dispatch import load_checkpoint, save_checkpoint

FORMATS = ["compressed-tensors", "gptq", "awq"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    config = QuantConfig(scheme_from_name("w4a16", group_size=32))
    for fmt in FORMATS:
        model, _ = convert_model(make_hf_model(), config, progress=False)
        save_checkpoint(model, root / fmt, fmt)
    return root


def _loads_or_refuses(directory: Path) -> None:
    try:
        load_checkpoint(directory)
    except TorchquantError as exc:
        event(f"refused: {type(exc).__name__}")
        return
    event("loaded")


@pytest.mark.parametrize(
    "edit", [edit_raw_bytes, edit_header_fields], ids=["raw-bytes", "header-fields"]
)
@fuzz_settings
@given(data=st.data(), fmt=st.sampled_from(FORMATS))
def test_weight_file_edits_load_or_raise_our_error(saved, edit, data, fmt):
    with scratch_copy(saved / fmt) as directory:
        edit(data, directory / "model.safetensors")
        _loads_or_refuses(directory)


@fuzz_settings
@given(data=st.data(), fmt=st.sampled_from(FORMATS), target=st.sampled_from(["qc", "any"]))
def test_config_json_edits_load_or_raise_our_error(saved, data, fmt, target):
    """Edits of ``config.json`` (often inside ``quantization_config``) and GPTQ's own file."""
    with scratch_copy(saved / fmt) as directory:
        names = sorted(p.name for p in directory.glob("*.json"))
        path = directory / data.draw(st.sampled_from(names))
        doc = json.loads(path.read_text())
        if target == "qc" and isinstance(doc.get("quantization_config"), dict):
            doc["quantization_config"] = data.draw(json_edits(doc["quantization_config"]))
        else:
            doc = data.draw(json_edits(doc))
        path.write_text(json.dumps(doc))
        _loads_or_refuses(directory)
