"""Fake quantization for training: quantize -> dequantize in the forward, straight-through back.

Every forward here equals the reference numerics (``torchquant.numerics``) bit for bit:
the INTn weight path is ``dequantize_int_weight(quantize_codes(w, ...))``, the FP8
weight path ``dequantize_fp8_weight`` of the E4M3 cast, the activation path
``dequantize_activation(quantize_activation(x, ...))``.  Gradients are straight-through
(1 inside the clipping range, 0 outside) for the quantized tensor and LSQ-style for
learnable scales: ``d(q*s)/ds = round(x/s) - x/s`` inside and the clipped code outside.
"""

from __future__ import annotations

import torch

from torchquant.config import ActivationQuant, WeightQuant
from torchquant.errors import QuantizationError
from torchquant.numerics import (
    choose_fp8_scale,
    choose_int_qparams,
    group_min_max,
    quantize_activation,
)
from torchquant.numerics.qparams import FP8_E4M3_MAX
from torchquant.ops.fake_quant import fake_quant_int_weight

INT8_MIN, INT8_MAX = -128.0, 127.0


def round_ste(t: torch.Tensor) -> torch.Tensor:
    """``round(t)`` in the forward, identity in the backward."""
    return t + (torch.round(t) - t).detach()


def cast_ste(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` rounded to ``dtype`` (and back to ``t.dtype``) with an identity gradient."""
    if dtype == t.dtype:
        return t
    return t + (t.to(dtype).to(t.dtype) - t).detach()


def minmax_weight_qparams(
    w: torch.Tensor, weight: WeightQuant, scale_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Float32 scales ``(N, G)`` and float zero points (or ``None``) from the weight's range.

    The same choice round-to-nearest makes (``choose_int_qparams`` / ``choose_fp8_scale``),
    with INT scales rounded to ``scale_dtype`` (the dtype ``QuantLinear`` stores) before the
    zero points are chosen, returned as float32 tensors so they can become parameters.
    """
    w = w.detach()
    if weight.type == "fp8":
        absmax = w.abs().amax(dim=1, keepdim=True) if weight.group_size == -1 else w.abs().amax()
        return choose_fp8_scale(absmax).reshape(-1, 1), None
    lo, hi = group_min_max(w, weight.group_size)
    scales, zeros = choose_int_qparams(lo, hi, weight.bits, weight.symmetric, scale_dtype)
    return scales.float(), None if zeros is None else zeros.float()


def int_zero_points(zeros: torch.Tensor | None, bits: int) -> torch.Tensor | None:
    """Learnable float zero points -> integer-valued ones in ``[0, 2**bits)`` (STE rounding)."""
    if zeros is None:
        return None
    return torch.clamp(round_ste(zeros), 0, (1 << bits) - 1)


def fake_quantize_int_weight(
    w: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    """INTn fake-quantized ``w (N, K)`` with integer-valued ``zeros`` (fused op, STE/LSQ)."""
    return fake_quant_int_weight(w, scales, zeros, bits, group_size)


class _FakeQuantFp8(torch.autograd.Function):
    """E4M3 fake quantization ``fp8(clamp(t / s, +-448)) * s`` with STE and LSQ gradients."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        x = t.float() / scale.float()
        q = torch.clamp(x, -FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).float()
        ctx.save_for_backward(x, q, scale)
        return (q * scale.float()).to(t.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, q, scale = ctx.saved_tensors
        inside = x.abs() <= FP8_E4M3_MAX
        g = grad.float()
        grad_t = torch.where(inside, g, 0.0).to(grad.dtype)
        d_scale = torch.where(inside, q - x, q)  # outside, q is the saturated +-448
        grad_s = _sum_to(g * d_scale, scale.shape).to(scale.dtype)
        return grad_t, grad_s


def _sum_to(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum a broadcast gradient back to ``shape`` (per-row ``(N, 1)`` or per-tensor)."""
    if t.shape == shape:
        return t
    if len(shape) == 2 and shape[0] == t.shape[0]:
        return t.sum(dim=1, keepdim=True)
    return t.sum().reshape(shape)


def fake_quantize_fp8_weight(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """FP8 E4M3 fake-quantized ``w (N, K)`` with a per-row ``(N, 1)`` or ``(1, 1)`` scale."""
    return _FakeQuantFp8.apply(w, scale)


class _FakeQuantActivation(torch.autograd.Function):
    """INT8/FP8 activation fake quantization; ``scale`` given (static) or computed (dynamic)."""

    @staticmethod
    def forward(ctx, x2, scale, act_type, per_token, percentile):
        static = scale.reshape(1, 1) if scale is not None else None
        q, used = quantize_activation(x2, act_type, per_token, percentile, static)
        qf = q.float()
        ctx.save_for_backward(x2, used)
        ctx.act_type = act_type
        ctx.learn_scale = scale is not None and scale.requires_grad
        ctx.scale_shape = None if scale is None else scale.shape
        return (qf * used).to(x2.dtype)

    @staticmethod
    def backward(ctx, grad):
        x2, used = ctx.saved_tensors
        x = x2.float() / used
        if ctx.act_type == "int8":
            r = torch.round(x)
            lo, hi = INT8_MIN, INT8_MAX
        else:
            r = torch.clamp(x, -FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).float()
            lo, hi = -FP8_E4M3_MAX, FP8_E4M3_MAX
        inside = (r >= lo) & (r <= hi) if ctx.act_type == "int8" else x.abs() <= hi
        g = grad.float()
        grad_x = torch.where(inside, g, 0.0).to(grad.dtype)
        grad_s = None
        if ctx.learn_scale:
            d_scale = torch.where(inside, r - x, torch.where(x < 0, lo, hi))
            grad_s = (g * d_scale).sum().reshape(ctx.scale_shape)
        return grad_x, grad_s, None, None, None


def fake_quantize_activation(
    x: torch.Tensor, act: ActivationQuant, static_scale: torch.Tensor | None = None
) -> torch.Tensor:
    """Fake-quantize a layer input ``x (..., K)`` as ``act`` says (dynamic, or ``static_scale``).

    Dynamic scales are not trained (they follow each input); a static ``static_scale``
    that requires grad gets the LSQ gradient.
    """
    if not act.dynamic and static_scale is None:
        raise QuantizationError("a static activation scheme needs a static_scale")
    x2 = x.reshape(-1, x.shape[-1])
    scale = None if act.dynamic else static_scale
    out = _FakeQuantActivation.apply(
        x2, scale, act.type, act.granularity == "token", float(act.percentile)
    )
    return out.reshape(x.shape)
