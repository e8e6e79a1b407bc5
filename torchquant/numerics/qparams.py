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


# -- float32 exponent fields: 2**-6 (E4M3's smallest normal binade, whose step of 2**-9 its
# -- subnormals share), and the shift from a binade to the constant that rounds to its step
_E4M3_MIN_BINADE = (127 - 6) << 23
_STEP_TO_ROUNDER = (23 - 3) << 23
_HALF_SIGNIFICAND = 1 << 22
_SIGN16 = -(1 << 15)
# -- up to this many values PyTorch's own cast (two calls) beats the eight vectorised passes
NATIVE_FP8_CAST_ELEMENTS = 1 << 12


def fp8_e4m3_values(x: torch.Tensor) -> torch.Tensor:
    """``to_fp8_e4m3(x).float()`` bit for bit (signed zeros and NaN included), float32.

    On CPU, PyTorch converts to and from float8 one element at a time (about 4 ns each
    way, ~30x a vectorised pass), which made the FP8 activation casts most of a W8A8 FP8
    layer's time there; this rounds in float32 instead (:func:`fp8_e4m3_values_`).
    Other devices cast natively.
    """
    if x.device.type != "cpu" or (x.requires_grad and torch.is_grad_enabled()):
        return to_fp8_e4m3(x).float()  # -- the cast's gradient, where one is asked for
    return fp8_e4m3_values_(x.float().clone() if x.dtype == torch.float32 else x.float())


def fp8_e4m3_values_(v: torch.Tensor) -> torch.Tensor:
    """:func:`fp8_e4m3_values` of a float32 CPU tensor, written over it (a temporary the
    caller owns: one allocation fewer, each of which page-faults afresh at these sizes).

    Adding and subtracting ``1.5 * 2**23`` times a value's E4M3 step (2**-3 of its binade,
    2**-9 below 2**-6), signed as the value, rounds it to that step, to nearest even, as
    the cast does; the rounder's sign then restores the sign of values rounded to zero.
    Saturation is the cast's clamp.  NaN stays NaN (its rounder is finite).  No gradient
    flows through it (a rounding: the ops that call it have their own backward).
    """
    with torch.no_grad():
        small = v.numel() <= NATIVE_FP8_CAST_ELEMENTS  # -- fewer calls win: a decode step
        if small or v.device.type != "cpu" or v.dtype != torch.float32:
            return v.copy_(to_fp8_e4m3(v).float())
        return _round_to_e4m3_(v)


def _round_to_e4m3_(v: torch.Tensor) -> torch.Tensor:
    v.clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX)
    rounder = (v.view(torch.int32) & 0x7F800000).clamp_min_(_E4M3_MIN_BINADE)
    rounder = rounder.add_(_STEP_TO_ROUNDER).bitwise_or_(_HALF_SIGNIFICAND).view(torch.float32)
    torch.copysign(rounder, v, out=rounder)
    v.add_(rounder).sub_(rounder)
    return torch.copysign(v, rounder, out=v)


def e4m3_to_float(codes: torch.Tensor) -> torch.Tensor:
    """``codes.float()`` of float8_e4m3fn ``codes``, bit for bit (NaN included).

    On CPU each code's bits are moved into a float16 (E4M3's exponent field into float16's,
    so E4M3 subnormals become float16 subnormals of the same digits), widened and scaled by
    2**8 (the difference of the two exponent biases): integer passes and one exact
    multiply instead of PyTorch's element-at-a-time float8 conversion (~10x slower).
    Other devices convert natively.
    """
    if codes.device.type != "cpu":
        return codes.float()
    signed = codes.view(torch.int8).to(torch.int16)
    magnitude = signed & 0x7F
    nan = ((magnitude + 1) >> 7) * 0x7C00  # -- float16's NaN exponent for code 0x7F alone
    half = (magnitude << 7).bitwise_or_(nan).bitwise_or_(signed & _SIGN16)
    return half.view(torch.float16).float().mul_(256.0)


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
