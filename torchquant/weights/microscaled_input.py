"""The linear of a microscaled layer that also quantizes its input (NVFP4, MXFP4, MXFP8).

The weight's format (:mod:`~torchquant.weights.fp4`, :mod:`~torchquant.weights.mxfp8`)
hands its buffers to ``ops.linear_microscaled``; a static NVFP4 activation keeps its
calibrated float32 global scale in the layer's ``input_scale`` buffer.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from torchquant.ops import bind
from torchquant.ops.microscaled import linear_microscaled, linear_microscaled_reference
from torchquant.weights.base import QuantizedLayer


def _arguments(layer: QuantizedLayer, bias: Tensor | None) -> tuple:
    global_scale = getattr(layer, "global_scale", None)
    input_global_scale = getattr(layer, "input_scale", None)
    act = layer.scheme.activation
    args = (layer.qweight, layer.scales, global_scale, bias, input_global_scale, act.type)
    return (*args, act.scale_rounding)


def microscaled_reference(layer: QuantizedLayer, x: Tensor, bias: Tensor | None) -> Tensor:
    """``quantize(x) W^T + bias`` through the op's exact reference."""
    return linear_microscaled_reference(x, *_arguments(layer, bias))


def bind_microscaled(layer: QuantizedLayer, bias: Tensor | None) -> Callable[[Tensor], Tensor]:
    """The fast op with every argument but ``x`` bound."""
    return bind(linear_microscaled, *_arguments(layer, bias))
