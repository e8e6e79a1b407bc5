"""FP4 E2M1 weights with block scales: NVFP4 and MXFP4 (the reference numerics).

An E2M1 code is 4 bits, sign in bit 3 and the magnitude index in bits 0-2, for
``+-{0, 0.5, 1, 1.5, 2, 3, 4, 6}``; two codes share a byte, the even column in the
low nibble (compressed-tensors' ``*-pack-quantized`` order).  Rounding is to nearest
with ties to even, saturating at +-6; a negative value that rounds to zero keeps its
sign bit (code 8), as compressed-tensors writes it.

NVFP4: one E4M3 scale per 16 values along K and one float32 global scale per tensor,
``w = e2m1 * (block_scale / global_scale)``, chosen as compressed-tensors does: the
global scale ``448 * 6 / amax`` and the block scales ``global * amax_block / 6``
computed in the weight's dtype, then rounded to E4M3 (a zero one becomes 0.125).
MXFP4: one E8M0 scale (a biased power-of-two exponent, uint8) per 32 values, no
global scale, ``floor(log2(amax_block)) - 2`` as the OCP MX reference computes it, or,
opted into with ``scale_rounding="compressed-tensors"``, as compressed-tensors computes it
(see :func:`e8m0_scales_for_amax`).
A K that is not a multiple of the block leaves a shorter last block.

The scale search (``observer="mse"``) keeps, for each block, the representable scale
with the least squared error after rounding among a few candidates: NVFP4's E4M3
scales of the block max shrunk by the MSE observer's factors, MXFP4's spec exponent and
one below and above it.  The spec's own scale is a candidate, so the search is never
worse than round-to-nearest, and ties keep it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial

import torch

from torchquant.config import MX_SCALE_ROUNDINGS
from torchquant.errors import QuantizationError
from torchquant.numerics.qparams import FP8_E4M3_MAX, to_fp8_e4m3
from torchquant.numerics.range_search import shrink_factors
from torchquant.numerics.weight import _check_weight, num_groups

FP4_MAX = 6.0
FP4_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
NVFP4_BLOCK = 16
MXFP4_BLOCK = 32
E8M0_BIAS = 127
# -- floor(log2(6)): the exponent of E2M1's largest value, the MX spec's emax_elem
E2M1_EMAX = 2
# -- log2 of float32's smallest normal: the MX reference's exponent of an all-zero block
FP32_MIN_NORMAL_EXPONENT = -126
# -- compressed-tensors' replacement for a block scale that rounds to zero in E4M3
NVFP4_ZERO_SCALE = 0.125
# -- shrink factors the NVFP4 scale search tries: E4M3 has 8 scales per octave, and 20
# -- factors down to the MSE observer's 0.2 reach nearly every one of them near the top
FP4_GRID = 20

# -- midpoints between neighbouring magnitudes; at each one, ties go to the even
# -- neighbour: the upper one where it passes with ``>=``, the lower one with ``>``
_UP_AT_TIE = (0.75, 1.75, 3.5)
_DOWN_AT_TIE = (0.25, 1.25, 2.5, 5.0)


def _float32_below(edge: float) -> float:
    return float(torch.nextafter(torch.tensor(edge), torch.tensor(0.0)))


# -- the same edges, each one ``|x|`` must pass strictly (``a >= e`` is ``a > e - ulp``
# -- in float32), so one ``bucketize`` counts the edges passed: the magnitude index
_STRICT_EDGES = tuple(sorted((*_DOWN_AT_TIE, *map(_float32_below, _UP_AT_TIE))))


def encode_e2m1(x: torch.Tensor) -> torch.Tensor:
    """E2M1 codes ``uint8`` of finite ``x`` (same shape): nearest value, ties to even."""
    edges = torch.tensor(_STRICT_EDGES, dtype=torch.float32, device=x.device)
    index = torch.bucketize(x.float().abs(), edges).to(torch.uint8)
    return index | ((x < 0).to(torch.uint8) << 3)


def decode_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """float32 values of E2M1 ``codes`` (same shape); code 8 is -0."""
    signed = (*FP4_MAGNITUDES, *(-m for m in FP4_MAGNITUDES))
    table = torch.tensor(signed, dtype=torch.float32, device=codes.device)
    return table[codes.long()]


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """``(N, K)`` codes as ``(N, ceil(K/2))`` uint8, column ``2j`` in byte ``j``'s low nibble."""
    if codes.shape[1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    pairs = codes.to(torch.uint8).view(codes.shape[0], -1, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_e2m1(packed: torch.Tensor, k: int) -> torch.Tensor:
    """The ``(N, k)`` uint8 codes held in ``packed: (N, ceil(k/2))``."""
    codes = torch.stack((packed & 0x0F, packed >> 4), dim=-1)
    return codes.reshape(packed.shape[0], -1)[:, :k]


@dataclass
class Fp4Weight:
    """E2M1 ``codes (N, K)`` uint8 with block ``scales (N, ceil(K/block))``.

    NVFP4: ``scales`` float8_e4m3fn and ``global_scale (1,)`` float32; MXFP4:
    ``scales`` uint8 E8M0 exponents and ``global_scale`` ``None``.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    global_scale: torch.Tensor | None
    block: int


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x: (N, K)`` as ``(N, ceil(K/block), block)``, a short last block padded with zeros."""
    n, k = x.shape
    g = num_groups(k, block)
    return torch.nn.functional.pad(x, (0, g * block - k)).view(n, g, block)


def block_absmax(w: torch.Tensor, block: int) -> torch.Tensor:
    """``max |w|`` per block of ``block`` columns, ``(N, ceil(K/block))`` in ``w``'s dtype."""
    return _blocks(w.abs(), block).amax(dim=2)


def expand_blocks(t: torch.Tensor, block: int, k: int) -> torch.Tensor:
    """Per-block values ``(N, G)`` repeated over their columns, ``(N, k)``."""
    return t.repeat_interleave(block, dim=1)[:, :k]


# -- NVFP4


def choose_nvfp4_global_scale(w: torch.Tensor) -> torch.Tensor:
    """``448 * 6 / max |w|`` as float32 ``(1,)``, 1 for an all-zero weight.

    Computed in ``w``'s dtype as compressed-tensors does, except float16, whose range
    would overflow to Inf for small weights (compressed-tensors then falls back to 1).
    """
    dtype = torch.float32 if w.dtype == torch.float16 else w.dtype
    amax = w.abs().amax().to(dtype)
    if not bool(amax > 0):
        return torch.ones(1, dtype=torch.float32, device=w.device)
    return (FP8_E4M3_MAX * FP4_MAX / amax).float().reshape(1)


def choose_nvfp4_block_scales(w: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """E4M3 block scales ``(N, ceil(K/16))``: ``global * amax_block / 6``, zero ones 0.125."""
    return nvfp4_scales_for_amax(block_absmax(w, NVFP4_BLOCK), global_scale)


def nvfp4_scales_for_amax(amax: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """E4M3 scales of blocks whose largest magnitude is ``amax (N, G)`` (0.125 for zero ones)."""
    scales = to_fp8_e4m3(global_scale * (amax / FP4_MAX)).float()
    return torch.where(scales == 0, NVFP4_ZERO_SCALE, scales).to(torch.float8_e4m3fn)


def quantize_nvfp4_weight(
    w: torch.Tensor, what: str = "weight", block_amax: torch.Tensor | None = None
) -> Fp4Weight:
    """Round-to-nearest NVFP4 of ``w: (N, K)``, the block scales from ``block_amax (N, G)``
    when given (a clipped range; values past it saturate), else from each block's max."""
    _check_weight(w, what)
    global_scale = choose_nvfp4_global_scale(w)
    if block_amax is None:
        scales = choose_nvfp4_block_scales(w, global_scale)
    else:
        scales = nvfp4_scales_for_amax(block_amax.to(w.dtype), global_scale)
    codes = encode_on_scales(w, scales, global_scale, NVFP4_BLOCK)
    return Fp4Weight(codes, scales, global_scale, NVFP4_BLOCK)


def dequantize_nvfp4_weight(
    codes: torch.Tensor,
    scales: torch.Tensor,
    global_scale: torch.Tensor,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``e2m1 * (block_scale / global_scale)`` in float32, as ``dtype``."""
    return dequantize_fp4_weight(codes, scales, global_scale, NVFP4_BLOCK, dtype)


# -- MXFP4


def choose_mxfp4_scales(w: torch.Tensor, scale_rounding: str = "ocp") -> torch.Tensor:
    """E8M0 exponents ``(N, ceil(K/32))`` uint8 of ``w``'s blocks, biased by 127
    (``floor(log2(amax_block)) - 2`` with the spec's rounding)."""
    return mxfp4_scales_for_amax(block_absmax(w, MXFP4_BLOCK), scale_rounding)


def mxfp4_scales_for_amax(amax: torch.Tensor, scale_rounding: str = "ocp") -> torch.Tensor:
    """E8M0 exponents of blocks whose largest magnitude is ``amax (N, G)``."""
    return e8m0_scales_for_amax(amax, E2M1_EMAX, scale_rounding)


def check_scale_rounding(scale_rounding: str) -> str:
    """``scale_rounding`` itself, refused by name when it is not one of the known rules."""
    if scale_rounding not in MX_SCALE_ROUNDINGS:
        raise QuantizationError(
            f"scale_rounding must be one of {MX_SCALE_ROUNDINGS}, got {scale_rounding!r}"
        )
    return scale_rounding


def e8m0_scales_for_amax(
    amax: torch.Tensor, element_emax: int, scale_rounding: str = "ocp"
) -> torch.Tensor:
    """E8M0 exponents ``p(amax) - element_emax`` biased by 127, uint8 (any MX element type:
    ``element_emax`` is the exponent of its largest value).

    ``p(amax)`` is the power of two the block max is rounded to.  ``"ocp"`` (the OCP MX
    reference): ``floor(log2(amax))``, so the block max lands at ``[4, 8)`` times an FP4
    block's scale, and a max past 6 saturates (losing up to a quarter of it).
    ``"compressed-tensors"`` (what that library and llm-compressor write): the same
    exponent plus one when the max's significand ``amax / 2**floor(log2(amax))`` is 1.75 or
    more (compressed-tensors gets there by adding a quarter of an octave's significand
    range to the float's bits and clearing the significand), so the max lands at
    ``[3.5, 7)`` times the scale: it saturates by at most 1/7 of itself, never farther from
    6 than half the step 4 -> 6, at the price of a grid twice as coarse in the blocks
    rounded up.

    ``frexp`` reads the exponent exactly (``log2`` can round up just below a power of
    two); an all-zero block takes the smallest normal's exponent, as the MX reference
    does, and the result is clamped to E8M0's range ``[-127, 127]``.
    """
    check_scale_rounding(scale_rounding)
    amax = amax.float()
    significand, exponent = torch.frexp(amax)  # amax = m * 2**exponent, m in [0.5, 1)
    floor_log2 = exponent - 1
    if scale_rounding == "compressed-tensors":
        floor_log2 = floor_log2 + (significand >= 0.875).to(floor_log2.dtype)
    floor_log2 = torch.where(amax > 0, floor_log2, FP32_MIN_NORMAL_EXPONENT)
    shared = torch.clamp(floor_log2 - element_emax, -E8M0_BIAS, E8M0_BIAS)
    return (shared + E8M0_BIAS).to(torch.uint8)


def mxfp4_scale_candidates(scales: torch.Tensor) -> list[torch.Tensor]:
    """The rounding's exponents ``scales``, then one power of two below and one above
    (E8M0's range ``[0, 254]``; 255 is its NaN)."""
    e = scales.to(torch.int16)
    return [scales, *((e + step).clamp(0, 2 * E8M0_BIAS).to(torch.uint8) for step in (-1, 1))]


def e8m0_to_float(scales: torch.Tensor) -> torch.Tensor:
    """float32 ``2 ** (e - 127)`` of E8M0 exponents ``e`` (exact, subnormals included)."""
    one = torch.ones(scales.shape, dtype=torch.float32, device=scales.device)
    return torch.ldexp(one, scales.to(torch.int32) - E8M0_BIAS)


def quantize_mxfp4_weight(
    w: torch.Tensor,
    what: str = "weight",
    block_amax: torch.Tensor | None = None,
    scale_rounding: str = "ocp",
) -> Fp4Weight:
    """Round-to-nearest MXFP4 of ``w: (N, K)``, the exponents from ``block_amax (N, G)``
    when given, else from each block's max, rounded to a power of two by ``scale_rounding``."""
    _check_weight(w, what)
    amax = block_absmax(w, MXFP4_BLOCK) if block_amax is None else block_amax
    scales = mxfp4_scales_for_amax(amax, scale_rounding)
    return Fp4Weight(encode_on_scales(w, scales, None, MXFP4_BLOCK), scales, None, MXFP4_BLOCK)


def dequantize_mxfp4_weight(
    codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``e2m1 * 2 ** (e - 127)`` in float32, as ``dtype``."""
    return dequantize_fp4_weight(codes, scales, None, MXFP4_BLOCK, dtype)


# -- either format, told apart by the global scale NVFP4 has and MXFP4 has not


def fp4_block_scales(scales: torch.Tensor, global_scale: torch.Tensor | None) -> torch.Tensor:
    """float32 ``(N, G)`` multiplier of each block: E4M3 / global (NVFP4) or E8M0 (MXFP4)."""
    if global_scale is None:
        return e8m0_to_float(scales)
    return scales.float() / global_scale.float()


def encode_on_scales(
    w: torch.Tensor, scales: torch.Tensor, global_scale: torch.Tensor | None, block: int
) -> torch.Tensor:
    """E2M1 codes ``(N, K)`` of ``w`` divided (in float32) by its blocks' multipliers."""
    element = expand_blocks(fp4_block_scales(scales, global_scale), block, w.shape[1])
    return encode_e2m1(w.float() / element)


def dequantize_fp4_weight(
    codes: torch.Tensor,
    scales: torch.Tensor,
    global_scale: torch.Tensor | None,
    block: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``e2m1 * block multiplier`` in float32, as ``dtype`` (NVFP4 or MXFP4)."""
    element = expand_blocks(fp4_block_scales(scales, global_scale), block, codes.shape[1])
    return (decode_e2m1(codes) * element).to(dtype)


# -- the per-block scale search


def block_squared_error(
    w: torch.Tensor, scales: torch.Tensor, global_scale: torch.Tensor | None, block: int
) -> torch.Tensor:
    """``sum (dequant(quant(w)) - w)^2`` per block ``(N, G)`` on the given block scales."""
    blocks = _blocks(w.float(), block)  # (N, G, block)
    element = fp4_block_scales(scales, global_scale).unsqueeze(2)
    error = decode_e2m1(encode_e2m1(blocks / element)) * element - blocks
    return error.square().sum(dim=2)


def search_block_scales(
    w: torch.Tensor,
    candidates: Iterable[torch.Tensor],
    global_scale: torch.Tensor | None,
    block: int,
) -> torch.Tensor:
    """Per block, the one of ``candidates`` (each ``(N, G)`` block scales, stored dtype)
    whose rounding has the least squared error; ties keep the earlier candidate."""
    best, best_error = None, None
    for scales in candidates:
        error = block_squared_error(w, scales, global_scale, block)
        if best is None:
            best, best_error = scales, error
            continue
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        # -- float8 has no ``where`` on CPU: choose between the scales' bytes
        best = torch.where(better, scales.view(torch.uint8), best.view(torch.uint8))
        best = best.view(scales.dtype)
    return best


def search_nvfp4_weight(w: torch.Tensor, what: str = "weight") -> Fp4Weight:
    """NVFP4 of ``w: (N, K)`` with each block's E4M3 scale searched (global scale as RTN's):
    the scales of the block max times each of the MSE observer's shrink factors."""
    _check_weight(w, what)
    global_scale = choose_nvfp4_global_scale(w)
    amax = block_absmax(w, NVFP4_BLOCK)
    candidates = (nvfp4_scales_for_amax(amax * p, global_scale) for p in shrink_factors(FP4_GRID))
    scales = search_block_scales(w, candidates, global_scale, NVFP4_BLOCK)
    codes = encode_on_scales(w, scales, global_scale, NVFP4_BLOCK)
    return Fp4Weight(codes, scales, global_scale, NVFP4_BLOCK)


def search_mxfp4_weight(
    w: torch.Tensor, what: str = "weight", scale_rounding: str = "ocp"
) -> Fp4Weight:
    """MXFP4 of ``w: (N, K)`` with each block's E8M0 exponent searched around the one
    ``scale_rounding`` chooses (that one first, so ties keep it)."""
    _check_weight(w, what)
    candidates = mxfp4_scale_candidates(choose_mxfp4_scales(w, scale_rounding))
    scales = search_block_scales(w, candidates, None, MXFP4_BLOCK)
    return Fp4Weight(encode_on_scales(w, scales, None, MXFP4_BLOCK), scales, None, MXFP4_BLOCK)


# -- weight type -> its round-to-nearest and its scale search, each ``(w, what) -> Fp4Weight``
FP4_ROUNDING = {"nvfp4": quantize_nvfp4_weight, "mxfp4": quantize_mxfp4_weight}
FP4_SCALE_SEARCH = {"nvfp4": search_nvfp4_weight, "mxfp4": search_mxfp4_weight}


def fp4_rounding(
    weight_type: str, scale_rounding: str = "ocp", search: bool = False
) -> Callable[..., Fp4Weight]:
    """The round-to-nearest (``search``: the scale search) of ``weight_type`` with its block
    exponents rounded by ``scale_rounding`` (MXFP4's choice; NVFP4's E4M3 scales have one)."""
    rounding = (FP4_SCALE_SEARCH if search else FP4_ROUNDING)[weight_type]
    if check_scale_rounding(scale_rounding) == "ocp":
        return rounding
    if weight_type != "mxfp4":
        raise QuantizationError(
            f"scale_rounding={scale_rounding!r} is for mxfp4 (E8M0 scales), not {weight_type}"
        )
    return partial(rounding, scale_rounding=scale_rounding)
