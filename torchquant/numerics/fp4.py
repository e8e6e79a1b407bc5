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
global scale, ``floor(log2(amax_block)) - 2`` as the OCP MX reference computes it.
A K that is not a multiple of the block leaves a shorter last block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from torchquant.numerics.qparams import FP8_E4M3_MAX, to_fp8_e4m3
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

# -- midpoints between neighbouring magnitudes; at each one, ties go to the even
# -- neighbour: the upper one where it passes with ``>=``, the lower one with ``>``
_UP_AT_TIE = (0.75, 1.75, 3.5)
_DOWN_AT_TIE = (0.25, 1.25, 2.5, 5.0)


def encode_e2m1(x: torch.Tensor) -> torch.Tensor:
    """E2M1 codes ``uint8`` of finite ``x`` (same shape): nearest value, ties to even."""
    a = x.float().abs()
    index = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for edge in _UP_AT_TIE:
        index += a >= edge
    for edge in _DOWN_AT_TIE:
        index += a > edge
    return index | ((x < 0).to(torch.uint8) << 3)


def decode_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """float32 values of E2M1 ``codes`` (same shape)."""
    table = torch.tensor(FP4_MAGNITUDES, dtype=torch.float32, device=codes.device)
    magnitude = table[(codes & 7).long()]
    return torch.where((codes & 8) != 0, -magnitude, magnitude)


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


def block_absmax(w: torch.Tensor, block: int) -> torch.Tensor:
    """``max |w|`` per block of ``block`` columns, ``(N, ceil(K/block))`` in ``w``'s dtype."""
    n, k = w.shape
    g = num_groups(k, block)
    padded = torch.nn.functional.pad(w.abs(), (0, g * block - k))
    return padded.view(n, g, block).amax(dim=2)


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
    amax = block_absmax(w, NVFP4_BLOCK)
    scales = to_fp8_e4m3(global_scale * (amax / FP4_MAX)).float()
    return torch.where(scales == 0, NVFP4_ZERO_SCALE, scales).to(torch.float8_e4m3fn)


def quantize_nvfp4_weight(w: torch.Tensor, what: str = "weight") -> Fp4Weight:
    """Round-to-nearest NVFP4 of ``w: (N, K)``."""
    _check_weight(w, what)
    global_scale = choose_nvfp4_global_scale(w)
    scales = choose_nvfp4_block_scales(w, global_scale)
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


def choose_mxfp4_scales(w: torch.Tensor) -> torch.Tensor:
    """E8M0 exponents ``(N, ceil(K/32))`` uint8: ``floor(log2(amax_block)) - 2`` biased by 127.

    ``frexp`` reads the exponent exactly (``log2`` can round up just below a power of
    two); an all-zero block takes the smallest normal's exponent, as the MX reference
    does, and the result is clamped to E8M0's range ``[-127, 127]``.
    """
    amax = block_absmax(w, MXFP4_BLOCK).float()
    _, exponent = torch.frexp(amax)  # amax = m * 2**exponent, m in [0.5, 1)
    floor_log2 = torch.where(amax > 0, exponent - 1, FP32_MIN_NORMAL_EXPONENT)
    shared = torch.clamp(floor_log2 - E2M1_EMAX, -E8M0_BIAS, E8M0_BIAS)
    return (shared + E8M0_BIAS).to(torch.uint8)


def e8m0_to_float(scales: torch.Tensor) -> torch.Tensor:
    """float32 ``2 ** (e - 127)`` of E8M0 exponents ``e`` (exact, subnormals included)."""
    one = torch.ones(scales.shape, dtype=torch.float32, device=scales.device)
    return torch.ldexp(one, scales.to(torch.int32) - E8M0_BIAS)


def quantize_mxfp4_weight(w: torch.Tensor, what: str = "weight") -> Fp4Weight:
    """Round-to-nearest MXFP4 of ``w: (N, K)``."""
    _check_weight(w, what)
    scales = choose_mxfp4_scales(w)
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
