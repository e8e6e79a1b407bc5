import pytest
import torch
from fuzz_strategies import int_weight_cases
from hypothesis import given, settings

from torchquant.errors import QuantizationError
from torchquant.numerics import (
    dequantize_fp8_weight,
    dequantize_int_weight,
    expand_groups,
    quantize_fp8_weight,
    quantize_int_weight,
)


def roundtrip(w, bits, group_size, symmetric):
    q = quantize_int_weight(w, bits, group_size, symmetric, scale_dtype=torch.float32)
    return q, dequantize_int_weight(q.codes, q.scales, q.zeros, bits, group_size)


@settings(max_examples=80, deadline=None)
@given(case=int_weight_cases(max_rows=8, max_cols=300, min_scale=1e-3, max_scale=1e3))
def test_codes_in_range_and_error_within_half_step(case):
    w, bits, group_size, symmetric = case
    q, deq = roundtrip(w, bits, group_size, symmetric)
    assert q.codes.dtype == torch.uint8
    assert int(q.codes.max()) <= (1 << bits) - 1
    step = expand_groups(q.scales, group_size, w.shape[1])
    # both grids cover [min(w, 0), max(w, 0)], so every weight is within half a step
    # (the top symmetric code is exactly half a step below +absmax: allow float32 rounding)
    assert torch.all((deq - w).abs() <= step / 2 + 1e-6 * w.abs())


def test_partial_last_group_has_its_own_scale():
    w = torch.randn(4, 200)
    w[:, 128:] *= 100
    q, deq = roundtrip(w, 4, 128, False)
    assert q.scales.shape == (4, 2)
    assert torch.all(q.scales[:, 1] > 10 * q.scales[:, 0])
    assert (deq - w).norm() / w.norm() < 0.1


@pytest.mark.parametrize("symmetric", [False, True])
def test_all_zero_group_is_exact_with_unit_scale(symmetric):
    w = torch.randn(2, 64)
    w[:, :32] = 0
    q, deq = roundtrip(w, 4, 32, symmetric)
    assert torch.equal(deq[:, :32], torch.zeros(2, 32))
    assert torch.all(q.scales[:, 0] == 1)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("value", [3.7, -0.25])
def test_constant_group_is_exact(symmetric, value):
    w = torch.full((3, 32), value)
    _, deq = roundtrip(w, 4, 32, symmetric)
    torch.testing.assert_close(deq, w, rtol=1e-6, atol=0)


def test_single_huge_outlier_is_kept_and_only_its_group_coarsens():
    w = torch.randn(1, 128) * 0.01
    w[0, 5] = 1e4
    q, deq = roundtrip(w, 8, 64, False)
    assert abs(deq[0, 5].item() - 1e4) <= q.scales[0, 0].item() / 2 * (1 + 1e-5)
    assert (deq[0, 64:] - w[0, 64:]).abs().max() < 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_input_dtypes(dtype):
    w = torch.randn(16, 256).to(dtype)
    q = quantize_int_weight(w, 4, 128, False)
    assert q.scales.dtype == dtype
    deq = dequantize_int_weight(q.codes, q.scales, q.zeros, 4, 128, dtype)
    assert deq.dtype == dtype
    rel = (deq.float() - w.float()).norm() / w.float().norm()
    assert rel < 0.12


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_weight_is_refused_by_name(bad):
    w = torch.randn(4, 32)
    w[1, 3] = bad
    with pytest.raises(QuantizationError, match="layers.0.q_proj.weight"):
        quantize_int_weight(w, 4, 32, False, what="layers.0.q_proj.weight")
    with pytest.raises(QuantizationError, match="NaN/Inf"):
        quantize_fp8_weight(w)


def test_fp8_per_channel_and_per_tensor():
    w = torch.randn(32, 64) * torch.logspace(-3, 3, 32).unsqueeze(1)
    for per_channel in (True, False):
        q, s = quantize_fp8_weight(w, per_channel=per_channel)
        assert q.dtype == torch.float8_e4m3fn
        assert s.shape == ((32, 1) if per_channel else ())
        assert q.float().abs().max() <= 448
        deq = dequantize_fp8_weight(q, s)
        if per_channel:
            rel = ((deq - w).norm(dim=1) / w.norm(dim=1)).max()
            assert rel < 0.05


def test_fp8_saturates_instead_of_overflowing():
    q, s = quantize_fp8_weight(torch.tensor([[1.0, 2.0, 1e30]]), per_channel=True)
    assert torch.isfinite(q.float()).all()
    assert q.float().abs().max() == 448


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"w": torch.randn(4), "bits": 4, "group_size": 32}, "2-D"),
        ({"w": torch.randint(0, 3, (4, 32)), "bits": 4, "group_size": 32}, "fp32/fp16/bf16"),
        ({"w": torch.randn(4, 32), "bits": 9, "group_size": 32}, "bits"),
        ({"w": torch.randn(4, 32), "bits": 4, "group_size": 0}, "group_size"),
    ],
)
def test_bad_weight_arguments(kwargs, match):
    with pytest.raises(QuantizationError, match=match):
        quantize_int_weight(symmetric=False, **kwargs)
