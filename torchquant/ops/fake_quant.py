"""Custom op for INTn weight fake-quantization with a straight-through / LSQ backward.

``torchquant::fake_quant_int_weight(w, scales, zeros, bits, group_size) -> w_q`` and its
backward op are registered with ``torch.library``: the implementation here is the
reference (``torchquant.numerics.fake_quant``), and the fused Triton kernels are the
CUDA implementation.  ``register_autograd`` ties them together and
``register_fake`` lets ``torch.compile`` trace both, so a compiled QAT model keeps one
fused op per layer.  Shapes and formulas: see the kernel module.
"""

from __future__ import annotations

import torch

from torchquant.numerics.fake_quant import (
    fake_quantize_int_backward_reference,
    fake_quantize_int_reference,
)
from torchquant.ops.common import register_cuda


@torch.library.custom_op("torchquant::fake_quant_int_weight", mutates_args=())
def fake_quant_int_weight(
    w: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    """Fake-quantized weight ``(N, K)``: quantize to INTn codes and dequantize again."""
    return fake_quantize_int_reference(w, scales, zeros, bits, group_size)


@torch.library.custom_op("torchquant::fake_quant_int_weight_backward", mutates_args=())
def fake_quant_int_weight_backward(
    grad: torch.Tensor,
    w: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad_w, grad_scales, grad_zeros)``; ``grad_zeros`` is all-zero for symmetric."""
    gw, gs, gz = fake_quantize_int_backward_reference(grad, w, scales, zeros, bits, group_size)
    return gw, gs, gz if gz is not None else torch.zeros_like(scales)


@fake_quant_int_weight.register_fake
def _(w, scales, zeros, bits, group_size):
    return torch.empty_like(w)


@fake_quant_int_weight_backward.register_fake
def _(grad, w, scales, zeros, bits, group_size):
    return torch.empty_like(w), torch.empty_like(scales), torch.empty_like(scales)


def _setup_context(ctx, inputs, output) -> None:
    w, scales, zeros, bits, group_size = inputs
    ctx.save_for_backward(w, scales, zeros)
    ctx.bits, ctx.group_size = bits, group_size
    ctx.has_zeros = zeros is not None


def _backward(ctx, grad):
    w, scales, zeros = ctx.saved_tensors
    gw, gs, gz = fake_quant_int_weight_backward(grad, w, scales, zeros, ctx.bits, ctx.group_size)
    if ctx.has_zeros:
        gz = gz.to(zeros.dtype)
    return gw, gs, gz if ctx.has_zeros else None, None, None


fake_quant_int_weight.register_autograd(_backward, setup_context=_setup_context)


def fake_quant_int_weight_cuda(
    w: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    from torchquant.triton_kernels.fake_quant import fake_quant_int_forward

    return fake_quant_int_forward(w, scales, zeros, bits, group_size)


def fake_quant_int_weight_backward_cuda(
    grad: torch.Tensor,
    w: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from torchquant.triton_kernels.fake_quant import fake_quant_int_backward

    gw, gs, gz = fake_quant_int_backward(grad, w, scales, zeros, bits, group_size)
    return gw, gs, gz if gz is not None else torch.zeros_like(scales)


register_cuda("torchquant::fake_quant_int_weight", fake_quant_int_weight_cuda)
register_cuda("torchquant::fake_quant_int_weight_backward", fake_quant_int_weight_backward_cuda)
