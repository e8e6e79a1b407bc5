"""W4A8 linear (INT4 grouped weights x INT8 or FP8 E4M3 activations): the ops, reference, CPU, CUDA.

``qweight (N, ceil(K/32)*4)`` int32, the packed unsigned 4-bit codes of the packed-INT
weight format (symmetric: the weight is ``code - 8``), ``scales (N, G)`` one per group of
``group_size`` input columns (-1: one per row; a shorter last group when it does not
divide ``K``).  The input is quantized as W8A8 quantizes it (per token or per tensor,
dynamic or static, after the SmoothQuant divisor), and

    y[m, n] = s_x[m] * sum_g s_w[n, g] * sum_{k in g} q_x[m, k] q_w[n, k]

each inner sum exact (integers for INT8; E4M3 values times codes, exact in float64), the
group sums scaled and added in float64 in group order.  ``linear_w4a8_int8`` and
``linear_w4a8_fp8`` are one definition registered under two names.

CPU: the layer's cached layout holds the signed codes as int8 ``(N, K)``
(:func:`w4a8_cpu_layout`, derived per call without it).  INT8: each group's products run
exact integer sums (``w8a8.int_products``), so the result is the reference's bit for bit.
Inputs of bf16 tolerance past ``BLOCK_DIAGONAL_MAX_ROWS`` rows instead run one GEMM on
weight tiles dequantized to ``code * s_w`` (:func:`dequantized_product`) where the CPU has
no int8 instructions, and for FP8 activations everywhere.  Few rows
run one call on a block-diagonal input; more run tile by tile along N, each tile's group
sums scaled into its float64 accumulator while both are still in cache (one pass over
``G`` full ``(M, N)`` planes per group cost more than the products).  FP8: the same
tiles, each group's products a float32 matmul of the E4M3 values and codes (float32
accumulation, within float32 tolerance of the reference).  CUDA: the Triton kernel.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch

from torchquant.numerics import num_groups, quantize_activation, unpack_codes
from torchquant.ops import common, cpu_kernels
from torchquant.ops.w8a8 import (
    ActivationQuant,
    int_products,
    quantize_dynamic,
    scaled_output,
    takes_dynamic_scales,
)

W4A8_BITS = 4
CODE_ZERO = 1 << (W4A8_BITS - 1)  # -- the implied zero point of symmetric 4-bit codes


def signed_codes(qweight: torch.Tensor, in_features: int) -> torch.Tensor:
    """The weight's codes ``(N, K)`` int8 in ``[-8, 7]`` (symmetric: ``code - 8``)."""
    return (unpack_codes(qweight, W4A8_BITS, in_features).to(torch.int8) - CODE_ZERO).to(torch.int8)


def w4a8_cpu_layout(qweight: torch.Tensor, in_features: int) -> cpu_kernels.CpuLayout:
    """The signed codes as int8 ``(N, K)`` (1 byte a weight, derived once per layer on CPU;
    N-major: ``_int_mm`` on its transposed view measured faster than on a K-major copy)."""
    return cpu_kernels.CpuLayout(packed=signed_codes(qweight, in_features))


# -- up to this many (rows x groups), INT8 runs one torch._int_mm on a block-diagonal input
# -- (each row repeated per group, zero outside it): G times the multiply-adds, but one
# -- call over the whole weight instead of G small ones, which cost more at decode sizes
BLOCK_DIAGONAL_MAX_ROWS = 64
# -- tiles along N hold about this many outputs (a power of two columns, at least
# -- MIN_TILE_COLUMNS): a tile's int32 sums and float64 accumulator (12 bytes an output)
# -- stay in a core's L2 between the group steps; 4096x4096 at M=16: 1.0x -> 2.3x fp32
TILE_OUTPUTS = 32768
MIN_TILE_COLUMNS = 128


def group_bounds(k: int, group_size: int) -> list[slice]:
    """The input columns of each group (the last one shorter when ``group_size`` does not
    divide ``k``; ``-1``: one group)."""
    size = k if group_size == -1 else group_size
    return [slice(g * size, min((g + 1) * size, k)) for g in range(num_groups(k, group_size))]


def scaled_group_sums(groups: Iterable[torch.Tensor], scales: torch.Tensor) -> torch.Tensor:
    """``sum_g s_w[:, g] * groups[g]`` in float64, group by group in order.

    ``groups`` are each group's exact product sums ``(M, N)``; every implementation adds
    them in this one order, so those with exact products agree bit for bit.
    """
    out = None
    for g, sums in enumerate(groups):
        term = sums.double() * scales[:, g].double()
        out = term if out is None else out.add_(term)
    return out


def _float64_groups(xq, wq, group_size) -> Iterator[torch.Tensor]:
    for cols in group_bounds(xq.shape[1], group_size):
        yield xq[:, cols].double() @ wq[:, cols].double().t()


def tile_columns(m: int, n: int) -> int:
    """Output columns per tile for ``m`` rows: about ``TILE_OUTPUTS`` outputs."""
    columns = 1 << max(0, (TILE_OUTPUTS // max(m, 1)).bit_length() - 1)
    return min(n, max(MIN_TILE_COLUMNS, columns))


def _int8_products(x_group: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """A group's exact int32 sums ``x_group @ codes`` (``codes``: its ``(rows, columns)``)."""
    return int_products(x_group, codes.t())


def _float32_products(x_group: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """A group's float32 sums of E4M3 values (``x_group`` already float32) times codes."""
    return x_group @ codes.float()


def tiled_scaled_sums(
    x_groups: list[torch.Tensor], codes_t: torch.Tensor, scales: torch.Tensor,
    bounds: list[slice], products: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:  # fmt: skip
    """:func:`scaled_group_sums` of ``products`` one N tile at a time, float64 ``(M, N)``.

    ``x_groups[g]`` is group ``g``'s columns of the activations, ``codes_t (K, N)``; each
    term is ``sums * s_w`` added in group order (``addcmul_``: the product is exact in
    float64, so fused or not it is the reference's term), the same sum bit for bit.
    """
    m, n = x_groups[0].shape[0], codes_t.shape[1]
    scales_t = scales.double().t()
    out = torch.empty(m, n, dtype=torch.float64)
    step = tile_columns(m, n)
    for start in range(0, n, step):
        cols = slice(start, min(start + step, n))
        acc = out[:, cols]
        for g, rows in enumerate(bounds):
            sums = products(x_groups[g], codes_t[rows, cols])
            if g == 0:
                torch.mul(sums, scales_t[0, cols], out=acc)
            else:
                acc.addcmul_(sums, scales_t[g, cols])
    return out


def _block_diagonal_sums(xq, codes_t, scales, bounds) -> torch.Tensor:
    """INT8 for few rows: every group's sums from one ``_int_mm`` on a block-diagonal input."""
    m, groups = xq.shape[0], len(bounds)
    diagonal = xq.new_zeros(m, groups, xq.shape[1])
    for g, cols in enumerate(bounds):
        diagonal[:, g, cols] = xq[:, cols]
    sums = int_products(diagonal.reshape(m * groups, -1), codes_t.t()).reshape(m, groups, -1)
    return scaled_group_sums(sums.unbind(1), scales)


def cpu_group_sums(xq: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                   group_size: int) -> torch.Tensor:  # fmt: skip
    """``sum_g s_w[:, g] * sum_{k in g} q_x q_w`` float64 ``(M, N)`` on CPU (``codes (N, K)``):
    INT8 (and INT4) codes exact, E4M3 values in float32."""
    codes_t = codes.t()
    bounds = group_bounds(xq.shape[1], group_size)
    if xq.dtype != torch.int8:
        x_groups = [xq[:, cols].float() for cols in bounds]
        return tiled_scaled_sums(x_groups, codes_t, scales, bounds, _float32_products)
    if 1 < len(bounds) and xq.shape[0] * len(bounds) <= BLOCK_DIAGONAL_MAX_ROWS:
        return _block_diagonal_sums(xq, codes_t, scales, bounds)
    x_groups = [xq[:, cols].contiguous() for cols in bounds]
    return tiled_scaled_sums(x_groups, codes_t, scales, bounds, _int8_products)


def linear_w4a8_reference(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
    group_size: int, act_type: str, per_token: bool, percentile: float,
    input_scale: torch.Tensor | None, smooth: torch.Tensor | None,
) -> torch.Tensor:  # fmt: skip
    """The exact maths: each group's products summed in float64 (exact), then scaled."""
    x2 = common.rows(x)
    xq, xs = quantize_activation(x2, act_type, per_token, percentile, input_scale, smooth)
    wq = signed_codes(qweight, x2.shape[1])
    acc = scaled_group_sums(_float64_groups(xq, wq, group_size), scales)
    shared_scale = not per_token and input_scale is None
    return scaled_output(x, x2, acc, xs.double(), None, bias, shared_scale)


def linear_w4a8_cpu(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
    group_size: int, act: ActivationQuant, layout: cpu_kernels.CpuLayout | None = None,
) -> torch.Tensor:  # fmt: skip
    """The CPU implementation; ``layout`` is the layer's cached one (:func:`w4a8_cpu_layout`)."""
    x2 = common.rows(x)
    if takes_dynamic_scales(act):
        xq, xs = quantize_dynamic(x2, act.act_type, act.per_token)
        shared_scale = None  # -- the scales carry the NaN rows
    else:
        xq, xs = quantize_activation(x2, *act)
        shared_scale = not act.per_token and act.input_scale is None
    if layout is None or layout.packed is None:
        layout = w4a8_cpu_layout(qweight, x2.shape[1])
    if runs_dequantized(x2, act.act_type):
        acc = dequantized_product(xq, layout.packed, scales, group_size)
        return scaled_output(x, x2, acc, xs, None, bias, shared_scale)
    acc = cpu_group_sums(xq, layout.packed, scales, group_size)
    return scaled_output(x, x2, acc, xs.double(), None, bias, shared_scale)


def runs_dequantized(x2: torch.Tensor, act_type: str) -> bool:
    """Whether many rows take :func:`dequantized_product`: inputs of bf16 tolerance (bf16,
    float32 inside ``cpu_kernels.float32_in_bf16``) past ``BLOCK_DIAGONAL_MAX_ROWS``, FP8
    activations, a CPU without int8 instructions (whose group-by-group sums ran 0.02-0.3x
    the float32 GEMM at 256-1024 rows on AVX2) or one with a native bf16 GEMM (one bf16 GEMM
    ran 1.3-1.6x faster than VNNI group sums at 256-1024 rows, AVX-512 BF16)."""
    return (
        x2.shape[0] > BLOCK_DIAGONAL_MAX_ROWS
        and cpu_kernels.computes_in_bf16(x2.dtype)
        and (
            act_type == "fp8"
            or not cpu_kernels.native_int8_gemm()
            or cpu_kernels.native_bf16_gemm()
        )
    )


def dequantized_product(
    xq: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, group_size: int
) -> torch.Tensor:
    """``sum_g s_w[:, g] * sum_{k in g} q_x q_w`` ``(M, N)`` as one GEMM of the activation
    codes by weight tiles dequantized to ``code * s_w`` (``cpu_kernels.blocked_signed_linear``):
    each weight rounded once to the GEMM's dtype and the sums accumulated in float32, far
    inside bf16 tolerance, at the speed of the float GEMM instead of ``G`` short ones."""
    return cpu_kernels.blocked_signed_linear(xq, codes, scales, group_size)


def linear_w4a8_cuda(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
    group_size: int, act: ActivationQuant, layout: cpu_kernels.CpuLayout | None = None,
) -> torch.Tensor:  # fmt: skip
    """The Triton kernel on activations quantized per row (NaN scales for non-finite rows)."""
    from torchquant.triton_kernels.act_quant import quantize_activation_rows
    from torchquant.triton_kernels.fp8_gemm import fp8_supported
    from torchquant.triton_kernels.w4a8_gemm import w4a8_gemm

    name = f"linear_w4a8_{act.act_type}"
    if act.percentile < 100.0:
        common.warn_fallback(name, "percentile activation scales need a sort")
        return linear_w4a8_reference(x, qweight, scales, bias, group_size, *act)
    if group_size == 16:
        common.warn_fallback(name, "groups of 16 are shorter than one 8-bit MMA step (32)")
        return linear_w4a8_reference(x, qweight, scales, bias, group_size, *act)
    if act.act_type == "fp8" and not fp8_supported(x.device):
        common.warn_fallback(name, "FP8 tensor cores need compute capability >= 8.9")
        return linear_w4a8_reference(x, qweight, scales, bias, group_size, *act)
    x2 = common.rows(x)
    xq, xs = quantize_activation_rows(
        x2, act.act_type, act.per_token, act.smooth, act.input_scale, row_scales=True
    )
    out = w4a8_gemm(xq, xs, qweight, scales, group_size, bias, x.dtype)
    return common.unflatten(out, x)


def _reference(x, qweight, scales, bias, group_size, act: ActivationQuant, layout):
    return linear_w4a8_reference(x, qweight, scales, bias, group_size, *act)


def _with_act_type(impl, act_type: str):
    """``impl(x, qweight, scales, bias, group_size, act, layout)`` as the op
    ``linear_w4a8_{act_type}`` takes its arguments (no ``act_type``; the layout last)."""

    def bound(x, qweight, scales, bias, group_size, per_token, percentile, input_scale, smooth,
              *layout):  # fmt: skip
        act = ActivationQuant(act_type, per_token, percentile, input_scale, smooth)
        return impl(x, qweight, scales, bias, group_size, act, cpu_kernels.CpuLayout(*layout))

    return bound


_W4A8_ARGUMENTS = (
    "Tensor x, Tensor qweight, Tensor scales, Tensor? bias, SymInt group_size, "
    "bool per_token, float percentile, Tensor? input_scale, Tensor? smooth"
)


def _define_w4a8_op(act_type: str):
    """``torchquant::linear_w4a8_{act_type}`` with its CPU, CUDA and fake implementations."""
    on_cuda = _with_act_type(linear_w4a8_cuda, act_type)
    on_cuda.__name__ = f"linear_w4a8_{act_type}_cuda"  # its name in ops.cuda
    op = common.define_layout_op(
        f"linear_w4a8_{act_type}",
        _W4A8_ARGUMENTS,
        _with_act_type(_reference, act_type),
        _with_act_type(linear_w4a8_cpu, act_type),
        on_cuda,
        f"INT4 grouped weights x {act_type.upper()} activations; ``packed`` is the layer's "
        "cached int8 codes, if any.",
    )
    return op, on_cuda


linear_w4a8_int8, linear_w4a8_int8_cuda = _define_w4a8_op("int8")
linear_w4a8_fp8, linear_w4a8_fp8_cuda = _define_w4a8_op("fp8")
# -- w4a4: INT4 activations are int8 codes in [-7, 7], multiplied as INT8 ones are
linear_w4a8_int4, linear_w4a8_int4_cuda = _define_w4a8_op("int4")
