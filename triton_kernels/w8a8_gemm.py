"""W8A8 INT8 GEMM: int8 activations x int8 weights -> int32 on tensor cores, scaled epilogue.

``int8_gemm(a, b, a_scale, b_scale, bias, out_dtype)``: ``a (M, K)`` int8 (per-token
or per-tensor quantized activations, see :mod:`.act_quant`), ``b (N, K)`` int8
symmetric per-channel weights, float32 scales ``a_scale (M|1, 1)``, ``b_scale
(N|1, 1)``; returns ``(M, N)`` in ``out_dtype``.  Products accumulate exactly in int32
(K up to 131072 cannot overflow).  The kernel and its search space live in :mod:`.scaled_gemm`;
this module holds the INT8 instances, tuned and cached on their own.
"""

from __future__ import annotations

import torch
import triton

from .scaled_gemm import (
    SPLIT_K_CONFIGS,
    SPLIT_K_MAX_M,
    TILED_CONFIGS,
    check_operands,
    launch_scaled_gemm,
    tune,
)

_int8_split_k = tune(SPLIT_K_CONFIGS, split_k=True)
_int8_tiled = tune(TILED_CONFIGS, split_k=False)


def int8_gemm(
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
    """``(a @ b^T) * a_scale * b_scale + bias`` (Triton); ``split_k`` None picks by M."""
    check_operands(a, b, a_scale, b_scale, bias, torch.int8)
    split_k = a.shape[0] <= SPLIT_K_MAX_M if split_k is None else split_k
    return launch_scaled_gemm(
        _int8_split_k, _int8_tiled, a, b, a_scale, b_scale, bias, out_dtype, split_k, config, out
    )
