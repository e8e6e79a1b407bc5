import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchquant.algorithms.gptq import accumulate_hessian, gptq_quantize
from torchquant.errors import CalibrationError, QuantizationError
from torchquant.numerics import (
    choose_int_qparams,
    dequantize_int_weight,
    group_min_max,
    quantize_int_weight,
)


def correlated_inputs(tokens: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    scale = torch.logspace(-1, 1, k)
    return (torch.randn(tokens, k, generator=g) @ mix) * scale


def output_error(w, wq, x):
    return float(((x @ (wq - w).t()).pow(2)).sum())


def dequant(res, bits, group_size):
    if res.g_idx is None:
        return dequantize_int_weight(res.codes, res.scales, res.zeros, bits, group_size)
    idx = res.g_idx.long()
    zero = res.zeros[:, idx].float() if res.zeros is not None else 1 << (bits - 1)
    return (res.codes.float() - zero) * res.scales[:, idx].float()


def naive_gptq(w, h, bits, group_size, symmetric, dampening=0.01):
    """Textbook GPTQ: after every column, update every remaining column directly."""
    w = w.clone().double()
    h = h.clone().double()
    k = w.shape[1]
    h += dampening * torch.diag(h).mean() * torch.eye(k, dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    gs = k if group_size == -1 else group_size
    q = torch.zeros_like(w)
    for j in range(k):
        if j % gs == 0:
            lo, hi = group_min_max(w[:, j : j + gs].float(), -1)
            scale, zero = choose_int_qparams(lo, hi, bits, symmetric)
            z = (1 << (bits - 1)) if zero is None else zero.double()
        code = torch.clamp(torch.round(w[:, j : j + 1] / scale.double()) + z, 0, (1 << bits) - 1)
        q[:, j : j + 1] = (code - z) * scale.double()
        err = (w[:, j : j + 1] - q[:, j : j + 1]) / hinv[j, j]
        w[:, j:] -= err @ hinv[j : j + 1, j:]
    return q.float()


@pytest.mark.parametrize("group_size", [-1, 16, 24])
def test_blocked_matches_naive_column_loop(group_size):
    torch.manual_seed(0)
    n, k = 8, 64
    w = torch.randn(n, k)
    h, _ = accumulate_hessian(None, 0, correlated_inputs(512, k))
    res = gptq_quantize(w, h, 4, group_size, symmetric=False, block_size=16)
    blocked = dequant(res, 4, group_size)
    ref = naive_gptq(w, h, 4, group_size, False)
    # -- equal codes except where float rounding flips a tie: compare the dequantized values
    mismatch = (blocked - ref).abs() > 1e-4
    assert mismatch.float().mean() < 0.01


@pytest.mark.parametrize("bits, group_size", [(4, 32), (3, 32), (2, -1), (8, 32), (4, 48)])
@pytest.mark.parametrize("act_order, static", [(False, False), (True, False), (True, True)])
def test_gptq_beats_rtn_on_correlated_inputs(bits, group_size, act_order, static):
    torch.manual_seed(1)
    n, k = 32, 160  # 160 = 3 x 48 + 16: a partial last group for g48
    w = torch.randn(n, k)
    x = correlated_inputs(2048, k)
    h, count = accumulate_hessian(None, 0, x[:1000])
    h, count = accumulate_hessian(h, count, x[1000:])
    assert count == 2048
    res = gptq_quantize(w, h, bits, group_size, False, 128, 0.01, act_order, static)
    assert res.codes.dtype == torch.uint8 and int(res.codes.max()) < (1 << bits)
    assert (res.g_idx is not None) == (act_order and not static and group_size != -1)
    rtn = quantize_int_weight(w, bits, group_size, False)
    rtn_w = dequantize_int_weight(rtn.codes, rtn.scales, rtn.zeros, bits, group_size)
    assert output_error(w, dequant(res, bits, group_size), x) < output_error(w, rtn_w, x)


@pytest.mark.parametrize("group_size", [32, -1])
@pytest.mark.parametrize("act_order, static", [(False, False), (True, False), (True, True)])
def test_hessian_weighted_ranges_beat_rtn(act_order, static, group_size):
    torch.manual_seed(2)
    w = torch.distributions.StudentT(3.0).sample((32, 96))
    x = correlated_inputs(1024, 96, seed=3)
    h, _ = accumulate_hessian(None, 0, x)
    res = gptq_quantize(w, h, 3, group_size, False, 32, 0.01, act_order, static, "hessian_mse")
    rtn = quantize_int_weight(w, 3, group_size, False)
    rtn_w = dequantize_int_weight(rtn.codes, rtn.scales, rtn.zeros, 3, group_size)
    assert output_error(w, dequant(res, 3, group_size), x) < output_error(w, rtn_w, x)


def test_hessian_accumulation_equals_full_batch():
    x = torch.randn(300, 12)
    h, n = accumulate_hessian(None, 0, x[:100])
    h, n = accumulate_hessian(h, n, x[100:].reshape(2, 100, 12))
    torch.testing.assert_close(h, 2 * x.t() @ x / 300, rtol=1e-5, atol=1e-5)


def test_dead_input_columns_are_zeroed_and_symmetric_has_no_zeros():
    x = torch.randn(256, 32)
    x[:, 5] = 0.0
    h, _ = accumulate_hessian(None, 0, x)
    w = torch.randn(4, 32)
    res = gptq_quantize(w, h, 4, 16, symmetric=True)
    assert res.zeros is None
    assert torch.all(dequant(res, 4, 16)[:, 5] == 0)


@settings(max_examples=15, deadline=None)
@given(bits=st.integers(2, 8), k=st.integers(4, 80), gs=st.sampled_from([-1, 16, 32]))
def test_codes_stay_in_range_for_any_shape(bits, k, gs):
    w = torch.randn(3, k)
    h, _ = accumulate_hessian(None, 0, torch.randn(64, k))
    res = gptq_quantize(w, h, bits, gs, symmetric=False, block_size=8)
    assert res.codes.shape == (3, k)
    assert int(res.codes.max()) <= (1 << bits) - 1
    assert res.scales.shape[1] == (1 if gs == -1 else -(-k // gs))


def test_bad_inputs():
    w = torch.randn(4, 8)
    with pytest.raises(QuantizationError, match="disagree"):
        gptq_quantize(w, torch.eye(7), 4, -1)
    with pytest.raises(CalibrationError, match="NaN"):
        gptq_quantize(w, torch.full((8, 8), float("nan")), 4, -1)
    with pytest.raises(QuantizationError, match="bits"):
        gptq_quantize(w, torch.eye(8), 9, -1)
