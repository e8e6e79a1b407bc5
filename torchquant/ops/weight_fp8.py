"""Weight-only FP8 E4M3 linear: the op, its reference, CPU and CUDA paths.

``qweight (N, K)`` float8_e4m3fn, float32 ``scales (N, 1)`` per channel or ``(1, 1)``
per tensor: ``w = qweight * scale``.

CPU, bf16 inputs, and float32 ones inside ``cpu_kernels.float32_in_bf16`` (rounded to
bf16 and the result cast back), within ``cpu_kernels.BF16_RELATIVE_ERROR`` of the exact
reference:
PyTorch has no CPU kernel reading FP8 weights, and converting the
codes costs ~60x the product, so a layer keeps its codes as bf16 (exact: every E4M3
value is a bf16 value; :func:`fp8_cpu_layout`, 2 bytes a weight beside the 1 of
``qweight``) and each call is one bf16 product with the scale applied to the output.
Called without that layout (through the dispatcher, under ``torch.compile``) the op
converts blocks of rows per call; the full float weight never exists.  A row whose
product overflows before the (tiny) scale is applied is recomputed by the reference.
Other inputs run the reference.  CUDA: the Triton kernels (the reference below
compute capability 8.9).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from torchquant.numerics import dequantize_fp8_weight
from torchquant.numerics.qparams import e4m3_to_float
from torchquant.ops import common, cpu_kernels


def linear_fp8_weight_reference(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """The exact maths: ``qweight * scale`` in float32 as ``x.dtype``, then matmul."""
    return F.linear(x, dequantize_fp8_weight(qweight, scales, x.dtype), bias)


def fp8_cpu_layout(qweight: torch.Tensor) -> cpu_kernels.CpuLayout:
    """``packed``: the E4M3 codes as bf16 ``(N, K)``, exactly their values."""
    return cpu_kernels.CpuLayout(e4m3_to_float(qweight).to(cpu_kernels.COMPUTE_DTYPE))


def fp8_rows_linear(
    x2: torch.Tensor, qweight: torch.Tensor, codes: torch.Tensor | None = None
) -> torch.Tensor:
    """``x2 @ qweight.T`` in bf16 or float32 (both hold every E4M3 value), ``(M, N)``.

    ``codes`` is ``qweight`` as bf16 (a :func:`fp8_cpu_layout`); without it blocks of rows
    are converted per call.  One row is a matrix-vector product where the CPU has no native
    bf16 GEMM (twice as fast as ``F.linear`` in bf16 there), else ``F.linear`` (2-2.3x
    ``torch.mv`` with AVX-512 BF16).  More rows multiply in ``cpu_kernels.gemm_dtype``:
    where the CPU has no native bf16 GEMM, tiles of rows widened to float32 (one cheap
    pass over the weight, against a bf16 GEMM ~4x slower than float32's).
    """
    if codes is not None and x2.shape[0] == 1:
        if cpu_kernels.native_bf16_gemm():
            return F.linear(x2.to(codes.dtype), codes)
        return torch.mv(codes, x2[0].to(codes.dtype)).unsqueeze(0)
    dtype = cpu_kernels.gemm_dtype()
    x2 = x2.to(dtype)
    if codes is not None and dtype == codes.dtype:
        return x2 @ codes.t()

    def rows_of(start: int, stop: int) -> torch.Tensor:
        if codes is None:
            return e4m3_to_float(qweight[start:stop]).to(dtype)
        return codes[start:stop].to(dtype)

    return cpu_kernels.blocked_linear(x2, qweight.shape[0], rows_of)


linear_fp8_weight = torch.library.custom_op(
    "torchquant::linear_fp8_weight", linear_fp8_weight_reference, mutates_args=()
)
linear_fp8_weight.__doc__ = "Weight-only FP8 E4M3 linear (per-channel or per-tensor float32 scale)."


def linear_fp8_weight_cpu(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
    codes: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """The CPU implementation; ``codes`` is the layer's cached :func:`fp8_cpu_layout`."""
    if not cpu_kernels.computes_in_bf16(x.dtype):
        return linear_fp8_weight_reference(x, qweight, scales, bias)
    x2 = common.rows(x)
    out = fp8_rows_linear(x2, qweight, codes).float() * scales.reshape(1, -1)
    out = common.finish(out, bias, x2)

    def exact(rows: torch.Tensor) -> torch.Tensor:
        return linear_fp8_weight_reference(rows, qweight, scales, bias)

    return common.unflatten(common.recompute_overflowed_rows(out, x2, exact), x)


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
