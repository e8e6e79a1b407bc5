"""W4A4 / W8A8 microscaled layers (nvfp4, mxfp4, mxfp8) in compressed-tensors.

Our export reads as the library's own presets (NVFP4, MXFP4, MXFP8) to the library's
config parser, decompresses in the library to our weights bit for bit (MXFP8), and
round-trips exactly, the calibrated NVFP4 activation global scale included; a dynamic
NVFP4 global scale, which the format cannot hold, is refused by name.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_llama

from torchquant import (
    ActivationQuant,
    CheckpointError,
    QuantConfig,
    QuantScheme,
    WeightQuant,
    convert_model,
)
from torchquant.formats.compressed_tensors import load_compressed_tensors, save_compressed_tensors
from torchquant.modules import QuantLinear

pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors import BaseCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

STATIC_NVFP4 = QuantScheme(WeightQuant("nvfp4"), ActivationQuant("nvfp4", dynamic=False))
SCHEMES = {"mxfp4": "mxfp4", "mxfp8": "mxfp8", "nvfp4 static": STATIC_NVFP4}
PRESETS = {"mxfp4": "MXFP4", "mxfp8": "MXFP8", "nvfp4 static": "NVFP4"}
FORMATS = {"mxfp4": "mxfp4-pack-quantized", "mxfp8": "mxfp8-quantized"}
FORMATS["nvfp4 static"] = "nvfp4-pack-quantized"


def _quantized(scheme, dtype=torch.float32):
    model = tiny_llama(
        dtype=dtype, vocab=128, hidden=64, inter=96, layers=2, heads=4, kv_heads=2,
        tie_word_embeddings=True,
    )  # fmt: skip
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    config = QuantConfig(default=scheme)
    return convert_model(model, config, calibration_data=ids, progress=False)[0]


def _layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


@pytest.mark.parametrize("name", list(SCHEMES))
def test_round_trip_is_bit_exact_and_reads_as_the_library_preset(tmp_path, name):
    model = _quantized(SCHEMES[name])
    save_compressed_tensors(model, tmp_path / "ct")
    loaded = load_compressed_tensors(tmp_path / "ct")
    ours, back = model.state_dict(), loaded.state_dict()
    assert list(ours) == list(back)
    assert all(ours[key].dtype == back[key].dtype for key in ours)
    assert all(
        torch.equal(ours[key].view(torch.uint8), back[key].view(torch.uint8)) for key in ours
    )
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qc["format"] == FORMATS[name]
    (group,) = QuantizationConfig.model_validate(qc).config_groups.values()
    preset = preset_name_to_scheme(PRESETS[name], ["Linear"])
    pairs = ((group.weights, preset.weights), (group.input_activations, preset.input_activations))
    for ours, theirs in pairs:
        for field in ("num_bits", "type", "strategy", "group_size", "symmetric", "dynamic"):
            assert getattr(ours, field) == getattr(theirs, field), field


def test_static_nvfp4_stores_its_input_global_scale(tmp_path):
    model = _quantized(STATIC_NVFP4)
    save_compressed_tensors(model, tmp_path / "ct")
    state = load_file(tmp_path / "ct" / "model.safetensors")
    for name, layer in _layers(model).items():
        stored = state[f"{name}.input_global_scale"]
        assert stored.dtype == torch.float32 and torch.equal(stored, layer.input_scale)
        assert float(stored) > 0


def test_library_decompresses_our_mxfp8_weights(tmp_path):
    model = _quantized("mxfp8")
    save_compressed_tensors(model, tmp_path / "ct")
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    (group,) = QuantizationConfig.model_validate(qc).config_groups.values()
    compressor = BaseCompressor.get_value_from_registry(group.format)
    state = load_file(tmp_path / "ct" / "model.safetensors")
    for name, layer in _layers(model).items():
        local = {k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(f"{name}.")}
        theirs = compressor.decompress(local, group)["weight"]
        assert torch.equal(theirs.float(), layer.dequantized_weight(torch.float32)), name


def test_a_dynamic_nvfp4_global_scale_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="dynamic global scale have no compressed-tensors"):
        save_compressed_tensors(_quantized("nvfp4"), tmp_path / "ct")
