"""FP8 W8A8 GEMM: E4M3 activations x E4M3 weights on tensor cores (sm_89 and newer).

``fp8_gemm(a, b, a_scale, b_scale, bias, out_dtype)``: ``a (M, K)`` and ``b (N, K)``
float8_e4m3fn, float32 scales ``a_scale (M|1, 1)`` and ``b_scale (N|1, 1)``; float32
accumulation, the same scaled epilogue as the INT8 GEMM (kernel and launcher in
:mod:`.scaled_gemm`, tuned and cached apart from INT8).  FP8 tensor cores exist from Ada
(sm_89) and Hopper (sm_90) on; older GPUs get :class:`FP8Unsupported` from
:func:`check_fp8_support` (from :mod:`._launch`) so callers can fall back.
"""

from __future__ import annotations

import torch

from ._launch import FP8Unsupported, check_fp8_support, fp8_supported
from .scaled_gemm import ScaledGemm

__all__ = ["FP8Unsupported", "check_fp8_support", "fp8_gemm", "fp8_supported"]

fp8_gemm = ScaledGemm(torch.float8_e4m3fn)
