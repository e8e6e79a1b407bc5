"""Defined behaviour for bad or extreme numbers: an error naming the tensor, or a tested result.

Documented results checked here:
- NaN/Inf weights: ``QuantizationError`` naming the layer's weight (also via ``convert_model``).
- NaN/Inf activations: weight-only layers propagate them like ``nn.Linear``; W8A8 layers turn
  exactly the affected output rows into NaN (the whole output with one dynamic per-tensor
  scale), never finite garbage.
- Subnormal weights: groups whose scale underflows the scale dtype are stored as exact zeros;
  larger subnormals quantize with the usual half-step bound.
- Huge weights (1e38 in float32/bfloat16, +-3e38 asymmetric): finite scales and results, the
  same codes as the weights scaled down by a power of two.
  Weights at the float16 limit whose grid would dequantize to Inf, and scales that overflow
  float16: ``QuantizationError`` naming the tensor.
- FP8: weights and activations saturate at +-448 (an explicit clamp, so no backend's cast
  can turn an out-of-range value into NaN).
"""

import pytest
import torch
from torch import nn

from torchquant import QuantConfig, QuantizationError, QuantLinear, convert_model
from torchquant.config import scheme_from_name
from torchquant.numerics import (
    dequantize_fp8_weight,
    dequantize_int_weight,
    quantize_activation,
    quantize_fp8_weight,
    quantize_int_weight,
)

WEIGHT_SCHEMES = ["w8a16", "w4a16", "w3a16", "w8a16-fp8"]
ACT_SCHEMES = ["w8a8", "fp8"]


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(64, 64)
        self.down = nn.Linear(64, 32)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("scheme", WEIGHT_SCHEMES + ACT_SCHEMES)
def test_convert_model_names_the_layer_with_nonfinite_weights(bad, scheme):
    model = Block()
    model.down.weight.data[3, 7] = bad
    with pytest.raises(QuantizationError, match=r"down\.weight contains 1 NaN/Inf"):
        convert_model(model, QuantConfig(scheme, ignore=()), progress=False)


@pytest.mark.parametrize("scheme", WEIGHT_SCHEMES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_weight_only_layers_propagate_nonfinite_inputs_like_float(scheme, bad):
    layer = QuantLinear.from_weight(torch.randn(16, 64) * 0.1, None, scheme_from_name(scheme))
    x = torch.randn(3, 64)
    x[1, 5] = bad
    out = layer(x)
    ref = nn.functional.linear(x, layer.dequantized_weight())
    assert torch.isfinite(out[[0, 2]]).all()
    assert not torch.isfinite(out[1]).any()
    assert torch.equal(torch.isnan(out), torch.isnan(ref))


@pytest.mark.parametrize("scheme", ACT_SCHEMES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_w8a8_nonfinite_input_rows_become_nan_rows(scheme, bad):
    layer = QuantLinear.from_weight(
        torch.randn(16, 64) * 0.1, torch.randn(16), scheme_from_name(scheme)
    )
    x = torch.randn(4, 64)
    clean = layer(x)
    x[2, 9] = bad
    out = layer(x)
    assert torch.isnan(out[2]).all()
    assert torch.equal(out[[0, 1, 3]], clean[[0, 1, 3]])


def test_w8a8_per_tensor_dynamic_scale_poisons_the_whole_output():
    scheme = QuantConfig.from_dict(
        {
            "default": {
                "weight": {"type": "int", "bits": 8, "group_size": -1, "symmetric": True},
                "activation": {"type": "int8", "granularity": "tensor"},
            },
            "ignore": [],
        }
    ).default
    layer = QuantLinear.from_weight(torch.randn(8, 32), None, scheme)
    x = torch.randn(3, 32)
    assert torch.isfinite(layer(x)).all()
    x[0, 0] = float("inf")
    assert torch.isnan(layer(x)).all()


def test_w8a8_static_scale_with_nonfinite_input_poisons_only_its_row():
    scheme = QuantConfig.from_dict(
        {
            "default": {
                "weight": {"type": "int", "bits": 8, "group_size": -1, "symmetric": True},
                "activation": {"type": "int8", "granularity": "tensor", "dynamic": False},
            },
            "ignore": [],
        }
    ).default
    layer = QuantLinear.from_weight(torch.randn(8, 32), None, scheme)
    layer.input_scale.fill_(0.05)
    x = torch.randn(3, 32)
    x[1, 4] = float("nan")
    out = layer(x)
    assert torch.isnan(out[1]).all() and torch.isfinite(out[[0, 2]]).all()


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_subnormal_weights_never_give_nan(symmetric, bits):
    w = torch.full((2, 64), 1e-45)  # the smallest subnormal: its scale underflows to 0
    w[1] = torch.linspace(-1e-39, 1e-39, 64)  # subnormal but representable steps
    q = quantize_int_weight(w, bits, 32, symmetric)
    deq = dequantize_int_weight(q.codes, q.scales, q.zeros, bits, 32)
    assert torch.isfinite(q.scales).all() and torch.isfinite(deq).all()
    # stored as exact zeros, or exactly when the grid's step is that subnormal itself (2-bit sym)
    assert torch.equal(deq[0], torch.zeros(64)) or torch.equal(deq[0], w[0])
    assert (deq[1] - w[1]).abs().max() <= 2e-39 / ((1 << bits) - 2) + 1e-45


def test_float16_subnormal_scale_underflow_stores_zeros():
    w = torch.full((2, 32), 1e-7, dtype=torch.float16)
    q = quantize_int_weight(w, 4, 32, True)
    assert q.scales.dtype == torch.float16 and torch.all(q.scales == 1)
    assert torch.equal(dequantize_int_weight(q.codes, q.scales, q.zeros, 4, 32), torch.zeros(2, 32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scheme", WEIGHT_SCHEMES + ACT_SCHEMES)
def test_huge_weights_quantize_exactly_like_scaled_down_ones(dtype, scheme):
    """Scaling by a power of two commutes with quantization, up to weights of 1e38."""
    base = torch.randn(8, 64)
    base[0, 0], base[1, 1] = 18.8, -18.8  # times 2**122: about +-1e38
    small = QuantLinear.from_weight(base.to(dtype), None, scheme_from_name(scheme))
    huge = QuantLinear.from_weight((base * 2.0**122).to(dtype), None, scheme_from_name(scheme))
    assert torch.equal(huge.qweight.view(torch.uint8), small.qweight.view(torch.uint8))
    assert torch.equal(huge.scales, small.scales * 2.0**122)
    assert torch.isfinite(huge.dequantized_weight(torch.float32)).all()


def test_float32_asymmetric_range_near_the_limit_does_not_overflow():
    w = torch.randn(2, 32) * 1e37
    w[0, 0], w[0, 1] = 3e38, -3e38
    q = quantize_int_weight(w, 4, 32, False, scale_dtype=torch.float32)
    deq = dequantize_int_weight(q.codes, q.scales, q.zeros, 4, 32)
    assert torch.isfinite(deq).all()
    assert abs(deq[0, 0].item() - 3e38) <= q.scales[0, 0].item() / 2 * 1.0001


@pytest.mark.parametrize("scheme", ["w4a16", "w2a16"])
def test_float16_weights_at_the_limit_are_refused_by_name(scheme):
    w = torch.randn(4, 128).half()
    w[2, 17] = -65504
    with pytest.raises(QuantizationError, match=r"blk\.weight: magnitudes near the torch.float16"):
        QuantLinear.from_weight(w, None, scheme_from_name(scheme), "blk.weight")


def test_float16_scale_overflow_is_refused_by_name():
    w = torch.randn(4, 64) * 1e6
    with pytest.raises(QuantizationError, match=r"l\.weight: a quantization scale overflows"):
        quantize_int_weight(w, 4, 32, True, scale_dtype=torch.float16, what="l.weight")


def test_fp8_weight_and_activation_saturate_at_448_without_nan():
    q, s = quantize_fp8_weight(torch.tensor([[1.0, -2.0, 3e38]]), per_channel=False)
    assert q.float().abs().max() == 448 and torch.isfinite(dequantize_fp8_weight(q, s)).all()
    x = torch.tensor([[1.0, -1e4, 1e30]])
    q, _ = quantize_activation(x, "fp8", True, static_scale=torch.tensor(0.5))
    assert q.float().tolist() == [[2.0, -448.0, 448.0]]
