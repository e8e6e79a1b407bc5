"""A layer's bound eager CPU call gives exactly what its op's CPU kernel gives.

``QuantLinear`` binds each op once, taking the kernel operands from its cached layout
(``bind_intn_cpu``, ``bind_int8_weight_cpu``, ``bind_w8a8_cpu``); the op called through
the dispatcher derives them per call.  Both must agree bit for bit on either side of
every row threshold, for ragged shapes, with and without bias, for bf16 inputs and for
float32 ones inside ``float32_in_bf16``.
"""

from __future__ import annotations

import pytest
import torch

from torchquant import QuantLinear, scheme_from_name
from torchquant.ops import common, cpu_kernels
from torchquant.ops.w8a8 import ActivationQuant, linear_w8a8_cpu

# -- around INT8PACK_MAX_ROWS (48) and INT4PACK_MAX_ROWS (80 and 48)
ROWS = (1, 3, 48, 49, 81)
SHAPES = ((40, 100), (64, 64))  # (N, K): N not a multiple of 16, K not of 32
WEIGHT_ONLY = [
    ("w4a16", 128),
    ("w4a16", 32),
    ("w3a16", 64),
    ("w6a16", 32),  # -- two int4pack planes
    ("w8a16", None),  # -- int8pack
    ("w8a16", 16),  # -- two int4pack planes
]


def _layer(scheme: str, group_size: int | None, n: int, k: int, dtype: torch.dtype, bias: bool):
    torch.manual_seed(n * 1000 + k)
    linear = torch.nn.Linear(k, n, bias=bias).to(dtype)
    return QuantLinear.from_linear(linear, scheme_from_name(scheme, group_size))


def _op_through_dispatcher(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """The layer's op called as ``torch.ops`` does, on the layer's cached layout."""
    w, layout = layer.scheme.weight, tuple(layer.cpu_layout())
    if w.bits == 8 and layer.zeros is None:
        args = (layer.qweight, layer.scales, layer.bias, w.group_size, *layout)
        return torch.ops.torchquant.linear_int8_weight(x, *args)
    args = (layer.qweight, layer.scales, layer.zeros, layer.bias, w.bits, w.group_size, *layout)
    return torch.ops.torchquant.linear_intn(x, *args)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("scheme,group_size", WEIGHT_ONLY)
def test_bound_weight_only_call_is_the_op(scheme, group_size, n, k, bias, dtype):
    with cpu_kernels.float32_in_bf16():
        layer = _layer(scheme, group_size, n, k, dtype, bias)
        for m in ROWS:
            x = torch.randn(2, m, k, dtype=dtype)
            out = layer(x)
            assert out.dtype == dtype and out.shape == (2, m, n)
            torch.testing.assert_close(out, _op_through_dispatcher(layer, x), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("scheme", ["w8a8", "fp8"])
def test_bound_w8a8_call_is_the_cpu_kernel(scheme, n, k, bias, dtype):
    with cpu_kernels.float32_in_bf16():
        layer = _layer(scheme, None, n, k, dtype, bias)
        act = layer.scheme.activation
        quant = ActivationQuant(act.type, act.granularity == "token", 100.0, None, None)
        for m in ROWS:
            x = torch.randn(m, k, dtype=dtype)
            x[0, 1] = float("nan")  # -- a non-finite row stays non-finite
            out = layer(x)
            args = (layer.qweight, layer.scales, layer.bias, quant, layer.cpu_layout())
            torch.testing.assert_close(
                out, linear_w8a8_cpu(x, *args), rtol=0, atol=0, equal_nan=True
            )
            assert not out[0].isfinite().any() and out[1:].isfinite().all()


def test_bound_call_recomputes_rows_that_overflow_in_bf16():
    """A float32 input beyond bf16's range rounds to infinity: the bound call recomputes
    that row by the reference, as the op does."""
    with cpu_kernels.float32_in_bf16():
        layer = _layer("w4a16", 32, 32, 64, torch.float32, True)
        x = torch.randn(2, 64)
        x[1, 0] = torch.finfo(torch.float32).max
        out = layer(x)
        ref = layer.reference_forward(x)
        assert torch.equal(out[1].isfinite(), ref[1].isfinite())
        torch.testing.assert_close(out, _op_through_dispatcher(layer, x), rtol=0, atol=0)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_finish_widens_by_the_bias_addition_with_the_same_values(out_dtype):
    out = torch.randn(3, 40).to(out_dtype)
    bias, x = torch.randn(40), torch.randn(1, 3, 8)
    expected = (out.to(torch.float32) + bias).reshape(1, 3, 40)
    assert torch.equal(common.finish(out, bias, x), expected)
