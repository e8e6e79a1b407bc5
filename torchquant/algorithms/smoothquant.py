"""SmoothQuant: move activation outliers into the weights with a per-channel scale.

``s_j = max|x_j|^alpha / max|W[:, j]|^(1 - alpha)``; the layer computes
``(x / s) (W diag(s))^T``, identical in exact arithmetic, with a flatter input to
quantize.  ``1 / s`` is folded into the module that produces ``x`` (a norm's weight
and bias, or a linear's output rows) when there is one, else divided at run time.
"""

from __future__ import annotations

import torch

MIN_SCALE = 1e-5


def smoothing_factors(
    act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float
) -> torch.Tensor:
    """Per-input-channel factors ``s (K,)`` for linears ``(N_i, K)`` sharing input ``x``.

    Channels never active (``max|x_j| = 0``) or with all-zero weights keep ``s = 1``.
    """
    w_absmax = torch.stack([w.abs().amax(dim=0).float() for w in weights]).amax(dim=0)
    a = act_absmax.float().to(w_absmax.device)
    s = a.clamp(min=MIN_SCALE).pow(alpha) / w_absmax.clamp(min=MIN_SCALE).pow(1.0 - alpha)
    dead = (a == 0) | (w_absmax == 0) | ~torch.isfinite(s)
    return torch.where(dead, torch.ones_like(s), s.clamp(min=MIN_SCALE))
