"""FP8 E4M3 weights with one float32 scale per ``(rows, columns)`` block (DeepSeek-V3's recipe).

``qweight (N, K)`` float8_e4m3fn and ``scales (ceil(N / bn), ceil(K / bk))`` float32 for
``block = (bn, bk)``: the tensors compressed-tensors stores for ``strategy: "block"``
(``weight`` and ``weight_scale``, same shapes), so exchange copies them as they are.
No zero points, no INT codes.  With FP8 activations (one scale per ``1 x bk`` group of
each token) the layer runs the W8A8 block op (:mod:`~torchquant.weights.activation`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from torchquant import ops
from torchquant.config import WeightQuant
from torchquant.numerics import block_grid, quantize_fp8_block_weight
from torchquant.weights.base import Buffers, QuantizedLayer, WeightFormat


class Fp8BlockFormat(WeightFormat):
    name = "FP8 block-wise"
    args_type = "float"
    groups_experts = False  # -- experts run one block op each

    def holds(self, weight: WeightQuant) -> bool:
        return weight.type == "fp8" and weight.block is not None

    def scale_dtype(self, weight: WeightQuant, dtype: torch.dtype) -> torch.dtype:
        return torch.float32

    def weight_buffers(
        self, n: int, k: int, weight: WeightQuant, dtype: torch.dtype, device: torch.device | None
    ) -> Buffers:
        return {
            "qweight": torch.empty(n, k, dtype=torch.float8_e4m3fn, device=device),
            "scales": torch.empty(
                block_grid(n, k, weight.block), dtype=torch.float32, device=device
            ),
            "zeros": None,
        }

    def quantize(self, layer: QuantizedLayer, weight: Tensor, name: str) -> None:
        q, s = quantize_fp8_block_weight(weight, layer.scheme.weight.block, what=name)
        layer.qweight.copy_(q)
        layer.scales.copy_(s)

    def reference_linear(self, layer: QuantizedLayer, x: Tensor, bias: Tensor | None) -> Tensor:
        args = (layer.qweight, layer.scales, bias, *layer.scheme.weight.block)
        return ops.linear_fp8_block_weight_reference(x, *args)

    def bind_linear(self, layer: QuantizedLayer, bias: Tensor | None) -> Callable[[Tensor], Tensor]:
        args = (layer.qweight, layer.scales, bias, *layer.scheme.weight.block)
        return ops.bind(ops.linear_fp8_block_weight, *args)
