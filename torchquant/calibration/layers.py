"""Rescaling linear-like layers (``nn.Linear`` and GPT-2 ``Conv1D``) and the modules feeding them.

SmoothQuant and AWQ move a per-input-channel factor ``s`` into a linear's weight
(:func:`scale_inputs`) and its inverse into the module producing that input
(:func:`fold_into_source`), which leaves the float function unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from torchquant.plan import get_weight, stores_transposed


def set_weight(module: nn.Module, w: torch.Tensor) -> None:
    """Write ``w: (out, in)`` back into the module's own layout."""
    module.weight.data.copy_(w.t() if stores_transposed(module) else w)


def out_features(module: nn.Module) -> int | None:
    """Size of the module's output channel dimension, or ``None`` if it has no weight."""
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor):
        return None
    if w.dim() == 1:
        return w.shape[0]
    return get_weight(module).shape[0]


@torch.no_grad()
def fold_into_source(source: nn.Module, s: torch.Tensor) -> None:
    """Divide the output channels of ``source`` (a norm or a linear) by ``s``."""
    if source.weight.dim() == 1:
        source.weight.data.div_(s.to(source.weight.dtype))
    else:
        w = get_weight(source)
        set_weight(source, w / s.to(w.dtype).unsqueeze(1))
    bias = getattr(source, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.data.div_(s.to(bias.dtype))


@torch.no_grad()
def scale_inputs(linear: nn.Module, s: torch.Tensor) -> None:
    """Multiply the input columns of ``linear`` by ``s``."""
    w = get_weight(linear)
    set_weight(linear, w * s.to(w.dtype).unsqueeze(0))
