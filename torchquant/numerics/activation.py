"""Dynamic (and static) quantization of activations to INT8, INT4 or FP8 E4M3.

Per-token scales are computed over the last dimension (one per row of the
flattened ``(tokens, K)`` input); per-tensor uses one scale.  The scale comes
from the max-abs value, or from a percentile of ``|x|`` to clip rare outliers.
An optional per-input-channel SmoothQuant divisor is applied first.  A row holding
NaN/Inf has no quantized value, so a quantized linear's output row for it is NaN
(``poison_nonfinite_rows``), as a float linear's would be.

INT4 activations are int8 tensors holding codes in [-7, 7] (scale ``max|x| / 7``),
so they multiply INT8 weight codes on the same integer kernels; ``pack_int4_activation``
stores two per byte.  Asymmetric INT8 activations (``quantize_activation_asymmetric``)
are int8 codes with an integer zero point: ``x ~= (q - z) * scale``, ``q`` and ``z``
in [-128, 127], the 256 codes spread over ``[min(x, 0), max(x, 0)]``.  Keeping the
codes signed (rather than uint8 ``q + 128``) lets them multiply int8 weights directly
(``torch._int_mm``, INT8 tensor cores) and is how compressed-tensors stores them.
"""

from __future__ import annotations

import math

import torch

from torchquant.errors import QuantizationError
from torchquant.numerics.qparams import FP8_E4M3_MAX, to_fp8_e4m3

INT8_MIN, INT8_MAX = -128.0, 127.0
INT4_MAX = 7.0  # -- symmetric: -8 is never used, so the range is balanced around zero
# -- the values each activation dtype holds, in units of the scale
ACTIVATION_RANGES = {
    "int8": (INT8_MIN, INT8_MAX),
    "fp8": (-FP8_E4M3_MAX, FP8_E4M3_MAX),
    "int4": (-INT4_MAX, INT4_MAX),
}
ACT_DTYPES = tuple(ACTIVATION_RANGES)
# -- dtypes whose codes are integers held in int8 tensors
INT_ACT_DTYPES = ("int8", "int4")
# -- codes of an asymmetric INT8 activation: all 256 int8 values
ASYM_LEVELS = INT8_MAX - INT8_MIN


def _absmax(x: torch.Tensor, per_token: bool, percentile: float) -> torch.Tensor:
    a = x.abs().float()
    if not per_token:
        a = a.reshape(1, -1)
    if percentile >= 100.0:
        return a.amax(dim=-1, keepdim=True)
    k = max(1, math.ceil(percentile / 100.0 * a.shape[-1]))
    return a.kthvalue(k, dim=-1, keepdim=True).values


def activation_qmax(dtype: str) -> float:
    """The largest value ``dtype`` holds: ``max |x|`` maps onto it (127 INT8, 7 INT4, 448 FP8)."""
    return ACTIVATION_RANGES[dtype][1]


def activation_scale(
    x: torch.Tensor, dtype: str, per_token: bool, percentile: float = 100.0
) -> torch.Tensor:
    """float32 scales, ``(rows, 1)`` per token or ``(1, 1)`` per tensor, for ``x: (rows, K)``."""
    scale = _absmax(x, per_token, percentile) / activation_qmax(dtype)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def quantize_activation(
    x: torch.Tensor,
    dtype: str = "int8",
    per_token: bool = True,
    percentile: float = 100.0,
    static_scale: torch.Tensor | None = None,
    smooth: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x: (rows, K)``; returns ``(q, scale)`` with ``x ~= q * scale``.

    ``q`` is int8 (round-half-to-even, clamped to [-128, 127], or to [-7, 7] for
    ``"int4"``) or float8_e4m3fn (saturating at +-448).  ``smooth`` ``(K,)`` divides ``x``
    column-wise before quantizing; ``static_scale`` (a scalar tensor) replaces the dynamic scale.
    """
    if dtype not in ACT_DTYPES:
        raise QuantizationError(f"activation dtype must be one of {ACT_DTYPES}, got {dtype!r}")
    if x.dim() != 2:
        raise QuantizationError(f"activation must be 2-D (rows, K), got {tuple(x.shape)}")
    xf = x.float()
    if smooth is not None:
        xf = xf / smooth.float()
    if static_scale is not None:
        scale = static_scale.float().reshape(1, 1)
    else:
        scale = activation_scale(xf, dtype, per_token, percentile)
    if dtype in INT_ACT_DTYPES:
        lo, hi = ACTIVATION_RANGES[dtype]
        q = torch.clamp(torch.round(xf / scale), lo, hi).to(torch.int8)
    else:
        q = to_fp8_e4m3(xf / scale)
    return q, scale


def poison_nonfinite_rows(x2: torch.Tensor, out: torch.Tensor, shared_scale: bool) -> torch.Tensor:
    """NaN/Inf in an input row makes that output row NaN, as a float linear would.

    Quantizing a non-finite value has no meaning (NaN casts to an arbitrary integer),
    so without this a bad activation would come out as plausible finite garbage.
    With one dynamic scale for the whole tensor every row depends on it, so the
    whole output becomes NaN.
    """
    bad = ~torch.isfinite(x2).all(dim=-1, keepdim=True)
    if shared_scale:
        bad = bad.any().expand_as(bad)
    return torch.where(bad, torch.full_like(out, float("nan")), out)


def dequantize_activation(
    q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    return (q.float() * scale.float()).to(dtype)


def asymmetric_activation_qparams(
    lo: torch.Tensor, hi: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 scale and int32 zero point for asymmetric INT8 codes covering ``[lo, hi]``.

    The range is widened to include 0 (so zero is exact: the code ``z``); an empty range
    gets scale 1.  ``z = round(-128 - lo / scale)`` clamped to [-128, 127].  Non-finite
    bounds give a NaN scale and zero point 0.
    """
    lo = torch.clamp(lo.float(), max=0.0)
    hi = torch.clamp(hi.float(), min=0.0)
    scale = (hi - lo) / ASYM_LEVELS
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = torch.where(torch.isfinite(scale), scale, torch.full_like(scale, float("nan")))
    zero = torch.clamp(torch.round(INT8_MIN - lo / scale), INT8_MIN, INT8_MAX)
    return scale, torch.nan_to_num(zero, nan=0.0).to(torch.int32)


def quantize_activation_asymmetric(
    x: torch.Tensor,
    per_token: bool = True,
    static_scale: torch.Tensor | None = None,
    static_zero_point: torch.Tensor | None = None,
    smooth: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric INT8 ``x: (rows, K)``: ``(q, scale, zero_point)``, ``x ~= (q - z) * scale``.

    ``q`` int8 ``clamp(round(x / scale) + z, -128, 127)``; float32 ``scale`` and int32
    ``zero_point`` ``(rows, 1)`` per token or ``(1, 1)`` per tensor, from each input's
    min and max, or the static (calibrated) pair when both are given.  Codes of a
    non-finite value are 0 (their rows have no meaning: ``poison_nonfinite_rows``).
    """
    if x.dim() != 2:
        raise QuantizationError(f"activation must be 2-D (rows, K), got {tuple(x.shape)}")
    if (static_scale is None) != (static_zero_point is None):
        raise QuantizationError(
            "asymmetric static activations need both input_scale and input_zero_point"
        )
    xf = x.float()
    if smooth is not None:
        xf = xf / smooth.float()
    if static_scale is not None:
        scale = static_scale.float().reshape(1, 1)
        zero = static_zero_point.to(torch.int32).reshape(1, 1)
    else:
        v = xf if per_token else xf.reshape(1, -1)
        if v.shape[-1] == 0:
            lo = hi = v.new_zeros(v.shape[0], 1)
        else:
            lo, hi = v.amin(dim=-1, keepdim=True), v.amax(dim=-1, keepdim=True)
        scale, zero = asymmetric_activation_qparams(lo, hi)
    codes = torch.nan_to_num(torch.round(xf / scale), nan=0.0) + zero
    q = torch.clamp(codes, INT8_MIN, INT8_MAX).to(torch.int8)
    return q, scale, zero


def dequantize_activation_asymmetric(
    q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, dtype=torch.float32
) -> torch.Tensor:
    """``(q - z) * scale`` as ``dtype``."""
    return ((q.float() - zero_point.float()) * scale.float()).to(dtype)


def pack_int4_activation(q: torch.Tensor) -> torch.Tensor:
    """INT4 codes ``(rows, K)`` int8 in [-8, 7] -> ``(rows, ceil(K / 2))`` uint8.

    Column ``2j`` goes in the low nibble of byte ``j``, column ``2j + 1`` in the high one,
    each as 4-bit two's complement; an odd ``K`` pads a zero code.
    """
    if q.dim() != 2 or q.dtype != torch.int8:
        raise QuantizationError(f"INT4 codes must be 2-D int8, got {q.dtype} {tuple(q.shape)}")
    nibbles = torch.nn.functional.pad(q.to(torch.int16), (0, q.shape[1] % 2)) & 0xF
    return (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).to(torch.uint8)


def unpack_int4_activation(packed: torch.Tensor, k: int) -> torch.Tensor:
    """The inverse of :func:`pack_int4_activation`: ``(rows, k)`` int8 codes."""
    b = packed.to(torch.int16)
    nibbles = torch.stack((b & 0xF, b >> 4), dim=-1).reshape(b.shape[0], -1)[:, :k]
    return torch.where(nibbles >= 8, nibbles - 16, nibbles).to(torch.int8)
