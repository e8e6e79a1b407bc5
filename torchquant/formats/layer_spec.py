"""What a checkpoint records about each quantized layer, parsed strictly on load."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from torchquant.config import QuantScheme
from torchquant.errors import CheckpointError, TorchquantError
from torchquant.modules import QuantLinear

_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16)}
_SPEC_TYPES = {
    "in_features": int,
    "out_features": int,
    "bias": bool,
    "smooth": bool,
    "dtype": str,
    "scheme": dict,
    "g_idx": bool,
}
_OPTIONAL = {"smooth", "g_idx"}


@dataclass(frozen=True)
class LayerSpec:
    """Enough to rebuild an empty ``QuantLinear`` shell before loading its tensors."""

    in_features: int
    out_features: int
    bias: bool
    smooth: bool
    dtype: str
    scheme: QuantScheme
    g_idx: bool = False

    @classmethod
    def of(cls, layer: QuantLinear) -> LayerSpec:
        return cls(
            layer.in_features,
            layer.out_features,
            layer.bias is not None,
            layer.smooth_scale is not None,
            str(layer.dtype),
            layer.scheme,
            layer.g_idx is not None,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias,
            "smooth": self.smooth,
            "dtype": self.dtype,
            "scheme": self.scheme.to_dict(),
            "g_idx": self.g_idx,
        }

    @classmethod
    def from_dict(cls, name: str, data: object) -> LayerSpec:
        """Parse one layer description strictly: exact keys and types, plausible sizes."""
        where = f"layer {name!r}"
        if not isinstance(data, Mapping):
            raise CheckpointError(f"{where}: layer description must be a mapping, got {data!r}")
        unknown = sorted(set(data) - _SPEC_TYPES.keys())
        missing = sorted(_SPEC_TYPES.keys() - set(data) - _OPTIONAL)
        if unknown or missing:
            raise CheckpointError(
                f"{where}: layer description has unknown field(s) {unknown}, lacks {missing}"
            )
        for key, kind in _SPEC_TYPES.items():
            value = data.get(key, False)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise CheckpointError(f"{where}: {key}={value!r} must be {kind.__name__}")
        try:
            scheme = QuantScheme.from_dict(data["scheme"])
        except (TypeError, TorchquantError) as exc:
            raise CheckpointError(f"{where}: bad scheme in metadata: {exc}") from None
        spec = cls(
            data["in_features"],
            data["out_features"],
            data["bias"],
            data.get("smooth", False),
            data["dtype"],
            scheme,
            data.get("g_idx", False),
        )
        if spec.dtype not in _DTYPES:
            raise CheckpointError(f"{where}: dtype {spec.dtype!r} not one of {list(_DTYPES)}")
        if not (0 < spec.in_features <= 2**20 and 0 < spec.out_features <= 2**22):
            raise CheckpointError(
                f"{where}: implausible shape {spec.out_features}x{spec.in_features}"
            )
        return spec

    def build(self) -> QuantLinear:
        return QuantLinear(
            self.in_features,
            self.out_features,
            self.scheme,
            bias=self.bias,
            dtype=_DTYPES[self.dtype],
            device="meta",
            smooth=self.smooth,
            g_idx=self.g_idx,
        )
