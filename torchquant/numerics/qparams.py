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


def choose_int_qparams(
    min_vals: torch.Tensor,
    max_vals: torch.Tensor,
    bits: int,
    symmetric: bool,
    scale_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales and integer zero points so that ``w ~= (code - zero) * scale``.

    The range is widened to include 0 so that zero is exact and constant groups
    are representable; an all-zero range gets scale 1.  Symmetric schemes use
    ``scale = absmax / (2**(bits-1) - 1)`` and the implied zero ``2**(bits-1)``
    (returned as ``None``).  The scale is rounded to ``scale_dtype`` *before* the
    zero point is chosen, so codes are computed with the scale that is stored.
    """
    min_vals = torch.clamp(min_vals.float(), max=0.0)
    max_vals = torch.clamp(max_vals.float(), min=0.0)
    if symmetric:
        qmax = (1 << (bits - 1)) - 1
        scales = torch.maximum(-min_vals, max_vals) / qmax
    else:
        scales = (max_vals - min_vals) / ((1 << bits) - 1)
    scales = torch.where(scales > 0, scales, torch.ones_like(scales)).to(scale_dtype)
    if torch.isinf(scales).any():
        raise QuantizationError(
            f"scale overflows {scale_dtype}: the range is too large; use scale_dtype=float32"
        )
    if symmetric:
        return scales, None
    zeros = torch.clamp(torch.round(-min_vals / scales.float()), 0, (1 << bits) - 1)
    return scales, zeros.to(torch.uint8)


def choose_fp8_scale(absmax: torch.Tensor) -> torch.Tensor:
    """float32 scale mapping ``absmax`` onto the E4M3 maximum (448); zero ranges get scale 1."""
    scale = absmax.float() / FP8_E4M3_MAX
    return torch.where(scale > 0, scale, torch.ones_like(scale))
