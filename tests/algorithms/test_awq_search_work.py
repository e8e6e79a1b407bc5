"""The AWQ searches' shortcuts choose what the plain searches choose."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.tiny_models import tiny_llama
from torchquant import QuantConfig, convert_model
from torchquant.algorithms.awq import (
    PartedLoss,
    fake_quantize,
    quantize_in_ranges,
    search_clip,
    search_scales,
)
from torchquant.calibration.block import CalibrationBlock
from torchquant.config import AWQConfig, QuantScheme, WeightQuant
from torchquant.numerics import dequantize_int_weight, group_min_max


def counted_loss(parts: list[list[float]]) -> tuple[PartedLoss, list[int]]:
    """A loss whose part ``i`` for the ``c``-th distinct weight list is ``parts[c][i]``,
    counting the parts scored; candidates are told apart by their first weight's sum."""
    keys: dict[float, int] = {}
    scored = [0]

    def part(ws: list[torch.Tensor], i: int) -> torch.Tensor:
        c = keys.setdefault(float(ws[0].sum()), len(keys))
        scored[0] += 1
        return torch.tensor(parts[c][i], dtype=torch.float32)

    return PartedLoss(len(parts[0]), part), scored


@pytest.mark.parametrize("seed", range(6))
def test_parted_search_picks_the_full_searchs_candidate(seed):
    gen = torch.Generator().manual_seed(seed)
    act_mean = torch.rand(16, generator=gen) + 0.1
    w = torch.randn(8, 16, generator=gen)

    def quantize(t):
        return fake_quantize(t, 3, 8, False)

    grid, parts = 10, 5
    table = (torch.rand(grid, parts, generator=gen) * 4).tolist()
    if seed % 3 == 1:
        table[7] = list(table[2])  # -- equal totals: the first of them wins
        table[2][0], table[2][1] = table[2][1], table[2][0]  # -- reached in another order
    if seed % 3 == 2:
        table[4][3] = math.nan  # -- a NaN part is never chosen
    parted, _ = counted_loss(table)
    plain, _ = counted_loss(table)
    got = search_scales(act_mean, [w], quantize, parted, grid)
    want = search_scales(act_mean, [w], quantize, lambda ws: plain(ws), grid)
    assert got[1] == want[1] and got[2] == want[2]
    assert torch.equal(got[0], want[0])


def test_parted_search_skips_the_rest_of_a_beaten_candidate():
    act_mean = torch.rand(16) + 0.1
    w = torch.randn(8, 16)
    table = [[1.0 + 10 * c] * 4 for c in range(10)]  # -- alpha 0 is best by far
    loss, scored = counted_loss(table)
    s, alpha, best = search_scales(act_mean, [w], lambda t: fake_quantize(t, 3, 8, False), loss, 10)
    assert alpha == 0.0 and best == 4.0
    # -- every first part, then only the best candidate's other three
    assert scored[0] == 10 + 3


def counted_quantize(calls: list[int]):
    def quantize(t):
        calls[0] += 1
        return fake_quantize(t, 3, 8, False)

    return quantize


@settings(max_examples=25, deadline=None)
@given(
    table=st.lists(
        st.lists(st.floats(0.0, 4.0, width=32), min_size=4, max_size=4), min_size=6, max_size=6
    ),
    budget_candidates=st.integers(0, 7),
)
def test_kept_candidates_change_nothing_but_the_quantizations(table, budget_candidates):
    """Whatever the cache holds, the choice and loss are the plain search's; with room for
    every candidate each is quantized once, with none again where the second pass reaches it."""
    gen = torch.Generator().manual_seed(len(table))
    act_mean = torch.rand(16, generator=gen) + 0.1
    w = torch.randn(8, 16, generator=gen)
    per_candidate = w.numel() * w.element_size()
    calls = [0]
    parted, scored = counted_loss(table)
    got = search_scales(
        act_mean,
        [w],
        counted_quantize(calls),
        parted,
        len(table),
        cache_bytes=budget_candidates * per_candidate,
    )
    plain, _ = counted_loss(table)
    want = search_scales(act_mean, [w], counted_quantize([0]), lambda ws: plain(ws), len(table))
    assert got[1] == want[1] and got[2] == want[2] and torch.equal(got[0], want[0])
    reached = scored[0] > len(table)  # -- the second pass scored some candidate further
    if budget_candidates >= len(table):
        assert calls[0] == len(table)
    elif budget_candidates == 0 and reached:
        assert calls[0] > len(table)


def test_kept_candidates_stay_within_the_budget():
    """A budget of three candidates keeps the three least first parts; the second pass
    reaches every candidate, so the other five are quantized again."""
    act_mean = torch.rand(16) + 0.1
    w = torch.randn(8, 16)
    table = [[10.0 - c, 3.0, 3.0, 3.0] for c in range(8)]  # -- the last candidate is best
    per_candidate = w.numel() * w.element_size()
    for kept, quantized in ((8, 8), (3, 8 + 5), (0, 8 + 8)):
        calls = [0]
        loss, _ = counted_loss(table)
        got = search_scales(
            act_mean, [w], counted_quantize(calls), loss, 8, cache_bytes=kept * per_candidate
        )
        assert got[1] == 7 / 8 and got[2] == 12.0
        assert calls[0] == quantized


def test_parted_search_without_a_finite_loss_keeps_unit_scales():
    act_mean = torch.rand(16) + 0.1
    loss, _ = counted_loss([[math.inf, 1.0]] * 4)
    s, alpha, best = search_scales(
        act_mean, [torch.randn(8, 16)], lambda t: fake_quantize(t, 3, 8, False), loss, 4
    )
    assert torch.equal(s, torch.ones(16)) and alpha == 0.0 and best == math.inf


def partial_product_ranges(w, x, bits, group_size, grid, max_shrink):
    """The clip ranges scored the plain way, in float64: each group's partial products."""
    n, k = w.shape
    lo0, hi0 = group_min_max(w, group_size)
    g = lo0.shape[1]
    best = torch.full((n, g), math.inf, dtype=torch.float64)
    best_p = torch.ones(n, g)
    for i in range(max(1, int(grid * max_shrink))):
        p = 1.0 - i / grid
        d = (fake_quantize(w, bits, group_size, False, (lo0 * p, hi0 * p)) - w).double()
        xd = x.double()
        err = torch.stack(
            [
                (
                    xd[:, j * group_size : (j + 1) * group_size]
                    @ d[:, j * group_size : (j + 1) * group_size].t()
                )
                .pow(2)
                .mean(0)
                for j in range(g)
            ],
            dim=1,
        )
        better = err < best
        best = torch.where(better, err, best)
        best_p = torch.where(better, torch.full_like(best_p, p), best_p)
    return lo0 * best_p, hi0 * best_p


@pytest.mark.parametrize("tokens", [16, 300])  # -- fewer rows than a group, and more
def test_clip_search_matches_the_partial_products(tokens):
    torch.manual_seed(tokens)
    w = torch.distributions.StudentT(3.0).sample((24, 96))
    x = torch.randn(tokens, 96)
    x[:, :3] *= 20.0
    got = search_clip(w, x, 3, 32, False, grid=20, max_shrink=0.5)
    want = partial_product_ranges(w, x, 3, 32, 20, 0.5)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 40, -1])  # -- 40 leaves a partial last group
@pytest.mark.parametrize("symmetric", [False, True])
def test_grouped_fake_quantize_is_the_codes_dequantized(dtype, bits, group_size, symmetric):
    torch.manual_seed(bits * 100 + group_size)
    w = (torch.distributions.StudentT(3.0).sample((24, 96)) * 0.1).to(dtype)
    w[3, :40] = 0.0  # -- an all-zero group: scale 1
    w[5] = w[5].abs()  # -- groups that do not reach below zero
    lo, hi = group_min_max(w, group_size)
    shrunk = (lo * 0.7, hi * 0.7)
    for ranges in (None, shrunk):
        q = quantize_in_ranges(w, ranges or (lo, hi), bits, group_size, symmetric, torch.float32)
        want = dequantize_int_weight(q.codes, q.scales, q.zeros, bits, group_size, dtype)
        got = fake_quantize(w, bits, group_size, symmetric, ranges)
        assert got.dtype == dtype and torch.equal(got, want)


@pytest.mark.usefixtures("one_thread")
def test_float_outputs_of_the_statistics_pass_give_the_recomputed_state_dict(monkeypatch):
    """The scale search scores candidates against the outputs the statistics pass saw
    (attention with its rotary and mask keywords, the MLP, a linear): the same state dict
    as running the inspected modules again, with one forward fewer per sample and mapping."""
    scheme = QuantScheme(
        WeightQuant(bits=4, group_size=16, symmetric=False),
        algorithm="awq",
        awq=AWQConfig(grid=4, clip_grid=4),
    )
    ids = torch.randint(0, 96, (3, 24), generator=torch.Generator().manual_seed(1))

    def calibrated(recompute: bool) -> tuple[dict, int]:
        model = tiny_llama(layers=2, kv_heads=2)  # -- v feeds o: all four mappings fold
        calls = [0]
        for block in model.model.layers:
            block.mlp.register_forward_pre_hook(lambda m, a: calls.__setitem__(0, calls[0] + 1))
        if recompute:
            monkeypatch.setattr(CalibrationBlock, "rescaled_within", lambda self, name: True)
        convert_model(model, QuantConfig(scheme), calibration_data=ids, progress=False)
        monkeypatch.undo()
        return model.state_dict(), calls[0]

    reused, reused_calls = calibrated(False)
    recomputed, recomputed_calls = calibrated(True)
    assert reused.keys() == recomputed.keys()
    for name, t in reused.items():
        assert torch.equal(t, recomputed[name]), name
    assert recomputed_calls - reused_calls == 2 * len(ids)  # -- each block's MLP reference
