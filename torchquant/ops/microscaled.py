"""Microscaled linears (NVFP4, MXFP4, MXFP8 weights and activations): ops, references, CPU, CUDA.

``linear_microscaled`` quantizes each input row to ``fmt`` per block along K (see
``numerics.microscaling``) and multiplies by a weight stored in the same format:
``qweight (N, ceil(K/2))`` packed E2M1 codes with ``scales`` float8_e4m3fn and a float32
``global_scale (1,)`` (NVFP4) or uint8 E8M0 ``scales`` (MXFP4), or ``qweight (N, K)``
float8_e4m3fn with uint8 E8M0 ``scales`` (MXFP8).  ``input_global_scale (1,)`` is NVFP4's
calibrated activation global scale (``None``: computed from each input);
``scale_rounding`` how MXFP4 activations round their block maxima to E8M0 powers of two
(``"ocp"``, the spec's, or ``"compressed-tensors"``; see ``numerics.fp4``).
``linear_mxfp8_weight`` is the weight-only MXFP8 linear.

The reference (the oracle): both operands dequantized in float32 (exact: a code times a
power of two, or E2M1 times E4M3 / global, as the numerics define it), multiplied in
float64, rounded once to ``x.dtype``.  CPU: the same dequantized values multiplied in
float32 a block of weight rows at a time (the full float weight never exists), which
differs from the reference only by float32 accumulation.  CUDA: the Triton kernels
(activation quantization in one pass, to its scaled values in bf16, then a GEMM
dequantizing only the weight in registers, or codes and ``tl.dot_scaled`` on Blackwell for
the MX formats); the weight-only MXFP8 op runs the block-scaled weight-only kernels
(``triton_kernels.block_scaled_dispatch``: GEMV, split-K, tiled or dequantize + cuBLAS).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from torchquant.numerics.activation import poison_nonfinite_rows
from torchquant.numerics.fp4 import choose_nvfp4_global_scale, dequantize_fp4_weight, unpack_e2m1
from torchquant.numerics.microscaling import (
    MICROSCALED_BLOCKS,
    MXFP8_BLOCK,
    dequantize_microscaled,
    dequantize_mxfp8,
    quantize_microscaled,
)
from torchquant.ops import common, cpu_kernels


def dequantize_microscaled_rows(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    global_scale: torch.Tensor | None,
    fmt: str,
    k: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Weight rows ``(n, k)`` in ``dtype`` (computed in float32, as the numerics define them)."""
    if fmt == "mxfp8":
        return dequantize_mxfp8(qweight, scales, dtype)
    codes = unpack_e2m1(qweight, k)
    return dequantize_fp4_weight(codes, scales, global_scale, MICROSCALED_BLOCKS[fmt], dtype)


def shares_input_scale(fmt: str, input_global_scale: torch.Tensor | None) -> bool:
    """Whether every row's quantization depends on the whole input (NVFP4's dynamic global
    scale), so a non-finite value anywhere makes every output row NaN."""
    return fmt == "nvfp4" and input_global_scale is None


def _finish_rows(
    out: torch.Tensor, x2: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, shared: bool
) -> torch.Tensor:
    out = common.add_bias(out.to(x.dtype), bias)
    return common.unflatten(poison_nonfinite_rows(x2, out, shared_scale=shared), x)


def linear_microscaled_reference(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
    global_scale: torch.Tensor | None, bias: torch.Tensor | None,
    input_global_scale: torch.Tensor | None, fmt: str, scale_rounding: str = "ocp",
) -> torch.Tensor:  # fmt: skip
    """The exact maths: both operands dequantized (float32, exact), matmul in float64."""
    x2, k = common.rows(x), x.shape[-1]
    xq = quantize_microscaled(x2, fmt, input_global_scale, scale_rounding)
    xd = dequantize_microscaled(xq).double()
    w = dequantize_microscaled_rows(qweight, scales, global_scale, fmt, k, torch.float64)
    return _finish_rows(xd @ w.t(), x2, x, bias, shares_input_scale(fmt, input_global_scale))


linear_microscaled = torch.library.custom_op(
    "torchquant::linear_microscaled", linear_microscaled_reference, mutates_args=()
)
linear_microscaled.__doc__ = "Microscaled weights x activations quantized per block (NVFP4/MX)."


def linear_microscaled_cpu(
    x, qweight, scales, global_scale, bias, input_global_scale, fmt, scale_rounding="ocp"
):
    x2, k = common.rows(x), x.shape[-1]
    xd = dequantize_microscaled(quantize_microscaled(x2, fmt, input_global_scale, scale_rounding))

    def weight_rows(start: int, stop: int) -> torch.Tensor:
        s, q = scales[start:stop], qweight[start:stop]
        return dequantize_microscaled_rows(q, s, global_scale, fmt, k, torch.float32)

    out = cpu_kernels.blocked_linear(xd, qweight.shape[0], weight_rows)
    return _finish_rows(out, x2, x, bias, shares_input_scale(fmt, input_global_scale))


def linear_mxfp8_weight_reference(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """The exact maths: ``e4m3 * 2 ** e`` in float32 as ``x.dtype``, then matmul."""
    return F.linear(x, dequantize_mxfp8(qweight, scales, x.dtype), bias)


linear_mxfp8_weight = torch.library.custom_op(
    "torchquant::linear_mxfp8_weight", linear_mxfp8_weight_reference, mutates_args=()
)
linear_mxfp8_weight.__doc__ = "Weight-only MXFP8 linear (E4M3 values, E8M0 scales per 32)."


def linear_mxfp8_weight_cpu(x, qweight, scales, bias):
    if not (cpu_kernels.uses_bf16_kernels(x) or x.dtype == torch.float32):
        return linear_mxfp8_weight_reference(x, qweight, scales, bias)

    def weight_rows(start: int, stop: int) -> torch.Tensor:
        return dequantize_mxfp8(qweight[start:stop], scales[start:stop], x.dtype)

    out = cpu_kernels.blocked_linear(common.rows(x), qweight.shape[0], weight_rows)
    return common.finish(out, bias, x)


for _op, _cpu in (
    (linear_microscaled, linear_microscaled_cpu),
    (linear_mxfp8_weight, linear_mxfp8_weight_cpu),
):
    common.register_cpu(_op, _cpu)
    _op.register_fake(common.fake_linear)


def linear_microscaled_cuda(
    x, qweight, scales, global_scale, bias, input_global_scale, fmt, scale_rounding="ocp"
):
    from torchquant.triton_kernels.microscaled_gemm import microscaled_gemm, uses_dot_scaled
    from torchquant.triton_kernels.microscaled_quant import (
        quantize_microscaled as quantize_rows,
    )
    from torchquant.triton_kernels.microscaled_quant import quantize_to_scaled_values

    x2, k = common.rows(x), x.shape[-1]
    x_global = input_global_scale
    if fmt == "nvfp4" and x_global is None:  # -- dynamic: per tensor, finite values only
        x_global = choose_nvfp4_global_scale(torch.nan_to_num(x2, 0.0, 0.0, 0.0))
    args = (qweight, scales, global_scale, fmt, k, bias, x.dtype)
    shared = shares_input_scale(fmt, input_global_scale)
    if uses_dot_scaled(fmt, x.device):  # -- the MX MMA takes the codes
        values, block_scales = quantize_rows(x2, fmt, x_global, scale_rounding)
        out = microscaled_gemm(values, block_scales, x_global, *args)
        return common.unflatten(poison_nonfinite_rows(x2, out, shared_scale=shared), x)
    # -- the activation dequantized once; its non-finite values come as NaN, making their
    # -- rows NaN in the GEMM (a shared dynamic global scale still poisons every row here)
    scaled = quantize_to_scaled_values(x2, fmt, x_global, scale_rounding)
    out = microscaled_gemm(scaled, None, x_global, *args)
    if shared:
        out = poison_nonfinite_rows(x2, out, shared_scale=True)
    return common.unflatten(out, x)


common.register_cuda("torchquant::linear_microscaled", linear_microscaled_cuda)


def linear_mxfp8_weight_cuda(x, qweight, scales, bias):
    from torchquant.triton_kernels.block_scaled_dispatch import block_scaled_matmul
    from torchquant.triton_kernels.block_scaled_weight import BlockScaledWeight

    weight = BlockScaledWeight(qweight, scales, None, MXFP8_BLOCK)
    return common.unflatten(block_scaled_matmul(common.rows(x), weight, bias), x)


common.register_cuda("torchquant::linear_mxfp8_weight", linear_mxfp8_weight_cuda)
