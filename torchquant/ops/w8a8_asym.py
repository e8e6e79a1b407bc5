"""W8A8 with asymmetric INT8 activations: integer zero points, corrected in integer arithmetic.

``qweight (N, K)`` int8 symmetric per-channel codes, float32 ``scales (N, 1)``; the
activations are int8 codes ``q`` with a zero point ``z`` (``x ~= (q - z) * s_x``,
see ``numerics.quantize_activation_asymmetric``): per token or per tensor from each
input's min and max, or the static ``input_scale`` / ``input_zero_point`` pair.  Then

    y = s_x * s_w * (sum_k q_x q_w - z * sum_k q_w)

the first sum on the INT8 kernels, the second from ``weight_sums (N,)`` int32, the
column sums of the weight codes, which a layer derives once (``weight_code_sums``) and
passes in; ``None`` derives them per call.  Nothing is dequantized.

CPU: the exact integer products of INT8 W8A8 (``w8a8.int_products``, as float64) and the
correction in float64, which holds every integer term exactly, scales in float64: the
reference's result bit for bit.  CUDA: the INT8 Triton GEMM with the correction in its epilogue.
"""

from __future__ import annotations

import torch

from torchquant.numerics import poison_nonfinite_rows, quantize_activation_asymmetric
from torchquant.ops import common
from torchquant.ops.w8a8 import int_products, scaled_output


def weight_code_sums(qweight: torch.Tensor) -> torch.Tensor:
    """``sum_k qweight[n, k]`` ``(N,)`` int32: the zero-point correction's weight term."""
    return qweight.sum(dim=1, dtype=torch.int32)


def _corrected(acc: torch.Tensor, zero: torch.Tensor, weight_sums: torch.Tensor) -> torch.Tensor:
    """``acc - z * weight_sums`` as float64 (``acc (M, N)`` integer or exact float64,
    ``z (M|1, 1)``): every term is an integer the dtype holds, so the result is exact."""
    return (acc - zero.to(acc.dtype) * weight_sums.to(acc.dtype).reshape(1, -1)).double()


def linear_w8a8_asym_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    per_token: bool,
    input_scale: torch.Tensor | None,
    input_zero_point: torch.Tensor | None,
    smooth: torch.Tensor | None,
    weight_sums: torch.Tensor | None = None,
) -> torch.Tensor:
    """The exact maths in float64 (which holds every integer sum); ``weight_sums`` is
    derived from ``qweight`` here whatever is passed, so the oracle trusts no cache."""
    x2 = common.rows(x)
    xq, xs, xz = quantize_activation_asymmetric(
        x2, per_token, input_scale, input_zero_point, smooth
    )
    acc = xq.double() @ qweight.double().t()
    acc = _corrected(acc, xz, weight_code_sums(qweight))
    shared_scale = not per_token and input_scale is None
    return scaled_output(x, x2, acc, xs.double(), scales.double(), bias, shared_scale)


def linear_w8a8_asym_cpu(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
    per_token: bool, input_scale: torch.Tensor | None, input_zero_point: torch.Tensor | None,
    smooth: torch.Tensor | None, weight_sums: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """``torch._int_mm`` products, the zero-point correction in integers, float64 scales."""
    x2 = common.rows(x)
    xq, xs, xz = quantize_activation_asymmetric(
        x2, per_token, input_scale, input_zero_point, smooth
    )
    sums = weight_code_sums(qweight) if weight_sums is None else weight_sums
    acc = int_products(xq, qweight)  # -- exact float64: holds the correction's terms too
    acc = _corrected(acc, xz, sums)
    shared_scale = not per_token and input_scale is None
    return scaled_output(x, x2, acc, xs.double(), scales.double(), bias, shared_scale)


def linear_w8a8_asym_cuda(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
    per_token: bool, input_scale: torch.Tensor | None, input_zero_point: torch.Tensor | None,
    smooth: torch.Tensor | None, weight_sums: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """The activations quantized by the reference (one min/max pass), the GEMM and its
    zero-point epilogue in Triton; rows with NaN/Inf come out NaN."""
    from torchquant.triton_kernels.w8a8_gemm import int8_gemm_asym

    x2 = common.rows(x)
    xq, xs, xz = quantize_activation_asymmetric(
        x2, per_token, input_scale, input_zero_point, smooth
    )
    sums = weight_code_sums(qweight) if weight_sums is None else weight_sums
    out = int8_gemm_asym(xq, qweight, xs, xz, scales.float(), sums, bias, x.dtype)
    shared_scale = not per_token and input_scale is None
    return common.unflatten(poison_nonfinite_rows(x2, out, shared_scale), x)


linear_w8a8_int8_asym = torch.library.custom_op(
    "torchquant::linear_w8a8_int8_asym",
    linear_w8a8_asym_reference,
    mutates_args=(),
    schema=(
        "(Tensor x, Tensor qweight, Tensor scales, Tensor? bias, bool per_token, "
        "Tensor? input_scale, Tensor? input_zero_point, Tensor? smooth, "
        "Tensor? weight_sums=None) -> Tensor"
    ),
)
linear_w8a8_int8_asym.__doc__ = "INT8 weights x asymmetric INT8 activations, zero-point epilogue."
common.register_cpu(linear_w8a8_int8_asym, linear_w8a8_asym_cpu)
linear_w8a8_int8_asym.register_fake(common.fake_linear)
common.register_cuda("torchquant::linear_w8a8_int8_asym", linear_w8a8_asym_cuda)
