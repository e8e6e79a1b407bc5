"""Round-to-nearest weight quantization and dequantization (the reference numerics).

Weights are ``(out_features, in_features)``; groups run along the input dimension.
A group size that does not divide ``in_features`` leaves a shorter last group
(``ceil(K / g)`` groups, code ``k`` in group ``k // g``), as the GPTQ ``g_idx``
convention allows.  Rounding is round-half-to-even (``torch.round``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from torchquant.errors import QuantizationError
from torchquant.numerics.qparams import (
    check_finite,
    choose_fp8_scale,
    choose_int_qparams,
    to_fp8_e4m3,
)


def num_groups(in_features: int, group_size: int) -> int:
    """Groups per row; ``group_size == -1`` means one group (per-channel)."""
    return 1 if group_size == -1 else -(-in_features // group_size)


def expand_groups(t: torch.Tensor, group_size: int, in_features: int) -> torch.Tensor:
    """Broadcast per-group values ``(N, G)`` to per-element ``(N, K)``."""
    if group_size == -1:
        return t[:, :1].expand(t.shape[0], in_features)
    return t.repeat_interleave(group_size, dim=1)[:, :in_features]


def expand_qparams(
    scales: torch.Tensor, zeros: torch.Tensor | None, bits: int, group_size: int, in_features: int
) -> tuple[torch.Tensor, torch.Tensor | float]:
    """Per-element float32 scale and zero point ``(N, K)``; ``zeros=None`` is symmetric.

    A symmetric scheme's zero point is the implied ``2**(bits-1)`` (a float).
    """
    scale = expand_groups(scales, group_size, in_features).float()
    if zeros is None:
        return scale, float(1 << (bits - 1))
    return scale, expand_groups(zeros, group_size, in_features).float()


def group_min_max(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group minimum and maximum of ``w: (N, K)``, each ``(N, G)``, padding the last group."""
    n, k = w.shape
    if group_size == -1:
        return w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    g = num_groups(k, group_size)
    pad = g * group_size - k
    w = w.float()
    if pad == 0:  # -- whole groups: reduce the grouped view, no padded copies
        grouped = w.reshape(n, g, group_size)
        return grouped.amin(dim=2), grouped.amax(dim=2)
    lo = torch.nn.functional.pad(w, (0, pad), value=float("inf")).view(n, g, group_size)
    hi = torch.nn.functional.pad(w, (0, pad), value=float("-inf")).view(n, g, group_size)
    return lo.amin(dim=2), hi.amax(dim=2)


@dataclass
class IntWeight:
    """Unsigned codes ``(N, K)`` uint8 with per-group ``scales`` and ``zeros`` ``(N, G)``.

    ``zeros`` is ``None`` for symmetric schemes (the implied zero is 2**(bits-1)).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    bits: int
    group_size: int


def _check_weight(w: torch.Tensor, what: str) -> None:
    if w.dim() != 2:
        raise QuantizationError(f"{what} must be 2-D (out, in), got shape {tuple(w.shape)}")
    if not w.is_floating_point() or w.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise QuantizationError(f"{what} must be fp32/fp16/bf16, got {w.dtype}")
    if w.numel() == 0:
        raise QuantizationError(f"{what} is empty (shape {tuple(w.shape)}); nothing to quantize")
    check_finite(w, what)


def check_group_size(group_size: int, in_features: int, what: str = "weight") -> None:
    if group_size != -1 and (not isinstance(group_size, int) or group_size <= 0):
        raise QuantizationError(f"group_size for {what} must be -1 or positive, got {group_size!r}")


def quantize_codes(
    w: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    """Codes in ``[0, 2**bits)`` for ``w`` given its qparams (used by RTN and GPTQ)."""
    scale, zero = expand_qparams(scales, zeros, bits, group_size, w.shape[1])
    codes = torch.round(w.float() / scale) + zero
    return torch.clamp(codes, 0, (1 << bits) - 1).to(torch.uint8)


def quantize_int_weight(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    scale_dtype: torch.dtype | None = None,
    what: str = "weight",
) -> IntWeight:
    """Round-to-nearest INTn quantization of ``w: (N, K)`` per group (or per channel)."""
    _check_weight(w, what)
    check_group_size(group_size, w.shape[1], what)
    if not 2 <= bits <= 8:
        raise QuantizationError(f"bits for {what} must be in 2..8, got {bits}")
    scale_dtype = scale_dtype or (w.dtype if group_size != -1 else torch.float32)
    lo, hi = group_min_max(w, group_size)
    scales, zeros = choose_int_qparams(lo, hi, bits, symmetric, scale_dtype, what)
    codes = quantize_codes(w, scales, zeros, bits, group_size)
    _check_grid_fits(w, lo, hi, scales, codes, zeros, bits, group_size, what)
    return IntWeight(codes, scales, zeros, bits, group_size)


def _check_grid_fits(
    w: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    scales: torch.Tensor,
    codes: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    what: str,
) -> None:
    """Refuse weights whose dequantized values would overflow the model dtype.

    Rounding to the grid can land up to half a step beyond a group's extreme, so
    weights right at the dtype's limit (e.g. 65504 in float16) could dequantize to
    Inf.  The exact check runs only when that cheap bound says it is possible.
    """
    limit = torch.finfo(w.dtype).max
    bound = torch.maximum(-lo.double(), hi.double()) + scales.double()
    if bool((bound <= limit).all()):
        return
    deq = dequantize_int_weight(codes, scales, zeros, bits, group_size, torch.float64)
    if bool((deq.abs() > limit).any()):
        raise QuantizationError(
            f"{what}: magnitudes near the {w.dtype} limit ({float(w.abs().max()):.4g}) would "
            f"dequantize beyond {limit:.4g} (Inf); quantize from a wider dtype or rescale"
        )


def dequantize_int_weight(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``(code - zero) * scale`` as ``dtype``, computed in float32."""
    scale, zero = expand_qparams(scales, zeros, bits, group_size, codes.shape[1])
    return ((codes.float() - zero) * scale).to(dtype)


def quantize_fp8_weight(
    w: torch.Tensor, per_channel: bool = True, what: str = "weight"
) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 E4M3 weight ``(N, K)`` and float32 scale ``(N, 1)`` (per channel) or ``()``."""
    _check_weight(w, what)
    scale = choose_fp8_weight_scale(w, per_channel)
    return to_fp8_e4m3(w.float() / scale), scale


def choose_fp8_weight_scale(w: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """float32 scale ``(N, 1)`` per channel or ``()`` per tensor: ``max |w|`` maps onto 448."""
    absmax = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().amax()
    return choose_fp8_scale(absmax)


def dequantize_fp8_weight(
    qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    return (qweight.float() * scale.float()).to(dtype)
