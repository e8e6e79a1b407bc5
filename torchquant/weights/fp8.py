"""FP8 E4M3 weights with a float32 scale per output channel or per tensor.

``qweight (N, K)`` float8_e4m3fn, ``scales (N, 1)`` (``group_size=-1``) or ``(1, 1)``
(``group_size=0``) float32; no zero points, no INT codes.  This is also the weight of
FP8 W8A8 layers.  The CPU kernels read the buffers as they are (no CPU layout).
"""

from __future__ import annotations

import torch
from torch import Tensor

from torchquant import ops
from torchquant.config import WeightQuant
from torchquant.numerics import quantize_fp8_weight
from torchquant.weights.base import Buffers, QuantizedLayer, WeightFormat


class Fp8Format(WeightFormat):
    name = "FP8"
    args_type = "float"

    def holds(self, weight: WeightQuant) -> bool:
        return weight.type == "fp8" and weight.block is None

    def scale_dtype(self, weight: WeightQuant, dtype: torch.dtype) -> torch.dtype:
        return torch.float32

    def weight_buffers(
        self, n: int, k: int, weight: WeightQuant, dtype: torch.dtype, device: torch.device | None
    ) -> Buffers:
        rows = n if weight.group_size == -1 else 1
        return {
            "qweight": torch.empty(n, k, dtype=torch.float8_e4m3fn, device=device),
            "scales": torch.empty(rows, 1, dtype=torch.float32, device=device),
            "zeros": None,
        }

    def quantize(self, layer: QuantizedLayer, weight: Tensor, name: str) -> None:
        per_channel = layer.scheme.weight.group_size == -1
        q, s = quantize_fp8_weight(weight, per_channel=per_channel, what=name)
        layer.qweight.copy_(q)
        layer.scales.copy_(s.reshape(layer.scales.shape))

    def linear(
        self, layer: QuantizedLayer, x: Tensor, bias: Tensor | None, reference: bool
    ) -> Tensor:
        if reference:
            return ops.linear_fp8_weight_reference(x, layer.qweight, layer.scales, bias)
        return ops.run(ops.linear_fp8_weight, x, layer.qweight, layer.scales, bias)
