"""The W8A8 op of a layer that also quantizes its input (INT8 or FP8 activations).

The weight is stored by its format (:mod:`~torchquant.weights.int8`,
:mod:`~torchquant.weights.fp8`, :mod:`~torchquant.weights.fp8_block`, or
:mod:`~torchquant.weights.packed_int` for W4A8's INT4 codes); the activation
type picks the op, and per-group activations (which only block-wise weights take) the
block op.  The op applies the SmoothQuant divisor and the static input scale itself.
Asymmetric INT8 activations take the zero-point op, with the static ``input_zero_point``
and the column sums of the weight codes (``weight_sums``, derived once per layer).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from torchquant import ops
from torchquant.config import QuantScheme
from torchquant.ops.cpu_kernels import CpuLayout

# -- activation type -> the fast W8A8 op (the reference takes the type as an argument)
W8A8_OPS = {
    "int8": ops.linear_w8a8_int8,
    "fp8": ops.linear_w8a8_fp8,
    "int4": ops.linear_w8a8_int4,
}
W4A8_OPS = {
    "int8": ops.linear_w4a8_int8,
    "fp8": ops.linear_w4a8_fp8,
    "int4": ops.linear_w4a8_int4,
}


def linear_w8a8(
    x: Tensor,
    scheme: QuantScheme,
    qweight: Tensor,
    scales: Tensor,
    bias: Tensor | None,
    input_scale: Tensor | None,
    smooth_scale: Tensor | None,
    reference: bool,
    input_zero_point: Tensor | None = None,
) -> Tensor:
    """``quantize(x) W^T + bias`` for a scheme with ``scheme.activation`` set."""
    if not reference:
        args = (scheme, qweight, scales, bias, input_scale, smooth_scale)
        return bind_w8a8(*args, input_zero_point=input_zero_point)(x)
    act = scheme.activation
    if not act.symmetric:
        per_token = act.granularity == "token"
        args = (per_token, input_scale, input_zero_point, smooth_scale)
        return ops.linear_w8a8_asym_reference(x, qweight, scales, bias, *args)
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
    input_zero_point: Tensor | None = None, weight_sums: Tensor | None = None,
) -> Callable[[Tensor], Tensor]:  # fmt: skip
    """The fast W8A8 op with every argument but ``x`` bound; the layer's cached CPU
    ``layout`` (its weight format's) serves the CPU product, its cached ``weight_sums``
    the zero-point correction of asymmetric activations."""
    act = scheme.activation
    if not act.symmetric:
        per_token = act.granularity == "token"
        args = (per_token, input_scale, input_zero_point, smooth_scale, weight_sums)
        return ops.bind(ops.linear_w8a8_int8_asym, qweight, scales, bias, *args)
    if act.granularity == "group":
        return ops.bind(ops.linear_fp8_block, qweight, scales, bias, *scheme.weight.block)
    per_token, percentile = act.granularity == "token", float(act.percentile)
    quant = ops.ActivationQuant(act.type, per_token, percentile, input_scale, smooth_scale)
    if scheme.is_w4a8:
        args = (qweight, scales, bias, scheme.weight.group_size, *quant[1:], *(layout or ()))
        return ops.bind(W4A8_OPS[act.type], *args)
    on_cpu = None
    if layout is not None:
        on_cpu = ops.bind_w8a8_cpu(qweight, scales, bias, quant, layout)
    args = (qweight, scales, bias, *quant[1:])
    return ops.bind(W8A8_OPS[act.type], *args, on_cpu=on_cpu)
