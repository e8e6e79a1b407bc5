"""Choosing scales and zero points from observed ranges (shared by RTN, observers and GPTQ)."""

from __future__ import annotations

import torch

from torchquant.errors import QuantizationError

FP8_E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448.0


def check_finite(t: torch.Tensor, what: str) -> None:
    """Refuse NaN/Inf up front: a single one would silently poison a whole group's scale."""
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise QuantizationError(f"{what} contains {bad} NaN/Inf value(s); cannot quantize it")


def to_fp8_e4m3(x: torch.Tensor) -> torch.Tensor:
    """``x`` saturated to +-448 and rounded to float8_e4m3fn (a plain cast turns those into NaN)."""
    return torch.clamp(x, -FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)


def choose_int_qparams(
    min_vals: torch.Tensor,
    max_vals: torch.Tensor,
    bits: int,
    symmetric: bool,
    scale_dtype: torch.dtype = torch.float32,
    what: str = "weight",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales and integer zero points so that ``w ~= (code - zero) * scale``.

    The range is widened to include 0 so that zero is exact and constant groups
    are representable; an all-zero range gets scale 1.  Symmetric schemes use
    ``scale = absmax / (2**(bits-1) - 1)`` and the implied zero ``2**(bits-1)``
    (returned as ``None``).  The scale is rounded to ``scale_dtype`` *before* the
    zero point is chosen, so codes are computed with the scale that is stored.
    Scales are computed in float64, so ranges near the float32 limit do not
    overflow on the way; a scale that underflows to 0 in ``scale_dtype`` (a group
    of subnormal weights) becomes 1, which stores that group as exact zeros; a
    scale that overflows ``scale_dtype`` is an error naming ``what``.
    """
    min_vals = torch.clamp(min_vals.double(), max=0.0)
    max_vals = torch.clamp(max_vals.double(), min=0.0)
    if symmetric:
        qmax = (1 << (bits - 1)) - 1
        scales = torch.maximum(-min_vals, max_vals) / qmax
    else:
        scales = (max_vals - min_vals) / ((1 << bits) - 1)
    scales = scales.to(scale_dtype)
    if torch.isinf(scales).any():
        raise QuantizationError(
            f"{what}: a quantization scale overflows {scale_dtype} (range up to "
            f"{float(torch.maximum(-min_vals, max_vals).max()):.3g}); store scales in float32"
        )
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    if symmetric:
        return scales, None
    zeros = torch.clamp(torch.round(-min_vals / scales.double()), 0, (1 << bits) - 1)
    return scales, zeros.to(torch.uint8)


def choose_fp8_scale(absmax: torch.Tensor) -> torch.Tensor:
    """float32 scale mapping ``absmax`` onto the E4M3 maximum (448); zero ranges get scale 1.

    A scale that underflows float32 (subnormal weights) also becomes 1, storing zeros.
    """
    scale = (absmax.double() / FP8_E4M3_MAX).float()
    return torch.where(scale > 0, scale, torch.ones_like(scale))
