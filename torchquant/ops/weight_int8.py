"""Weight-only INT8 symmetric linear: the op, its reference, CPU and CUDA paths.

``qweight (N, K)`` int8, ``scales (N, G)``: ``w = qweight * scale``, one scale per
row (``group_size == -1``) or per group of ``group_size`` input columns.

CPU, bf16 inputs, and float32 ones inside ``cpu_kernels.float32_in_bf16`` (rounded to
bf16 and the result cast back), per channel: PyTorch's ``_weight_int8pack_mm`` on the
int8 weight as stored; per group: the codes ``qweight + 128`` as two 4-bit int4pack
planes (see ``cpu_kernels``).  Above
``INT8PACK_MAX_ROWS`` rows both dequantize tiles of rows into one reused bf16 buffer and
multiply them by the bf16 GEMM.  Every path stays within
``cpu_kernels.BF16_RELATIVE_ERROR`` (``||out - ref|| / ||ref||``) of the exact
reference; other inputs run the reference.  CUDA: the Triton kernels.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from torchquant.numerics import dequantize_int_weight
from torchquant.ops import common, cpu_kernels

INT8PACK_MAX_ROWS = 48


def _dequantize_rows(qweight, scales, group_size, dtype):
    def rows_of(start: int, stop: int) -> torch.Tensor:
        codes = qweight[start:stop].to(torch.int16) + 128
        return dequantize_int_weight(codes, scales[start:stop], None, 8, group_size, dtype)

    return rows_of


def linear_int8_weight_reference(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
    group_size: int,
) -> torch.Tensor:  # fmt: skip
    """The exact maths: dequantize the whole weight in float32, then matmul in ``x.dtype``."""
    w = _dequantize_rows(qweight, scales, group_size, x.dtype)(0, qweight.shape[0])
    return F.linear(x, w, bias)


def int8_cpu_layout(
    qweight: torch.Tensor, scales: torch.Tensor, group_size: int
) -> cpu_kernels.CpuLayout:
    """int8pack layout per channel, int4pack planes per group (derived once per layer)."""
    if group_size == -1:
        return cpu_kernels.int8pack_layout(qweight, scales)
    k = qweight.shape[1]
    codes = (qweight.to(torch.int16) + 128).to(torch.uint8)
    groups = cpu_kernels.column_groups(k, group_size, None)
    return cpu_kernels.int4pack_layout(codes, scales, 128.0, groups)


def _int8_reference(x, qweight, scales, bias, group_size, *layout):
    return linear_int8_weight_reference(x, qweight, scales, bias, group_size)


def linear_int8_weight_cpu(x, qweight, scales, bias, group_size, *layout):
    if not cpu_kernels.computes_in_bf16(x.dtype):
        return linear_int8_weight_reference(x, qweight, scales, bias, group_size)
    x2, n = common.rows(x), qweight.shape[0]

    def exact(rows: torch.Tensor) -> torch.Tensor:
        return linear_int8_weight_reference(rows, qweight, scales, None, group_size)

    if x2.shape[0] > INT8PACK_MAX_ROWS:
        out = cpu_kernels.blocked_signed_linear(x2, qweight, scales, group_size)
        out = common.recompute_overflowed_rows(out, x2, exact)
    else:
        layout = cpu_kernels.CpuLayout(*layout)
        if layout.scales_zeros is None:
            layout = int8_cpu_layout(qweight, scales, group_size)
        if group_size == -1:
            out = cpu_kernels.int8pack_linear(x2, qweight, layout)
            if x2.dtype != cpu_kernels.COMPUTE_DTYPE:
                out = common.recompute_overflowed_rows(out, x2, exact)
        else:
            out = cpu_kernels.int4pack_linear(x2, layout, n, exact)
    return common.finish(out, bias, x)


def bind_int8_weight_cpu(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    group_size: int,
    layout: cpu_kernels.CpuLayout,
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The layer's eager CPU call, ``x -> linear_int8_weight_cpu(x, ...)`` with the kernel's
    operands taken once from its cached ``layout`` (None without one)."""
    if layout.scales_zeros is None:
        return None

    def exact(rows: torch.Tensor) -> torch.Tensor:
        return linear_int8_weight_reference(rows, qweight, scales, None, group_size)

    if group_size == -1:
        int8pack = cpu_kernels.int8pack_product(qweight, layout)

        def product(x2: torch.Tensor) -> torch.Tensor:
            out = int8pack(x2)
            if x2.dtype != cpu_kernels.COMPUTE_DTYPE:
                out = common.recompute_overflowed_rows(out, x2, exact)
            return out
    else:
        product = cpu_kernels.int4pack_product(layout, qweight.shape[0], exact)

    def call(x: torch.Tensor) -> torch.Tensor:
        x2 = common.rows(x)
        if x2.shape[0] > INT8PACK_MAX_ROWS or not cpu_kernels.computes_in_bf16(x.dtype):
            return linear_int8_weight_cpu(x, qweight, scales, bias, group_size, *layout)
        return common.finish(product(x2), bias, x)

    return call


def linear_int8_weight_cuda(x, qweight, scales, bias, group_size, *layout):
    """The Triton kernels (``dequant_matmul`` picks the path by the number of rows)."""
    from torchquant.triton_kernels.dequant_matmul import dequant_matmul
    from torchquant.triton_kernels.weight import QuantWeight

    weight = QuantWeight(qweight, scales, None, 8, group_size)
    return common.unflatten(dequant_matmul(common.rows(x), weight, bias), x)


linear_int8_weight = common.define_layout_op(
    "linear_int8_weight",
    "Tensor x, Tensor qweight, Tensor scales, Tensor? bias, SymInt group_size",
    _int8_reference,
    linear_int8_weight_cpu,
    linear_int8_weight_cuda,
    "Weight-only INT8 linear; ``packed*`` are the layer's cached ``CpuLayout``, if any.",
)
