import pytest
import torch
from torch import nn

from torchquant.algorithms.awq import (
    fake_quantize,
    scale_candidates,
    search_clip,
    search_scales,
    weight_salience,
)
from torchquant.algorithms.smoothquant import smoothing_factors
from torchquant.calibration.layers import fold_into_source, scale_inputs
from torchquant.numerics import group_min_max


def outlier_inputs(tokens: int, k: int) -> torch.Tensor:
    x = torch.randn(tokens, k)
    x[:, :4] *= 30.0  # a few salient channels, as in real LLM activations
    return x


def test_scale_candidates_are_normalised():
    cands = scale_candidates(torch.rand(16) + 0.1, 10)
    assert len(cands) == 10 and cands[0][0] == 0.0
    for _, s in cands:
        assert float(s.max() * s.min()) == pytest.approx(1.0, rel=1e-4)


def test_weight_salience_is_group_relative_magnitude():
    w = torch.tensor([[1.0, -2.0, 4.0, 0.5, 1.0], [2.0, 2.0, -1.0, 1.0, 3.0]])
    # groups of 2 (the last one short): |w| / max|w| in the group, averaged over rows
    want = torch.tensor([[0.5, 1.0, 1.0, 0.125, 1.0], [1.0, 1.0, 1.0, 1.0, 1.0]]).mean(0)
    torch.testing.assert_close(weight_salience([w[:1], w[1:]], 2), want)
    per_channel = weight_salience([w], -1)
    torch.testing.assert_close(per_channel, (w.abs() / w.abs().amax(1, keepdim=True)).mean(0))


def test_duo_scaling_candidates_divide_by_weight_salience():
    act, wm = torch.tensor([4.0, 1.0, 2.0]), torch.tensor([0.5, 1.0, 0.25])
    for (alpha, s), (alpha0, _) in zip(
        scale_candidates(act, 4, wm), scale_candidates(act, 4), strict=True
    ):
        assert alpha == alpha0
        raw = act.pow(alpha) / (wm.pow(1 - alpha) + 1e-4)
        torch.testing.assert_close(s, raw / (raw.max() * raw.min()).sqrt())
        assert float(s.max() * s.min()) == pytest.approx(1.0, rel=1e-4)
    assert not torch.allclose(scale_candidates(act, 4, wm)[0][1], torch.ones(3))


@pytest.mark.parametrize("w_means", ["act", "duo", "both"])
def test_awq_scales_reduce_output_error_vs_rtn(w_means):
    torch.manual_seed(0)
    k, n = 128, 64
    x = outlier_inputs(1024, k)
    w = torch.randn(n, k) * 0.05
    ref = x @ w.t()

    def quantize(t):
        return fake_quantize(t, 3, 32, False)

    def loss_with(ws):
        return float((x @ ws[0].t() - ref).pow(2).mean())

    duo = weight_salience([w], 32)
    choices = {"act": [None], "duo": [duo], "both": [None, duo]}[w_means]
    s, alpha, loss = search_scales(x.abs().mean(0), [w], quantize, loss_with, 20, choices)
    assert alpha > 0.0
    assert loss < loss_with([quantize(w)])
    if w_means == "both":
        for single in ([None], [duo]):
            assert loss <= search_scales(x.abs().mean(0), [w], quantize, loss_with, 20, single)[2]


def test_clip_search_never_worse_than_minmax():
    torch.manual_seed(0)
    w = torch.distributions.StudentT(3.0).sample((32, 96))
    x = torch.randn(256, 96)
    lo, hi = search_clip(w, x, 3, 32, False, grid=20, max_shrink=0.5)
    lo0, hi0 = group_min_max(w, 32)
    assert lo.shape == lo0.shape == (32, 3)
    assert bool((hi <= hi0 + 1e-7).all()) and bool((hi >= 0.5 * hi0 - 1e-6).all())

    def err(ranges):
        q = fake_quantize(w, 3, 32, False, ranges)
        return float((x @ (q - w).t()).pow(2).sum())

    assert err((lo, hi)) < err((lo0, hi0))


def test_smoothing_factors_follow_the_formula_and_guard_dead_channels():
    act = torch.tensor([4.0, 1.0, 0.0])
    w = torch.tensor([[1.0, 2.0, 3.0], [0.5, -4.0, 1.0]])
    s = smoothing_factors(act, [w], alpha=0.5)
    torch.testing.assert_close(s[:2], torch.tensor([4.0**0.5 / 1.0, 1.0 / 4.0**0.5]))
    assert s[2] == 1.0
    assert torch.equal(
        smoothing_factors(act[:2], [w[:, :2]], alpha=0.0)[0], 1.0 / torch.tensor(1.0)
    )


@pytest.mark.parametrize("source_kind", ["layernorm", "linear"])
def test_folding_keeps_the_float_output(source_kind):
    torch.manual_seed(0)
    k = 24
    if source_kind == "layernorm":
        source = nn.LayerNorm(k)
        nn.init.normal_(source.weight)
        nn.init.normal_(source.bias)
    else:
        source = nn.Linear(16, k)
    lin = nn.Linear(k, 8)
    x = torch.randn(5, k if source_kind == "layernorm" else 16)
    before = lin(source(x))
    s = torch.rand(k) * 3 + 0.1
    fold_into_source(source, s)
    scale_inputs(lin, s)
    torch.testing.assert_close(lin(source(x)), before, rtol=1e-5, atol=1e-5)
