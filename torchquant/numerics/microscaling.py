"""Microscaled activations (NVFP4, MXFP4, MXFP8) and MXFP8 weights (the reference numerics).

Each row of ``x: (M, K)`` is cut into blocks of ``MICROSCALED_BLOCKS[fmt]`` values along
K (a shorter last block where the block does not divide K), each with its own scale:

- ``nvfp4``: E2M1 values, E4M3 block scales and a float32 global scale, exactly as
  NVFP4 weights (``numerics.fp4``); the global scale ``448 * 6 / max |x|`` is computed
  per tensor from each input (dynamic) or given (calibrated, static).
- ``mxfp4``: E2M1 values, E8M0 scales ``floor(log2(amax_block)) - 2`` (OCP MX), or the
  block max rounded to a power of two as compressed-tensors does it
  (``scale_rounding="compressed-tensors"``, see ``numerics.fp4.e8m0_scales_for_amax``).
- ``mxfp8``: E4M3 values, E8M0 scales ``floor(log2(amax_block)) - 8``; values past
  +-448 after scaling saturate there, as the MX reference's conversion does.  The
  compressed-tensors rounding is offered here too: the library rounds MXFP8 block maxima
  by the same rule (its 1.75 threshold is fixed by E2M1's one mantissa bit, for every
  element type), so the max lands at ``[224, 448)`` times the scale instead of ``[256, 512)``.

Values round to nearest, ties to even.  Non-finite inputs are not refused here (an
activation may hold them): their rows quantize as zeros, and the ops make the output
rows NaN (``poison_nonfinite_rows``), every row when one dynamic global scale is
shared by the whole tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from torchquant.errors import QuantizationError
from torchquant.numerics.fp4 import (
    block_absmax,
    check_scale_rounding,
    choose_nvfp4_global_scale,
    decode_e2m1,
    e8m0_scales_for_amax,
    e8m0_to_float,
    encode_on_scales,
    expand_blocks,
    mxfp4_scales_for_amax,
    nvfp4_scales_for_amax,
)
from torchquant.numerics.qparams import e4m3_to_float, to_fp8_e4m3
from torchquant.numerics.weight import _check_weight

# -- each microscaled format's block of values along K sharing one scale
MICROSCALED_BLOCKS = {"nvfp4": 16, "mxfp4": 32, "mxfp8": 32}
MXFP8_BLOCK = 32
# -- floor(log2(448)): the exponent of E4M3's largest value, the MX spec's emax_elem
E4M3_EMAX = 8


@dataclass
class BlockScaled:
    """A tensor ``(M, K)`` in a microscaled format ``fmt``.

    ``values``: E2M1 codes uint8 (``nvfp4``, ``mxfp4``, unpacked) or float8_e4m3fn
    (``mxfp8``); ``scales (M, ceil(K/block))``: float8_e4m3fn (``nvfp4``) or uint8 E8M0;
    ``global_scale (1,)`` float32 for ``nvfp4``, else ``None``.
    """

    values: torch.Tensor
    scales: torch.Tensor
    global_scale: torch.Tensor | None
    fmt: str

    @property
    def block(self) -> int:
        return MICROSCALED_BLOCKS[self.fmt]


def _check_format(fmt: str) -> int:
    if fmt not in MICROSCALED_BLOCKS:
        raise QuantizationError(
            f"microscaled format must be one of {tuple(MICROSCALED_BLOCKS)}, got {fmt!r}"
        )
    return MICROSCALED_BLOCKS[fmt]


# -- MXFP8 values on E8M0 scales


def choose_mxfp8_scales(x: torch.Tensor, scale_rounding: str = "ocp") -> torch.Tensor:
    """E8M0 exponents ``(M, ceil(K/32))`` uint8 of ``x: (M, K)``'s blocks, the block maxima
    rounded to powers of two by ``scale_rounding`` (``numerics.fp4.e8m0_scales_for_amax``)."""
    return e8m0_scales_for_amax(block_absmax(x, MXFP8_BLOCK), E4M3_EMAX, scale_rounding)


def encode_mxfp8(x: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """E4M3 values ``(M, K)`` of ``x`` divided (in float32) by its blocks' powers of two."""
    element = expand_blocks(e8m0_to_float(scales), MXFP8_BLOCK, x.shape[1])
    return to_fp8_e4m3(x.float() / element)


def dequantize_mxfp8(
    values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``e4m3 * 2 ** (e - 127)`` in float32 (exact), as ``dtype``."""
    element = expand_blocks(e8m0_to_float(scales), MXFP8_BLOCK, values.shape[1])
    return (e4m3_to_float(values) * element).to(dtype)


def quantize_mxfp8_weight(
    w: torch.Tensor, what: str = "weight", scale_rounding: str = "ocp"
) -> BlockScaled:
    """Round-to-nearest MXFP8 of ``w: (N, K)`` (NaN/Inf refused, naming ``what``), its
    E8M0 exponents rounded by ``scale_rounding``."""
    _check_weight(w, what)
    scales = choose_mxfp8_scales(w, scale_rounding)
    return BlockScaled(encode_mxfp8(w, scales), scales, None, "mxfp8")


# -- activations


def quantize_microscaled(
    x: torch.Tensor,
    fmt: str,
    global_scale: torch.Tensor | None = None,
    scale_rounding: str = "ocp",
) -> BlockScaled:
    """``x: (M, K)`` in ``fmt`` with each block's scale from its max.

    ``global_scale`` (``nvfp4`` only): the calibrated ``(1,)`` float32 global scale; without
    it the global scale is computed from ``x`` (non-finite values left out).
    ``scale_rounding`` (MX formats only): how the E8M0 exponents round the block maxima.
    """
    _check_format(fmt)
    if check_scale_rounding(scale_rounding) != "ocp" and fmt == "nvfp4":
        raise QuantizationError(
            f"scale_rounding={scale_rounding!r} is for MX (E8M0) activations, not {fmt}"
        )
    if x.dim() != 2:
        raise QuantizationError(f"activation must be 2-D (rows, K), got {tuple(x.shape)}")
    if global_scale is not None and fmt != "nvfp4":
        raise QuantizationError(f"{fmt} activations take no global scale (only nvfp4 ones)")
    x = torch.where(torch.isfinite(x), x, torch.zeros((), dtype=x.dtype, device=x.device))
    if fmt == "mxfp8":
        scales = choose_mxfp8_scales(x, scale_rounding)
        return BlockScaled(encode_mxfp8(x, scales), scales, None, fmt)
    block = MICROSCALED_BLOCKS[fmt]
    amax = block_absmax(x, block)
    if fmt == "mxfp4":
        scales = mxfp4_scales_for_amax(amax, scale_rounding)
    else:
        if global_scale is None:
            global_scale = choose_nvfp4_global_scale(x)
        global_scale = global_scale.float().reshape(1)
        scales = nvfp4_scales_for_amax(amax, global_scale)
    return BlockScaled(encode_on_scales(x, scales, global_scale, block), scales, global_scale, fmt)


def block_multipliers(q: BlockScaled) -> torch.Tensor:
    """float32 ``(M, G)`` multiplier of each block: E4M3 / global (NVFP4) or E8M0."""
    if q.global_scale is None:
        return e8m0_to_float(q.scales)
    return q.scales.float() / q.global_scale.float()


def dequantize_microscaled(q: BlockScaled, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The values ``(M, K)`` times their block's multiplier, in float32 (exact), as ``dtype``."""
    k = q.values.shape[1]
    element = expand_blocks(block_multipliers(q), q.block, k)
    values = q.values.float() if q.fmt == "mxfp8" else decode_e2m1(q.values)
    return (values * element).to(dtype)


def fake_quantize_microscaled(
    x: torch.Tensor,
    fmt: str,
    global_scale: torch.Tensor | None = None,
    scale_rounding: str = "ocp",
) -> torch.Tensor:
    """``dequantize(quantize(x))`` in float32 (``x: (M, K)``)."""
    return dequantize_microscaled(quantize_microscaled(x, fmt, global_scale, scale_rounding))
