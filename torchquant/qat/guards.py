"""Catching a diverging QAT run early, with the layer and tensor that went wrong."""

from __future__ import annotations

import math

import torch
from torch import nn

from torchquant.errors import QuantizationError
from torchquant.qat.qat_linear import QatLinear


def qat_state_problems(model: nn.Module) -> list[str]:
    """``"layer.tensor: what"`` for every QAT tensor that is NaN/Inf or a non-positive scale."""
    problems = []
    for name, layer in model.named_modules():
        if not isinstance(layer, QatLinear):
            continue
        tensors = {
            "weight": layer.weight,
            "weight_scales": layer.weight_scales,
            "weight_global_scale": layer.weight_global_scale,
            "weight_zeros": layer.weight_zeros,
            "input_scale": layer.input_scale,
            "input_zero_point": layer.input_zero_point,
        }
        for tname, t in tensors.items():
            if t is None:
                continue
            bad = int((~torch.isfinite(t.detach())).sum())
            if bad:
                problems.append(f"{name}.{tname}: {bad} NaN/Inf value(s)")
            elif tname.endswith("scale") or tname.endswith("scales"):
                low = int((t.detach() <= layer.options.min_scale).sum())
                if low:
                    problems.append(
                        f"{name}.{tname}: {low} value(s) at or below min_scale "
                        f"{layer.options.min_scale:g} (the scale collapsed)"
                    )
    return problems


def check_qat_state(model: nn.Module) -> None:
    """Raise :class:`QuantizationError` listing every diverged QAT tensor (cheap: no forward)."""
    problems = qat_state_problems(model)
    if problems:
        listed = "; ".join(problems[:5]) + (" ..." if len(problems) > 5 else "")
        raise QuantizationError(f"QAT state diverged: {listed}")


def check_loss(loss: torch.Tensor | float, model: nn.Module, step: int | None = None) -> float:
    """The loss as a float; a NaN/Inf loss raises, naming the QAT tensors that caused it."""
    value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
    if math.isfinite(value):
        return value
    where = f" at step {step}" if step is not None else ""
    problems = qat_state_problems(model)
    cause = "; ".join(problems[:5]) if problems else "no QAT tensor is non-finite (check the data)"
    raise QuantizationError(f"loss is {value}{where}: {cause}; lower the learning rate")
