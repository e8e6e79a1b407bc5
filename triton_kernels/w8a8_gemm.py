"""W8A8 INT8 GEMM: int8 activations x int8 weights -> int32 on tensor cores, scaled epilogue.

``int8_gemm(a, b, a_scale, b_scale, bias, out_dtype)``: ``a (M, K)`` int8 (per-token
or per-tensor quantized activations, see :mod:`.act_quant`), ``b (N, K)`` int8
symmetric per-channel weights, float32 scales ``a_scale (M|1, 1)``, ``b_scale
(N|1, 1)``; returns ``(M, N)`` in ``out_dtype``.  Products accumulate exactly in int32
(K up to 131072 cannot overflow).  The kernel lives in :mod:`.scaled_gemm`; the
configs below are the INT8 tunings (int8 MMA tiles take 32+ along K).
"""

from __future__ import annotations

import torch
import triton

from .scaled_gemm import (
    check_operands,
    gemm_config,
    launch_scaled_gemm,
    scaled_gemm_torch,
    tune,
)

SPLIT_K_MAX_M = 32  # decode and small batches split K so the weight streams on every SM

INT8_SPLIT_K_CONFIGS = [
    gemm_config(16, bn, bk, sk, 4, st)
    for bn, bk in ((64, 128), (128, 128), (64, 256), (32, 256))
    for sk in (1, 2, 4, 8)
    for st in (3, 4)
] + [gemm_config(32, 64, 128, sk, 4, 4) for sk in (1, 2, 4)]

INT8_TILED_CONFIGS = [
    gemm_config(128, 256, 128, 1, 8, 3),
    gemm_config(128, 128, 128, 1, 8, 3),
    gemm_config(128, 128, 64, 1, 4, 4),
    gemm_config(64, 128, 128, 1, 4, 4),
    gemm_config(128, 64, 128, 1, 4, 4),
    gemm_config(64, 64, 128, 1, 4, 4),
    gemm_config(32, 64, 128, 1, 4, 4),
]

_int8_split_k = tune(INT8_SPLIT_K_CONFIGS, split_k=True)
_int8_tiled = tune(INT8_TILED_CONFIGS, split_k=False)


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


def int8_gemm_torch(
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
    """PyTorch twin of :func:`int8_gemm` (``split_k`` and ``config`` are ignored)."""
    result = scaled_gemm_torch(a, b, a_scale, b_scale, bias, out_dtype)
    return out.copy_(result) if out is not None else result
