"""FP8 E4M3 weights with a float32 scale per output channel or per tensor.

``qweight (N, K)`` float8_e4m3fn, ``scales (N, 1)`` (``group_size=-1``) or ``(1, 1)``
(``group_size=0``) float32; no zero points, no INT codes.  This is also the weight of
FP8 W8A8 layers.  bf16 layers on CPU (and float32 weight-only ones) keep the codes as
bf16 too (``ops.fp8_cpu_layout``, 2 bytes a weight, never saved): the CPU has no FP8
product.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from torchquant import ops
from torchquant.config import WeightQuant
from torchquant.numerics import quantize_fp8_weight
from torchquant.ops import cpu_kernels
from torchquant.ops.cpu_kernels import CpuLayout
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

    def reference_linear(self, layer: QuantizedLayer, x: Tensor, bias: Tensor | None) -> Tensor:
        return ops.linear_fp8_weight_reference(x, layer.qweight, layer.scales, bias)

    def bind_linear(self, layer: QuantizedLayer, bias: Tensor | None) -> Callable[[Tensor], Tensor]:
        q, s, codes = layer.qweight, layer.scales, layer.cpu_layout().packed
        on_cpu = None
        if codes is not None:

            def on_cpu(x: Tensor) -> Tensor:
                return ops.linear_fp8_weight_cpu(x, q, s, bias, codes)

        return ops.bind(ops.linear_fp8_weight, q, s, bias, on_cpu=on_cpu)

    def cpu_layout(self, layer: QuantizedLayer) -> CpuLayout:
        if not cpu_kernels.keeps_layout(layer.dtype):
            return CpuLayout()  # the op runs the reference for this dtype (ops.cpu_kernels)
        return ops.fp8_cpu_layout(layer.qweight)
