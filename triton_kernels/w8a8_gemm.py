"""W8A8 INT8 GEMM: int8 activations x int8 weights -> int32 on tensor cores, scaled epilogue.

``int8_gemm(a, b, a_scale, b_scale, bias, out_dtype)``: ``a (M, K)`` int8 (per-token
or per-tensor quantized activations, see :mod:`.act_quant`), ``b (N, K)`` int8
symmetric per-channel weights, float32 scales ``a_scale (M|1, 1)``, ``b_scale
(N|1, 1)``; returns ``(M, N)`` in ``out_dtype``.  Products accumulate exactly in int32
up to ``K = 131071`` (``INT8_MAX_K``: codes of -128 on both sides cannot overflow it);
longer K runs in chunks of that length, scaled and summed in float32.  The kernel, its
search space and the launcher live in :mod:`.scaled_gemm`; this is the INT8 instance,
tuned and cached on its own.
"""

from __future__ import annotations

import torch

from .scaled_gemm import ScaledGemm

int8_gemm = ScaledGemm(torch.int8)
