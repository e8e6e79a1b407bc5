"""The FP8 block scale search (``observer="mse"``): per block, the widening of the block
max's scale whose E4M3 rounding has the least squared error."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchquant.errors import QuantizationError
from torchquant.numerics import (
    block_grid,
    dequantize_fp8_block_weight,
    quantize_fp8_block_weight,
    search_fp8_block_weight,
)
from torchquant.numerics.fp8_block import FP8_SCALE_WIDENINGS, _block_absmax, expand_blocks
from torchquant.numerics.qparams import choose_fp8_scale

BLOCK = (128, 128)


def _block_errors(w, q, scales, block):
    """Squared error of each block ``(GN, GK)``, summed tile by tile."""
    error = (dequantize_fp8_block_weight(q, scales, block) - w).square()
    gn, gk = block_grid(*w.shape, block)
    return torch.tensor(
        [
            [
                float(
                    error[
                        i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]
                    ].sum()
                )
                for j in range(gk)
            ]
            for i in range(gn)
        ]
    )


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 300), k=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_no_block_is_worse_than_round_to_nearest(n, k, seed):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05
    rtn_q, rtn_s = quantize_fp8_block_weight(w, BLOCK)
    q, scales = search_fp8_block_weight(w, BLOCK)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (n, k)
    assert scales.dtype == torch.float32 and scales.shape == rtn_s.shape
    assert bool((_block_errors(w, q, scales, BLOCK) <= _block_errors(w, rtn_q, rtn_s, BLOCK)).all())


def test_searched_scales_are_widenings_that_clip_nothing():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(300, 200, generator=g)
    w[:, :2] *= 30  # a few large columns, as real weights have
    q, scales = search_fp8_block_weight(w, BLOCK)
    amax = _block_absmax(w, BLOCK)
    candidates = torch.stack([choose_fp8_scale(amax * f) for f in FP8_SCALE_WIDENINGS])
    assert bool((candidates == scales).any(dim=0).all())
    assert bool((scales >= quantize_fp8_block_weight(w, BLOCK)[1]).all())
    element = expand_blocks(scales, BLOCK, *w.shape)
    assert bool(((w / element).abs() <= 448).all())  # -- no value saturates


def test_the_search_lowers_the_total_error_on_gaussian_weights():
    w = torch.randn(512, 384, generator=torch.Generator().manual_seed(2)) * 0.02
    rtn_q, rtn_s = quantize_fp8_block_weight(w, BLOCK)
    q, scales = search_fp8_block_weight(w, BLOCK)
    rtn = _block_errors(w, rtn_q, rtn_s, BLOCK).sum()
    searched = _block_errors(w, q, scales, BLOCK).sum()
    assert searched < 0.99 * rtn


def test_zero_blocks_keep_scale_one_and_values_round_as_their_scale_says():
    w = torch.zeros(200, 256)
    w[:128, 128:] = torch.randn(128, 128, generator=torch.Generator().manual_seed(3))
    q, scales = search_fp8_block_weight(w, BLOCK)
    assert scales[0, 0] == 1 and scales[1, 0] == 1 and scales[1, 1] == 1
    element = expand_blocks(scales, BLOCK, *w.shape)
    expected = torch.clamp(w / element, -448, 448).to(torch.float8_e4m3fn)
    assert torch.equal(q.view(torch.uint8), expected.view(torch.uint8))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_weights_are_refused_by_name(bad):
    w = torch.randn(4, 8)
    w[1, 2] = bad
    with pytest.raises(QuantizationError, match="layers.0.mlp.up_proj"):
        search_fp8_block_weight(w, BLOCK, what="layers.0.mlp.up_proj")
