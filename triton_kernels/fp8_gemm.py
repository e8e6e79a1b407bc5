"""FP8 W8A8 GEMM: E4M3 activations x E4M3 weights on tensor cores (sm_89 and newer).

``fp8_gemm(a, b, a_scale, b_scale, bias, out_dtype)``: ``a (M, K)`` and ``b (N, K)``
float8_e4m3fn, float32 scales ``a_scale (M|1, 1)`` and ``b_scale (N|1, 1)``; float32
accumulation, the same scaled epilogue as the INT8 GEMM (kernel in
:mod:`.scaled_gemm`, tuned and cached apart from INT8).  FP8 tensor cores exist from Ada (sm_89)
and Hopper (sm_90) on; older GPUs get :class:`FP8Unsupported` from
:func:`check_fp8_support` (from :mod:`._launch`) so callers can fall back.
"""

from __future__ import annotations

import torch
import triton

from ._launch import FP8Unsupported, check_fp8_support, fp8_supported
from .scaled_gemm import (
    SPLIT_K_CONFIGS,
    SPLIT_K_MAX_M,
    TILED_CONFIGS,
    check_operands,
    launch_scaled_gemm,
    tune,
)

__all__ = ["FP8Unsupported", "check_fp8_support", "fp8_gemm", "fp8_supported"]

_fp8_split_k = tune(SPLIT_K_CONFIGS, split_k=True)
_fp8_tiled = tune(TILED_CONFIGS, split_k=False)


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
