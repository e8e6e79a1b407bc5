"""FP8 block-wise linear (DeepSeek-V3's recipe): the ops, their references, CPU and CUDA paths.

``qweight (N, K)`` float8_e4m3fn, float32 ``scales (ceil(N / block_n), ceil(K / block_k))``,
one per weight block: ``w = qweight * scale``.  ``linear_fp8_block_weight`` multiplies
by that weight (weight-only); ``linear_fp8_block`` also quantizes each token's input
to FP8 with one scale per ``1 x block_k`` group, so every product of the matmul pairs
one activation group with one weight block.

CPU, bf16 and float32 inputs: blocks of weight rows are dequantized and multiplied,
never the whole float weight at once (weight-only in the input's dtype, as the reference
rounds the weight; W8A8 in float32, which keeps the products of the two scales and
differs from the float64 reference only by float32 accumulation).  float16 inputs run
the reference.  CUDA: the W8A8 op runs the Triton block GEMM (the reference below compute
capability 8.9); the weight-only op runs its reference there (no kernel of its own yet).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from torchquant.numerics import (
    dequantize_fp8_block_weight,
    expand_blocks,
    poison_nonfinite_rows,
    quantize_activation_groups,
)
from torchquant.numerics.qparams import FP8_E4M3_MAX, e4m3_to_float, fp8_e4m3_values_
from torchquant.ops import common, cpu_kernels


def linear_fp8_block_weight_reference(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
    block_n: int, block_k: int,
) -> torch.Tensor:  # fmt: skip
    """The exact maths: ``qweight * scale`` in float32 as ``x.dtype``, then matmul."""
    w = dequantize_fp8_block_weight(qweight, scales, (block_n, block_k), x.dtype)
    return F.linear(x, w, bias)


def linear_fp8_block_reference(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
    block_n: int, block_k: int,
) -> torch.Tensor:  # fmt: skip
    """The exact maths: both operands times their scales in float64 (exact), then matmul."""
    x2 = common.rows(x)
    xq, xs = quantize_activation_groups(x2, block_k)
    (m, k), n = x2.shape, qweight.shape[0]
    xd = xq.double() * expand_blocks(xs.double(), (1, block_k), m, k)
    wd = qweight.double() * expand_blocks(scales.double(), (block_n, block_k), n, k)
    out = common.add_bias((xd @ wd.t()).to(x.dtype), bias)
    return common.unflatten(poison_nonfinite_rows(x2, out, shared_scale=False), x)


def dequantize_block_rows(
    qweight: torch.Tensor, scales: torch.Tensor, block_n: int, block_k: int,
    dtype: torch.dtype, start: int, stop: int,
) -> torch.Tensor:  # fmt: skip
    """Rows ``start:stop`` of the float weight, as the reference computes them (each value
    times its block's scale in float32, rounded once to ``dtype``), the scales broadcast
    per block of columns instead of widened to one per weight."""
    row_scales = scales.float()[torch.arange(start, stop) // block_n]
    values = e4m3_to_float(qweight[start:stop])
    values = cpu_kernels.dequantize_groups(values, values, row_scales, 0.0, block_k)
    return values if dtype == torch.float32 else values.to(dtype)


def _blocked_product(
    x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, block_n: int, block_k: int
) -> torch.Tensor:
    def weight_rows(start: int, stop: int) -> torch.Tensor:
        return dequantize_block_rows(qweight, scales, block_n, block_k, x2.dtype, start, stop)

    return cpu_kernels.blocked_linear(x2, qweight.shape[0], weight_rows)


linear_fp8_block_weight = torch.library.custom_op(
    "torchquant::linear_fp8_block_weight", linear_fp8_block_weight_reference, mutates_args=()
)
linear_fp8_block_weight.__doc__ = "Weight-only FP8 E4M3 linear, one float32 scale per weight block."


def _blocked_dtype(x: torch.Tensor) -> bool:
    """Whether the blocked CPU path serves ``x``: bf16, and float32 (its matmul is float32)."""
    return cpu_kernels.uses_bf16_kernels(x) or x.dtype == torch.float32


def linear_fp8_block_weight_cpu(x, qweight, scales, bias, block_n, block_k):
    if not _blocked_dtype(x):
        return linear_fp8_block_weight_reference(x, qweight, scales, bias, block_n, block_k)
    x2 = common.rows(x)
    if cpu_kernels.computes_in_bf16(x.dtype):  # -- within bf16 tolerance: a native bf16 GEMM
        x2 = x2.to(cpu_kernels.gemm_dtype())
    out = _blocked_product(x2, qweight, scales, block_n, block_k)
    return common.finish(out, bias, x)


linear_fp8_block = torch.library.custom_op(
    "torchquant::linear_fp8_block", linear_fp8_block_reference, mutates_args=()
)
linear_fp8_block.__doc__ = "FP8 block weights x FP8 activations, one scale per 1 x block_k group."


def linear_fp8_block_cpu(x, qweight, scales, bias, block_n, block_k):
    if not _blocked_dtype(x):
        return linear_fp8_block_reference(x, qweight, scales, bias, block_n, block_k)
    x2 = common.rows(x)
    xd = fake_quantized_groups(x2, block_k)
    if cpu_kernels.computes_in_bf16(x.dtype):  # -- within bf16 tolerance: a native bf16 GEMM
        xd = xd.to(cpu_kernels.gemm_dtype())
    out = common.add_bias(_blocked_product(xd, qweight, scales, block_n, block_k).to(x.dtype), bias)
    return common.unflatten(out, x)  # -- NaN scales made a non-finite input's row NaN


@torch.no_grad()  # -- a rounding inside an op: nothing to differentiate
def fake_quantized_groups(x2: torch.Tensor, block_k: int) -> torch.Tensor:
    """The FP8 activations of ``quantize_activation_groups(x2, block_k)`` times their
    scales, ``(M, K)`` float32: bit for bit in rows that are finite.  Each group's scale
    broadcasts over its columns (no scale per column, no float8 tensor: both cost more
    than the GEMM at these sizes on CPU), and is NaN where the group holds NaN/Inf, so
    that input row's products, and its output row, come out NaN without a poisoning pass.
    """
    xf = x2.float()
    m, k = xf.shape
    span = k // block_k * block_k
    pieces = [(0, span, block_k), (span, k, k - span)]
    out = torch.empty_like(xf)
    scales = []
    for start, stop, width in pieces:
        if stop == start:
            continue
        group = xf[:, start:stop].view(m, -1, width)
        absmax = torch.maximum(group.amax(dim=-1, keepdim=True), -group.amin(dim=-1, keepdim=True))
        scale = absmax / FP8_E4M3_MAX
        scale = torch.where(scale > 0, scale, 1.0) + (absmax - absmax)  # -- + NaN: not finite
        torch.div(group, scale, out=out[:, start:stop].view(m, -1, width))
        scales.append((start, stop, width, scale))
    fp8_e4m3_values_(out)
    for start, stop, width, scale in scales:
        out[:, start:stop].view(m, -1, width).mul_(scale)
    return out


for _op, _cpu in (
    (linear_fp8_block_weight, linear_fp8_block_weight_cpu),
    (linear_fp8_block, linear_fp8_block_cpu),
):
    common.register_cpu(_op, _cpu)
    _op.register_fake(common.fake_linear)


def linear_fp8_block_cuda(x, qweight, scales, bias, block_n, block_k):
    from torchquant.triton_kernels.fp8_block_gemm import fp8_block_gemm, quantize_activation_groups
    from torchquant.triton_kernels.fp8_gemm import fp8_supported

    if not fp8_supported(x.device) or block_k % 64 != 0:
        why = "the kernel needs sm_89+ and block_k a multiple of 64"
        common.warn_fallback("linear_fp8_block", why)
        return linear_fp8_block_reference(x, qweight, scales, bias, block_n, block_k)
    xq, xs = quantize_activation_groups(common.rows(x), block_k)
    out = fp8_block_gemm(xq, xs, qweight, scales, block_n, block_k, bias, x.dtype)
    return common.unflatten(out, x)


common.register_cuda("torchquant::linear_fp8_block", linear_fp8_block_cuda)
