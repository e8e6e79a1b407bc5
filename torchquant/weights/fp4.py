"""FP4 E2M1 weights with block scales: NVFP4 and MXFP4.

``qweight (N, ceil(K/2))`` uint8, two E2M1 codes a byte (even column in the low
nibble); ``scales (N, ceil(K/block))``; no zero points, no INT codes.
NVFP4 (block 16): ``scales`` float8_e4m3fn and ``global_scale (1,)`` float32.
MXFP4 (block 32): ``scales`` uint8 E8M0 exponents, no global scale.
These are compressed-tensors' ``weight_packed``, ``weight_scale`` and
``weight_global_scale`` under our names, so exchange copies them as they are.
The CPU kernels read the buffers as they are (no CPU layout).  With activations of
the same type (schemes ``nvfp4``, ``mxfp4``) the layer runs ``ops.linear_microscaled``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor

from torchquant.config import WeightQuant
from torchquant.numerics.fp4 import (
    MXFP4_BLOCK,
    NVFP4_BLOCK,
    Fp4Weight,
    dequantize_fp4_weight,
    fp4_rounding,
    pack_e2m1,
    unpack_e2m1,
)
from torchquant.ops import bind
from torchquant.ops.weight_fp4 import linear_fp4_weight, linear_fp4_weight_reference
from torchquant.weights.base import Buffers, QuantizedLayer, WeightFormat
from torchquant.weights.microscaled_input import bind_microscaled, microscaled_reference


class Fp4Format(WeightFormat):
    """E2M1 codes with one scale per ``block`` values along K (and NVFP4's global scale)."""

    args_type = "float"
    weight_type: ClassVar[str]
    block: ClassVar[int]
    block_scale_dtype: ClassVar[torch.dtype]
    has_global_scale: ClassVar[bool]

    def holds(self, weight: WeightQuant) -> bool:
        return weight.type == self.weight_type

    def scale_dtype(self, weight: WeightQuant, dtype: torch.dtype) -> torch.dtype:
        return self.block_scale_dtype

    def weight_buffers(
        self, n: int, k: int, weight: WeightQuant, dtype: torch.dtype, device: torch.device | None
    ) -> Buffers:
        g = -(-k // self.block)
        buffers: Buffers = {
            "qweight": torch.empty(n, -(-k // 2), dtype=torch.uint8, device=device),
            "scales": torch.empty(n, g, dtype=self.block_scale_dtype, device=device),
            "zeros": None,
        }
        if self.has_global_scale:
            buffers["global_scale"] = torch.empty(1, dtype=torch.float32, device=device)
        return buffers

    def round(self, weight: Tensor, name: str, scale_rounding: str = "ocp") -> Fp4Weight:
        """Round-to-nearest codes and scales of ``weight: (N, K)``."""
        return fp4_rounding(self.weight_type, scale_rounding)(weight, what=name)

    def quantize(self, layer: QuantizedLayer, weight: Tensor, name: str) -> None:
        self.set_fp4(layer, self.round(weight, name, layer.scheme.weight.scale_rounding))

    def set_fp4(self, layer: QuantizedLayer, q: Fp4Weight) -> None:
        """Store E2M1 codes ``(N, K)`` with their block scales (and global scale)."""
        self.set_values(layer, q.codes, q.scales, q.global_scale)

    def encode_values(self, values: Tensor) -> Tensor:
        return pack_e2m1(values)

    def fp4_codes(self, layer: QuantizedLayer) -> Tensor:
        """The E2M1 codes ``(N, K)`` uint8 the layer holds."""
        return unpack_e2m1(layer.qweight, layer.in_features)

    def reference_linear(self, layer: QuantizedLayer, x: Tensor, bias: Tensor | None) -> Tensor:
        if layer.scheme.activation is not None:
            return microscaled_reference(layer, x, bias)
        args = (layer.qweight, layer.scales, _global_scale(layer), bias, self.block)
        return linear_fp4_weight_reference(x, *args)

    def bind_linear(self, layer: QuantizedLayer, bias: Tensor | None) -> Callable[[Tensor], Tensor]:
        if layer.scheme.activation is not None:
            return bind_microscaled(layer, bias)
        args = (layer.qweight, layer.scales, _global_scale(layer), bias, self.block)
        return bind(linear_fp4_weight, *args)

    def dequantize(self, layer: QuantizedLayer) -> Tensor:
        codes, gs = self.fp4_codes(layer), _global_scale(layer)
        return dequantize_fp4_weight(codes, layer.scales, gs, self.block, layer.dtype)


def _global_scale(layer: QuantizedLayer) -> Tensor | None:
    return getattr(layer, "global_scale", None)


class Nvfp4Format(Fp4Format):
    name = "NVFP4"
    weight_type = "nvfp4"
    block = NVFP4_BLOCK
    block_scale_dtype = torch.float8_e4m3fn
    has_global_scale = True


class Mxfp4Format(Fp4Format):
    name = "MXFP4"
    weight_type = "mxfp4"
    block = MXFP4_BLOCK
    block_scale_dtype = torch.uint8
    has_global_scale = False
