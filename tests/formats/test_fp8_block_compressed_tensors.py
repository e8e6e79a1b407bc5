"""FP8 block-wise in compressed-tensors: export, import, the library's parsing and decompression,
transformers loading our folder, and the INT-only formats refusing it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_llama

from torchquant import CheckpointError, QuantConfig, convert_model
from torchquant.formats.awq import save_awq
from torchquant.formats.compressed_tensors import load_compressed_tensors, save_compressed_tensors
from torchquant.formats.gptq import save_gptq
from torchquant.modules import QuantLinear

transformers = pytest.importorskip("transformers")
ct = pytest.importorskip("compressed_tensors")
pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ["fp8-block", "w8a16-fp8-block"]
# -- hidden 192: partial 64-wide blocks along K and N; hidden 256: whole blocks only
PARTIAL = {"vocab": 128, "hidden": 192, "inter": 320, "heads": 4, "kv_heads": 2}
WHOLE = {"vocab": 128, "hidden": 256, "inter": 384, "heads": 4, "kv_heads": 2}


def _quantized(name: str, shape: dict, dtype: torch.dtype = torch.float32):
    model = tiny_llama(dtype=dtype, tie_word_embeddings=True, **shape)
    return convert_model(model, QuantConfig(name), progress=False)[0]


def _config(folder) -> dict:
    return json.loads((folder / "config.json").read_text())["quantization_config"]


@pytest.mark.parametrize("name", NAMES)
def test_export_import_round_trip_is_bit_exact(tmp_path, name):
    model = _quantized(name, PARTIAL)
    save_compressed_tensors(model, tmp_path / "ct")
    loaded = load_compressed_tensors(tmp_path / "ct")
    ours = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    for layer_name, layer in ours.items():
        back = loaded.get_submodule(layer_name)
        assert back.scheme == layer.scheme
        assert torch.equal(back.qweight.view(torch.uint8), layer.qweight.view(torch.uint8))
        assert torch.equal(back.scales, layer.scales)
    ids = torch.randint(0, 128, (2, 9))
    assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("name", NAMES)
def test_the_library_parses_the_config_and_decompresses_the_weights(tmp_path, name):
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    model = _quantized(name, PARTIAL)
    save_compressed_tensors(model, tmp_path / "ct")
    group = QuantizationConfig.model_validate(_config(tmp_path / "ct")).config_groups["group_0"]
    assert group.weights.strategy == "block" and group.weights.block_structure == [128, 128]
    assert group.format == ("float-quantized" if name == "fp8-block" else "naive-quantized")
    if name == "fp8-block":
        acts = group.input_activations
        assert (acts.strategy, acts.group_size, acts.dynamic, acts.type) == (
            "group", 128, True, "float",
        )  # fmt: skip
    else:
        assert group.input_activations is None
    state = load_file(tmp_path / "ct" / "model.safetensors")
    compressor = BaseCompressor.get_value_from_registry(group.format)
    for layer_name, layer in model.named_modules():
        if isinstance(layer, QuantLinear):
            prefix = f"{layer_name}."
            local = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            assert local["weight_scale"].shape == layer.scales.shape
            theirs = compressor.decompress(local, group)["weight"]
            assert torch.equal(theirs.float(), layer.dequantized_weight(torch.float32))


def test_transformers_loads_the_folder_and_computes_what_we_compute(tmp_path):
    """transformers' compressed-tensors path (its dynamic group quantization needs K a
    multiple of 128, so this model has whole blocks) gives our logits to float32 rounding."""
    model = _quantized("fp8-block", WHOLE)
    save_compressed_tensors(model, tmp_path / "ct")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ct").eval()
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_a_scale_of_the_wrong_block_grid_is_refused(tmp_path):
    from safetensors.torch import save_file

    model = _quantized("fp8-block", PARTIAL)
    save_compressed_tensors(model, tmp_path / "ct")
    path = tmp_path / "ct" / "model.safetensors"
    state = load_file(path)
    key = "model.layers.0.mlp.down_proj.weight_scale"
    state[key] = state[key].t().contiguous()
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"down_proj.weight_scale: shape.*in \(128, 128\)"):
        load_compressed_tensors(tmp_path / "ct")


def test_mismatched_activation_group_is_refused(tmp_path):
    model = _quantized("fp8-block", PARTIAL)
    save_compressed_tensors(model, tmp_path / "ct")
    config_path = tmp_path / "ct" / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"]["config_groups"]["group_0"]["input_activations"]["group_size"] = (
        64
    )
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="block columns"):
        load_compressed_tensors(tmp_path / "ct")


@pytest.mark.parametrize("save", [save_gptq, save_awq])
def test_int_only_formats_refuse_block_fp8(tmp_path, save):
    model = _quantized("w8a16-fp8-block", PARTIAL)
    with pytest.raises(CheckpointError, match="block128x128 a16 is not an INT weight"):
        save(model, tmp_path / "out")
