"""The W8A8 op of a layer that also quantizes its input (INT8 or FP8 activations).

The weight is stored by its format (:mod:`~torchquant.weights.int8`,
:mod:`~torchquant.weights.fp8`, :mod:`~torchquant.weights.fp8_block`, or
:mod:`~torchquant.weights.packed_int` for W4A8's INT4 codes); the activation
type picks the op, and per-group activations (which only block-wise weights take) the
block op.  The op applies the SmoothQuant divisor and the static input scale itself.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from torchquant import ops
from torchquant.config import QuantScheme
from torchquant.ops.cpu_kernels import CpuLayout

# -- activation type -> the fast W8A8 op (the reference takes the type as an argument)
W8A8_OPS = {"int8": ops.linear_w8a8_int8, "fp8": ops.linear_w8a8_fp8}
W4A8_OPS = {"int8": ops.linear_w4a8_int8, "fp8": ops.linear_w4a8_fp8}


def linear_w8a8(
    x: Tensor,
    scheme: QuantScheme,
    qweight: Tensor,
    scales: Tensor,
    bias: Tensor | None,
    input_scale: Tensor | None,
    smooth_scale: Tensor | None,
    reference: bool,
) -> Tensor:
    """``quantize(x) W^T + bias`` for a scheme with ``scheme.activation`` set."""
    if not reference:
        return bind_w8a8(scheme, qweight, scales, bias, input_scale, smooth_scale)(x)
    act = scheme.activation
    if act.granularity == "group":
        return ops.linear_fp8_block_reference(x, qweight, scales, bias, *scheme.weight.block)
    per_token, percentile = act.granularity == "token", float(act.percentile)
    if scheme.is_w4a8:
        return ops.linear_w4a8_reference(
            x, qweight, scales, bias, scheme.weight.group_size,
            act.type, per_token, percentile, input_scale, smooth_scale,
        )  # fmt: skip
    return ops.linear_w8a8_reference(
        x, qweight, scales, bias, act.type, per_token, percentile, input_scale, smooth_scale
    )


def bind_w8a8(
    scheme: QuantScheme, qweight: Tensor, scales: Tensor, bias: Tensor | None,
    input_scale: Tensor | None, smooth_scale: Tensor | None, layout: CpuLayout | None = None,
) -> Callable[[Tensor], Tensor]:  # fmt: skip
    """The fast W8A8 op with every argument but ``x`` bound; the layer's cached CPU
    ``layout`` (its weight format's) serves the CPU product."""
    act = scheme.activation
    if act.granularity == "group":
        return ops.bind(ops.linear_fp8_block, qweight, scales, bias, *scheme.weight.block)
    per_token, percentile = act.granularity == "token", float(act.percentile)
    quant = ops.ActivationQuant(act.type, per_token, percentile, input_scale, smooth_scale)
    if scheme.is_w4a8:
        args = (qweight, scales, bias, scheme.weight.group_size, *quant[1:], *(layout or ()))
        return ops.bind(W4A8_OPS[act.type], *args)
    on_cpu = None
    if layout is not None:

        def on_cpu(x: Tensor) -> Tensor:
            return ops.linear_w8a8_cpu(x, qweight, scales, bias, quant, layout)

    args = (qweight, scales, bias, *quant[1:])
    return ops.bind(W8A8_OPS[act.type], *args, on_cpu=on_cpu)
