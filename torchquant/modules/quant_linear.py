"""``QuantLinear``: an inference linear layer holding quantized weights as buffers."""

from __future__ import annotations

import torch
from torch import nn

from torchquant import ops
from torchquant.config import QuantScheme
from torchquant.errors import QuantizationError
from torchquant.numerics import (
    num_groups,
    pack_codes,
    packed_width,
    quantize_fp8_weight,
    quantize_int_weight,
)
from torchquant.ops import cpu_kernels
from torchquant.ops.cpu_kernels import CpuLayout

# -- where the layer's CPU layout is cached (a plain attribute: never a buffer, never saved)
_CPU_LAYOUT = "_cpu_layout_cache"


def uses_int8_storage(scheme: QuantScheme) -> bool:
    """INT8 symmetric weights are kept as signed int8 ``(N, K)``; other INT widths are packed."""
    w = scheme.weight
    return w.type == "int" and w.bits == 8 and w.symmetric


def _scale_dtype(scheme: QuantScheme, dtype: torch.dtype) -> torch.dtype:
    """Grouped INT scales follow the model dtype (as GPTQ/AWQ); per-channel and FP8 use float32."""
    w = scheme.weight
    return dtype if (w.type == "int" and w.group_size > 0) else torch.float32


def _derive_layout_after_load(module: QuantLinear, incompatible_keys: object) -> None:
    module.cpu_layout()


class QuantLinear(nn.Module):
    """Linear layer ``y = x W^T + b`` with ``W`` stored quantized by ``scheme``.

    Buffers (all persistent, saved by ``save_quantized``):
    ``qweight`` packed int32 ``(N, ceil(K/32)*bits)`` for INTn, int8 ``(N, K)`` for
    INT8 symmetric, float8_e4m3fn ``(N, K)`` for FP8; ``scales`` ``(N, G)`` (or
    ``(1, 1)`` per tensor); ``zeros`` uint8 ``(N, G)`` for asymmetric INT;
    ``bias`` ``(N,)``; ``input_scale`` ``(1,)`` for static activation scales;
    ``smooth_scale`` ``(K,)`` SmoothQuant divisor applied to the input;
    ``g_idx`` int32 ``(K,)`` the group of each input column (GPTQ act-order), absent
    when column ``k`` is in group ``k // group_size``.
    On CPU, bf16 INT layers also keep the weight in the layout of PyTorch's quantized
    CPU kernels (:meth:`cpu_layout`), derived once after quantizing or loading and
    re-derived when a buffer changes; it is not a buffer, so it is never saved.
    The constructor allocates empty buffers of the right shapes (use
    ``device="meta"`` to build a skeleton for loading); :meth:`from_linear`
    quantizes an existing layer.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        scheme: QuantScheme,
        bias: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        smooth: bool = False,
        g_idx: bool = False,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.scheme = scheme
        self.dtype = dtype
        w = scheme.weight
        n, k = out_features, in_features
        g = 1 if w.group_size in (-1, 0) else num_groups(k, w.group_size)
        sdt = _scale_dtype(scheme, dtype)
        if w.type == "fp8":
            qweight = torch.empty(n, k, dtype=torch.float8_e4m3fn, device=device)
            scales = torch.empty(n if w.group_size == -1 else 1, 1, dtype=sdt, device=device)
        elif uses_int8_storage(scheme):
            qweight = torch.empty(n, k, dtype=torch.int8, device=device)
            scales = torch.empty(n, g, dtype=sdt, device=device)
        else:
            qweight = torch.empty(n, packed_width(k, w.bits), dtype=torch.int32, device=device)
            scales = torch.empty(n, g, dtype=sdt, device=device)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        zeros = None
        if w.type == "int" and not w.symmetric:
            zeros = torch.empty(n, g, dtype=torch.uint8, device=device)
        self.register_buffer("zeros", zeros)
        self.register_buffer("bias", torch.empty(n, dtype=dtype, device=device) if bias else None)
        act = scheme.activation
        static = act is not None and not act.dynamic
        input_scale = torch.empty(1, dtype=torch.float32, device=device) if static else None
        self.register_buffer("input_scale", input_scale)
        smooth_scale = torch.empty(k, dtype=torch.float32, device=device) if smooth else None
        self.register_buffer("smooth_scale", smooth_scale)
        # -- g_idx (K,) int32: group of each input column (GPTQ act-order); None = k // group
        if g_idx and not (w.type == "int" and not uses_int8_storage(scheme) and w.group_size > 0):
            raise QuantizationError(
                f"g_idx needs grouped packed INT weights, got scheme {scheme.describe()!r}"
            )
        self.register_buffer(
            "g_idx", torch.empty(k, dtype=torch.int32, device=device) if g_idx else None
        )
        self.register_load_state_dict_post_hook(_derive_layout_after_load)

    # -- construction from float layers

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        scheme: QuantScheme,
        name: str = "weight",
    ) -> QuantLinear:
        """Quantize ``weight: (out, in)`` round-to-nearest into a new layer on its device."""
        if weight.dim() != 2:
            raise QuantizationError(f"{name}: expected a 2-D weight, got {tuple(weight.shape)}")
        n, k = weight.shape
        layer = cls(k, n, scheme, bias is not None, weight.dtype, weight.device)
        w = scheme.weight
        sdt = _scale_dtype(scheme, weight.dtype)
        if w.type == "fp8":
            q, s = quantize_fp8_weight(weight, per_channel=w.group_size == -1, what=name)
            layer.qweight.copy_(q)
            layer.scales.copy_(s.reshape(layer.scales.shape))
        else:
            iw = quantize_int_weight(weight, w.bits, w.group_size, w.symmetric, sdt, what=name)
            layer.set_int_codes(iw.codes, iw.scales, iw.zeros)
        if bias is not None:
            layer.bias.copy_(bias.detach())
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Module, scheme: QuantScheme, name: str = "") -> QuantLinear:
        """Quantize an ``nn.Linear`` (or a transformers GPT-2 ``Conv1D``, weight ``(in, out)``)."""
        weight = linear.weight.detach()
        if type(linear).__name__ == "Conv1D" and not isinstance(linear, nn.Linear):
            weight = weight.t()
        label = f"{name}.weight" if name else "weight"
        return cls.from_weight(weight, getattr(linear, "bias", None), scheme, label)

    def set_int_codes(
        self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None
    ) -> None:
        """Store unsigned INT codes ``(N, K)`` with their qparams (RTN, GPTQ and AWQ end here)."""
        w = self.scheme.weight
        if uses_int8_storage(self.scheme):
            self.qweight.copy_((codes.to(torch.int16) - 128).to(torch.int8))
        else:
            self.qweight.copy_(pack_codes(codes, w.bits))
        self.scales.copy_(scales.reshape(self.scales.shape))
        if self.zeros is not None:
            if zeros is None:
                raise QuantizationError("asymmetric scheme needs zero points")
            self.zeros.copy_(zeros)
        self.cpu_layout()

    # -- the CPU kernels' layout

    def _layout_key(self) -> tuple[int, ...]:
        """Changes whenever a buffer the layout is derived from is replaced or written."""
        tensors = (self.qweight, self.scales, self.zeros, self.g_idx)
        return tuple(v for t in tensors if t is not None for v in (t.data_ptr(), t._version))

    def _derive_cpu_layout(self) -> CpuLayout:
        w = self.scheme.weight
        if self.scheme.activation is not None or w.type != "int":
            return CpuLayout()  # W8A8 and FP8 run on the buffers as they are
        if self.dtype != cpu_kernels.COMPUTE_DTYPE:
            return CpuLayout()  # only bf16 inputs run the kernels (see ops.cpu_kernels)
        if uses_int8_storage(self.scheme):
            return ops.int8_cpu_layout(self.qweight, self.scales, w.group_size)
        group_size = w.group_size if self.g_idx is None else 0
        if self.g_idx is not None and not self._g_idx_in_range():
            return CpuLayout()  # not written yet (codes are set before g_idx): derive later
        return ops.intn_cpu_layout(
            self.qweight, self.scales, self.zeros, self.g_idx, w.bits, group_size, self.in_features
        )

    def _g_idx_in_range(self) -> bool:
        groups = self.scales.shape[1]
        return bool(((self.g_idx >= 0) & (self.g_idx < groups)).all())

    def cpu_layout(self) -> CpuLayout:
        """The weight laid out for the CPU kernels; empty off CPU (or where none is needed).

        Inside ``torch.compile`` the cached layout is used as it is (or, when none was
        derived, the op derives one per call).
        """
        if self.qweight.device.type != "cpu":
            return CpuLayout()
        cache = self.__dict__.get(_CPU_LAYOUT)
        if torch.compiler.is_compiling():
            return cache[1] if cache is not None else CpuLayout()
        key = self._layout_key()
        if cache is None or cache[0] != key:
            with torch.no_grad():
                cache = (key, self._derive_cpu_layout())
            self.__dict__[_CPU_LAYOUT] = cache
        return cache[1]

    def cpu_layout_nbytes(self) -> int:
        """Bytes the cached CPU layout holds beyond the buffers."""
        cache = self.__dict__.get(_CPU_LAYOUT)
        return cache[1].nbytes() if cache is not None else 0

    def __getstate__(self) -> dict:
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        return {key: value for key, value in state.items() if key != _CPU_LAYOUT}

    # -- inference

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x, reference=False)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``forward`` through the exact reference maths, on any device (the tests' oracle)."""
        return self._linear(x, reference=True)

    def _linear(self, x: torch.Tensor, reference: bool) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise QuantizationError(
                f"input has {x.shape[-1]} features, layer expects {self.in_features}"
            )
        w, act = self.scheme.weight, self.scheme.activation
        x = x.to(self.dtype)
        if act is not None:
            per_token = act.granularity == "token"
            if reference:
                return ops.linear_w8a8_reference(
                    x, self.qweight, self.scales, self.bias, act.type, per_token,
                    float(act.percentile), self.input_scale, self.smooth_scale,
                )  # fmt: skip
            op = ops.linear_w8a8_int8 if act.type == "int8" else ops.linear_w8a8_fp8
            return op(
                x,
                self.qweight,
                self.scales,
                self.bias,
                per_token,
                float(act.percentile),
                self.input_scale,
                self.smooth_scale,
            )
        if self.smooth_scale is not None:
            x = (x / self.smooth_scale).to(self.dtype)
        if w.type == "fp8":
            fp8 = ops.linear_fp8_weight_reference if reference else ops.linear_fp8_weight
            return fp8(x, self.qweight, self.scales, self.bias)
        if uses_int8_storage(self.scheme):
            if reference:
                return ops.linear_int8_weight_reference(
                    x, self.qweight, self.scales, self.bias, w.group_size
                )
            return ops.linear_int8_weight(
                x, self.qweight, self.scales, self.bias, w.group_size, *self.cpu_layout()
            )
        if reference:
            group_size = w.group_size if self.g_idx is None else 0
            return ops.linear_intn_reference(
                x, self.qweight, self.scales, self.zeros, self.bias, w.bits, group_size, self.g_idx
            )
        if self.g_idx is not None:
            return ops.linear_intn_gidx(
                x, self.qweight, self.scales, self.zeros, self.g_idx, self.bias, w.bits,
                *self.cpu_layout(),
            )  # fmt: skip
        return ops.linear_intn(
            x, self.qweight, self.scales, self.zeros, self.bias, w.bits, w.group_size,
            *self.cpu_layout(),
        )  # fmt: skip

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight this layer computes with, ``(N, K)`` (for tests and export)."""
        eye = torch.eye(self.in_features, dtype=self.dtype, device=self.qweight.device)
        bias, self.bias = self.bias, None
        smooth, self.smooth_scale = self.smooth_scale, None
        act, scheme = self.scheme.activation, self.scheme
        try:
            if act is not None:
                self.scheme = QuantScheme(scheme.weight)
            w = self.reference_forward(eye).t()
        finally:
            self.bias, self.smooth_scale, self.scheme = bias, smooth, scheme
        return w.to(dtype or self.dtype)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, scheme={self.scheme.describe()}"
        )
