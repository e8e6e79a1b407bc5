"""Reference INTn weight fake quantization for training: forward and straight-through backward.

``w (N, K)`` float; ``scales (N, G)``; ``zeros (N, G)`` float holding integers, or
``None`` for symmetric schemes (implied zero ``2**(bits-1)``); ``G = ceil(K / group_size)``.

Forward: ``(clamp(round(w / s) + z, 0, qmax) - z) * s`` in float32, cast to ``w.dtype``:
the same bits as ``dequantize_int_weight(quantize_codes(w, ...))``.

Backward, with ``x = w / s``, ``r = round(x)``, ``c = r + z`` and *inside* meaning
``0 <= c <= qmax``: the weight gradient passes inside and is blocked outside
(straight-through estimator); the scale gradient is LSQ's ``r - x`` inside and the
clipped level ``-z`` / ``qmax - z`` outside; the zero-point gradient is ``0`` inside
and ``-s`` outside.  Scale and zero gradients are summed over each group.
"""

from __future__ import annotations

import torch

from torchquant.numerics.weight import expand_groups


def _grid(w, scales, zeros, bits, group_size):
    k = w.shape[1]
    s = expand_groups(scales.float(), group_size, k)
    z = float(1 << (bits - 1)) if zeros is None else expand_groups(zeros.float(), group_size, k)
    x = w.float() / s
    r = torch.round(x)
    return s, z, x, r, r + z


def _sum_groups(t: torch.Tensor, group_size: int, groups: int) -> torch.Tensor:
    """``(N, K)`` -> ``(N, G)`` sums over each group (the last one may be shorter)."""
    n, k = t.shape
    g = k if group_size == -1 else group_size
    return torch.nn.functional.pad(t, (0, groups * g - k)).view(n, groups, g).sum(dim=2)


def fake_quantize_int_reference(
    w: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    """Quantize to INTn codes and dequantize again, as ``w.dtype``."""
    s, z, _, _, c = _grid(w, scales, zeros, bits, group_size)
    return ((torch.clamp(c, 0, (1 << bits) - 1) - z) * s).to(w.dtype)


def fake_quantize_int_backward_reference(
    grad: torch.Tensor,
    w: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(grad_w, grad_scales, grad_zeros)``; ``grad_zeros`` is ``None`` when ``zeros`` is."""
    qmax = float((1 << bits) - 1)
    s, z, x, r, c = _grid(w, scales, zeros, bits, group_size)
    g = grad.float()
    inside = (c >= 0) & (c <= qmax)
    grad_w = torch.where(inside, g, 0.0).to(w.dtype)
    d_scale = torch.where(inside, r - x, torch.where(c < 0, -z, qmax - z))
    grad_s = _sum_groups(g * d_scale, group_size, scales.shape[1]).to(scales.dtype)
    grad_z = None
    if zeros is not None:
        d_zero = torch.where(inside, 0.0, -s)
        grad_z = _sum_groups(g * d_zero, group_size, zeros.shape[1]).to(zeros.dtype)
    return grad_w, grad_s, grad_z
