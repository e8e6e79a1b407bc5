"""W8A8 INT8 GEMM: int8 activations x int8 weights -> int32 on tensor cores, scaled epilogue.

``int8_gemm(a, b, a_scale, b_scale, bias, out_dtype)``: ``a (M, K)`` int8 (per-token
or per-tensor quantized activations, see :mod:`.act_quant`), ``b (N, K)`` int8
symmetric per-channel weights, float32 scales ``a_scale (M|1, 1)``, ``b_scale
(N|1, 1)``; returns ``(M, N)`` in ``out_dtype``.  Products accumulate exactly in int32
up to ``K = 131071`` (``INT8_MAX_K``: codes of -128 on both sides cannot overflow it);
longer K runs in chunks of that length, scaled and summed in float32.  The kernel, its
search space and the launcher live in :mod:`.scaled_gemm`; this is the INT8 instance,
tuned and cached on its own.

``int8_gemm_asym`` is the same GEMM for asymmetric activations (int8 codes with an
integer zero point): the zero-point correction runs in the kernel's epilogue.
"""

from __future__ import annotations

import torch

from .scaled_gemm import ScaledGemm

int8_gemm = ScaledGemm(torch.int8)


def int8_gemm_asym(
    a: torch.Tensor,
    b: torch.Tensor,
    a_scale: torch.Tensor,
    a_zero: torch.Tensor,
    b_scale: torch.Tensor,
    b_sum: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    split_k: bool | None = None,
    config=None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Asymmetric activations: ``(a @ b^T - a_zero * b_sum) * a_scale * b_scale + bias``.

    ``a (M, K)`` int8 codes with int32 zero points ``a_zero`` shaped as ``a_scale``
    (``(M, 1)`` per token, ``(1, 1)`` per tensor), ``b_sum (N,)`` int32 the column sums
    ``sum_k b[n, k]``; the correction is exact in int32 inside the kernel's epilogue
    (K past ``ZERO_POINT_MAX_K`` runs in chunks, as the symmetric GEMM does past its bound).
    """
    n = b.shape[0]
    if a_zero.dtype != torch.int32 or a_zero.numel() != a_scale.numel():
        raise ValueError(
            f"a_zero must be int32 shaped as a_scale {tuple(a_scale.shape)}, "
            f"got {a_zero.dtype} {tuple(a_zero.shape)}"
        )
    if b_sum.dtype != torch.int32 or tuple(b_sum.shape) != (n,):
        raise ValueError(f"b_sum must be int32 ({n},), got {b_sum.dtype} {tuple(b_sum.shape)}")
    zero = a_zero.reshape(-1, 1).contiguous()
    return int8_gemm(a, b, a_scale, b_scale, bias, out_dtype, split_k, config, out, zero, b_sum)
