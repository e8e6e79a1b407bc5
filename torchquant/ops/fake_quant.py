"""Custom op for INTn weight fake-quantization with a straight-through / LSQ backward.

``torchquant::fake_quant_int_weight(w, scales, zeros, bits, group_size) -> w_q`` and its
backward op are registered with ``torch.library``: their default implementation is the
reference itself (``torchquant.numerics.fake_quant``), and the fused Triton kernels are
the CUDA implementation.  ``register_autograd`` ties them together and
``register_fake`` lets ``torch.compile`` trace both, so a compiled QAT model keeps one
fused op per layer.  Shapes and formulas: see the reference module.
"""

from __future__ import annotations

import torch
from torch import Tensor

from torchquant.numerics.fake_quant import (
    fake_quantize_int_backward_reference,
    fake_quantize_int_reference,
)
from torchquant.ops.common import register_cuda

fake_quant_int_weight = torch.library.custom_op(
    "torchquant::fake_quant_int_weight", fake_quantize_int_reference, mutates_args=()
)


def _zeros_placeholder(grad_zeros: Tensor | None, scales: Tensor) -> Tensor:
    """An op returns tensors only: symmetric schemes get an all-zero ``grad_zeros``."""
    return grad_zeros if grad_zeros is not None else torch.zeros_like(scales)


@torch.library.custom_op("torchquant::fake_quant_int_weight_backward", mutates_args=())
def fake_quant_int_weight_backward(
    grad: Tensor, w: Tensor, scales: Tensor, zeros: Tensor | None, bits: int, group_size: int
) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_w, grad_scales, grad_zeros)``; ``grad_zeros`` is all-zero for symmetric."""
    gw, gs, gz = fake_quantize_int_backward_reference(grad, w, scales, zeros, bits, group_size)
    return gw, gs, _zeros_placeholder(gz, scales)


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
    w: Tensor, scales: Tensor, zeros: Tensor | None, bits: int, group_size: int
) -> Tensor:
    from torchquant.triton_kernels.fake_quant import fake_quant_int_forward

    return fake_quant_int_forward(w, scales, zeros, bits, group_size)


def fake_quant_int_weight_backward_cuda(
    grad: Tensor, w: Tensor, scales: Tensor, zeros: Tensor | None, bits: int, group_size: int
) -> tuple[Tensor, Tensor, Tensor]:
    from torchquant.triton_kernels.fake_quant import fake_quant_int_backward

    gw, gs, gz = fake_quant_int_backward(grad, w, scales, zeros, bits, group_size)
    return gw, gs, _zeros_placeholder(gz, scales)


register_cuda("torchquant::fake_quant_int_weight", fake_quant_int_weight_cuda)
register_cuda("torchquant::fake_quant_int_weight_backward", fake_quant_int_weight_backward_cuda)
