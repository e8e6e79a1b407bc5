"""AWQ's clipping search on MXFP4: each block's own exponent, the one below and the one
above, where a shrink of the range alone never reaches the one above."""

import pytest
import torch

from torchquant import WeightQuant
from torchquant.algorithms.awq import (
    MXFP4_CLIP_FACTORS,
    clip_factors,
    quantize_fp4_in_ranges,
    search_clip_ranges,
    weight_fake_quantize,
)
from torchquant.numerics.fp4 import choose_mxfp4_scales

ROUNDINGS = ["ocp", "compressed-tensors"]


def _saturating_block() -> tuple[torch.Tensor, torch.Tensor]:
    """One row of one block whose max 1.9 lands at 7.6 times the spec's scale (saturating
    to 6), fed by an input channel far larger than the others."""
    w = torch.full((1, 32), 0.01)
    w[0, 0] = 1.9
    x = torch.randn(256, 32, generator=torch.Generator().manual_seed(0)) * 0.01
    x[:, 0] = 10.0
    return w, x


def test_the_spec_rounding_can_take_the_exponent_above_a_saturating_max():
    w, x = _saturating_block()
    quantize = weight_fake_quantize(WeightQuant(type="mxfp4"))
    ranges = search_clip_ranges(w, x, 32, quantize, factors=MXFP4_CLIP_FACTORS)
    chosen = quantize_fp4_in_ranges(w, ranges, "mxfp4", "w").scales
    assert int(chosen) == int(choose_mxfp4_scales(w)) + 1

    def output_error(q: torch.Tensor) -> float:
        return float((x @ (q - w).t()).square().mean())

    assert output_error(quantize(w, ranges)) < output_error(quantize(w))
    # -- the shrinks alone stop at the spec's own exponent there
    shrunk = search_clip_ranges(w, x, 32, quantize, grid=20, max_shrink=0.5)
    assert torch.equal(quantize_fp4_in_ranges(w, shrunk, "mxfp4", "w").scales,
                       choose_mxfp4_scales(w))  # fmt: skip


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_the_factors_reach_the_rounding_exponent_and_its_two_neighbours(rounding):
    w = torch.randn(16, 96, generator=torch.Generator().manual_seed(1))
    lo, hi = w.reshape(16, 3, 32).amin(dim=2), w.reshape(16, 3, 32).amax(dim=2)
    own = choose_mxfp4_scales(w, rounding).to(torch.int16)
    got = [
        quantize_fp4_in_ranges(w, (lo * p, hi * p), "mxfp4", "w", rounding).scales.to(torch.int16)
        for p in MXFP4_CLIP_FACTORS
    ]
    for step, scales in zip((0, -1, 1), got, strict=True):
        assert torch.equal(scales - own, torch.full_like(own, step)), step


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_ties_keep_each_blocks_own_range(rounding):
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(2))
    quantize = weight_fake_quantize(WeightQuant(type="mxfp4", scale_rounding=rounding))
    lo, hi = search_clip_ranges(w, torch.zeros(64, 64), 32, quantize, factors=MXFP4_CLIP_FACTORS)
    assert torch.equal(hi, w.reshape(8, 2, 32).amax(dim=2))
    assert torch.equal(lo, w.reshape(8, 2, 32).amin(dim=2))


@pytest.mark.parametrize("weight_type", ["int", "nvfp4"])
def test_other_formats_keep_the_shrinks(weight_type):
    want = tuple(1.0 - i / 20 for i in range(10))
    assert clip_factors(weight_type, 20, 0.5) == want
    assert clip_factors(weight_type, 4, 0.1) == (1.0,)
    assert clip_factors("mxfp4", 20, 0.5) == MXFP4_CLIP_FACTORS
