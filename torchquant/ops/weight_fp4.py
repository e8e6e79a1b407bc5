"""Weight-only FP4 E2M1 linear (NVFP4, MXFP4): the op, its reference, CPU and CUDA paths.

``qweight (N, ceil(K/2))`` uint8, two E2M1 codes a byte (see ``numerics.fp4``);
``scales (N, ceil(K/block))``: float8_e4m3fn with a float32 ``global_scale (1,)``
(NVFP4, block 16), or uint8 E8M0 exponents with ``global_scale`` ``None`` (MXFP4,
block 32); ``w = e2m1 * multiplier`` of the value's block.

CPU, bf16 inputs: PyTorch has no kernel reading FP4 weights, so blocks of weight rows
are dequantized to bf16 (the reference's own values) and multiplied; the full float
weight never exists.  Other input dtypes run the reference.  CUDA: the Triton kernels,
the path picked by M (``triton_kernels.block_scaled_dispatch``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from torchquant.numerics.fp4 import dequantize_fp4_weight, unpack_e2m1
from torchquant.ops import common, cpu_kernels


def dequantize_fp4_rows(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    global_scale: torch.Tensor | None,
    block: int,
    k: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Rows ``(n, k)`` in ``dtype`` of packed codes ``(n, ceil(k/2))`` (the numerics' values)."""
    return dequantize_fp4_weight(unpack_e2m1(qweight, k), scales, global_scale, block, dtype)


def linear_fp4_weight_reference(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
    global_scale: torch.Tensor | None, bias: torch.Tensor | None, block: int,
) -> torch.Tensor:  # fmt: skip
    """The exact maths: the weight dequantized in float32 as ``x.dtype``, then matmul."""
    k = x.shape[-1]
    w = dequantize_fp4_rows(qweight, scales, global_scale, block, k, x.dtype)
    return F.linear(x, w, bias)


linear_fp4_weight = torch.library.custom_op(
    "torchquant::linear_fp4_weight", linear_fp4_weight_reference, mutates_args=()
)
linear_fp4_weight.__doc__ = "Weight-only FP4 E2M1 linear with block scales (NVFP4 or MXFP4)."


def linear_fp4_weight_cpu(x, qweight, scales, global_scale, bias, block):
    if not cpu_kernels.uses_bf16_kernels(x):
        return linear_fp4_weight_reference(x, qweight, scales, global_scale, bias, block)
    x2, k = common.rows(x), x.shape[-1]

    def dequantize(start: int, stop: int) -> torch.Tensor:
        s = scales[start:stop]
        return dequantize_fp4_rows(qweight[start:stop], s, global_scale, block, k, x.dtype)

    out = cpu_kernels.blocked_linear(x2, qweight.shape[0], dequantize)
    return common.finish(out, bias, x)


common.register_cpu(linear_fp4_weight, linear_fp4_weight_cpu)
linear_fp4_weight.register_fake(common.fake_linear)


def linear_fp4_weight_cuda(x, qweight, scales, global_scale, bias, block):
    from torchquant.triton_kernels.block_scaled_dispatch import block_scaled_matmul
    from torchquant.triton_kernels.block_scaled_weight import BlockScaledWeight

    weight = BlockScaledWeight(qweight, scales, global_scale, block)
    return common.unflatten(block_scaled_matmul(common.rows(x), weight, bias), x)


common.register_cuda("torchquant::linear_fp4_weight", linear_fp4_weight_cuda)
