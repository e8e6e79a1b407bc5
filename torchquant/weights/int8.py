"""INT8 symmetric weights as signed int8, one byte per weight, unpacked.

``qweight (N, K)`` int8 holding ``code - 128``, ``scales (N, G)``; no zero points (the
implied zero is 128) and no ``g_idx``.  This is also the weight of INT8 W8A8 layers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from torchquant import ops
from torchquant.config import WeightQuant
from torchquant.numerics import num_groups
from torchquant.ops import cpu_kernels
from torchquant.ops.cpu_kernels import CpuLayout
from torchquant.weights.base import Buffers, IntWeightFormat, QuantizedLayer


class Int8Format(IntWeightFormat):
    name = "INT8"

    def holds(self, weight: WeightQuant) -> bool:
        return weight.type == "int" and weight.bits == 8 and weight.symmetric

    def weight_buffers(
        self, n: int, k: int, weight: WeightQuant, dtype: torch.dtype, device: torch.device | None
    ) -> Buffers:
        g = num_groups(k, weight.group_size)
        sdt = self.scale_dtype(weight, dtype)
        return {
            "qweight": torch.empty(n, k, dtype=torch.int8, device=device),
            "scales": torch.empty(n, g, dtype=sdt, device=device),
            "zeros": None,
        }

    def encode(self, codes: Tensor, weight: WeightQuant) -> Tensor:
        return (codes.to(torch.int16) - 128).to(torch.int8)

    def decode(self, qweight: Tensor, weight: WeightQuant, k: int) -> Tensor:
        return (qweight.to(torch.int16) + 128).to(torch.uint8)

    def reference_linear(self, layer: QuantizedLayer, x: Tensor, bias: Tensor | None) -> Tensor:
        q, s, group_size = layer.qweight, layer.scales, layer.scheme.weight.group_size
        return ops.linear_int8_weight_reference(x, q, s, bias, group_size)

    def bind_linear(self, layer: QuantizedLayer, bias: Tensor | None) -> Callable[[Tensor], Tensor]:
        args = (layer.qweight, layer.scales, bias, layer.scheme.weight.group_size)
        layout = layer.cpu_layout()
        on_cpu = ops.bind_int8_weight_cpu(*args, layout)
        return ops.bind(ops.linear_int8_weight, *args, *layout, on_cpu=on_cpu)

    def cpu_layout(self, layer: QuantizedLayer) -> CpuLayout:
        if not cpu_kernels.keeps_layout(layer.dtype):
            return CpuLayout()  # the op runs the reference for this dtype (ops.cpu_kernels)
        return ops.int8_cpu_layout(layer.qweight, layer.scales, layer.scheme.weight.group_size)
