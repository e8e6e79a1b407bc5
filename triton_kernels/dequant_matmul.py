"""Weight-only quantized linear: pick the GEMV, split-K, tiled or dequantize+cuBLAS path by M.

``dequant_matmul(x, weight, bias)`` computes ``x @ W^T + bias`` for ``x (M, K)``
fp32/bf16/fp16 and ``W (N, K)``, a :class:`.QuantWeight` in any format of :mod:`.weight`
(packed INT2..8 with per-group or per-channel scales, asymmetric or symmetric; INT8 or
FP8 E4M3 byte storage), returning ``(M, N)`` in ``x.dtype``.  The thresholds below are
where each path is expected to win on an H100 (weight streaming decides small M,
tensor-core throughput large M); they are plain constants so a benchmark run can move them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dequant import dequantize_weight
from .dequant_gemm import dequant_gemm
from .dequant_gemv import dequant_gemv
from .weight import QuantWeight

GEMV_MAX_M = 1  # M up to this: CUDA-core GEMV, split over K
SPLIT_K_MAX_M = 64  # M up to this: 16-row tensor-core tiles, split over K
CUBLAS_MIN_M = 1024  # M from this: dequantize once to x.dtype, then cuBLAS


def select_path(m: int) -> str:
    """Name of the path used for ``m`` rows: gemv, split_k, tiled or cublas."""
    if m <= GEMV_MAX_M:
        return "gemv"
    if m <= SPLIT_K_MAX_M:
        return "split_k"
    if m < CUBLAS_MIN_M:
        return "tiled"
    return "cublas"


def dequant_matmul(x: torch.Tensor, weight: QuantWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """Quantized-weight linear on the GPU (see the module docstring for formats and paths)."""
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (M, K), got {tuple(x.shape)}")
    path = select_path(x.shape[0])
    if path == "gemv":
        return dequant_gemv(x, weight, bias)
    if path in ("split_k", "tiled"):
        return dequant_gemm(x, weight, bias, split_k=path == "split_k")
    w = dequantize_weight(weight, x.shape[1], x.dtype)
    return F.linear(x, w, bias)
