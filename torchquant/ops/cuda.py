"""CUDA implementations of the quantized-linear ops: the Triton kernels.

Registered with ``torch.library.register_kernel(op, "cuda")``, so ``QuantLinear``
(and anything else calling the ops) runs the kernels whenever its tensors live on a
GPU, while ``torch.compile`` keeps tracing the ops through their fake
implementations.  Everything here is CUDA-graph safe: no host synchronisation and
only shape-dependent allocations.  Autotuning runs on the first call of each shape
class, so warm a model up before capturing it in a graph.

Fallbacks to the reference implementation, with a warning: FP8 on GPUs below
compute capability 8.9, and percentile activation scales (which need a sort).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from torchquant.numerics import quantize_activation
from torchquant.ops.linear import _w8a8
from torchquant.triton_kernels.act_quant import quantize_activation as quantize_activation_kernel
from torchquant.triton_kernels.dequant_matmul import dequant_matmul
from torchquant.triton_kernels.fp8_gemm import fp8_gemm, fp8_supported
from torchquant.triton_kernels.w8a8_gemm import int8_gemm


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _unflatten(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _warn_fallback(what: str, why: str) -> None:
    warnings.warn(f"{what}: {why}; using the reference PyTorch implementation", stacklevel=3)


def linear_intn_cuda(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    out = dequant_matmul(_rows(x), qweight, scales, zeros, bias, bits, group_size)
    return _unflatten(out, x)


def linear_int8_weight_cuda(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    group_size: int,
) -> torch.Tensor:
    out = dequant_matmul(_rows(x), qweight, scales, None, bias, 8, group_size)
    return _unflatten(out, x)


def linear_fp8_weight_cuda(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    if not fp8_supported(x.device):
        _warn_fallback("linear_fp8_weight", "FP8 conversions need compute capability >= 8.9")
        w = (qweight.float() * scales.float()).to(x.dtype)
        return F.linear(x, w, bias)
    out = dequant_matmul(_rows(x), qweight, scales, None, bias, 8, -1)
    return _unflatten(out, x)


def _w8a8_cuda(
    act_type: str,
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    per_token: bool,
    percentile: float,
    input_scale: torch.Tensor | None,
    smooth: torch.Tensor | None,
) -> torch.Tensor:
    if percentile < 100.0:
        _warn_fallback(f"linear_w8a8_{act_type}", "percentile activation scales need a sort")
        return _w8a8(x, qweight, scales, bias, act_type, per_token, percentile, input_scale, smooth)
    if act_type == "fp8" and not fp8_supported(x.device):
        _warn_fallback("linear_w8a8_fp8", "FP8 tensor cores need compute capability >= 8.9")
        return _w8a8(x, qweight, scales, bias, act_type, per_token, percentile, input_scale, smooth)
    # -- per-row scales in every mode: NaN in rows with NaN/Inf makes those output rows NaN
    xq, xs = quantize_activation_kernel(
        _rows(x), act_type, per_token, smooth, input_scale, row_scales=True
    )
    gemm = int8_gemm if act_type == "int8" else fp8_gemm
    out = gemm(xq, qweight, xs, scales.float(), bias, x.dtype)
    return _unflatten(out, x)


def linear_w8a8_int8_cuda(x, qweight, scales, bias, per_token, percentile, input_scale, smooth):
    return _w8a8_cuda("int8", x, qweight, scales, bias, per_token, percentile, input_scale, smooth)


def linear_w8a8_fp8_cuda(x, qweight, scales, bias, per_token, percentile, input_scale, smooth):
    return _w8a8_cuda("fp8", x, qweight, scales, bias, per_token, percentile, input_scale, smooth)


def quantize_activation_cuda(
    x: torch.Tensor,
    act_type: str,
    per_token: bool,
    percentile: float,
    smooth: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    if percentile < 100.0 or (act_type == "fp8" and not fp8_supported(x.device)):
        _warn_fallback("quantize_activation", "percentile scale or no FP8 support")
        return quantize_activation(x, act_type, per_token, percentile, None, smooth)
    return quantize_activation_kernel(x, act_type, per_token, smooth)


CUDA_KERNELS = {
    "torchquant::linear_intn": linear_intn_cuda,
    "torchquant::linear_int8_weight": linear_int8_weight_cuda,
    "torchquant::linear_fp8_weight": linear_fp8_weight_cuda,
    "torchquant::linear_w8a8_int8": linear_w8a8_int8_cuda,
    "torchquant::linear_w8a8_fp8": linear_w8a8_fp8_cuda,
    "torchquant::quantize_activation": quantize_activation_cuda,
}

for _name, _impl in CUDA_KERNELS.items():
    torch.library.register_kernel(_name, "cuda", _impl)
