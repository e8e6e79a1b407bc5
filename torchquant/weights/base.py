"""The interface every weight storage format implements, and the part INT formats share.

A format owns the buffers a quantized weight is stored in (``qweight``, ``scales``,
``zeros`` and, where it can carry one, ``g_idx``): their shapes and dtypes, how a
float weight is rounded into them, how INT codes are written and read back, and the
weight-only op that computes with them.  ``QuantLinear`` holds the buffers and asks
its format; exchange formats ask it whether the weight is INT and for its codes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar, Protocol

import torch
from torch import Tensor

from torchquant.config import QuantScheme, WeightQuant
from torchquant.errors import QuantizationError
from torchquant.numerics import quantize_int_weight, unpack_codes
from torchquant.ops.cpu_kernels import CpuLayout

Buffers = dict[str, Tensor | None]


class QuantizedLayer(Protocol):
    """What a format reads and writes on a layer (``QuantLinear`` is one)."""

    in_features: int
    out_features: int
    scheme: QuantScheme
    dtype: torch.dtype
    qweight: Tensor
    scales: Tensor
    zeros: Tensor | None
    g_idx: Tensor | None

    def cpu_layout(self) -> CpuLayout: ...


class WeightFormat(ABC):
    """One storage kind of a quantized weight (stateless: one instance serves every layer).

    ``name`` names the kind in messages; ``is_int`` says the weight is unsigned INT
    codes with scales and zero points (what the INT exchange formats hold);
    ``args_type`` is the ``type`` quantization args give the stored values in the
    exchange formats' configs (compressed-tensors: ``"int"`` or ``"float"``);
    ``groups_experts`` says the grouped mixture-of-experts op reads its buffers stacked.
    """

    name: ClassVar[str]
    is_int: ClassVar[bool] = False
    args_type: ClassVar[str]
    groups_experts: ClassVar[bool] = True

    @abstractmethod
    def holds(self, weight: WeightQuant) -> bool:
        """Whether this format stores weights quantized as ``weight``."""

    def takes_g_idx(self, weight: WeightQuant) -> bool:
        """Whether a per-column group index (GPTQ act-order) can come with the weight."""
        return False

    @abstractmethod
    def scale_dtype(self, weight: WeightQuant, dtype: torch.dtype) -> torch.dtype:
        """The dtype ``scales`` is kept in for a layer computing in ``dtype``."""

    @abstractmethod
    def weight_buffers(
        self, n: int, k: int, weight: WeightQuant, dtype: torch.dtype, device: torch.device | None
    ) -> Buffers:
        """Empty ``qweight``, ``scales`` and ``zeros`` (``None`` where unused) for ``(n, k)``."""

    def allocate(
        self,
        n: int,
        k: int,
        scheme: QuantScheme,
        dtype: torch.dtype,
        device: torch.device | str | None,
        g_idx: bool = False,
    ) -> Buffers:
        """Every buffer the weight of an ``(n, k)`` layer needs, ``g_idx (k,)`` int32 included."""
        if g_idx and not self.takes_g_idx(scheme.weight):
            raise QuantizationError(
                f"g_idx needs grouped packed INT weights, got scheme {scheme.describe()!r}"
            )
        buffers = self.weight_buffers(n, k, scheme.weight, dtype, device)
        buffers["g_idx"] = torch.empty(k, dtype=torch.int32, device=device) if g_idx else None
        return buffers

    @abstractmethod
    def quantize(self, layer: QuantizedLayer, weight: Tensor, name: str) -> None:
        """Round ``weight: (N, K)`` to nearest into the layer's buffers."""

    def set_int_codes(
        self, layer: QuantizedLayer, codes: Tensor, scales: Tensor, zeros: Tensor | None
    ) -> None:
        """Store unsigned INT codes ``(N, K)`` with their qparams."""
        raise QuantizationError(f"{self.name} weights hold no INT codes")

    def int_codes(self, layer: QuantizedLayer) -> Tensor:
        """The unsigned INT codes ``(N, K)`` uint8 the layer holds."""
        raise QuantizationError(f"{self.name} weights hold no INT codes")

    def set_packed_codes(
        self, layer: QuantizedLayer, packed: Tensor, scales: Tensor, zeros: Tensor | None
    ) -> None:
        """Store codes given as our packed bitstream ``(N, ceil(K/32)*bits)`` int32."""
        raise QuantizationError(f"{self.name} weights hold no INT codes")

    def set_values(
        self,
        layer: QuantizedLayer,
        values: Tensor,
        scales: Tensor,
        global_scale: Tensor | None = None,
    ) -> None:
        """Store a float format's rounded values ``(N, K)`` (FP8 values, FP4 codes) as
        :meth:`encode_values` lays them out, with their scales and NVFP4's global scale."""
        if (global_scale is not None) != (getattr(layer, "global_scale", None) is not None):
            raise QuantizationError(f"{self.name} weights take a global scale exactly when NVFP4")
        layer.qweight.copy_(self.encode_values(values))
        layer.scales.copy_(scales.reshape(layer.scales.shape))
        if global_scale is not None:
            layer.global_scale.copy_(global_scale)

    def encode_values(self, values: Tensor) -> Tensor:
        """``qweight`` holding a float format's rounded ``values (N, K)`` (FP8: as they are)."""
        return values

    def linear(
        self, layer: QuantizedLayer, x: Tensor, bias: Tensor | None, reference: bool
    ) -> Tensor:
        """``x W^T + bias`` with the stored weight: the exact reference op, or the fast one."""
        if reference:
            return self.reference_linear(layer, x, bias)
        return self.bind_linear(layer, bias)(x)

    @abstractmethod
    def reference_linear(self, layer: QuantizedLayer, x: Tensor, bias: Tensor | None) -> Tensor:
        """``x W^T + bias`` through the op's exact reference."""

    @abstractmethod
    def bind_linear(self, layer: QuantizedLayer, bias: Tensor | None) -> Callable[[Tensor], Tensor]:
        """The fast op with every argument but ``x`` bound (``QuantLinear`` caches it while
        its buffers stay the same, so a call does no lookups)."""

    def cpu_layout(self, layer: QuantizedLayer) -> CpuLayout:
        """The weight in the layout of the CPU kernels; empty where they use the buffers as is."""
        return CpuLayout()

    def dequantize(self, layer: QuantizedLayer) -> Tensor:
        """The float weight ``(N, K)`` the reference op computes with, in the layer's dtype."""
        eye = torch.eye(layer.in_features, dtype=layer.dtype, device=layer.qweight.device)
        return self.linear(layer, eye, None, reference=True).t()


class IntWeightFormat(WeightFormat):
    """Unsigned codes with per-group scales (and zero points when asymmetric).

    Subclasses say how codes are laid out in ``qweight`` (:meth:`encode`, :meth:`decode`).
    """

    is_int = True
    args_type = "int"

    def scale_dtype(self, weight: WeightQuant, dtype: torch.dtype) -> torch.dtype:
        """Grouped scales follow the model dtype (as GPTQ/AWQ); per-channel ones are float32."""
        return dtype if weight.group_size > 0 else torch.float32

    @abstractmethod
    def encode(self, codes: Tensor, weight: WeightQuant) -> Tensor:
        """``qweight`` holding unsigned ``codes: (N, K)``."""

    @abstractmethod
    def decode(self, qweight: Tensor, weight: WeightQuant, k: int) -> Tensor:
        """Unsigned codes ``(N, K)`` uint8 held in ``qweight``."""

    def quantize(self, layer: QuantizedLayer, weight: Tensor, name: str) -> None:
        w = layer.scheme.weight
        sdt = self.scale_dtype(w, weight.dtype)
        iw = quantize_int_weight(weight, w.bits, w.group_size, w.symmetric, sdt, what=name)
        self.set_int_codes(layer, iw.codes, iw.scales, iw.zeros)

    def set_int_codes(
        self, layer: QuantizedLayer, codes: Tensor, scales: Tensor, zeros: Tensor | None
    ) -> None:
        layer.qweight.copy_(self.encode(codes, layer.scheme.weight))
        store_qparams(layer, scales, zeros)

    def set_packed_codes(
        self, layer: QuantizedLayer, packed: Tensor, scales: Tensor, zeros: Tensor | None
    ) -> None:
        codes = unpack_codes(packed, layer.scheme.weight.bits, layer.in_features)
        self.set_int_codes(layer, codes, scales, zeros)

    def int_codes(self, layer: QuantizedLayer) -> Tensor:
        return self.decode(layer.qweight, layer.scheme.weight, layer.in_features)


def store_qparams(layer: QuantizedLayer, scales: Tensor, zeros: Tensor | None) -> None:
    """Write INT ``scales`` (any shape of the right size) and the zero points it needs."""
    layer.scales.copy_(scales.reshape(layer.scales.shape))
    if layer.zeros is not None:
        if zeros is None:
            raise QuantizationError("asymmetric scheme needs zero points")
        layer.zeros.copy_(zeros)
