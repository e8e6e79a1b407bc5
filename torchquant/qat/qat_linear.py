"""``QatLinear``: an ``nn.Linear`` that trains through fake quantization of its weight and input."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from torchquant.config import QuantScheme
from torchquant.config.scheme import MICROSCALED_BLOCKS
from torchquant.errors import ConfigError, QuantizationError
from torchquant.modules.quant_linear import QuantLinear, _scale_dtype, check_scheme
from torchquant.numerics import activation_qmax, asymmetric_activation_qparams
from torchquant.numerics.fp4 import choose_nvfp4_global_scale
from torchquant.qat.fake_quant import (
    asym_zero_point,
    cast_ste,
    fake_quantize_activation,
    fake_quantize_weight,
    has_zero_points,
    int_zero_points,
    minmax_weight_qparams,
    store_trained_weight,
    weight_qparam_shape,
)
from torchquant.qat.options import QatOptions


class QatLinear(nn.Linear):
    """``y = fq_a(x) fq_w(W)^T + b``, with fake quantization as ``scheme`` says.

    State lives only in parameters and buffers (so DDP, ``state_dict`` and optimizers
    see all of it): ``weight``/``bias`` as in ``nn.Linear``; ``weight_scales`` ``(N, G)``
    float32 and ``weight_zeros`` ``(N, G)`` float (integer-valued in use) when scales are
    learned (:class:`QatOptions`), otherwise the scales follow the weight's min-max range
    at every step; ``input_scale`` ``(1,)`` for static activation schemes (NVFP4's: the
    global scale), and ``input_zero_point`` ``(1,)`` float (integer-valued in use, in
    [-128, 127]) for static asymmetric ones, trained with the scale (LSQ).
    Microscaled weights (NVFP4, MXFP4, MXFP8) keep no ``weight_scales``: their block scales
    follow each block's max at every step; NVFP4's global scale ``weight_global_scale``
    ``(1,)`` float32 is learned (LSQ) when scales are.
    :meth:`to_quant_linear` turns the layer into the ``QuantLinear`` that computes the
    same function.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        scheme: QuantScheme,
        bias: bool = True,
        options: QatOptions | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        check_scheme(scheme)
        if scheme.weight.observer != "minmax":
            raise ConfigError(
                f"QAT of {scheme.describe()}: weight.observer={scheme.weight.observer!r} "
                "searches block scales after training, QAT's follow each block's max; "
                "expected weight.observer='minmax'"
            )
        self.scheme = scheme
        self.options = options or QatOptions()
        self.observing = False  # set by calibration: static input scales track max |x|
        self._observed: tuple[torch.Tensor, torch.Tensor] | None = None  # -- min, max seen
        self._make_qparams(self.weight.device)

    def _make_qparams(self, device: torch.device) -> None:
        w, act, opts = self.scheme.weight, self.scheme.activation, self.options
        scales = zeros = input_scale = input_zero_point = global_scale = None
        if opts.learn_scales and w.type == "nvfp4":
            global_scale = nn.Parameter(torch.ones(1, device=device))
        if opts.learn_scales and w.type not in MICROSCALED_BLOCKS:
            shape = weight_qparam_shape(w, self.out_features, self.in_features)
            scales = nn.Parameter(torch.ones(shape, device=device))
            if has_zero_points(w):
                zeros = nn.Parameter(torch.zeros(shape, device=device), opts.learn_zeros)
        if act is not None and not act.dynamic:
            input_scale = nn.Parameter(torch.ones(1, device=device), opts.learn_input_scale)
            if not act.symmetric:
                zero = torch.zeros(1, device=device)
                input_zero_point = nn.Parameter(zero, opts.learn_input_scale)
        self.weight_scales = scales
        self.weight_global_scale = global_scale
        self.weight_zeros = zeros
        self.input_scale = input_scale
        self.input_zero_point = input_zero_point

    # -- construction

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        scheme: QuantScheme,
        options: QatOptions | None = None,
        name: str = "",
    ) -> QatLinear:
        """Wrap ``linear`` (its weight and bias parameters are shared, not copied)."""
        if not isinstance(linear, nn.Linear):
            raise QuantizationError(
                f"{name or 'layer'}: QAT needs an nn.Linear, got {type(linear).__name__}"
            )
        if linear.weight.device.type == "meta":
            raise QuantizationError(f"{name}: weight is on the meta device; load it first")
        layer = cls(
            linear.in_features,
            linear.out_features,
            scheme,
            linear.bias is not None,
            options,
            device="meta",
            dtype=linear.weight.dtype,
        )
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer._make_qparams(linear.weight.device)
        layer.reset_qparams()
        return layer

    @torch.no_grad()
    def reset_qparams(self) -> None:
        """Learned scales and zero points from the weight's current min-max (RTN's choice)."""
        if self.weight_global_scale is not None:
            self.weight_global_scale.copy_(choose_nvfp4_global_scale(self.weight))
        if self.weight_scales is None:
            return
        s, z = minmax_weight_qparams(self.weight, self.scheme.weight, self._scale_dtype())
        self.weight_scales.copy_(s.reshape(self.weight_scales.shape))
        if self.weight_zeros is not None:
            self.weight_zeros.copy_(z)

    @torch.no_grad()
    def load_quantized(self, layer: QuantLinear, name: str = "") -> None:
        """Start from a post-training result: its weight, bias, scales and zero points.

        The float weight becomes the PTQ layer's dequantized weight, so the fake-quant
        model starts out computing exactly what the PTQ model computes.
        """
        label = name or "layer"
        if layer.scheme.weight != self.scheme.weight:
            raise ConfigError(
                f"{label}: PTQ layer is {layer.scheme.describe()}, QAT layer is "
                f"{self.scheme.describe()}"
            )
        if self.scheme.weight.type in MICROSCALED_BLOCKS:
            raise ConfigError(
                f"{label}: QAT of {self.scheme.describe()} weights starts from the float weight "
                "(its block scales follow each block's max); prepare it without ptq_model"
            )
        if self.weight_scales is None:
            raise ConfigError(f"{label}: starting from PTQ scales needs learn_scales=True")
        if layer.smooth_scale is not None:
            raise ConfigError(f"{label}: PTQ layers with a smoothing scale are not supported")
        if (layer.bias is None) != (self.bias is None):
            raise ConfigError(f"{label}: PTQ layer and QAT layer differ in having a bias")
        self.weight.copy_(layer.dequantized_weight(self.weight.dtype))
        if self.bias is not None:
            self.bias.copy_(layer.bias)
        self.weight_scales.copy_(layer.scales.float().reshape(self.weight_scales.shape))
        if self.weight_zeros is not None:
            self.weight_zeros.copy_(layer.zeros.float())

    # -- forward

    def _scale_dtype(self) -> torch.dtype:
        return _scale_dtype(self.scheme, self.weight.dtype)

    def weight_qparams(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Scales (float32, rounded to the storage dtype) and integer-valued zeros in use;
        for microscaled weights NVFP4's learned global scale (``None``: from the weight)."""
        w = self.scheme.weight
        if w.type in MICROSCALED_BLOCKS:
            g = self.weight_global_scale
            return (None if g is None else g.clamp_min(self.options.min_scale)), None
        if self.weight_scales is None:
            s, z = minmax_weight_qparams(self.weight, w, self._scale_dtype())
            return s.float(), z
        s = cast_ste(self.weight_scales.clamp_min(self.options.min_scale), self._scale_dtype())
        z = None if self.weight_zeros is None else int_zero_points(self.weight_zeros, w.bits)
        return s, z

    def fake_quantized_weight(self) -> torch.Tensor:
        scales, zeros = self.weight_qparams()
        return fake_quantize_weight(self.weight, self.scheme.weight, scales, zeros)

    @torch.no_grad()
    def start_observing(self) -> None:
        """Calibration starts: the static input qparams follow the inputs seen from now on."""
        self.input_scale.zero_()
        self._observed = None
        self.observing = True

    @torch.no_grad()
    def _observe(self, x: torch.Tensor) -> None:
        if self.input_zero_point is not None:
            lo, hi = x.detach().amin().float(), x.detach().amax().float()
            if self._observed is not None:
                lo, hi = torch.minimum(lo, self._observed[0]), torch.maximum(hi, self._observed[1])
            self._observed = (lo, hi)
            scale, zero = asymmetric_activation_qparams(lo.reshape(1), hi.reshape(1))
            self.input_scale.copy_(scale)
            self.input_zero_point.copy_(zero.float())
            return
        if self.scheme.activation.type == "nvfp4":  # -- the global scale 448 * 6 / max |x|
            amax = x.detach().abs().amax().float().reshape(1)
            if self._observed is not None:
                amax = torch.maximum(amax, self._observed[1])
            self._observed = (-amax, amax)
            self.input_scale.copy_(choose_nvfp4_global_scale(amax))
            return
        qmax = activation_qmax(self.scheme.activation.type)
        seen = x.detach().abs().amax().float().reshape(1) / qmax
        self.input_scale.copy_(torch.maximum(self.input_scale, seen))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise QuantizationError(
                f"input has {x.shape[-1]} features, layer expects {self.in_features}"
            )
        weight = self.fake_quantized_weight()
        act = self.scheme.activation
        if act is not None:
            scale = zero = None
            if not act.dynamic:
                if self.observing:
                    self._observe(x)
                scale = self.input_scale.clamp_min(self.options.min_scale)
                if self.input_zero_point is not None:
                    zero = asym_zero_point(self.input_zero_point)
            x = fake_quantize_activation(x, act, scale, zero)
        return F.linear(x, weight, self.bias)

    # -- conversion

    @torch.no_grad()
    def to_quant_linear(
        self, name: str = "", expected: QuantScheme | None | str = "any"
    ) -> QuantLinear:
        """The inference layer computing what this layer computes (learned scales included).

        ``expected`` is the scheme a config assigns to this layer; a different one
        (or ``None``, "skip it") raises :class:`ConfigError` rather than silently
        quantizing the layer differently from how it was trained.
        """
        label = name or "layer"
        if expected != "any" and expected != self.scheme:
            wanted = "skipping it" if expected is None else expected.describe()
            raise ConfigError(
                f"{label}: trained as {self.scheme.describe()}, but the config asks for {wanted}"
            )
        scales, zeros = self.weight_qparams()
        weight = self.weight.detach()
        layer = QuantLinear(
            self.in_features,
            self.out_features,
            self.scheme,
            self.bias is not None,
            dtype=weight.dtype,
            device=weight.device,
        )
        store_trained_weight(layer, weight, scales, zeros, self._scale_dtype())
        if self.bias is not None:
            layer.bias.copy_(self.bias)
        if self.input_scale is not None:
            layer.input_scale.copy_(self.input_scale.clamp_min(self.options.min_scale))
        if self.input_zero_point is not None:
            layer.input_zero_point.copy_(asym_zero_point(self.input_zero_point).to(torch.int8))
        return layer

    def extra_repr(self) -> str:
        learned = self.weight_scales is not None or self.weight_global_scale is not None
        learned = "learned" if learned else "min-max"
        return f"{super().extra_repr()}, scheme={self.scheme.describe()}, scales={learned}"
