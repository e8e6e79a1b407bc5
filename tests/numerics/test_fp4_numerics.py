"""FP4 E2M1 numerics: rounding, packing, NVFP4 and MXFP4 block scales.

The rounding is checked against the nearest E2M1 value found by brute force, the
NVFP4 scales, codes and packed bytes against compressed-tensors' own functions, and
MXFP4's E8M0 against the OCP reference formula; compressed-tensors' decompression
must give our dequantized weights bit for bit.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchquant import QuantizationError
from torchquant.numerics.fp4 import (
    FP4_MAGNITUDES,
    choose_mxfp4_scales,
    decode_e2m1,
    dequantize_mxfp4_weight,
    dequantize_nvfp4_weight,
    e8m0_to_float,
    encode_e2m1,
    pack_e2m1,
    quantize_mxfp4_weight,
    quantize_nvfp4_weight,
    unpack_e2m1,
)

ct_helpers = pytest.importorskip("compressed_tensors.compressors.nvfp4.helpers")
from compressed_tensors.quantization import QuantizationArgs  # noqa: E402
from compressed_tensors.quantization.lifecycle.forward import quantize  # noqa: E402
from compressed_tensors.quantization.quant_scheme import NVFP4A16  # noqa: E402
from compressed_tensors.quantization.utils.helpers import (  # noqa: E402
    calculate_qparams,
    generate_gparam,
)

GRID = torch.tensor(sorted({s * m for m in FP4_MAGNITUDES for s in (1.0, -1.0)}))


def _nearest_even(x: float) -> float:
    """The E2M1 value nearest ``x`` (saturated to +-6), ties to the even mantissa."""
    x = max(-6.0, min(6.0, x))
    dist = (GRID - x).abs()
    best = GRID[dist == dist.min()].tolist()
    if len(best) == 1:
        return best[0]
    codes = [int(encode_e2m1(torch.tensor([v]))) & 7 for v in best]
    return best[[c % 2 for c in codes].index(0)]


finite = st.floats(-20.0, 20.0, allow_nan=False, width=32)


@settings(max_examples=400, deadline=None)
@given(st.lists(finite, min_size=1, max_size=64))
def test_decode_of_encode_is_the_nearest_value_ties_to_even(values):
    x = torch.tensor(values, dtype=torch.float32)
    got = decode_e2m1(encode_e2m1(x))
    assert got.tolist() == [_nearest_even(v) for v in values]


def test_every_midpoint_rounds_to_the_even_neighbour_and_large_values_saturate():
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, 1e30])
    expected = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0]
    assert decode_e2m1(encode_e2m1(mids)).tolist() == expected
    assert decode_e2m1(encode_e2m1(-mids)).tolist() == [-v for v in expected]


def test_codes_cover_the_sixteen_values_with_the_sign_in_bit_three():
    codes = torch.arange(16, dtype=torch.uint8)
    values = decode_e2m1(codes)
    assert values[:8].tolist() == list(FP4_MAGNITUDES)
    assert values[8:].tolist() == [-m for m in FP4_MAGNITUDES]
    assert torch.equal(encode_e2m1(values[1:8]), codes[1:8])
    assert torch.equal(encode_e2m1(values[9:]), codes[9:])
    # a negative value rounding to zero keeps its sign; -0.0 itself is +0 (as compressed-tensors)
    assert encode_e2m1(torch.tensor([-0.1, -0.0])).tolist() == [8, 0]


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 5), st.integers(1, 40), st.randoms(use_true_random=False))
def test_unpack_of_pack_gives_the_codes(n, k, rnd):
    codes = torch.tensor([[rnd.randrange(16) for _ in range(k)] for _ in range(n)])
    packed = pack_e2m1(codes.to(torch.uint8))
    assert packed.shape == (n, -(-k // 2)) and packed.dtype == torch.uint8
    assert torch.equal(unpack_e2m1(packed, k), codes.to(torch.uint8))


def test_packing_puts_the_even_column_in_the_low_nibble():
    codes = torch.tensor([[1, 2, 15, 8, 7]], dtype=torch.uint8)
    assert pack_e2m1(codes).tolist() == [[0x21, 0x8F, 0x07]]


# -- NVFP4 against compressed-tensors


def _ct_nvfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """compressed-tensors' (llm-compressor's) NVFP4A16: packed bytes, E4M3 scales, global."""
    args = QuantizationArgs(**NVFP4A16["weights"].model_dump())
    n, k = w.shape
    global_scale = generate_gparam(w.min(), w.max())
    blocks = w.reshape(n, k // 16, 16)
    scale, _ = calculate_qparams(blocks.amin(-1), blocks.amax(-1), args, global_scale)
    scale = scale.to(w.dtype)  # the weight_scale parameter has the weight's dtype
    q = quantize(w, scale, None, args, global_scale=global_scale)
    return ct_helpers.pack_fp4_to_uint8(q), scale.to(torch.float8_e4m3fn), global_scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", range(4))
def test_nvfp4_matches_compressed_tensors_bit_for_bit(dtype, seed):
    torch.manual_seed(seed)
    w = (torch.randn(24, 128) * torch.rand(24, 1) * 3).to(dtype)
    w[3, 16:32] = 0  # a zero block: compressed-tensors' 0.125 scale
    w[5, :16] *= 1e-4  # block scales near E4M3's bottom
    ours = quantize_nvfp4_weight(w)
    packed, scales, global_scale = _ct_nvfp4(w)
    assert torch.equal(ours.global_scale, global_scale)
    assert torch.equal(ours.scales.view(torch.uint8), scales.view(torch.uint8))
    assert torch.equal(pack_e2m1(ours.codes), packed)
    deq = dequantize_nvfp4_weight(ours.codes, ours.scales, ours.global_scale, torch.bfloat16)
    ct_values = ct_helpers.unpack_fp4_from_uint8(packed, 24, 128, torch.float32)
    ct_deq = ct_values * (scales.to(torch.bfloat16) / global_scale).repeat_interleave(16, 1)
    assert torch.equal(deq, ct_deq.to(torch.bfloat16))


def test_nvfp4_error_is_within_half_a_step_of_each_block():
    torch.manual_seed(0)
    w = torch.randn(16, 100)  # a short last block of 4
    q = quantize_nvfp4_weight(w)
    assert q.codes.shape == (16, 100) and q.scales.shape == (16, 7)
    deq = dequantize_nvfp4_weight(q.codes, q.scales, q.global_scale)
    step = (q.scales.float() / q.global_scale).repeat_interleave(16, 1)[:, :100]
    # the widest E2M1 step is 2 (4 -> 6); the E4M3 rounding of the scale adds up to 1/16
    assert bool(((deq - w).abs() <= step * (1 + 1 / 16) + 1e-7).all())


def test_an_all_zero_weight_gets_global_scale_one_and_zero_codes():
    q = quantize_nvfp4_weight(torch.zeros(2, 32))
    assert q.global_scale.tolist() == [1.0]
    assert torch.equal(
        dequantize_nvfp4_weight(q.codes, q.scales, q.global_scale), torch.zeros(2, 32)
    )


# -- MXFP4


def _ocp_shared_exponent(amax: float) -> int:
    """The MX reference: ``floor(log2(amax)) - emax_elem``, clamped to E8M0."""
    if amax == 0:
        return -127
    return max(-127, min(127, math.floor(math.log2(amax)) - 2))


def test_mxfp4_scales_follow_the_ocp_reference():
    amaxes = [1.0, 0.99999994, 1.75, 6.0, 7.99, 8.0, 3e-39, 2.0**-130, 0.0, 1e38]
    w = torch.zeros(len(amaxes), 32)
    w[:, 5] = torch.tensor(amaxes)
    got = choose_mxfp4_scales(w).to(torch.int32) - 127
    assert got.flatten().tolist() == [_ocp_shared_exponent(a) for a in amaxes]


def test_mxfp4_saturates_the_block_max_above_six_times_the_scale():
    w = torch.zeros(1, 32)
    w[0, :3] = torch.tensor([7.5, 4.0, -7.9])  # scale 2**0: 7.5 and -7.9 saturate
    q = quantize_mxfp4_weight(w)
    assert e8m0_to_float(q.scales).tolist() == [[1.0]]
    assert dequantize_mxfp4_weight(q.codes, q.scales)[0, :3].tolist() == [6.0, 4.0, -6.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mxfp4_decompresses_in_compressed_tensors_to_our_weight(dtype):
    from compressed_tensors.compressors.mx_utils import decompress_mx_scale

    torch.manual_seed(1)
    w = (torch.randn(8, 96) * 0.02).to(dtype)
    q = quantize_mxfp4_weight(w)
    ct_values = ct_helpers.unpack_fp4_from_uint8(pack_e2m1(q.codes), 8, 96, torch.bfloat16)
    ct_scale = decompress_mx_scale(q.scales).to(torch.bfloat16).repeat_interleave(32, 1)
    ours = dequantize_mxfp4_weight(q.codes, q.scales, torch.bfloat16)
    assert torch.equal(ours, ct_values * ct_scale)
    ct_codes = quantize(w, ct_scale[:, ::32].to(dtype), None, _mx_args(), global_scale=None)
    assert torch.equal(ct_helpers.pack_fp4_to_uint8(ct_codes), pack_e2m1(q.codes))


def _mx_args() -> QuantizationArgs:
    from compressed_tensors.quantization.quant_scheme import MXFP4A16

    return QuantizationArgs(**MXFP4A16["weights"].model_dump())


@pytest.mark.parametrize("quantize_fp4", [quantize_nvfp4_weight, quantize_mxfp4_weight])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused_by_name(quantize_fp4, bad):
    w = torch.randn(4, 32)
    w[2, 7] = bad
    with pytest.raises(QuantizationError, match="layers.0.q_proj.*NaN/Inf"):
        quantize_fp4(w, what="layers.0.q_proj")
