"""Weight-only GEMV for decode (M = 1): stream the quantized weight once, split over K.

``x (M, K)`` fp32/bf16/fp16 times the dequantized weight ``(N, K)`` (formats in
:mod:`.dequant`), accumulated in float32 on CUDA cores (no tensor cores: one row
of activations cannot fill an MMA tile).  The grid is ``(N / BLOCK_N, SPLIT_K, M)``:
each program reduces one K slice of ``BLOCK_N`` weight rows and atomically adds its
partial sums into a zeroed float32 ``(M, N)`` buffer, so that even an ``N = 4096``
layer spreads over every SM.  When a K tile lies inside one quantization group the
scale and zero are applied once per tile and row (``s * (sum(x*c) - z*sum(x))``)
instead of once per weight.  Bias is added by the first K slice.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import m_bucket, output, run_kernel
from .dequant import check_weight, group_index, load_code_tile, load_qparams, weight_meta


@triton.jit
def _gemv_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    z_ptr,
    b_ptr,
    acc_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_qn,
    stride_sn,
    stride_zn,
    stride_am,
    M_BUCKET,
    BITS: tl.constexpr,
    PACKED: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    # -- the BLOCK_N weight rows and the run of K tiles owned by this program
    # (row offsets in int64: N * row stride may pass 2**31 elements)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    rows = q_ptr + offs_n[:, None].to(tl.int64) * stride_qn
    x_row = x_ptr + m.to(tl.int64) * stride_xm
    s_rows = s_ptr + offs_n * stride_sn
    z_rows = z_ptr + offs_n * stride_zn
    tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(tiles, SPLIT_K)
    t_start = pid_k * per_split
    t_end = tl.minimum(t_start + per_split, tiles)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for t in range(t_start, t_end):
        # -- activations (zero past K) and codes of this tile
        offs_k = t * BLOCK_K + tl.arange(0, BLOCK_K)
        x = tl.load(x_row + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
        codes = load_code_tile(rows, t, n_mask[:, None], K, BITS, PACKED, BLOCK_K)
        # -- dequantize and reduce: per tile when the tile sits in one group, else per weight
        if GROUP_SIZE == 0 or GROUP_SIZE % BLOCK_K == 0:
            g = group_index(t * BLOCK_K, GROUP_SIZE)
            scale, zero = load_qparams(s_rows, z_rows, g, n_mask, BITS, PACKED, HAS_ZEROS)
            dot = tl.sum(codes * x[None, :], axis=1)
            acc += scale * (dot - zero * tl.sum(x, axis=0))
        else:
            g = group_index(offs_k[None, :], GROUP_SIZE)
            mask = n_mask[:, None] & (offs_k[None, :] < K)
            scale, zero = load_qparams(
                s_rows[:, None], z_rows[:, None], g, mask, BITS, PACKED, HAS_ZEROS
            )
            acc += tl.sum((codes - zero) * scale * x[None, :], axis=1)
    # -- bias once (first K slice), then accumulate the partial sums
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        acc += tl.where(pid_k == 0, bias, 0.0)
    out_row = acc_ptr + m.to(tl.int64) * stride_am
    tl.atomic_add(out_row + offs_n, acc, mask=n_mask, sem="relaxed")


def _gemv_configs() -> list[triton.Config]:
    configs = []
    for block_n, block_k, warps in ((16, 256, 4), (32, 128, 4), (32, 256, 4), (64, 128, 8)):
        for split_k in (1, 2, 4, 8, 16):
            configs.append(
                triton.Config(
                    {"BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split_k},
                    num_warps=warps,
                    num_stages=3,
                )
            )
    return configs


def _prune_gemv(configs, named_args, **kwargs):
    """Keep K tiles inside one group (the cheap dequant path) and splits that have work."""
    args = {**named_args, **kwargs}
    group, k = args["GROUP_SIZE"], args["K"]
    kept = [
        c
        for c in configs
        if (group == 0 or group % c.kwargs["BLOCK_K"] == 0)
        and c.kwargs["SPLIT_K"] <= max(1, triton.cdiv(k, c.kwargs["BLOCK_K"]) // 2)
    ]
    return kept or configs[:1]


_gemv_tuned = triton.autotune(
    _gemv_configs(),
    key=["M_BUCKET", "N", "K", "BITS", "GROUP_SIZE", "PACKED", "HAS_ZEROS"],
    prune_configs_by={"early_config_prune": _prune_gemv},
    reset_to_zero=["acc_ptr"],
    cache_results=True,
)(_gemv_kernel)


def dequant_gemv(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
    config: triton.Config | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x (M, K) @ dequant(W)^T + bias`` -> ``(M, N)`` in ``x.dtype`` (meant for M = 1)."""
    m, k = x.shape
    check_weight(qweight, scales, zeros, bits, group_size, k)
    if x.stride(-1) != 1:
        x = x.contiguous()
    n = qweight.shape[0]
    out = output(out, (m, n), x.dtype, x.device)
    acc = out.zero_() if x.dtype == torch.float32 else torch.zeros_like(out, dtype=torch.float32)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"], m)

    run_kernel(
        _gemv_tuned,
        grid,
        config,
        x_ptr=x,
        b_ptr=bias if bias is not None else acc,
        acc_ptr=acc,
        M=m,
        N=n,
        K=k,
        stride_xm=x.stride(0),
        stride_am=acc.stride(0),
        M_BUCKET=m_bucket(m),
        HAS_BIAS=bias is not None,
        **weight_meta(qweight, scales, zeros, bits, group_size),
    )
    return out if acc is out else out.copy_(acc)
