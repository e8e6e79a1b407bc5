"""The bf16 decode route of W8A8 layers: few rows with per-token dynamic scales.

``w8a8.token_decode_linear`` quantizes each row with one max and one rounding pass into
bf16 codes and multiplies them on ``_weight_int8pack_mm`` (INT8 weights) or by the FP8
codes as bf16; it must stay within ``BF16_RELATIVE_ERROR`` of the exact reference, give
the reference's codes and scales for finite rows, and NaN rows exactly where the
reference has them.
"""

from __future__ import annotations

import pytest
import torch

from torchquant import QuantLinear, scheme_from_name
from torchquant.numerics import quantize_activation
from torchquant.ops import cpu_kernels, w8a8

# -- (rows, K, N): one token, a few, the most the route takes; K = 100 pads the int8 weight
SHAPES = [(1, 576, 192), (3, 100, 40), (w8a8.INT8PACK_MAX_ROWS, 72, 24), (2, 33, 17)]
SCHEMES = ["w8a8", "fp8", "w8a4"]


def _layer(scheme: str, k: int, n: int, dtype: torch.dtype) -> QuantLinear:
    torch.manual_seed(k * 100 + n)
    return QuantLinear.from_linear(torch.nn.Linear(k, n).to(dtype), scheme_from_name(scheme))


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def _run(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    with cpu_kernels.float32_in_bf16():
        return layer(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_decode_rows_match_the_reference(scheme, shape, dtype):
    m, k, n = shape
    layer = _layer(scheme, k, n, dtype)
    x = (torch.randn(m, k) * torch.logspace(-2, 2, m)[:, None]).to(dtype)
    out, ref = _run(layer, x), layer.reference_forward(x)
    assert out.dtype == dtype and out.shape == (m, n)
    assert _relative_error(out, ref) < cpu_kernels.BF16_RELATIVE_ERROR


def test_decode_rows_keep_the_leading_dimensions():
    layer = _layer("w8a8", 64, 24, torch.float32)
    x = torch.randn(1, 1, 64)
    out = _run(layer, x)
    assert out.shape == (1, 1, 24)
    assert _relative_error(out, layer.reference_forward(x)) < cpu_kernels.BF16_RELATIVE_ERROR


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_nonfinite_rows_come_out_nan_as_in_the_reference(scheme, bad):
    layer = _layer(scheme, 96, 40, torch.float32)
    x = torch.randn(4, 96)
    x[1, 7] = bad
    x[3] = 0.0  # -- an all-zero row takes scale 1, as in the reference
    out, ref = _run(layer, x), layer.reference_forward(x)
    assert torch.equal(out.isnan(), ref.isnan()) and out[1].isnan().all()
    finite = torch.tensor([True, False, True, True])
    error = _relative_error(out[finite], ref[finite])
    assert error < cpu_kernels.BF16_RELATIVE_ERROR


@pytest.mark.parametrize("act_type", ["int8", "fp8", "int4"])
def test_token_codes_are_the_reference_codes(act_type):
    torch.manual_seed(1)
    x = torch.randn(6, 80) * torch.logspace(-3, 3, 6)[:, None]
    x[2] = 0.0
    x[4, 5] = float("inf")
    x[5, 9] = float("nan")
    codes, scales = w8a8.quantize_token_codes(x, act_type)
    ref_codes, ref_scales = quantize_activation(x, act_type, per_token=True)
    assert codes.dtype == cpu_kernels.COMPUTE_DTYPE and scales.shape == (6, 1)
    finite = torch.isfinite(x).all(dim=1)
    assert torch.equal(codes[finite].float(), ref_codes[finite].float())
    assert torch.equal(scales[finite], ref_scales[finite])
    assert codes[~finite].isnan().any(dim=1).all()  # -- the NaN the products carry


def test_int8_rows_whose_bf16_sums_overflow_are_recomputed():
    """Huge weights, tiny inputs: the int8pack sums overflow bf16 before the input scale
    brings them back; those rows are the reference's."""
    w = torch.full((4, 32), 1e36)
    layer = QuantLinear.from_weight(w, None, scheme_from_name("w8a8"))
    x = torch.full((2, 32), 1e-30)
    out = _run(layer, x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, layer.reference_forward(x), rtol=1e-2, atol=0.0)


def test_route_is_taken_only_for_few_rows_of_dynamic_per_token_scales():
    act = w8a8.ActivationQuant("int8", True, 100.0, None, None)
    rows = torch.randn(w8a8.INT8PACK_MAX_ROWS, 8)
    with cpu_kernels.float32_in_bf16():
        assert w8a8.runs_token_decode(rows, act)
        assert not w8a8.runs_token_decode(torch.randn(w8a8.INT8PACK_MAX_ROWS + 1, 8), act)
        assert not w8a8.runs_token_decode(rows, act._replace(per_token=False))
        assert not w8a8.runs_token_decode(rows, act._replace(percentile=99.0))
        assert not w8a8.runs_token_decode(rows, act._replace(smooth=torch.ones(8)))
        assert not w8a8.runs_token_decode(rows.half(), act)
    assert not w8a8.runs_token_decode(rows, act)  # -- float32 outside the context: exact


@pytest.mark.parametrize("rows", [1, 4, 64])  # one call up to 4,096 elements, two past it
def test_abs_max_is_the_infinity_norm_of_each_row_nan_and_inf_included(rows):
    x = torch.randn(rows, 576) * 100
    x[0, 7] = float("nan")
    x[-1, 3] = -float("inf")
    expected = torch.linalg.vector_norm(x, float("inf"), dim=-1, keepdim=True)
    torch.testing.assert_close(w8a8.abs_max(x), expected, rtol=0, atol=0, equal_nan=True)
