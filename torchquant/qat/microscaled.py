"""Fake quantization of microscaled weights and activations (NVFP4, MXFP4, MXFP8) for training.

Block scales are not parameters: each step they follow each block's max, as
round-to-nearest chooses them, and the values round onto the E2M1 / E4M3 grid with a
straight-through gradient (blocked where a value saturates).  What trains besides the
weight is NVFP4's float32 global scale (the weight's, and a static activation's), with
the LSQ gradient of ``torchquant.numerics.fake_quant``.  The trained layer becomes a
``QuantLinear`` holding the codes this forward rounded to (:func:`store_microscaled_weight`).
"""

from __future__ import annotations

import torch

from torchquant.modules.quant_linear import QuantLinear
from torchquant.numerics.fake_quant import (
    fake_quantize_microscaled_backward_reference,
    fake_quantize_microscaled_reference,
)
from torchquant.numerics.microscaling import quantize_microscaled


class _FakeQuantMicroscaled(torch.autograd.Function):
    """``x (M, K)`` through its format's grid; ``global_scale`` (NVFP4) given or from ``x``."""

    @staticmethod
    def forward(ctx, x2, global_scale, fmt, scale_rounding):
        ctx.save_for_backward(x2, global_scale)
        ctx.fmt, ctx.scale_rounding = fmt, scale_rounding
        ctx.learn_scale = global_scale is not None and global_scale.requires_grad
        return fake_quantize_microscaled_reference(x2, fmt, global_scale, scale_rounding)

    @staticmethod
    def backward(ctx, grad):
        x2, global_scale = ctx.saved_tensors
        grad_x, grad_g = fake_quantize_microscaled_backward_reference(
            grad, x2, ctx.fmt, global_scale, ctx.learn_scale, ctx.scale_rounding
        )
        return grad_x, grad_g, None, None


def fake_quantize_microscaled(
    x: torch.Tensor,
    fmt: str,
    global_scale: torch.Tensor | None = None,
    scale_rounding: str = "ocp",
) -> torch.Tensor:
    """``x (..., K)`` fake-quantized to ``fmt`` per block along its last dimension.

    ``global_scale`` ``(1,)`` float32 is NVFP4's (``None``: computed from ``x``, as a
    dynamic activation's or a weight's whose global scale is not learned);
    ``scale_rounding`` MXFP4's E8M0 rule.
    """
    x2 = x.reshape(-1, x.shape[-1])
    return _FakeQuantMicroscaled.apply(x2, global_scale, fmt, scale_rounding).reshape(x.shape)


@torch.no_grad()
def store_microscaled_weight(
    layer: QuantLinear, w: torch.Tensor, global_scale: torch.Tensor | None
) -> None:
    """Write into ``layer`` the codes and scales :func:`fake_quantize_microscaled` rounds
    ``w (N, K)`` to with the same ``global_scale``, so its weight is the forward's bit for bit."""
    weight = layer.scheme.weight
    q = quantize_microscaled(w, weight.type, global_scale, weight.scale_rounding)
    layer.weight_format.set_values(layer, q.values, q.scales, q.global_scale)
