"""Reading, rescaling and replacing linear-like layers (``nn.Linear`` and GPT-2 ``Conv1D``)."""

from __future__ import annotations

import torch
from torch import nn

from torchquant.config import QuantScheme
from torchquant.modules import QuantLinear
from torchquant.numerics.activation import INT8_MAX
from torchquant.numerics.qparams import FP8_E4M3_MAX


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and not isinstance(module, nn.Linear)


def get_weight(module: nn.Module) -> torch.Tensor:
    """The weight as ``(out, in)`` (a view; Conv1D stores ``(in, out)``)."""
    w = module.weight.data
    return w.t() if _is_conv1d(module) else w


def set_weight(module: nn.Module, w: torch.Tensor) -> None:
    """Write ``w: (out, in)`` back into the module's own layout."""
    module.weight.data.copy_(w.t() if _is_conv1d(module) else w)


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


def static_input_scale(absmax: torch.Tensor, act_type: str) -> torch.Tensor:
    """Per-tensor static activation scale ``(1,)`` float32 from an observed ``|x|`` bound."""
    qmax = INT8_MAX if act_type == "int8" else FP8_E4M3_MAX
    scale = absmax.float().reshape(1) / qmax
    return torch.where(scale > 0, scale, torch.ones_like(scale))


@torch.no_grad()
def build_quant_linear(
    module: nn.Module,
    scheme: QuantScheme,
    name: str,
    int_codes: tuple | None = None,
    g_idx: torch.Tensor | None = None,
    smooth: torch.Tensor | None = None,
    input_scale: torch.Tensor | None = None,
) -> QuantLinear:
    """A ``QuantLinear`` from the module's current weight, or from precomputed INT codes."""
    w = get_weight(module)
    bias = getattr(module, "bias", None)
    if int_codes is None:
        layer = QuantLinear.from_weight(w, bias, scheme, f"{name}.weight")
    else:
        n, k = w.shape
        layer = QuantLinear(
            k, n, scheme, bias is not None, w.dtype, w.device, g_idx=g_idx is not None
        )
        layer.set_int_codes(*int_codes)
        if bias is not None:
            layer.bias.copy_(bias.detach())
    if g_idx is not None:
        layer.g_idx.copy_(g_idx)
    if smooth is not None:
        layer.smooth_scale = smooth.to(device=w.device, dtype=torch.float32)
    if input_scale is not None:
        layer.input_scale.copy_(input_scale)
    return layer
