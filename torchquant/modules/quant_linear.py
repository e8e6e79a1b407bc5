"""``QuantLinear``: an inference linear layer holding quantized weights as buffers."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from torchquant.config import QuantScheme
from torchquant.config.scheme import MICROSCALED_BLOCKS
from torchquant.errors import ConfigError, QuantizationError
from torchquant.ops import cpu_kernels, weight_code_sums
from torchquant.ops.cpu_kernels import CpuLayout
from torchquant.weights import bind_w8a8, linear_w8a8, weight_format

# -- where the layer's CPU layout and its bound op are cached (plain attributes: never
# -- buffers, never saved)
_CPU_LAYOUT = "_cpu_layout_cache"
_BOUND_LINEAR = "_bound_linear_cache"
_WEIGHT_SUMS = "_weight_sums_cache"
SIBLINGS_KEY = "_sibling_projections"  # -- (group, index), see ``modules.sibling_linears``
_CACHES = (_CPU_LAYOUT, _BOUND_LINEAR, _WEIGHT_SUMS, SIBLINGS_KEY)


def _scale_dtype(scheme: QuantScheme, dtype: torch.dtype) -> torch.dtype:
    """The dtype the scheme's weight format keeps scales in (``QatLinear`` matches it)."""
    return weight_format(scheme).scale_dtype(scheme.weight, dtype)


def check_scheme(scheme: object) -> None:
    """Refuse a layer ``scheme`` that is not a :class:`QuantScheme` (``QatLinear`` too)."""
    if not isinstance(scheme, QuantScheme):
        raise ConfigError(f"scheme must be a QuantScheme, got {type(scheme).__name__}")


def _runs_w8a8(scheme: QuantScheme) -> bool:
    """Whether the layer quantizes its input with a W8A8 op; microscaled activations are
    their weight format's (it runs one op for both operands)."""
    act = scheme.activation
    return act is not None and act.type not in MICROSCALED_BLOCKS


def _derive_layout_after_load(module: QuantLinear, incompatible_keys: object) -> None:
    module.cpu_layout()


class QuantLinear(nn.Module):
    """Linear layer ``y = x W^T + b`` with ``W`` stored quantized by ``scheme``.

    Buffers (all persistent, saved by ``save_quantized``): ``qweight``, ``scales``
    ``(N, G)`` (or ``(1, 1)`` per tensor) and ``zeros`` ``(N, G)`` as the scheme's
    weight format lays them out (``self.weight_format``, see :mod:`torchquant.weights`:
    packed int32 for INTn, int8 for INT8 symmetric, float8_e4m3fn for FP8);
    ``bias`` ``(N,)``; ``input_scale`` ``(1,)`` for static activation scales (for
    NVFP4 activations, their calibrated float32 global scale);
    ``input_zero_point`` ``(1,)`` int8 for static asymmetric ones;
    ``smooth_scale`` ``(K,)`` SmoothQuant divisor applied to the input;
    ``g_idx`` int32 ``(K,)`` the group of each input column (GPTQ act-order), absent
    when column ``k`` is in group ``k // group_size``.
    On CPU, bf16 INT layers (and float32 weight-only ones while inside ``float32_in_bf16``)
    also keep the weight in the layout of PyTorch's quantized CPU kernels (:meth:`cpu_layout`;
    FP8 layers their codes as bf16), derived once after quantizing or loading (or on
    entering that context) and re-derived when a buffer changes; it is not a buffer, so it
    is never saved; so are the column sums of the weight codes that asymmetric activations'
    zero-point correction takes (:meth:`weight_code_sums`).  ``forward`` calls the op with
    every argument but ``x`` bound once
    (re-bound when a buffer is replaced or written): a decode step runs ~200 layers.
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
        check_scheme(scheme)
        self.in_features = in_features
        self.out_features = out_features
        self.scheme = scheme
        self.dtype = dtype
        self.weight_format = weight_format(scheme)
        n, k = out_features, in_features
        buffers = self.weight_format.allocate(n, k, scheme, dtype, device, g_idx=g_idx)
        g_idx_buffer = buffers.pop("g_idx")
        for name, buffer in buffers.items():
            self.register_buffer(name, buffer)
        self.register_buffer("bias", torch.empty(n, dtype=dtype, device=device) if bias else None)
        act = scheme.activation
        static = act is not None and not act.dynamic
        input_scale = torch.empty(1, dtype=torch.float32, device=device) if static else None
        self.register_buffer("input_scale", input_scale)
        asym = static and not act.symmetric
        zero_point = torch.empty(1, dtype=torch.int8, device=device) if asym else None
        self.register_buffer("input_zero_point", zero_point)
        smooth_scale = torch.empty(k, dtype=torch.float32, device=device) if smooth else None
        self.register_buffer("smooth_scale", smooth_scale)
        # -- registered last, where checkpoints have always had it
        self.register_buffer("g_idx", g_idx_buffer)
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
        layer.weight_format.quantize(layer, weight, name)
        if bias is not None:
            layer.bias.copy_(bias.detach())
        layer.cpu_layout()
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
        self.weight_format.set_int_codes(self, codes, scales, zeros)
        self.cpu_layout()

    # -- the CPU kernels' layout

    def _layout_key(self) -> tuple[int, ...]:
        """Changes whenever a buffer the layout is derived from is replaced or written, and
        on entering or leaving ``float32_in_bf16`` (float32 layers keep a layout inside it)."""
        buffers = self._buffers
        key = [cpu_kernels.computes_in_bf16(self.dtype)]
        for name in ("qweight", "scales", "zeros", "g_idx"):
            t = buffers[name]
            if t is not None:
                key += (t.data_ptr(), t._version)
        return tuple(key)

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
                cache = (key, self.weight_format.cpu_layout(self))
            self.__dict__[_CPU_LAYOUT] = cache
        return cache[1]

    def weight_code_sums(self) -> torch.Tensor | None:
        """``sum_k`` of the weight codes ``(N,)`` int32 for asymmetric activations (else None),
        cached like the CPU layout (derived again when the weight changes, never saved);
        inside ``torch.compile`` the op derives them per call."""
        act = self.scheme.activation
        if act is None or act.symmetric or torch.compiler.is_compiling():
            return None
        key = self._layout_key()
        cache = self.__dict__.get(_WEIGHT_SUMS)
        if cache is None or cache[0] != key:
            with torch.no_grad():
                cache = (key, weight_code_sums(self.qweight))
            self.__dict__[_WEIGHT_SUMS] = cache
        return cache[1]

    def cpu_layout_nbytes(self) -> int:
        """Bytes the cached CPU layout holds beyond the buffers."""
        cache = self.__dict__.get(_CPU_LAYOUT)
        return cache[1].nbytes() if cache is not None else 0

    def _apply(self, fn: Callable, recurse: bool = True) -> QuantLinear:
        """Moving or casting the buffers drops the bound op, which would keep the old ones
        alive, and the layer's sibling group (its buffers are no longer the group's)."""
        self.__dict__.pop(_BOUND_LINEAR, None)
        self.__dict__.pop(SIBLINGS_KEY, None)
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        return {key: value for key, value in state.items() if key not in _CACHES}

    # -- inference

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_features(x)
        siblings = self.__dict__.get(SIBLINGS_KEY)
        if siblings is not None:  # -- (group, index): see ``modules.sibling_linears``
            out = siblings[0].output_of(siblings[1], x)
            if out is not None:
                return out
        if torch.compiler.is_compiling():
            return self._linear(x, reference=False)
        if x.dtype != self.dtype:
            x = x.to(self.dtype)
        return self._bound_linear()(x)

    def _bound_linear(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The fast op with this layer's buffers (and CPU layout) bound, derived again when
        any buffer is replaced or one the layout comes from is written."""
        key = (*map(id, self._buffers.values()), *self._layout_key())
        cache = self.__dict__.get(_BOUND_LINEAR)
        if cache is None or cache[0] != key:
            cache = (key, self._bind_linear())
            self.__dict__[_BOUND_LINEAR] = cache
        return cache[1]

    def _bind_linear(self) -> Callable[[torch.Tensor], torch.Tensor]:
        bias, smooth = self.bias, self.smooth_scale
        if _runs_w8a8(self.scheme):
            args = (self.qweight, self.scales, bias, self.input_scale, smooth, self.cpu_layout())
            zero_point, sums = self.input_zero_point, self.weight_code_sums()
            return bind_w8a8(self.scheme, *args, input_zero_point=zero_point, weight_sums=sums)
        linear = self.weight_format.bind_linear(self, bias)
        if smooth is None:
            return linear
        dtype = self.dtype
        return lambda x: linear((x / smooth).to(dtype))

    def _check_features(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.in_features:
            raise QuantizationError(
                f"input has {x.shape[-1]} features, layer expects {self.in_features}"
            )

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``forward`` through the exact reference maths, on any device (the tests' oracle)."""
        return self._linear(x, reference=True)

    def _linear(self, x: torch.Tensor, reference: bool) -> torch.Tensor:
        self._check_features(x)
        x = x.to(self.dtype)
        if _runs_w8a8(self.scheme):
            return linear_w8a8(
                x, self.scheme, self.qweight, self.scales, self.bias,
                self.input_scale, self.smooth_scale, reference, self.input_zero_point,
            )  # fmt: skip
        if self.smooth_scale is not None:
            x = (x / self.smooth_scale).to(self.dtype)
        return self.weight_format.linear(self, x, self.bias, reference)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight this layer computes with, ``(N, K)`` (for tests and export)."""
        return self.weight_format.dequantize(self).to(dtype or self.dtype)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, scheme={self.scheme.describe()}"
        )
