"""Weight-only FP8 E4M3 linear: the op, its reference, CPU and CUDA paths.

``qweight (N, K)`` float8_e4m3fn, float32 ``scales (N, 1)`` per channel or ``(1, 1)``
per tensor: ``w = qweight * scale``.

CPU, bf16 inputs: PyTorch has no CPU kernel reading FP8 weights, so blocks of weight
rows are converted (exactly) to bf16 and multiplied, the scale applied to the output;
the full float weight never exists.  Other input dtypes run the reference.  CUDA: the
Triton kernels (the reference below compute capability 8.9).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from torchquant.numerics import dequantize_fp8_weight
from torchquant.ops import common, cpu_kernels


def linear_fp8_weight_reference(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """The exact maths: ``qweight * scale`` in float32 as ``x.dtype``, then matmul."""
    return F.linear(x, dequantize_fp8_weight(qweight, scales, x.dtype), bias)


def fp8_rows_linear(
    x2: torch.Tensor, qweight: torch.Tensor, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``x2 @ qweight.T`` converting FP8 rows a block at a time; float32 ``(M, N)``.

    Multiplies in ``dtype``: by default float32 for float32 ``x2`` and bf16 (which
    holds every E4M3 value) for anything else.
    """
    if dtype is None:
        dtype = torch.float32 if x2.dtype == torch.float32 else cpu_kernels.COMPUTE_DTYPE
    x2 = x2.to(dtype)
    out = cpu_kernels.blocked_linear(x2, qweight.shape[0], lambda i, j: qweight[i:j].to(dtype))
    return out.float()


linear_fp8_weight = torch.library.custom_op(
    "torchquant::linear_fp8_weight", linear_fp8_weight_reference, mutates_args=()
)
linear_fp8_weight.__doc__ = "Weight-only FP8 E4M3 linear (per-channel or per-tensor float32 scale)."


def linear_fp8_weight_cpu(x, qweight, scales, bias):
    if not cpu_kernels.uses_bf16_kernels(x):
        return linear_fp8_weight_reference(x, qweight, scales, bias)
    out = fp8_rows_linear(common.rows(x), qweight) * scales.float().reshape(1, -1)
    return common.unflatten(common.add_bias(out.to(x.dtype), bias), x)


common.register_cpu(linear_fp8_weight, linear_fp8_weight_cpu)
linear_fp8_weight.register_fake(common.fake_linear)


def linear_fp8_weight_cuda(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    from torchquant.triton_kernels.dequant_matmul import dequant_matmul
    from torchquant.triton_kernels.fp8_gemm import fp8_supported
    from torchquant.triton_kernels.weight import QuantWeight

    if not fp8_supported(x.device):
        common.warn_fallback("linear_fp8_weight", "FP8 conversions need compute capability >= 8.9")
        return linear_fp8_weight_reference(x, qweight, scales, bias)
    weight = QuantWeight(qweight, scales, None, 8, -1)
    return common.unflatten(dequant_matmul(common.rows(x), weight, bias), x)


common.register_cuda("torchquant::linear_fp8_weight", linear_fp8_weight_cuda)
