"""MXFP4's opt-in E8M0 scale rounding through checkpoints: the native format keeps the
option (weights and activations) and loads bit-exact; ``mxfp4-pack-quantized`` stays the
plain layout, which compressed-tensors decompresses to our weights bit for bit, and the
library's own compression of the float weights is what this rounding stores.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_llama

from torchquant import ActivationQuant, QuantConfig, QuantScheme, WeightQuant, convert_model
from torchquant.formats.compressed_tensors import load_compressed_tensors, save_compressed_tensors
from torchquant.modules import QuantLinear
from torchquant.ops.microscaled import linear_microscaled_reference
from torchquant.serialization import load_quantized, save_quantized

pytestmark = pytest.mark.usefixtures("one_thread")

CT = "compressed-tensors"
SCHEMES = {
    "mxfp4a16": QuantScheme(WeightQuant("mxfp4", scale_rounding=CT)),
    "mxfp4": QuantScheme(
        WeightQuant("mxfp4", scale_rounding=CT), ActivationQuant("mxfp4", scale_rounding=CT)
    ),
}
SHAPE = {"vocab": 128, "hidden": 64, "inter": 96, "layers": 2, "heads": 4, "kv_heads": 2}


def _model(dtype=torch.float32):
    return tiny_llama(dtype=dtype, tie_word_embeddings=True, **SHAPE)


def _quantized(scheme, dtype=torch.float32):
    return convert_model(_model(dtype), QuantConfig(default=scheme), progress=False)[0]


def _layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


@pytest.mark.parametrize("name", list(SCHEMES))
def test_native_checkpoint_keeps_the_rounding_and_loads_bit_exact(tmp_path, name):
    scheme = SCHEMES[name]
    model = _quantized(scheme)
    plain_act = None if scheme.activation is None else ActivationQuant("mxfp4")
    spec = _quantized(QuantScheme(WeightQuant("mxfp4"), plain_act))
    assert any(
        not torch.equal(m.scales, _layers(spec)[n].scales) for n, m in _layers(model).items()
    )
    save_quantized(model, tmp_path / "ckpt", config=QuantConfig(scheme))
    text = json.dumps(json.loads((tmp_path / "ckpt" / "config.json").read_text()))
    assert text.count('"scale_rounding": "compressed-tensors"') >= (2 if name == "mxfp4" else 1)
    loaded = load_quantized(tmp_path / "ckpt", _model())
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[key]), key
    layer = loaded.model.layers[1].mlp.down_proj
    assert layer.scheme == scheme
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
        if name == "mxfp4":  # -- the loaded activations round as saved, not as the spec
            x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(1))
            args = (layer.qweight, layer.scales, None, layer.bias, None, "mxfp4")
            want = linear_microscaled_reference(x * 5, *args, CT)
            assert torch.equal(layer.reference_forward(x * 5), want)
            assert not torch.equal(linear_microscaled_reference(x * 5, *args, "ocp"), want)


pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors import BaseCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationConfig  # noqa: E402
from compressed_tensors.quantization.utils.helpers import calculate_qparams  # noqa: E402


def _library_group(folder):
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    (group,) = QuantizationConfig.model_validate(qc).config_groups.values()
    return qc, group


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_library_decompresses_the_export_and_compresses_floats_to_the_same_bytes(tmp_path, dtype):
    float_model = _model(dtype)
    model = _quantized(SCHEMES["mxfp4a16"], dtype)
    save_compressed_tensors(model, tmp_path / "ct")
    qc, group = _library_group(tmp_path / "ct")
    assert qc["format"] == "mxfp4-pack-quantized"
    compressor = BaseCompressor.get_value_from_registry(group.format)
    state = load_file(tmp_path / "ct" / "model.safetensors")
    for name, layer in _layers(model).items():
        local = {k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(f"{name}.")}
        theirs = compressor.decompress(local, group)["weight"]
        assert torch.equal(theirs, layer.dequantized_weight(torch.bfloat16)), name
        # -- the library's own scales and codes for the float weight: ours, byte for byte
        weight = float_model.get_submodule(name).weight.detach()
        n, k = weight.shape
        blocks = weight.reshape(n, k // 32, 32)
        scale, _ = calculate_qparams(blocks.amin(-1), blocks.amax(-1), group.weights)
        packed = compressor.compress({"weight": weight, "weight_scale": scale.to(dtype)}, group)
        assert torch.equal(packed["weight_scale"], layer.scales), name
        assert torch.equal(packed["weight_packed"], layer.qweight), name
    loaded = load_compressed_tensors(tmp_path / "ct")
    for name, layer in _layers(model).items():
        assert torch.equal(loaded.get_submodule(name).qweight, layer.qweight)
        assert torch.equal(loaded.get_submodule(name).scales, layer.scales)
