"""The W8A8 op of a layer that also quantizes its input (INT8 or FP8 activations).

The weight is stored by its format (:mod:`~torchquant.weights.int8`,
:mod:`~torchquant.weights.fp8` or :mod:`~torchquant.weights.fp8_block`); the activation
type picks the op, and per-group activations (which only block-wise weights take) the
block op.  The op applies the SmoothQuant divisor and the static input scale itself.
"""

from __future__ import annotations

from torch import Tensor

from torchquant import ops
from torchquant.config import QuantScheme

# -- activation type -> the fast W8A8 op (the reference takes the type as an argument)
W8A8_OPS = {"int8": ops.linear_w8a8_int8, "fp8": ops.linear_w8a8_fp8}


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
    act = scheme.activation
    if act.granularity == "group":
        args = (qweight, scales, bias, *scheme.weight.block)
        if reference:
            return ops.linear_fp8_block_reference(x, *args)
        return ops.run(ops.linear_fp8_block, x, *args)
    per_token = act.granularity == "token"
    percentile = float(act.percentile)
    if reference:
        return ops.linear_w8a8_reference(
            x, qweight, scales, bias, act.type, per_token, percentile, input_scale, smooth_scale
        )
    op = W8A8_OPS[act.type]
    return ops.run(op, x, qweight, scales, bias, per_token, percentile, input_scale, smooth_scale)
