"""NVFP4 and MXFP4 in compressed-tensors, judged by the compressed-tensors library itself.

Our export decompresses in the library to our weights bit for bit; a checkpoint whose
tensors the library compressed loads to the weights our own rounding gives; the
round trip is exact; and what the library cannot hold is refused by name.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import tiny_llama

from torchquant import CheckpointError, QuantConfig, convert_model
from torchquant.formats.compressed_tensors import load_compressed_tensors, save_compressed_tensors
from torchquant.modules import QuantLinear

pytest.importorskip("transformers")
ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors import BaseCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationConfig  # noqa: E402
from compressed_tensors.quantization.utils.helpers import (  # noqa: E402
    calculate_qparams,
    generate_gparam,
)

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ["nvfp4a16", "mxfp4a16"]
FORMATS = {"nvfp4a16": "nvfp4-pack-quantized", "mxfp4a16": "mxfp4-pack-quantized"}


def _model(dtype=torch.float32, **kw):
    shape = {"vocab": 128, "hidden": 64, "inter": 96, "layers": 2, "heads": 4, "kv_heads": 2}
    return tiny_llama(dtype=dtype, tie_word_embeddings=True, **{**shape, **kw})


def _quantized(name, dtype=torch.float32, **kw):
    model, _ = convert_model(_model(dtype, **kw), QuantConfig(default=name), progress=False)
    return model


def _layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def _library_group(folder):
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    (group,) = QuantizationConfig.model_validate(qc).config_groups.values()
    return qc, group


def _local(state, prefix):
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_export_import_round_trip_is_bit_exact(tmp_path, name, dtype):
    model = _quantized(name, dtype)
    save_compressed_tensors(model, tmp_path / "ct")
    loaded = load_compressed_tensors(tmp_path / "ct")
    for (key, ours), (key2, back) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert key == key2 and ours.dtype == back.dtype
        assert torch.equal(ours.view(torch.uint8), back.view(torch.uint8)), key
    for layer_name, layer in _layers(model).items():
        back, x = loaded.get_submodule(layer_name), torch.randn(3, layer.in_features).to(dtype)
        assert back.dtype == dtype and torch.equal(back(x), layer(x)), layer_name
    if dtype == torch.float32:  # -- a bf16 skeleton recomputes its rotary table in float32
        ids = torch.randint(0, 128, (2, 9))
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    qc, _ = _library_group(tmp_path / "ct")
    assert qc["format"] == FORMATS[name] and qc["ignore"] == ["lm_head"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_library_decompresses_our_export_to_our_weights(tmp_path, name, dtype):
    model = _quantized(name, dtype)
    save_compressed_tensors(model, tmp_path / "ct")
    _, group = _library_group(tmp_path / "ct")
    assert group.format == FORMATS[name]
    compressor = BaseCompressor.get_value_from_registry(group.format)
    state = load_file(tmp_path / "ct" / "model.safetensors")
    layers = _layers(model)
    assert len(layers) == 14
    for layer_name, layer in layers.items():
        theirs = compressor.decompress(_local(state, f"{layer_name}."), group)["weight"]
        # -- the library decompresses to bf16 (its unpacked codes' dtype)
        assert theirs.dtype == torch.bfloat16
        assert torch.equal(theirs, layer.dequantized_weight(torch.bfloat16)), layer_name


def _library_compressed(weight, group):
    """The library's own scales (llm-compressor's recipe) and compressor for one weight."""
    n, k = weight.shape
    args = group.weights
    blocks = weight.reshape(n, k // args.group_size, args.group_size)
    global_scale = None
    if args.strategy == "tensor_group":
        global_scale = generate_gparam(weight.min(), weight.max())
    scale, _ = calculate_qparams(blocks.amin(-1), blocks.amax(-1), args, global_scale)
    state = {"weight": weight, "weight_scale": scale.to(weight.dtype)}
    if global_scale is not None:
        state["weight_global_scale"] = global_scale
    compressor = BaseCompressor.get_value_from_registry(group.format)
    return compressor.compress(state, group)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_library_compressed_nvfp4_checkpoint_loads_to_our_rounding(tmp_path, dtype):
    float_model = _model(dtype)
    model = _quantized("nvfp4a16", dtype)  # -- the same seed: the same float weights
    save_compressed_tensors(model, tmp_path / "ct")
    _, group = _library_group(tmp_path / "ct")
    state = load_file(tmp_path / "ct" / "model.safetensors")
    for layer_name in _layers(model):
        weight = float_model.get_submodule(layer_name).weight.detach()
        for key, t in _library_compressed(weight, group).items():
            state[f"{layer_name}.{key}"] = t.contiguous()
    save_file(state, tmp_path / "ct" / "model.safetensors", metadata={"format": "pt"})
    loaded = load_compressed_tensors(tmp_path / "ct")
    for layer_name, layer in _layers(model).items():
        back = loaded.get_submodule(layer_name)
        assert torch.equal(back.qweight, layer.qweight), layer_name
        assert torch.equal(back.scales.view(torch.uint8), layer.scales.view(torch.uint8))
        assert torch.equal(back.global_scale, layer.global_scale)


def test_partial_last_blocks_are_refused_for_export(tmp_path):
    model = _quantized("mxfp4a16", hidden=48)  # K = 48: a 16-wide last MXFP4 block
    with pytest.raises(CheckpointError, match="MXFP4 with K=48 leaves a partial block of 16"):
        save_compressed_tensors(model, tmp_path / "ct")


@pytest.mark.parametrize("fmt", ["gptq", "awq"])
def test_int_only_formats_refuse_fp4(tmp_path, fmt):
    from torchquant.formats.dispatch import save_checkpoint

    with pytest.raises(CheckpointError, match="w-nvfp4 g16 a16 is not an INT weight"):
        save_checkpoint(_quantized("nvfp4a16"), tmp_path / fmt, fmt)


def test_fp4_tensors_that_do_not_fit_the_layer_are_refused(tmp_path):
    model = _quantized("nvfp4a16")
    save_compressed_tensors(model, tmp_path / "ct")
    state = load_file(tmp_path / "ct" / "model.safetensors")
    key = "model.layers.0.mlp.down_proj.weight_scale"
    state[key] = state[key][:, :-1].contiguous()
    save_file(state, tmp_path / "ct" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="down_proj.weight_scale: .*expected"):
        load_compressed_tensors(tmp_path / "ct")
