"""Weight-only linear of block-scaled float weights (NVFP4, MXFP4, MXFP8): the path by M.

``block_scaled_matmul(x, weight, bias)`` computes ``x @ W^T + bias`` for ``x (M, K)``
fp32/bf16/fp16 and a :class:`.BlockScaledWeight`, returning ``(M, N)`` in ``x.dtype``: the
CUDA-core GEMV at M = 1 (where K allows it), the split-K GEMM up to ``SPLIT_K_MAX_M``,
the tiled GEMM below ``CUBLAS_MIN_M``, and from there the weight dequantized once to
``x.dtype`` then cuBLAS -- the thresholds of the integer weights (``dequant_matmul``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .block_scaled_gemv import block_scaled_gemv, gemv_eligible
from .block_scaled_weight import BlockScaledWeight
from .dequant_matmul import CUBLAS_MIN_M, GEMV_MAX_M, SPLIT_K_MAX_M
from .fp4_gemm import dequantize_block_scaled, fp4_gemm


def block_scaled_matmul(
    x: torch.Tensor, weight: BlockScaledWeight, bias: torch.Tensor | None
) -> torch.Tensor:
    """Block-scaled weight-only linear on the GPU (paths in the module docstring)."""
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (M, K), got {tuple(x.shape)}")
    m = x.shape[0]
    if m <= GEMV_MAX_M and gemv_eligible(x, weight):
        return block_scaled_gemv(x, weight, bias)
    if m < CUBLAS_MIN_M:
        return fp4_gemm(x, weight, bias, split_k=m <= SPLIT_K_MAX_M)
    return F.linear(x, dequantize_block_scaled(weight, x.shape[1], x.dtype), bias)
