"""W8A8 linear (INT8 or FP8 E4M3 weights and activations): the ops, reference, CPU and CUDA.

``linear_w8a8_int4`` is the same op with INT4 activations (int8 codes in [-7, 7], the
``w8a4`` scheme): the integer paths below serve both.
``qweight (N, K)`` int8 or float8_e4m3fn, float32 ``scales (N, 1)``; activations are
quantized per token or per tensor (dynamic, optionally to a percentile of ``|x|``),
or with the static ``input_scale``, after dividing by the SmoothQuant ``smooth (K,)``.
``linear_w8a8_int8`` and ``linear_w8a8_fp8`` are one definition registered under two
names; ``quantize_activation`` is the activation half on its own.

CPU: INT8 products are summed exactly (``torch._int_mm`` in int32 where the CPU has int8
instructions; elsewhere, where it runs ~20x slower than float32, float32 GEMMs over
chunks of K short enough for their sums to be exact, see ``cpu_kernels.exact_int_sums``)
and the scales are applied in float64, as in the reference, so the result is the
reference's; bf16 inputs
(and float32 ones inside ``cpu_kernels.float32_in_bf16``, within the same tolerance)
of up to ``INT8PACK_MAX_ROWS`` rows run ``_weight_int8pack_mm`` on the codes as bf16
(exact; float32 accumulation, bf16 output, within bf16 tolerance) instead; dynamic
activations are quantized in fewer passes (same codes).  FP8 with bf16 inputs (float32
ones inside ``float32_in_bf16``: the activation codes are the same) multiplies
the (exact) bf16 values of both operands, the weight's from the layer's cached
``fp8_cpu_layout`` (converted per call without it), and scales in float32; other FP8
inputs run the reference.  Few rows with per-token dynamic scales (the decode step) take
``token_decode_linear``: one max and one rounding pass per row into bf16 codes, whose NaN
carries a non-finite row into its output (no poisoning pass), and one scaling pass that
adds the bias.  CUDA: the Triton kernels (FP8: or ``torch._scaled_mm`` where
``fp8_gemm_choice``'s measured table says it is faster; as shipped, ours everywhere).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from torchquant.numerics import poison_nonfinite_rows, quantize_activation
from torchquant.numerics.activation import ACTIVATION_RANGES, INT_ACT_DTYPES, activation_qmax
from torchquant.numerics.qparams import NATIVE_FP8_CAST_ELEMENTS, fp8_e4m3_values_, to_fp8_e4m3
from torchquant.ops import common, cpu_kernels, fp8_gemm_choice
from torchquant.ops.weight_fp8 import fp8_rows_linear
from torchquant.ops.weight_int8 import INT8PACK_MAX_ROWS


def scaled_output(x, x2, acc, xs, scales, bias, shared_scale: bool | None) -> torch.Tensor:
    """``acc * xs * scales`` (``scales`` None: the kernel applied them) as ``x``'s dtype and
    shape, plus ``bias``; rows with a non-finite input come out NaN (every row, with a
    ``shared_scale``), unless ``shared_scale`` is None: ``xs`` already holds those NaNs."""
    factors = [xs] if scales is None else [xs, scales.reshape(1, -1)]
    widens = any(torch.promote_types(acc.dtype, f.dtype) != acc.dtype for f in factors)
    # -- the op's own fresh sums are scaled in place where the dtype allows, in the same
    # -- order: no output-sized float64 allocations (each page-faults afresh on every call)
    in_place = not (acc.requires_grad or widens)
    out = acc
    for f in factors:
        out = out.mul_(f) if in_place else out * f
    out = common.add_bias_(out.to(x.dtype), bias)
    if shared_scale is not None:
        out = poison_nonfinite_rows(x2, out, shared_scale)
    return common.unflatten(out, x)


def linear_w8a8_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    act_type: str,
    per_token: bool,
    percentile: float,
    input_scale: torch.Tensor | None,
    smooth: torch.Tensor | None,
) -> torch.Tensor:
    """The exact maths: every product accumulated in float64 (which holds each int32 sum)."""
    x2 = common.rows(x)
    xq, xs = quantize_activation(x2, act_type, per_token, percentile, input_scale, smooth)
    acc = xq.to(torch.float64) @ qweight.to(torch.float64).t()
    shared_scale = not per_token and input_scale is None
    return scaled_output(x, x2, acc, xs.double(), scales.double(), bias, shared_scale)


class ActivationQuant(NamedTuple):
    """How the activations are quantized: the op's arguments after the weight and bias, in
    the order ``quantize_activation`` and ``linear_w8a8_reference`` take them."""

    act_type: str
    per_token: bool
    percentile: float
    input_scale: torch.Tensor | None
    smooth: torch.Tensor | None


def takes_dynamic_scales(act: ActivationQuant) -> bool:
    """Dynamic full-range scales without a SmoothQuant divisor (the decode step's case)."""
    return act.input_scale is None and act.percentile >= 100.0 and act.smooth is None


# -- up to this many elements one ``vector_norm`` call is the fastest max of |x| (one
# -- dispatch); past it ``abs().amax()`` is ~12x faster per element on CPU
ONE_CALL_ABS_MAX_ELEMENTS = 4096


def abs_max(xf: torch.Tensor) -> torch.Tensor:
    """``max |x|`` of each row of ``xf (M, K)`` as ``(M, 1)``; NaN where a row holds one."""
    if xf.numel() <= ONE_CALL_ABS_MAX_ELEMENTS:
        return torch.linalg.vector_norm(xf, float("inf"), dim=-1, keepdim=True)
    return xf.abs().amax(dim=-1, keepdim=True)


def quantize_dynamic(
    x2: torch.Tensor, act_type: str, per_token: bool, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_activation(x2, act_type, per_token)`` in fewer passes; INT8 codes as
    ``dtype`` when given (the values are the same).

    The codes and the scales of finite rows are the reference's bit for bit; the scale is
    NaN where the input is not finite (anywhere, per tensor), so those output rows come
    out NaN, as ``poison_nonfinite_rows`` makes them, without another pass over ``x2``.
    """
    xf = x2.float()
    absmax = abs_max(xf) if per_token else abs_max(xf.reshape(1, -1))
    scale = absmax / activation_qmax(act_type)
    scale = torch.where(scale > 0, scale, 1.0)
    if act_type in INT_ACT_DTYPES:
        lo, hi = ACTIVATION_RANGES[act_type]
        codes = (xf / scale).round_().clamp_(lo, hi).to(dtype or torch.int8)
    else:  # -- the E4M3 values in float32: PyTorch's CPU casts to float8 and back are slow
        codes = fp8_e4m3_values_(xf / scale)
    return codes, scale + (absmax - absmax)  # -- + 0 where absmax is finite, + NaN elsewhere


def quantize_token_codes(x2: torch.Tensor, act_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token dynamic codes of ``x2 (M, K)`` as bf16 values (exact: INT8/INT4 codes and
    E4M3 values all are bf16 values) with their float32 scales ``(M, 1)``, in one max and
    one rounding pass per row: the activation half of the bf16 decode routes.

    Codes and scales of finite rows are ``quantize_activation``'s bit for bit.  A row
    holding NaN/Inf gets NaN codes (``x / inf``, or the NaN itself), which every product
    carries into its output row, so no poisoning pass is needed.
    """
    xf = x2.float()
    absmax = abs_max(xf)
    scale = absmax / activation_qmax(act_type)
    scale = torch.where(scale > 0, scale, 1.0)
    if act_type in INT_ACT_DTYPES:
        lo, hi = ACTIVATION_RANGES[act_type]
        codes = (xf / scale).round_().clamp_(lo, hi)
    else:
        codes = xf / scale
        small = codes.numel() <= NATIVE_FP8_CAST_ELEMENTS  # -- a decode step: fewest calls
        codes = to_fp8_e4m3(codes) if small else fp8_e4m3_values_(codes)
    return codes.to(cpu_kernels.COMPUTE_DTYPE), scale


def runs_token_decode(x2: torch.Tensor, act: ActivationQuant) -> bool:
    """Whether the rows take the bf16 decode route: few rows of bf16 compute (float32 ones
    inside ``float32_in_bf16``) with per-token dynamic scales."""
    return (
        act.per_token
        and takes_dynamic_scales(act)
        and x2.shape[0] <= INT8PACK_MAX_ROWS
        and cpu_kernels.computes_in_bf16(x2.dtype)
    )


def token_decode_product(
    qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
    act: ActivationQuant, layout: cpu_kernels.CpuLayout | None,
) -> Callable[[torch.Tensor], torch.Tensor]:  # fmt: skip
    """``x2 (M, K) -> (M, N)`` for few rows with per-token dynamic scales (the decode step):
    the bf16 codes of :func:`quantize_token_codes` times the weight, ``_weight_int8pack_mm``
    for INT8 weights (it applies their scales) and the bf16 codes of the layer's layout for
    FP8 ones, then one scaling pass that adds the bias.  A row whose bf16 sums overflow
    where the exact maths does not is recomputed by the reference.  Everything taken from
    the layer (padded weight, its scales as one float32 row) is taken here, once."""
    act_type = act.act_type
    if act_type in INT_ACT_DTYPES:
        if layout is None or layout.scales_zeros is None:
            layout = cpu_kernels.int8pack_layout(qweight, scales)
        int8pack = cpu_kernels.int8pack_product(qweight, layout)
        weight_scales = None
    else:
        codes = layout.packed if layout is not None else None
        weight_scales = scales.reshape(1, -1).float()

    def exact(rows: torch.Tensor) -> torch.Tensor:
        return linear_w8a8_reference(rows, qweight, scales, bias, *act)

    def product(x2: torch.Tensor) -> torch.Tensor:
        xq, xs = quantize_token_codes(x2, act_type)
        if weight_scales is None:
            acc = int8pack(xq)
        else:
            acc = fp8_rows_linear(xq, qweight, codes)
            xs = xs * weight_scales
        out = acc * xs if bias is None else torch.addcmul(bias, acc, xs)
        out = out if out.dtype == x2.dtype else out.to(x2.dtype)
        return common.recompute_overflowed_rows(out, x2, exact)

    return product


def token_decode_linear(
    x: torch.Tensor, x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
    bias: torch.Tensor | None, act: ActivationQuant, layout: cpu_kernels.CpuLayout | None,
) -> torch.Tensor:  # fmt: skip
    """:func:`token_decode_product` of ``x2``, the rows of ``x``, in ``x``'s shape."""
    return common.unflatten(token_decode_product(qweight, scales, bias, act, layout)(x2), x)


def bind_w8a8_cpu(
    qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
    act: ActivationQuant, layout: cpu_kernels.CpuLayout,
) -> Callable[[torch.Tensor], torch.Tensor]:  # fmt: skip
    """The layer's eager CPU call, ``x -> linear_w8a8_cpu(x, ...)``, with the decode route's
    product bound once (:func:`token_decode_product`) where the scheme can take it."""

    def general(x: torch.Tensor) -> torch.Tensor:
        return linear_w8a8_cpu(x, qweight, scales, bias, act, layout)

    if not (act.per_token and takes_dynamic_scales(act)) or all(t is None for t in layout):
        return general  # -- no decode route, or no layout (none is derived here)
    product = token_decode_product(qweight, scales, bias, act, layout)

    def call(x: torch.Tensor) -> torch.Tensor:
        x2 = common.rows(x)
        if x2.shape[0] > INT8PACK_MAX_ROWS or not cpu_kernels.computes_in_bf16(x2.dtype):
            return general(x)
        return common.unflatten(product(x2), x)

    return call


def _runs_int8pack(x2: torch.Tensor, act: ActivationQuant) -> bool:
    """Whether INT8 W8A8 takes ``_weight_int8pack_mm`` (~4x ``_int_mm`` at one row): bf16
    inputs (whose tolerance its bf16 output keeps; float32 ones inside ``float32_in_bf16``)
    of few rows, each row with its own scale
    (so that a row whose product overflows in bf16 can be recomputed on its own)."""
    return (
        act.act_type in INT_ACT_DTYPES
        and cpu_kernels.computes_in_bf16(x2.dtype)
        and x2.shape[0] <= INT8PACK_MAX_ROWS
        and (act.per_token or act.input_scale is not None)
    )


def int_products(xq: torch.Tensor, qweight: torch.Tensor) -> torch.Tensor:
    """``xq @ qweight.T`` of integer codes, exactly, as float64 (``cpu_kernels.exact_int_sums``:
    ``torch._int_mm`` where the CPU has int8 instructions, float32 GEMMs elsewhere)."""
    return cpu_kernels.exact_int_sums(xq, qweight)


def linear_w8a8_cpu(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
    act: ActivationQuant, layout: cpu_kernels.CpuLayout | None = None,
) -> torch.Tensor:  # fmt: skip
    """The CPU implementation; ``layout`` is the layer's cached one (the weight format's:
    int8pack scales for INT8, the codes as bf16 for FP8), derived per call without it."""
    if act.act_type == "fp8" and not cpu_kernels.computes_in_bf16(x.dtype):
        return linear_w8a8_reference(x, qweight, scales, bias, *act)
    x2 = common.rows(x)
    if runs_token_decode(x2, act):
        return token_decode_linear(x, x2, qweight, scales, bias, act, layout)
    int8pack = _runs_int8pack(x2, act)
    if int8pack:
        codes_dtype = cpu_kernels.COMPUTE_DTYPE
    else:  # -- the codes as the integer products read them
        codes_dtype = torch.int8 if cpu_kernels.native_int8_gemm() else torch.float32
    if takes_dynamic_scales(act):
        xq, xs = quantize_dynamic(x2, act.act_type, act.per_token, codes_dtype)
        shared_scale = None  # -- the scales carry the NaN rows
    else:
        xq, xs = quantize_activation(x2, *act)
        shared_scale = not act.per_token and act.input_scale is None
    if int8pack:
        # -- the codes are exact in bf16; the kernel applies the weight scales (as bf16), and
        # -- its bf16 sums can overflow where the scaled result would not
        if layout is None or layout.scales_zeros is None:
            layout = cpu_kernels.int8pack_layout(qweight, scales)
        acc = cpu_kernels.int8pack_linear(xq, qweight, layout)  # bf16, times float32 xs
        out = scaled_output(x2, x2, acc, xs, None, bias, shared_scale)

        def exact(rows: torch.Tensor) -> torch.Tensor:
            return linear_w8a8_reference(rows, qweight, scales, bias, *act)

        out = common.recompute_overflowed_rows(out, x2, exact)
        return common.unflatten(out, x)
    if act.act_type in INT_ACT_DTYPES:
        acc = int_products(xq, qweight)
        return scaled_output(x, x2, acc, xs.double(), scales.double(), bias, shared_scale)
    codes = layout.packed if layout is not None else None
    acc = fp8_rows_linear(xq, qweight, codes)  # bf16 or float32, times float32 scales
    return scaled_output(x, x2, acc, xs, scales.float(), bias, shared_scale)


def linear_w8a8_cuda(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
    act: ActivationQuant,
) -> torch.Tensor:  # fmt: skip
    from torchquant.triton_kernels.act_quant import quantize_activation_rows
    from torchquant.triton_kernels.fp8_gemm import fp8_gemm, fp8_supported
    from torchquant.triton_kernels.w8a8_gemm import int8_gemm

    act_type = act.act_type
    if act.percentile < 100.0:
        common.warn_fallback(f"linear_w8a8_{act_type}", "percentile activation scales need a sort")
        return linear_w8a8_reference(x, qweight, scales, bias, *act)
    if act_type == "fp8" and not fp8_supported(x.device):
        common.warn_fallback("linear_w8a8_fp8", "FP8 tensor cores need compute capability >= 8.9")
        return linear_w8a8_reference(x, qweight, scales, bias, *act)
    # -- per-row scales in every mode: NaN in rows with NaN/Inf makes those output rows NaN
    xq, xs = quantize_activation_rows(
        common.rows(x), act_type, act.per_token, act.smooth, act.input_scale, row_scales=True
    )
    (m, k), n = xq.shape, qweight.shape[0]
    if act_type == "fp8" and fp8_gemm_choice.prefers_scaled_mm(x.device, m, n, k, x.dtype):
        out = fp8_gemm_choice.scaled_mm_linear(xq, xs, qweight, scales, bias, x.dtype)
        return common.unflatten(out, x)
    gemm = fp8_gemm if act_type == "fp8" else int8_gemm
    return common.unflatten(gemm(xq, qweight, xs, scales.float(), bias, x.dtype), x)


def _with_act_type(impl, act_type: str):
    """``impl`` as the op ``linear_w8a8_{act_type}`` takes its arguments (no ``act_type``)."""

    def bound(x, qweight, scales, bias, per_token, percentile, input_scale, smooth):
        act = ActivationQuant(act_type, per_token, percentile, input_scale, smooth)
        return impl(x, qweight, scales, bias, act)

    return bound


def _reference(x, qweight, scales, bias, act: ActivationQuant) -> torch.Tensor:
    return linear_w8a8_reference(x, qweight, scales, bias, *act)


def _define_w8a8_op(act_type: str):
    """``torchquant::linear_w8a8_{act_type}`` with its CPU, CUDA and fake implementations."""
    name = f"torchquant::linear_w8a8_{act_type}"
    schema = (
        "(Tensor x, Tensor qweight, Tensor scales, Tensor? bias, bool per_token, "
        "float percentile, Tensor? input_scale, Tensor? smooth) -> Tensor"
    )
    reference = _with_act_type(_reference, act_type)
    op = torch.library.custom_op(name, reference, mutates_args=(), schema=schema)
    weights = "FP8" if act_type == "fp8" else "INT8"
    op.__doc__ = f"{weights} weights x {act_type.upper()} activations, scaled epilogue."
    common.register_cpu(op, _with_act_type(linear_w8a8_cpu, act_type))
    op.register_fake(common.fake_linear)
    on_cuda = _with_act_type(linear_w8a8_cuda, act_type)
    on_cuda.__name__ = f"linear_w8a8_{act_type}_cuda"  # its name in ops.cuda
    common.register_cuda(name, on_cuda)
    return op, on_cuda


linear_w8a8_int8, linear_w8a8_int8_cuda = _define_w8a8_op("int8")
linear_w8a8_fp8, linear_w8a8_fp8_cuda = _define_w8a8_op("fp8")
linear_w8a8_int4, linear_w8a8_int4_cuda = _define_w8a8_op("int4")


@torch.library.custom_op("torchquant::quantize_activation", mutates_args=())
def quantize_activation_op(
    x: torch.Tensor, act_type: str, per_token: bool, percentile: float, smooth: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic activation quantization of ``x: (rows, K)``: ``(q, scale (rows|1, 1))``."""
    return quantize_activation(x, act_type, per_token, percentile, None, smooth)


@quantize_activation_op.register_fake
def _(x, act_type, per_token, percentile, smooth):
    qdtype = torch.int8 if act_type in INT_ACT_DTYPES else torch.float8_e4m3fn
    n = x.shape[0] if per_token else 1
    return x.new_empty(x.shape, dtype=qdtype), x.new_empty((n, 1), dtype=torch.float32)


def quantize_activation_cuda(
    x: torch.Tensor, act_type: str, per_token: bool, percentile: float, smooth: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    from torchquant.triton_kernels.act_quant import quantize_activation_rows
    from torchquant.triton_kernels.fp8_gemm import fp8_supported

    if percentile < 100.0 or (act_type == "fp8" and not fp8_supported(x.device)):
        common.warn_fallback("quantize_activation", "percentile scale or no FP8 support")
        return quantize_activation(x, act_type, per_token, percentile, None, smooth)
    return quantize_activation_rows(x, act_type, per_token, smooth)


common.register_cuda("torchquant::quantize_activation", quantize_activation_cuda)
