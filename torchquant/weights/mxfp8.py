"""MXFP8 weights (OCP MX): E4M3 values with one E8M0 scale per 32 values along K.

``qweight (N, K)`` float8_e4m3fn, ``scales (N, ceil(K/32))`` uint8 E8M0 exponents
(``2 ** (e - 127)``); no zero points, no INT codes.  With MXFP8 activations (scheme
``mxfp8``) the layer runs ``ops.linear_microscaled``; weight-only, ``linear_mxfp8_weight``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from torchquant.config import WeightQuant
from torchquant.numerics.microscaling import MXFP8_BLOCK, dequantize_mxfp8, quantize_mxfp8_weight
from torchquant.ops import bind
from torchquant.ops.microscaled import linear_mxfp8_weight, linear_mxfp8_weight_reference
from torchquant.weights.base import Buffers, QuantizedLayer, WeightFormat
from torchquant.weights.microscaled_input import bind_microscaled, microscaled_reference


class Mxfp8Format(WeightFormat):
    name = "MXFP8"
    args_type = "float"
    block = MXFP8_BLOCK
    has_global_scale = False

    def holds(self, weight: WeightQuant) -> bool:
        return weight.type == "mxfp8"

    def scale_dtype(self, weight: WeightQuant, dtype: torch.dtype) -> torch.dtype:
        return torch.uint8

    def weight_buffers(
        self, n: int, k: int, weight: WeightQuant, dtype: torch.dtype, device: torch.device | None
    ) -> Buffers:
        return {
            "qweight": torch.empty(n, k, dtype=torch.float8_e4m3fn, device=device),
            "scales": torch.empty(n, -(-k // MXFP8_BLOCK), dtype=torch.uint8, device=device),
            "zeros": None,
        }

    def quantize(self, layer: QuantizedLayer, weight: Tensor, name: str) -> None:
        q = quantize_mxfp8_weight(weight, name, layer.scheme.weight.scale_rounding)
        self.set_values(layer, q.values, q.scales)

    def reference_linear(self, layer: QuantizedLayer, x: Tensor, bias: Tensor | None) -> Tensor:
        if layer.scheme.activation is not None:
            return microscaled_reference(layer, x, bias)
        return linear_mxfp8_weight_reference(x, layer.qweight, layer.scales, bias)

    def bind_linear(self, layer: QuantizedLayer, bias: Tensor | None) -> Callable[[Tensor], Tensor]:
        if layer.scheme.activation is not None:
            return bind_microscaled(layer, bias)
        return bind(linear_mxfp8_weight, layer.qweight, layer.scales, bias)

    def dequantize(self, layer: QuantizedLayer) -> Tensor:
        return dequantize_mxfp8(layer.qweight, layer.scales, layer.dtype)
