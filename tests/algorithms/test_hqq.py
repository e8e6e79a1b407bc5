"""HQQ's solver: lower lp error than round-to-nearest, in RTN's own layout."""

import pytest
import torch
from fuzz_strategies import int_weight_cases
from hypothesis import given, settings

from torchquant.algorithms.hqq import LP_NORM, hqq_quantize
from torchquant.errors import QuantizationError
from torchquant.numerics import dequantize_int_weight, expand_groups, quantize_int_weight


def lp_error(w, q, group_size):
    """Per-group ``sum |w - dequant|^p`` ``(N, G)`` (HQQ's objective)."""
    deq = dequantize_int_weight(q.codes, q.scales, q.zeros, q.bits, group_size)
    err = (w.float() - deq).abs().pow(LP_NORM)
    groups = q.scales.shape[1]
    index = torch.arange(w.shape[1]) // (w.shape[1] if group_size == -1 else group_size)
    return torch.zeros(w.shape[0], groups).index_add_(1, index, err)


def heavy_tailed(n, k, seed):
    """Student-t weights (3 degrees of freedom): the outliers HQQ's lp objective tolerates."""
    g = torch.Generator().manual_seed(seed)
    chi2 = torch.randn(3, n, k, generator=g).square().sum(0)
    return torch.randn(n, k, generator=g) / (chi2 / 3).sqrt() * 0.02


@pytest.mark.parametrize("kind", ["normal", "student_t"])
@pytest.mark.parametrize("bits,group_size", [(4, 128), (3, 64), (2, 32), (4, -1)])
def test_lp_error_below_rtn(kind, bits, group_size):
    w = torch.randn(96, 512) * 0.02 if kind == "normal" else heavy_tailed(96, 512, 1)
    hqq = lp_error(w, hqq_quantize(w, bits, group_size), group_size)
    rtn = lp_error(w, quantize_int_weight(w, bits, group_size, False), group_size)
    assert torch.all(hqq <= rtn)
    assert hqq.sum() < 0.97 * rtn.sum()


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("in_features,group_size", [(576, 128), (100, 128), (130, 32), (77, -1)])
def test_same_layout_as_rtn(symmetric, in_features, group_size):
    """Partial last groups, a group wider than the row and per-channel, as RTN lays them out."""
    w = (torch.randn(24, in_features) * 0.05).to(torch.bfloat16)
    q = hqq_quantize(w, 4, group_size, symmetric)
    ref = quantize_int_weight(w, 4, group_size, symmetric)
    assert q.codes.shape == ref.codes.shape and q.codes.dtype == ref.codes.dtype
    assert q.scales.shape == ref.scales.shape and q.scales.dtype == ref.scales.dtype
    assert (q.zeros is None) == (ref.zeros is None)
    if q.zeros is not None:
        assert q.zeros.shape == ref.zeros.shape and q.zeros.dtype == torch.uint8
    assert (q.bits, q.group_size) == (4, group_size)
    assert lp_error(w, q, group_size).sum() <= lp_error(w, ref, group_size).sum()


def test_codes_are_the_nearest_on_the_stored_grid():
    """The codes round the weight with the stored scale and zero, so the layout needs nothing
    beyond RTN's formula to dequantize."""
    w = torch.randn(32, 256) * 0.03
    q = hqq_quantize(w, 3, 64)
    scale = expand_groups(q.scales, 64, 256).float()
    zero = expand_groups(q.zeros, 64, 256).float()
    expected = torch.clamp(torch.round(w / scale) + zero, 0, 7).to(torch.uint8)
    assert torch.equal(q.codes, expected)


@settings(max_examples=30, deadline=None)
@given(case=int_weight_cases(max_rows=6, max_cols=200, min_scale=1e-4, max_scale=1e2))
def test_codes_in_range_and_never_worse_than_rtn(case):
    w, bits, group_size, symmetric = case
    q = hqq_quantize(w, bits, group_size, symmetric)
    ref = quantize_int_weight(w, bits, group_size, symmetric)
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= (1 << bits) - 1
    if q.zeros is not None:
        assert int(q.zeros.max()) <= (1 << bits) - 1
    assert torch.all(q.scales > 0)
    hqq, rtn = lp_error(w, q, group_size), lp_error(w, ref, group_size)
    assert torch.all(hqq <= rtn * (1 + 1e-5) + 1e-30)


@pytest.mark.parametrize("bits", range(2, 9))
def test_every_bit_width(bits):
    w = heavy_tailed(16, 256, bits)
    q = hqq_quantize(w, bits, 64)
    assert int(q.codes.max()) <= (1 << bits) - 1
    assert (
        lp_error(w, q, 64).sum() <= lp_error(w, quantize_int_weight(w, bits, 64, False), 64).sum()
    )


def test_deterministic():
    w = heavy_tailed(48, 320, 7)
    a, b = hqq_quantize(w, 4, 128), hqq_quantize(w.clone(), 4, 128)
    assert torch.equal(a.codes, b.codes)
    assert torch.equal(a.scales, b.scales) and torch.equal(a.zeros, b.zeros)


def test_constant_and_zero_rows_stay_exact():
    w = torch.zeros(4, 64)
    w[1] = 0.25
    q = hqq_quantize(w, 4, 32)
    deq = dequantize_int_weight(q.codes, q.scales, q.zeros, 4, 32)
    torch.testing.assert_close(deq, w, rtol=0, atol=1e-7)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_refused_by_name(bad):
    w = torch.randn(8, 64)
    w[3, 9] = bad
    with pytest.raises(QuantizationError, match="model.layers.0.mlp.up_proj"):
        hqq_quantize(w, 4, 32, what="model.layers.0.mlp.up_proj")


@pytest.mark.parametrize(
    "params,field",
    [
        ({"iterations": 0}, "iterations"),
        ({"lp_norm": 1.5}, "lp_norm"),
        ({"beta": 0.0}, "beta"),
        ({"kappa": 0.5}, "kappa"),
    ],
)
def test_bad_solver_params_refused(params, field):
    with pytest.raises(QuantizationError, match=field):
        hqq_quantize(torch.randn(4, 32), 4, 32, **params)
