"""The chunked MSE range search picks exactly what one pass per candidate over the whole
tensor picks (the plain search, written out here as the oracle)."""

from __future__ import annotations

import pytest
import torch

from torchquant.numerics import choose_int_qparams, group_min_max, range_search
from torchquant.numerics.range_search import mse_range, shrink_factors


def plain_mse_range(x, bits, symmetric, granularity, group_size, column_weight=None):
    """Every candidate on the whole tensor at once: NaN-padded groups, NaN errors dropped."""
    rows, cols = x.shape
    if granularity == "group":
        g = -(-cols // group_size)
        pad = g * group_size - cols
        v = torch.nn.functional.pad(x, (0, pad), value=float("nan")).reshape(-1, group_size)
        lo0, hi0 = (t.reshape(-1, 1) for t in group_min_max(x, group_size))
    else:
        v = x.reshape(1, -1) if granularity == "tensor" else x
        lo0, hi0 = v.amin(dim=1, keepdim=True), v.amax(dim=1, keepdim=True)
    weight = None
    if column_weight is not None:
        full = column_weight.expand(x.shape)
        if granularity == "group":
            full = torch.nn.functional.pad(full, (0, pad), value=float("nan"))
        weight = torch.nan_to_num(full.reshape(v.shape), nan=0.0)
    best_err = torch.full_like(lo0, float("inf"))
    best_lo, best_hi = lo0.clone(), hi0.clone()
    qmax = (1 << bits) - 1
    for p in shrink_factors():
        scales, zeros = choose_int_qparams(lo0 * p, hi0 * p, bits, symmetric)
        zero = (1 << (bits - 1)) if zeros is None else zeros.float()
        err = torch.clamp(torch.round(v / scales) + zero, 0, qmax)
        err = ((err - zero) * scales - v) ** 2
        if weight is not None:
            err = err * weight
        err = err.nan_to_num(nan=0.0).sum(dim=1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, lo0 * p, best_lo)
        best_hi = torch.where(better, hi0 * p, best_hi)
    if granularity == "group":
        return best_lo.reshape(rows, -1), best_hi.reshape(rows, -1)
    return best_lo, best_hi


CASES = [
    # (rows, cols, granularity, group_size, bits, symmetric, weighted)
    (24, 96, "group", 32, 4, False, True),
    (24, 100, "group", 32, 3, False, True),  # a partial last group
    (24, 100, "group", 32, 4, True, False),
    (17, 77, "channel", -1, 3, False, True),
    (9, 40, "tensor", -1, 4, True, False),
]


@pytest.mark.parametrize("chunk", [64, 1000, 1 << 16])  # -- several chunks, a partial one, one
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[2]}-{c[0]}x{c[1]}-w{c[4]}")
def test_chunked_search_equals_the_plain_one(monkeypatch, case, chunk):
    rows, cols, granularity, group_size, bits, symmetric, weighted = case
    monkeypatch.setattr(range_search, "CHUNK_ELEMENTS", chunk)
    torch.manual_seed(rows * cols + bits)
    x = torch.distributions.StudentT(3.0).sample((rows, cols)) * 0.1
    x[0, :5] = 0.0  # -- a run of exact zeros, so some ranges tie across candidates
    weight = torch.rand(cols) * 4 if weighted else None
    got = mse_range(x, bits, symmetric, granularity, group_size, column_weight=weight)
    want = plain_mse_range(x, bits, symmetric, granularity, group_size, weight)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    full = plain_mse_range(x, bits, symmetric, granularity, group_size, torch.zeros(cols))
    assert bool((got[1] - got[0] < full[1] - full[0]).any())  # -- some ranges were clipped
