"""W4A8 in compressed-tensors: pack-quantized INT4 weights with dynamic per-token 8-bit
``input_activations`` (the library's W4A8 / W4AFP8 presets), checked by the library's own
config parsing and decompression, and by transformers loading the folder."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_llama

from torchquant import CheckpointError, QuantConfig, convert_model, scheme_from_name
from torchquant.formats.compressed_tensors import load_compressed_tensors, save_compressed_tensors
from torchquant.modules import QuantLinear

transformers = pytest.importorskip("transformers")
ct = pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed")

pytestmark = pytest.mark.usefixtures("one_thread")

PRESETS = {"w4a8": "W4A8", "w4a8-fp8": "W4AFP8"}


def _quantized(name: str, group_size: int = 32, hidden: int = 64) -> torch.nn.Module:
    model = tiny_llama(vocab=128, hidden=hidden, inter=128, layers=2, heads=4, kv_heads=2,
                       tie_word_embeddings=True)  # fmt: skip
    scheme = scheme_from_name(name, group_size)
    model, _ = convert_model(model, QuantConfig(scheme), progress=False)
    return model


def _quantization_config(folder) -> dict:
    return json.loads((folder / "config.json").read_text())["quantization_config"]


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize(("group_size", "hidden"), [(32, 64), (64, 96)])  # -- 96: partial group
def test_roundtrip_is_exact(tmp_path, name, group_size, hidden):
    model = _quantized(name, group_size, hidden)
    save_compressed_tensors(model, tmp_path / "ct")
    loaded = load_compressed_tensors(tmp_path / "ct")
    layer = loaded.model.layers[0].self_attn.q_proj
    assert isinstance(layer, QuantLinear) and layer.scheme.is_w4a8
    assert layer.scheme.activation == model.model.layers[0].self_attn.q_proj.scheme.activation
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("name", list(PRESETS))
def test_config_is_the_library_preset_and_it_decompresses_our_weights(tmp_path, name):
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

    model = _quantized(name, group_size=128, hidden=128)
    save_compressed_tensors(model, tmp_path / "ct")
    qc = _quantization_config(tmp_path / "ct")
    assert qc["format"] == "pack-quantized"
    group = QuantizationConfig.model_validate(qc).config_groups["group_0"]
    preset = PRESET_SCHEMES[PRESETS[name]]
    for part in ("weights", "input_activations"):
        ours, theirs = getattr(group, part), preset[part]
        for field in ("num_bits", "type", "symmetric", "strategy", "group_size", "dynamic"):
            assert getattr(ours, field) == getattr(theirs, field), (part, field)
    state = load_file(tmp_path / "ct" / "model.safetensors")
    compressor = BaseCompressor.get_value_from_registry("pack-quantized")
    for layer_name, layer in model.named_modules():
        if not isinstance(layer, QuantLinear):
            continue
        prefix = f"{layer_name}."
        local = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        theirs = compressor.decompress(local, group)["weight"]
        assert torch.equal(theirs.float(), layer.dequantized_weight(torch.float32)), layer_name


@pytest.mark.parametrize(("name", "tol"), [("w4a8-fp8", 1e-5), ("w4a8", 2e-2)])
def test_transformers_loads_the_folder_and_computes_what_we_compute(tmp_path, name, tol):
    """transformers' compressed-tensors path fake-quantizes the activations per token and
    multiplies by the decompressed weight: FP8 gives our logits to float32 rounding; INT8
    differs by its scale convention (max |x| / 127.5 where we, as vLLM's kernels, take
    max |x| / 127), a fraction of one activation step."""
    model = _quantized(name, group_size=32)
    save_compressed_tensors(model, tmp_path / "ct")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ct").eval()
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, model(ids).logits, rtol=tol, atol=tol)


def test_packed_weights_with_activations_other_than_w4a8_are_refused(tmp_path):
    model = _quantized("w4a8", group_size=32)
    save_compressed_tensors(model, tmp_path / "ct")
    config_path = tmp_path / "ct" / "config.json"
    config = json.loads(config_path.read_text())
    weights = config["quantization_config"]["config_groups"]["group_0"]["weights"]
    weights["symmetric"] = False  # -- asymmetric INT4 with INT8 activations: no such scheme
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="q_proj"):
        load_compressed_tensors(tmp_path / "ct")
