"""MXFP4's opt-in E8M0 scale rounding (``scale_rounding="compressed-tensors"``) beside the spec's.

The chosen exponents are checked against compressed-tensors' own ``generate_mx_scales`` and
its full MXFP4 weight quantization (codes bit for bit), and both roundings against the bound
each one proves.  Bound (block max ``a`` finite and in float32's normal range, block scale
``s = 2**e``): the spec's ``floor(log2 a) - 2`` puts ``a / s`` in ``[4, 8)``, so a value may
saturate from just under 8 to 6, an error below ``2 s``; the compressed-tensors rounding
puts ``a / s`` in ``[3.5, 7)``, so every value of the block lands within ``s`` of its
dequantized code (half of E2M1's widest step, 4 -> 6), saturated ones included, and the
block max loses less than 1/7 of itself.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchquant import QuantizationError
from torchquant.numerics.fp4 import (
    MXFP4_BLOCK,
    block_absmax,
    dequantize_mxfp4_weight,
    e8m0_to_float,
    expand_blocks,
    fp4_rounding,
    mxfp4_scales_for_amax,
    pack_e2m1,
    quantize_mxfp4_weight,
    search_mxfp4_weight,
)
from torchquant.numerics.fp4 import block_squared_error as squared_error
from torchquant.numerics.microscaling import quantize_microscaled

ROUNDINGS = ("ocp", "compressed-tensors")
# -- the largest ``|x| / s`` of a block and the largest error in units of ``s`` each allows
SCALED_MAX = {"ocp": 8.0, "compressed-tensors": 7.0}
ERROR_BOUND = {"ocp": 2.0, "compressed-tensors": 1.0}


def _exponents(scales: torch.Tensor) -> list[int]:
    return (scales.to(torch.int32) - 127).flatten().tolist()


def test_the_max_rounds_up_exactly_from_a_significand_of_one_and_three_quarters():
    amax = torch.tensor([[1.0, 1.5, 1.7499999, 1.75, 1.99, 2.0, 6.0, 7.0, 0.4375, 0.0]])
    spec = [-2, -2, -2, -2, -2, -1, 0, 0, -4, -128]
    up = [-2, -2, -2, -1, -1, -1, 0, 1, -3, -128]
    spec_zero, up_zero = -127, -127  # -- an all-zero block: the smallest normal's, clamped
    spec[-1], up[-1] = spec_zero, up_zero
    assert _exponents(mxfp4_scales_for_amax(amax)) == spec
    assert _exponents(mxfp4_scales_for_amax(amax, "compressed-tensors")) == up


def test_exponents_stay_inside_e8m0_at_both_ends_of_float32():
    amax = torch.tensor([[3.4e38, 2.0**-149, 2.0**-126 * 1.9]])
    for rounding in ROUNDINGS:
        got = _exponents(mxfp4_scales_for_amax(amax, rounding))
        assert got[1:] == [-127, -127]
        assert got[0] == (126 if rounding == "compressed-tensors" else 125)


ct_mx = pytest.importorskip("compressed_tensors.quantization.utils.mxfp_utils")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_exponents_are_compressed_tensors_generate_mx_scales(dtype):
    g = torch.Generator().manual_seed(0)
    amax = torch.rand(20000, generator=g) * torch.exp2(torch.randint(-12, 12, (20000,)).float())
    edges = torch.tensor([1.75, 1.7499, 1.0, 2.0, 3.5, 6.0, 7.0, 0.875, 1e-3])
    amax = torch.cat([amax, edges]).to(dtype).clamp(min=2.0**-12)
    theirs = ct_mx.generate_mx_scales(amax, 4)
    ours = mxfp4_scales_for_amax(amax, "compressed-tensors")
    assert torch.equal(ours.float(), theirs.float())
    assert not torch.equal(ours, mxfp4_scales_for_amax(amax))  # -- the two rules differ


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_codes_are_compressed_tensors_mxfp4_weight_codes(dtype):
    from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.quant_scheme import MXFP4A16
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    g = torch.Generator().manual_seed(1)
    w = (torch.randn(16, 128, generator=g) * torch.rand(16, 1, generator=g) * 0.1).to(dtype)
    args = QuantizationArgs(**MXFP4A16["weights"].model_dump())
    blocks = w.reshape(16, 4, 32)
    scale, _ = calculate_qparams(blocks.amin(-1), blocks.amax(-1), args)
    ct_codes = pack_fp4_to_uint8(quantize(w, scale.to(dtype), None, args, global_scale=None))
    ours = quantize_mxfp4_weight(w, scale_rounding="compressed-tensors")
    assert torch.equal(e8m0_to_float(ours.scales), scale.float())
    assert torch.equal(pack_e2m1(ours.codes), ct_codes)


# -- the bound, for weights and activations alike, partial last blocks included
normal_block_values = st.floats(
    -1.0, 1.0, allow_nan=False, allow_infinity=False, allow_subnormal=False, width=32
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(normal_block_values, min_size=1, max_size=100),
    st.integers(-60, 60),
    st.sampled_from(ROUNDINGS),
)
def test_no_value_loses_more_than_the_rounding_allows(values, octave, rounding):
    w = torch.tensor([values]) * 2.0**octave  # (1, K): K up to 100, a partial last block
    amax = block_absmax(w, MXFP4_BLOCK)
    q = quantize_mxfp4_weight(w, scale_rounding=rounding)
    scale = e8m0_to_float(q.scales)
    live = amax > 2.0**-100  # -- far from E8M0's floor, where the exponent is clamped
    scaled_max = amax / scale
    assert bool((scaled_max[live] < SCALED_MAX[rounding]).all())
    assert bool((scaled_max[live] >= SCALED_MAX[rounding] / 2).all())  # -- no wasted octave
    error = (dequantize_mxfp4_weight(q.codes, q.scales) - w).abs()
    per_value = expand_blocks(scale, MXFP4_BLOCK, w.shape[1])
    bound = ERROR_BOUND[rounding] * per_value
    assert bool((error <= bound)[expand_blocks(live, MXFP4_BLOCK, w.shape[1])].all())
    # -- what saturation (not rounding) takes off the block max, relative to it
    saturated = (amax - 6.0 * scale).clamp(min=0.0)[live] / amax[live]
    assert bool((saturated < (1 / 4 if rounding == "ocp" else 1 / 7)).all())
    acts = quantize_microscaled(w, "mxfp4", scale_rounding=rounding)
    assert torch.equal(acts.scales, q.scales) and torch.equal(acts.values, q.codes)


def test_the_compressed_tensors_rounding_saturates_less_at_the_top_of_an_octave():
    w = torch.zeros(1, 40)  # -- 32 + a short block of 8
    w[0, :3] = torch.tensor([7.5, 4.0, -7.9])
    w[0, 32:34] = torch.tensor([3.6, 0.3])  # -- 3.6 = 1.8 * 2: rounded up to 4
    spec = quantize_mxfp4_weight(w)
    ours = quantize_mxfp4_weight(w, scale_rounding="compressed-tensors")
    assert e8m0_to_float(spec.scales).tolist() == [[1.0, 0.5]]
    assert e8m0_to_float(ours.scales).tolist() == [[2.0, 1.0]]
    spec_w, ours_w = (dequantize_mxfp4_weight(q.codes, q.scales)[0] for q in (spec, ours))
    assert spec_w[[0, 1, 2, 32, 33]].tolist() == [6.0, 4.0, -6.0, 3.0, 0.25]
    # -- the coarser grid of a block rounded up: 0.3 on steps of 0.5 instead of 0.25
    assert ours_w[[0, 1, 2, 32, 33]].tolist() == [8.0, 4.0, -8.0, 4.0, 0.5]


def test_the_scale_search_starts_from_the_chosen_rounding_and_never_loses_to_it():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(32, 200, generator=g) * torch.rand(32, 1, generator=g)
    rtn = quantize_mxfp4_weight(w, scale_rounding="compressed-tensors")
    searched = search_mxfp4_weight(w, scale_rounding="compressed-tensors")
    err_rtn = squared_error(w, rtn.scales, None, MXFP4_BLOCK)
    err_search = squared_error(w, searched.scales, None, MXFP4_BLOCK)
    assert bool((err_search <= err_rtn).all()) and float(err_search.sum()) < float(err_rtn.sum())
    step = (searched.scales.to(torch.int16) - rtn.scales.to(torch.int16)).abs()
    assert int(step.max()) <= 1
    assert fp4_rounding("mxfp4", "compressed-tensors", search=True)(w).scales.equal(searched.scales)


def test_block_maxima_from_a_clipped_range_round_by_the_same_rule():
    w = torch.full((1, 32), 0.5)
    amax = torch.tensor([[1.8]])
    q = quantize_mxfp4_weight(w, block_amax=amax, scale_rounding="compressed-tensors")
    assert _exponents(q.scales) == [math.floor(math.log2(1.8)) + 1 - 2]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused_by_name(bad):
    w = torch.randn(4, 64)
    w[2, 40] = bad
    for rounding in ROUNDINGS:
        with pytest.raises(QuantizationError, match="layers.3.up_proj.*NaN/Inf"):
            quantize_mxfp4_weight(w, "layers.3.up_proj", scale_rounding=rounding)
        with pytest.raises(QuantizationError, match="layers.3.up_proj.*NaN/Inf"):
            search_mxfp4_weight(w, "layers.3.up_proj", scale_rounding=rounding)


def test_unknown_roundings_and_other_formats_are_refused_by_name():
    w = torch.randn(2, 32)
    with pytest.raises(QuantizationError, match="scale_rounding.*'nearest'"):
        quantize_mxfp4_weight(w, scale_rounding="nearest")
    with pytest.raises(QuantizationError, match="scale_rounding.*nvfp4"):
        fp4_rounding("nvfp4", "compressed-tensors")
    with pytest.raises(QuantizationError, match="scale_rounding.*nvfp4"):
        quantize_microscaled(w, "nvfp4", scale_rounding="compressed-tensors")
