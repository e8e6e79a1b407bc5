"""Asymmetric INT8 and INT4 activation ops: the integer paths against a float64 oracle.

The oracle dequantizes both operands (``(q - z) * s_x`` and ``q_w * s_w``) and multiplies
in float64; the ops never dequantize (``s_x s_w (sum q_x q_w - z sum_k q_w)``), so agreeing
with it to float64 rounding shows the zero-point correction is the right algebra.  The CPU
implementations must equal their references bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from fuzz_strategies import fuzz_settings
from hypothesis import given
from hypothesis import strategies as st

from torchquant import QuantLinear, ops, scheme_from_name
from torchquant.numerics import (
    dequantize_activation,
    dequantize_activation_asymmetric,
    quantize_activation,
    quantize_activation_asymmetric,
    quantize_int_weight,
)


def _weight(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    iw = quantize_int_weight(
        torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g), 8, -1, True
    )
    return (iw.codes.to(torch.int16) - 128).to(torch.int8), iw.scales.float()


def _oracle_asym(x, qweight, scales, bias, per_token, static=(None, None)):
    q, s, z = quantize_activation_asymmetric(x.reshape(-1, x.shape[-1]), per_token, *static)
    xd = dequantize_activation_asymmetric(q, s, z, torch.float64)
    out = xd @ (qweight.double() * scales.double()).t()
    out = out.to(x.dtype) + (0 if bias is None else bias)
    return out.reshape(*x.shape[:-1], -1)


@fuzz_settings
@given(
    m=st.integers(1, 9),
    k=st.integers(1, 80),
    n=st.integers(1, 24),
    offset=st.sampled_from([0.0, 0.5, 3.0, -4.0]),
    per_token=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_asym_integer_path_matches_float64_oracle(m, k, n, offset, per_token, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * 2 + offset
    qweight, scales = _weight(n, k, seed)
    bias = torch.randn(n, generator=g)
    args = (qweight, scales, bias, per_token, None, None, None)
    ref = ops.linear_w8a8_asym_reference(x, *args)
    torch.testing.assert_close(ref, _oracle_asym(x, qweight, scales, bias, per_token))
    assert torch.equal(ops.linear_w8a8_asym_cpu(x, *args), ref)
    assert torch.equal(ops.linear_w8a8_int8_asym(x, *args), ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_asym_static_and_cached_sums_match_reference(dtype):
    x = (torch.rand(3, 5, 64) * 6 - 1).to(dtype)
    qweight, scales = _weight(40, 64)
    static = (torch.tensor([0.03]), torch.tensor([-90], dtype=torch.int8))
    sums = ops.weight_code_sums(qweight)
    assert sums.dtype == torch.int32 and torch.equal(sums, qweight.int().sum(dim=1))
    args = (qweight, scales, None, False, *static, None)
    ref = ops.linear_w8a8_asym_reference(x, *args)
    assert ref.shape == (3, 5, 40) and ref.dtype == dtype
    assert torch.equal(ops.linear_w8a8_asym_cpu(x, *args, sums), ref)
    torch.testing.assert_close(ref, _oracle_asym(x, qweight, scales, None, False, static))


def test_asym_long_k_sums_past_int32_stay_exact():
    """Codes at the ends of their range over a long K: the product sums and the zero-point
    correction pass 2**31 (where int32 would wrap) and still equal the exact integer maths."""
    k = 200_000
    x = torch.where(torch.arange(k) % 3 == 0, -1.0, 3.0).repeat(2, 1)
    x[1] *= -1
    qweight = torch.full((2, k), -128, dtype=torch.int8)
    qweight[1, ::2] = 127
    scales = torch.full((2, 1), 1e-9)
    args = (qweight, scales, None, True, None, None, None)
    out = ops.linear_w8a8_asym_cpu(x, *args)
    assert torch.equal(out, ops.linear_w8a8_asym_reference(x, *args))
    xq, xs, xz = quantize_activation_asymmetric(x, True)
    sums = xq.long() @ qweight.long().t() - xz.long() * qweight.long().sum(dim=1)
    assert sums.abs().max() > 2**31
    exact = sums.double() * xs.double() * scales.double().t()
    assert torch.equal(out, exact.float())


@pytest.mark.parametrize("per_token", [True, False])
def test_asym_nan_rows_come_out_nan(per_token):
    x = torch.rand(4, 32)
    x[1, 3] = float("nan")
    x[2, 0] = float("inf")
    qweight, scales = _weight(8, 32)
    out = ops.linear_w8a8_int8_asym(x, qweight, scales, None, per_token, None, None, None)
    bad = torch.isnan(out).all(dim=1)
    assert bad.tolist() == ([False, True, True, False] if per_token else [True] * 4)
    assert torch.isfinite(out[~bad]).all()


def test_asym_smooth_divisor_divides_first():
    x = torch.rand(3, 16) * 4
    smooth = torch.rand(16) + 0.5
    qweight, scales = _weight(8, 16)
    with_smooth = ops.linear_w8a8_int8_asym(x, qweight, scales, None, True, None, None, smooth)
    plain = ops.linear_w8a8_int8_asym(x / smooth, qweight, scales, None, True, None, None, None)
    assert torch.equal(with_smooth, plain)


@fuzz_settings
@given(
    m=st.integers(1, 9),
    k=st.integers(1, 80),
    n=st.integers(1, 24),
    per_token=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_int4_activations_match_float64_oracle(m, k, n, per_token, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    qweight, scales = _weight(n, k, seed)
    args = (qweight, scales, None, per_token, 100.0, None, None)
    ref = ops.linear_w8a8_reference(x, *args[:3], "int4", *args[3:])
    q, s = quantize_activation(x, "int4", per_token)
    assert int(q.abs().max()) <= 7
    oracle = dequantize_activation(q, s, torch.float64) @ (qweight.double() * scales).t()
    torch.testing.assert_close(ref, oracle.float())
    assert torch.equal(ops.linear_w8a8_int4(x, *args), ref)


def test_int4_bf16_rows_take_int8pack_within_tolerance():
    x = torch.randn(2, 96).to(torch.bfloat16)
    qweight, scales = _weight(32, 96)
    args = (qweight, scales, None, True, 100.0, None, None)
    ref = ops.linear_w8a8_reference(x, *args[:3], "int4", *args[3:])
    out = ops.linear_w8a8_int4(x, *args)
    err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    assert out.dtype == torch.bfloat16 and err < 1e-2


@pytest.mark.parametrize("group_size,k", [(32, 96), (128, 200), (-1, 64)])
def test_w4a4_matches_float64_oracle(group_size, k):
    """INT4 grouped weights x INT4 activations on the W4A8 op (``w4a4``)."""
    layer = QuantLinear.from_linear(torch.nn.Linear(k, 24), scheme_from_name("w4a4", group_size))
    x = torch.randn(5, k)
    q, s = quantize_activation(x, "int4", True)
    oracle = dequantize_activation(q, s, torch.float64) @ layer.dequantized_weight().double().t()
    out = layer(x)
    torch.testing.assert_close(out, (oracle + layer.bias.double()).float())
    assert torch.equal(out, layer.reference_forward(x))
