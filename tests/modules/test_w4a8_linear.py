"""W4A8 layers: QuantLinear through the packed-INT weight format, state dicts, and models
converted round-to-nearest, with GPTQ and with SmoothQuant."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_llama

from torchquant import ConfigError, QuantConfig, QuantLinear, convert_model, scheme_from_name
from torchquant.config import QuantScheme, SmoothQuantConfig
from torchquant.numerics import dequantize_activation, quantize_activation
from torchquant.weights import PackedIntFormat

NAMES = ["w4a8", "w4a8-fp8"]


def _layer(name: str, k: int = 200, group_size: int = 128, dtype=torch.float32) -> QuantLinear:
    torch.manual_seed(0)
    weight, bias = torch.randn(48, k).to(dtype), torch.randn(48).to(dtype)
    return QuantLinear.from_weight(weight, bias, scheme_from_name(name, group_size))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_is_quantized_input_times_dequantized_weight(name, dtype):
    layer = _layer(name, dtype=dtype)  # -- K = 200: a partial last group of 72
    assert isinstance(layer.weight_format, PackedIntFormat)
    assert layer.scales.shape == (48, 2) and layer.qweight.dtype == torch.int32
    x = (torch.randn(3, 4, 200) * 2).to(dtype)
    out = layer(x)
    assert out.shape == (3, 4, 48) and out.dtype == dtype
    act_type = layer.scheme.activation.type
    xq, xs = quantize_activation(x.reshape(-1, 200), act_type, True)
    xd = dequantize_activation(xq, xs, torch.float64)
    want = F.linear(xd, layer.dequantized_weight(torch.float64), layer.bias.double())
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # -- bf16 output: 8 significant bits
    atol = tol * want.abs().max().item()
    torch.testing.assert_close(out.reshape(-1, 48).double(), want, rtol=tol, atol=atol)
    torch.testing.assert_close(out, layer.reference_forward(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_cpu_layout_holds_int8_codes_and_state_dict_reloads_bit_exact(name):
    layer = _layer(name)
    assert layer.cpu_layout_nbytes() == 48 * 200  # -- one int8 code a weight
    again = QuantLinear(200, 48, layer.scheme, device="meta")
    again.load_state_dict(layer.state_dict(), assign=True)
    x = torch.randn(5, 200)
    assert torch.equal(again(x), layer(x))
    assert set(layer.state_dict()) == {"qweight", "scales", "bias"}


def _model_and_tokens():
    model = tiny_llama(hidden=128, inter=256)
    ids = torch.randint(
        0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0)
    )
    return model, ids


@pytest.mark.parametrize("algorithm", ["rtn", "gptq", "smoothquant"])
def test_model_converts_with_each_algorithm(algorithm):
    model, ids = _model_and_tokens()
    with torch.no_grad():
        ref = model(ids).logits
    scheme = dataclasses.replace(scheme_from_name("w4a8", 64), algorithm=algorithm)
    data = ids if scheme.needs_calibration else None
    model, _ = convert_model(model, QuantConfig(scheme), calibration_data=data, progress=False)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.scheme.is_w4a8 for m in layers)
    with torch.no_grad():
        out = model(ids).logits
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 0.2, f"{algorithm}: relative logit error {rel:.3f}"


def test_smoothquant_with_gptq_rounding_smooths_then_solves():
    """SmoothQuant for the activations, GPTQ for the weights: the smoothed weights are
    rounded by GPTQ on the Hessians of the smoothed inputs, not to nearest."""
    model, ids = _model_and_tokens()
    base = scheme_from_name("w4a8", 64)
    sq = dataclasses.replace(base, algorithm="smoothquant", smoothquant={"alpha": 0.5})
    sq_gptq = dataclasses.replace(sq, smoothquant={"alpha": 0.5, "rounding": "gptq"})
    assert sq_gptq.rounds_with_gptq and not sq.rounds_with_gptq
    assert "rounding" not in sq.to_dict()["smoothquant"]  # -- earlier checkpoints' bytes
    assert QuantScheme.from_dict(sq_gptq.to_dict()) == sq_gptq
    codes = {}
    for name, scheme in (("rtn", sq), ("gptq", sq_gptq)):
        converted, _ = convert_model(
            copy.deepcopy(model), QuantConfig(scheme), calibration_data=ids, progress=False
        )
        layer = converted.model.layers[0].self_attn.q_proj
        codes[name] = layer.weight_format.int_codes(layer)
        with torch.no_grad():
            assert torch.isfinite(converted(ids).logits).all()
    assert not torch.equal(codes["rtn"], codes["gptq"])
    with pytest.raises(ConfigError, match="smoothquant.rounding"):
        SmoothQuantConfig(rounding="awq")
    with pytest.raises(ConfigError, match="'int' weights for smoothquant.rounding"):
        dataclasses.replace(
            scheme_from_name("fp8"), algorithm="smoothquant", smoothquant=sq_gptq.smoothquant
        )
