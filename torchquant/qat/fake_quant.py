"""Fake quantization for training: the reference numerics wrapped for autograd, per storage kind.

The maths is ``torchquant.numerics.fake_quant`` (forward and straight-through / LSQ
backward): INTn weights run the fused op ``torchquant::fake_quant_int_weight`` (Triton on
CUDA), FP8 weights and activations run the reference through an autograd function, and
microscaled ones (NVFP4, MXFP4, MXFP8) that of ``torchquant.qat.microscaled``.
This module is also the one place QAT looks at a weight's storage kind (INTn, FP8 or
microscaled):
the shape of its qparams, its min-max starting point, its fake quantization and what a
``QuantLinear`` stores for it after training.
"""

from __future__ import annotations

import torch

from torchquant.config import ActivationQuant, WeightQuant
from torchquant.config.scheme import MICROSCALED_BLOCKS
from torchquant.errors import QuantizationError
from torchquant.modules.quant_linear import QuantLinear
from torchquant.numerics import (
    block_grid,
    choose_fp8_weight_scale,
    choose_int_qparams,
    expand_blocks,
    group_min_max,
    num_groups,
    quantize_codes,
    quantize_fp8_block_weight,
    to_fp8_e4m3,
)
from torchquant.numerics.fake_quant import (
    fake_quantize_activation_asym_backward_reference,
    fake_quantize_activation_asym_reference,
    fake_quantize_activation_backward_reference,
    fake_quantize_activation_reference,
    fake_quantize_fp8_backward_reference,
    fake_quantize_fp8_reference,
)
from torchquant.ops.fake_quant import fake_quant_int_weight
from torchquant.qat.microscaled import fake_quantize_microscaled, store_microscaled_weight


def round_ste(t: torch.Tensor) -> torch.Tensor:
    """``round(t)`` in the forward, identity in the backward."""
    return t + (torch.round(t) - t).detach()


def cast_ste(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` rounded to ``dtype`` (and back to ``t.dtype``) with an identity gradient."""
    if dtype == t.dtype:
        return t
    return t + (t.to(dtype).to(t.dtype) - t).detach()


def int_zero_points(zeros: torch.Tensor | None, bits: int) -> torch.Tensor | None:
    """Learnable float zero points -> integer-valued ones in ``[0, 2**bits)`` (STE rounding)."""
    if zeros is None:
        return None
    return torch.clamp(round_ste(zeros), 0, (1 << bits) - 1)


# -- storage kinds: every INTn / FP8 distinction QAT makes


def weight_qparam_shape(
    weight: WeightQuant, out_features: int, in_features: int
) -> tuple[int, int]:
    """``(N, G)`` INT scales and zero points; one FP8 scale per row ``(N, 1)`` or ``(1, 1)``,
    or per block ``(ceil(N / bn), ceil(K / bk))``."""
    if weight.block is not None:
        return block_grid(out_features, in_features, weight.block)
    if weight.type == "fp8":
        return (out_features if weight.group_size == -1 else 1, 1)
    return out_features, num_groups(in_features, weight.group_size)


def has_zero_points(weight: WeightQuant) -> bool:
    return weight.type == "int" and not weight.symmetric


def minmax_weight_qparams(
    w: torch.Tensor, weight: WeightQuant, scale_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Float32 scales ``(N, G)`` and float zero points (or ``None``) from the weight's range.

    The same choice round-to-nearest makes (``choose_int_qparams`` / ``choose_fp8_scale``),
    with INT scales rounded to ``scale_dtype`` (the dtype ``QuantLinear`` stores) before the
    zero points are chosen, returned as float32 tensors so they can become parameters.
    """
    w = w.detach()
    if weight.block is not None:
        return quantize_fp8_block_weight(w, weight.block)[1], None
    if weight.type == "fp8":
        return choose_fp8_weight_scale(w, weight.group_size == -1).reshape(-1, 1), None
    lo, hi = group_min_max(w, weight.group_size)
    scales, zeros = choose_int_qparams(lo, hi, weight.bits, weight.symmetric, scale_dtype)
    return scales.float(), None if zeros is None else zeros.float()


def fake_quantize_weight(
    w: torch.Tensor, weight: WeightQuant, scales: torch.Tensor, zeros: torch.Tensor | None
) -> torch.Tensor:
    """``w (N, K)`` fake-quantized as ``weight`` says, with integer-valued ``zeros`` (INT);
    for microscaled weights ``scales`` is NVFP4's global scale (``None``: from ``w``)."""
    if weight.type in MICROSCALED_BLOCKS:
        return fake_quantize_microscaled(w, weight.type, scales, weight.scale_rounding)
    if weight.block is not None:  # -- block scales broadcast to (N, K); LSQ sums them back
        return fake_quantize_fp8_weight(w, expand_blocks(scales, weight.block, *w.shape))
    if weight.type == "fp8":
        return fake_quantize_fp8_weight(w, scales)
    return fake_quant_int_weight(w, scales, zeros, weight.bits, weight.group_size)


@torch.no_grad()
def store_trained_weight(
    layer: QuantLinear,
    w: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    scale_dtype: torch.dtype,
) -> None:
    """Write into ``layer`` the weight that fake quantization of ``w`` computes.

    ``scales`` are float32 already rounded to ``scale_dtype`` and ``zeros`` integer-valued
    (what :func:`fake_quantize_weight` was given), so the codes are the forward's codes.
    """
    weight = layer.scheme.weight
    if weight.type in MICROSCALED_BLOCKS:
        store_microscaled_weight(layer, w, scales)
        return
    if weight.type == "fp8":
        full = scales if weight.block is None else expand_blocks(scales, weight.block, *w.shape)
        layer.qweight.copy_(to_fp8_e4m3(w.float() / full))
        layer.scales.copy_(scales.reshape(layer.scales.shape))
        return
    stored = scales.to(scale_dtype)
    zeros_u8 = None if zeros is None else zeros.to(torch.uint8)
    codes = quantize_codes(w, stored, zeros_u8, weight.bits, weight.group_size)
    layer.set_int_codes(codes, stored, zeros_u8)


class _FakeQuantFp8(torch.autograd.Function):
    """E4M3 weight fake quantization with STE and LSQ gradients (the numerics reference)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(w, scale)
        return fake_quantize_fp8_reference(w, scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        w, scale = ctx.saved_tensors
        return fake_quantize_fp8_backward_reference(grad, w, scale)


def fake_quantize_fp8_weight(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """FP8 E4M3 fake-quantized ``w (N, K)`` with a per-row ``(N, 1)`` or ``(1, 1)`` scale."""
    return _FakeQuantFp8.apply(w, scale)


class _FakeQuantActivation(torch.autograd.Function):
    """INT8/FP8 activation fake quantization; ``scale`` given (static) or computed (dynamic)."""

    @staticmethod
    def forward(ctx, x2, scale, act_type, per_token, percentile):
        static = scale.reshape(1, 1) if scale is not None else None
        out, used = fake_quantize_activation_reference(x2, act_type, per_token, percentile, static)
        ctx.save_for_backward(x2, used)
        ctx.act_type = act_type
        ctx.learn_scale = scale is not None and scale.requires_grad
        ctx.scale_shape = None if scale is None else scale.shape
        return out

    @staticmethod
    def backward(ctx, grad):
        x2, used = ctx.saved_tensors
        grad_x, grad_s = fake_quantize_activation_backward_reference(
            grad, x2, used, ctx.act_type, ctx.learn_scale
        )
        if grad_s is not None:
            grad_s = grad_s.reshape(ctx.scale_shape)
        return grad_x, grad_s, None, None, None


class _FakeQuantActivationAsym(torch.autograd.Function):
    """Asymmetric INT8 activation fake quantization; a static scale and (integer-valued)
    zero point given, or both computed from each input (dynamic)."""

    @staticmethod
    def forward(ctx, x2, scale, zero, per_token):
        static = (None, None) if scale is None else (scale.reshape(1, 1), zero.reshape(1, 1))
        out, used_scale, used_zero = fake_quantize_activation_asym_reference(x2, per_token, *static)
        ctx.save_for_backward(x2, used_scale, used_zero)
        ctx.learn = scale is not None and (scale.requires_grad or zero.requires_grad)
        ctx.shapes = None if scale is None else (scale.shape, zero.shape)
        return out

    @staticmethod
    def backward(ctx, grad):
        x2, scale, zero = ctx.saved_tensors
        grad_x, grad_s, grad_z = fake_quantize_activation_asym_backward_reference(
            grad, x2, scale, zero, ctx.learn
        )
        if grad_s is not None:
            grad_s, grad_z = grad_s.reshape(ctx.shapes[0]), grad_z.reshape(ctx.shapes[1])
        return grad_x, grad_s, grad_z, None


def asym_zero_point(zero: torch.Tensor) -> torch.Tensor:
    """A learnable float zero point -> the integer-valued one in [-128, 127] (STE rounding)."""
    return torch.clamp(round_ste(zero), -128, 127)


def fake_quantize_activation(
    x: torch.Tensor,
    act: ActivationQuant,
    static_scale: torch.Tensor | None = None,
    static_zero_point: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fake-quantize a layer input ``x (..., K)`` as ``act`` says (dynamic, or ``static_scale``).

    Dynamic scales are not trained (they follow each input); a static ``static_scale``
    that requires grad gets the LSQ gradient, and so does the integer-valued
    ``static_zero_point`` (float, rounded by :func:`asym_zero_point`) of asymmetric ones.
    A static NVFP4 activation's ``static_scale`` is its global scale.
    """
    if not act.dynamic and static_scale is None:
        raise QuantizationError("a static activation scheme needs a static_scale")
    if act.type in MICROSCALED_BLOCKS:
        static = None if act.dynamic else static_scale
        return fake_quantize_microscaled(x, act.type, static, act.scale_rounding)
    x2 = x.reshape(-1, x.shape[-1])
    if not act.symmetric:
        if not act.dynamic and static_zero_point is None:
            raise QuantizationError("a static asymmetric scheme needs a static_zero_point")
        scale, zero = (None, None) if act.dynamic else (static_scale, static_zero_point)
        out = _FakeQuantActivationAsym.apply(x2, scale, zero, act.granularity == "token")
        return out.reshape(x.shape)
    if act.granularity == "group":  # -- each 1 x group_size group as a row of its own
        m, k = x2.shape
        padded = torch.nn.functional.pad(x2, (0, -k % act.group_size))
        groups = padded.reshape(-1, act.group_size)
        out = _FakeQuantActivation.apply(groups, None, act.type, True, float(act.percentile))
        return out.reshape(m, -1)[:, :k].reshape(x.shape)
    scale = None if act.dynamic else static_scale
    out = _FakeQuantActivation.apply(
        x2, scale, act.type, act.granularity == "token", float(act.percentile)
    )
    return out.reshape(x.shape)
