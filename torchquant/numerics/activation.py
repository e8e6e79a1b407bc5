"""Dynamic (and static) quantization of activations to INT8 or FP8 E4M3.

Per-token scales are computed over the last dimension (one per row of the
flattened ``(tokens, K)`` input); per-tensor uses one scale.  The scale comes
from the max-abs value, or from a percentile of ``|x|`` to clip rare outliers.
An optional per-input-channel SmoothQuant divisor is applied first.  A row holding
NaN/Inf has no quantized value, so a quantized linear's output row for it is NaN
(``poison_nonfinite_rows``), as a float linear's would be.
"""

from __future__ import annotations

import math

import torch

from torchquant.errors import QuantizationError
from torchquant.numerics.qparams import FP8_E4M3_MAX, to_fp8_e4m3

INT8_MIN, INT8_MAX = -128.0, 127.0
# -- the values each activation dtype holds, in units of the scale
ACTIVATION_RANGES = {"int8": (INT8_MIN, INT8_MAX), "fp8": (-FP8_E4M3_MAX, FP8_E4M3_MAX)}
ACT_DTYPES = tuple(ACTIVATION_RANGES)


def _absmax(x: torch.Tensor, per_token: bool, percentile: float) -> torch.Tensor:
    a = x.abs().float()
    if not per_token:
        a = a.reshape(1, -1)
    if percentile >= 100.0:
        return a.amax(dim=-1, keepdim=True)
    k = max(1, math.ceil(percentile / 100.0 * a.shape[-1]))
    return a.kthvalue(k, dim=-1, keepdim=True).values


def activation_qmax(dtype: str) -> float:
    """The largest value ``dtype`` holds: ``max |x|`` maps onto it (127 for INT8, 448 for FP8)."""
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

    ``q`` is int8 (round-half-to-even, clamped to [-128, 127]) or float8_e4m3fn
    (saturating at +-448).  ``smooth`` ``(K,)`` divides ``x`` column-wise before
    quantizing; ``static_scale`` (a scalar tensor) replaces the dynamic scale.
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
    if dtype == "int8":
        q = torch.clamp(torch.round(xf / scale), INT8_MIN, INT8_MAX).to(torch.int8)
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
