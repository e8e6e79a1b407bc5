"""FP8 W8A8 GEMM: E4M3 activations x E4M3 weights on tensor cores (sm_89 and newer).

``fp8_gemm(a, b, a_scale, b_scale, bias, out_dtype)``: ``a (M, K)`` and ``b (N, K)``
float8_e4m3fn, float32 scales ``a_scale (M|1, 1)`` and ``b_scale (N|1, 1)``; float32
accumulation, the same scaled epilogue as the INT8 GEMM (kernel in
:mod:`.scaled_gemm`, FP8 tunings below).  FP8 tensor cores exist from Ada (sm_89)
and Hopper (sm_90) on; older GPUs get :class:`FP8Unsupported` from
:func:`check_fp8_support` (from :mod:`._launch`) so callers can fall back.
"""

from __future__ import annotations

import torch
import triton

from ._launch import FP8Unsupported, check_fp8_support, fp8_supported
from .scaled_gemm import (
    check_operands,
    gemm_config,
    launch_scaled_gemm,
    scaled_gemm_torch,
    tune,
)

__all__ = ["FP8Unsupported", "check_fp8_support", "fp8_gemm", "fp8_gemm_torch", "fp8_supported"]

SPLIT_K_MAX_M = 32

FP8_SPLIT_K_CONFIGS = [
    gemm_config(16, bn, bk, sk, 4, st)
    for bn, bk in ((64, 128), (128, 128), (64, 256), (32, 256))
    for sk in (1, 2, 4, 8)
    for st in (3, 4)
] + [gemm_config(32, 64, 128, sk, 4, 4) for sk in (1, 2, 4)]

FP8_TILED_CONFIGS = [
    gemm_config(128, 256, 128, 1, 8, 3),
    gemm_config(128, 128, 128, 1, 8, 3),
    gemm_config(128, 128, 64, 1, 4, 4),
    gemm_config(64, 128, 128, 1, 4, 4),
    gemm_config(128, 64, 128, 1, 4, 4),
    gemm_config(64, 64, 128, 1, 4, 4),
    gemm_config(32, 64, 128, 1, 4, 4),
]

_fp8_split_k = tune(FP8_SPLIT_K_CONFIGS, split_k=True)
_fp8_tiled = tune(FP8_TILED_CONFIGS, split_k=False)


def fp8_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    a_scale: torch.Tensor,
    b_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    split_k: bool | None = None,
    config: triton.Config | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(a @ b^T) * a_scale * b_scale + bias`` in FP8 (Triton); ``split_k`` None picks by M."""
    check_operands(a, b, a_scale, b_scale, bias, torch.float8_e4m3fn)
    check_fp8_support(a.device)
    split_k = a.shape[0] <= SPLIT_K_MAX_M if split_k is None else split_k
    return launch_scaled_gemm(
        _fp8_split_k, _fp8_tiled, a, b, a_scale, b_scale, bias, out_dtype, split_k, config, out
    )


def fp8_gemm_torch(
    a: torch.Tensor,
    b: torch.Tensor,
    a_scale: torch.Tensor,
    b_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    split_k: bool | None = None,
    config: triton.Config | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """PyTorch twin of :func:`fp8_gemm` (``split_k`` and ``config`` are ignored)."""
    result = scaled_gemm_torch(a, b, a_scale, b_scale, bias, out_dtype)
    return out.copy_(result) if out is not None else result
