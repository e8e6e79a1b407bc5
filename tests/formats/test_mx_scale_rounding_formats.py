"""MXFP4's opt-in E8M0 scale rounding through checkpoints: the native format keeps the
option (weights and activations) and loads bit-exact; ``mxfp4-pack-quantized`` stays the
plain layout, which compressed-tensors decompresses to our weights bit for bit, and the
library's own compression of the float weights is what this rounding stores.  A folder
the library wrote loads with its rounding (its input quantization, bit for bit); ours load
with the rounding recorded in their shards' metadata.
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


from compressed_tensors.quantization.lifecycle.forward import fake_quantize  # noqa: E402
from compressed_tensors.quantization.utils.helpers import (  # noqa: E402
    compute_dynamic_scales_and_zp,
)
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from torchquant import CheckpointError  # noqa: E402
from torchquant.formats.compressed_tensors_mx_rounding import RECORD_KEY  # noqa: E402
from torchquant.numerics.microscaling import fake_quantize_microscaled  # noqa: E402


def _library_input_quantization(x, args):
    """The library's own forward on a dynamic MX input: scales from the blocks, fake-quantized."""
    scale, zero_point = compute_dynamic_scales_and_zp(x, args, None)
    return fake_quantize(x, scale, zero_point, args)


def _library_folder(folder, dtype, fmt):
    """A W+A MX folder as the library writes it: its own compression of the float
    weights, the preset's args, no torchquant metadata."""
    plain = QuantScheme(WeightQuant(fmt), ActivationQuant(fmt))
    save_compressed_tensors(_quantized(plain), folder)
    qc, group = _library_group(folder)
    compressor = BaseCompressor.get_value_from_registry(group.format)
    state = load_file(folder / "model.safetensors")
    float_model = _model(dtype)
    for name in _layers(_quantized(plain)):
        weight = float_model.get_submodule(name).weight.detach()
        n, k = weight.shape
        blocks = weight.reshape(n, k // 32, 32)
        scale, _ = calculate_qparams(blocks.amin(-1), blocks.amax(-1), group.weights)
        packed = compressor.compress({"weight": weight, "weight_scale": scale.to(dtype)}, group)
        state.update({f"{name}.{key}": t.contiguous() for key, t in packed.items()})
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return group


MX_CT = {
    "mxfp4": SCHEMES["mxfp4"],
    "mxfp8": QuantScheme(
        WeightQuant("mxfp8", scale_rounding=CT), ActivationQuant("mxfp8", scale_rounding=CT)
    ),
}


@pytest.mark.parametrize("fmt", list(MX_CT))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_library_mx_folder_quantizes_inputs_as_the_library_does(tmp_path, dtype, fmt):
    group = _library_folder(tmp_path / "ct", dtype, fmt)
    loaded = load_compressed_tensors(tmp_path / "ct")
    ours_model = _quantized(MX_CT[fmt], dtype)  # -- the library's codes are this rounding's
    for name, layer in _layers(ours_model).items():
        assert torch.equal(loaded.get_submodule(name).scales, layer.scales), name
        got = loaded.get_submodule(name).qweight.view(torch.uint8)
        assert torch.equal(got, layer.qweight.view(torch.uint8)), name
    layer = loaded.model.layers[1].mlp.down_proj
    assert layer.scheme == MX_CT[fmt]  # -- the library's rule, weights and inputs
    # -- inputs with outlier channels, where the two rules pick different block scales
    x = torch.randn(4, layer.in_features, generator=torch.Generator().manual_seed(2))
    x = x * torch.logspace(-2, 2, layer.in_features)
    x[0, 0] = 1.9 * 2**3  # -- a block max the spec's scale saturates, the library's holds
    x = x.to(dtype)
    theirs = _library_input_quantization(x, group.input_activations)
    ours = fake_quantize_microscaled(x, fmt, None, layer.scheme.activation.scale_rounding)
    assert torch.equal(ours.to(dtype), theirs)
    assert not torch.equal(fake_quantize_microscaled(x, fmt).to(dtype), theirs)
    weight = layer.dequantized_weight(torch.float64)
    out = layer.reference_forward(x)  # -- in the layer's dtype, the input cast to it exactly
    assert torch.equal(out, (theirs.double() @ weight.t()).to(out.dtype))


ROUND_TRIP = {
    "both compressed-tensors": SCHEMES["mxfp4"],
    "both ocp": QuantScheme(WeightQuant("mxfp4"), ActivationQuant("mxfp4")),
    "weights compressed-tensors": QuantScheme(
        WeightQuant("mxfp4", scale_rounding=CT), ActivationQuant("mxfp4")
    ),
    "inputs compressed-tensors": QuantScheme(
        WeightQuant("mxfp4"), ActivationQuant("mxfp4", scale_rounding=CT)
    ),
    "weight-only compressed-tensors": SCHEMES["mxfp4a16"],
    "weight-only ocp": QuantScheme(WeightQuant("mxfp4")),
}


@pytest.mark.parametrize("case", list(ROUND_TRIP))
def test_our_exports_load_with_the_rounding_they_were_made_with(tmp_path, case):
    scheme = ROUND_TRIP[case]
    model = _quantized(scheme)
    save_compressed_tensors(model, tmp_path / "ct")
    with safe_open(str(tmp_path / "ct" / "model.safetensors"), framework="pt") as f:
        recorded = (f.metadata() or {}).get(RECORD_KEY)
    assert (recorded is None) == ("ocp" in case)  # -- the spec's rounding writes no record
    loaded = load_compressed_tensors(tmp_path / "ct")
    for name in _layers(model):
        assert loaded.get_submodule(name).scheme == scheme, name
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_layers_of_different_roundings_get_their_own_groups(tmp_path):
    ocp = QuantScheme(WeightQuant("mxfp4"), ActivationQuant("mxfp4"))
    config = QuantConfig(default=SCHEMES["mxfp4"], overrides={r"re:.*mlp\..*": ocp})
    model = convert_model(_model(), config, progress=False)[0]
    save_compressed_tensors(model, tmp_path / "ct")
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert len(qc["config_groups"]) == 2
    loaded = load_compressed_tensors(tmp_path / "ct")
    for name, layer in _layers(model).items():
        assert loaded.get_submodule(name).scheme == layer.scheme, name


@pytest.mark.parametrize(
    "record, match",
    [
        ("{", "not JSON"),
        ('{"group_9": {"weights": "ocp"}}', "group_9"),
        ('{"group_0": {"outputs": "ocp"}}', "group_0"),
        ('{"group_0": {"input_activations": "nearest"}}', "nearest"),
    ],
)
def test_a_bad_rounding_record_is_refused_by_name(tmp_path, record, match):
    save_compressed_tensors(_quantized(SCHEMES["mxfp4"]), tmp_path / "ct")
    path = tmp_path / "ct" / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        metadata = {**f.metadata(), RECORD_KEY: record}
    save_file(load_file(path), path, metadata=metadata)
    with pytest.raises(CheckpointError, match=match):
        load_compressed_tensors(tmp_path / "ct")
