"""FP8 block GEMM (DeepSeek-V3's recipe): per-token-group activation scales x per-block weight
scales, applied in the K loop.

``fp8_block_gemm(a, a_scale, b, b_scale, block_n, block_k, bias, out_dtype)``:
``a (M, K)`` float8_e4m3fn with ``a_scale (M, ceil(K / block_k))`` float32, one per
``1 x block_k`` group of a row; ``b (N, K)`` float8_e4m3fn with ``b_scale
(ceil(N / block_n), ceil(K / block_k))`` float32, one per ``block_n x block_k`` block.
``out = sum_g (a_g @ b_g^T) * a_scale[:, g] * b_scale[n // block_n, g] + bias``: each
``BLOCK_K`` step (which divides ``block_k``, so it lies in one group) accumulates its FP8
products in float32 on the tensor cores and adds them, scaled, to the float32 tile.
``quantize_activation_groups`` quantizes ``x (M, K)`` to those ``a``/``a_scale`` with the
per-token kernel of :mod:`.act_quant`, each group seen as a row.  Needs sm_89+ (FP8).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import autotuned, check_device, check_fp8_support, m_bucket, output, run_kernel
from ._tiles import tile_config, tile_grid, tile_offsets
from .act_quant import quantize_activation_rows


@triton.jit
def fp8_block_gemm_kernel(
    a_ptr,
    a_scale_ptr,
    b_ptr,
    b_scale_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_am,
    stride_asm,
    stride_bn,
    stride_bsn,
    stride_om,
    M_BUCKET,
    SCALE_BLOCK_N: tl.constexpr,
    SCALE_BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    # -- output tile, grouped along M for L2 reuse of b
    offs_m, offs_n, m_mask, n_mask = tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    a_rows = a_ptr + offs_m[:, None].to(tl.int64) * stride_am
    b_cols = b_ptr + offs_n[None, :].to(tl.int64) * stride_bn
    a_scale_rows = a_scale_ptr + offs_m.to(tl.int64) * stride_asm
    b_scale_rows = b_scale_ptr + (offs_n // SCALE_BLOCK_N).to(tl.int64) * stride_bsn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(0, tl.cdiv(K, BLOCK_K)):
        # -- one K step: FP8 products in float32, then both scales of its group
        offs_k = t * BLOCK_K + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        a = tl.load(a_rows + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_cols + offs_k[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        group = (t * BLOCK_K) // SCALE_BLOCK_K
        a_scale = tl.load(a_scale_rows + group, mask=m_mask, other=0.0)
        b_scale = tl.load(b_scale_rows + group, mask=n_mask, other=0.0)
        part = tl.dot(a, b, out_dtype=tl.float32)
        acc += part * a_scale[:, None] * b_scale[None, :]
    # -- epilogue: cast, bias added in the output dtype (the reference's order)
    out = acc.to(out_ptr.dtype.element_ty)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0)
        out = (out.to(tl.float32) + bias.to(tl.float32)[None, :]).to(out_ptr.dtype.element_ty)
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(out_ptrs, out, mask=m_mask[:, None] & n_mask[None, :])


# -- BLOCK_K 128 (or 64) divides every block_k the configs allow (powers of two >= 64)
CONFIGS = [
    tile_config(128, 128, 128, 1, 8, 3),
    tile_config(64, 128, 128, 1, 4, 4),
    tile_config(128, 64, 128, 1, 4, 4),
    tile_config(64, 64, 128, 1, 4, 4),
    tile_config(32, 64, 128, 1, 4, 4),
    tile_config(16, 64, 128, 1, 4, 4),
    tile_config(16, 128, 128, 1, 4, 3),
    tile_config(16, 64, 64, 1, 4, 4),
]


def _prune(configs, named_args, **kwargs):
    """Keep the configs whose ``BLOCK_K`` divides the scale group along K."""
    group = named_args.get("SCALE_BLOCK_K", kwargs.get("SCALE_BLOCK_K"))
    return [c for c in configs if group % c.kwargs["BLOCK_K"] == 0] or configs[-1:]


fp8_block_gemm_tuned = autotuned(
    fp8_block_gemm_kernel, CONFIGS, ["M_BUCKET", "N", "K", "SCALE_BLOCK_K"], prune=_prune
)


def fp8_block_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    block_n: int,
    block_k: int,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    config: triton.Config | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The module docstring's ``out`` (``config`` runs one explicit config instead of tuning)."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(
            f"a (M, K) and b (N, K) must share K, got {tuple(a.shape)}, {tuple(b.shape)}"
        )
    if a.dtype != torch.float8_e4m3fn or b.dtype != torch.float8_e4m3fn:
        raise ValueError(f"a and b must be float8_e4m3fn, got {a.dtype} and {b.dtype}")
    (m, k), n = a.shape, b.shape[0]
    groups = triton.cdiv(k, block_k)
    if tuple(a_scale.shape) != (m, groups) or tuple(b_scale.shape) != (
        triton.cdiv(n, block_n),
        groups,
    ):
        raise ValueError(
            f"a_scale must be ({m}, {groups}) and b_scale ({triton.cdiv(n, block_n)}, {groups}), "
            f"got {tuple(a_scale.shape)} and {tuple(b_scale.shape)}"
        )
    if a_scale.dtype != torch.float32 or b_scale.dtype != torch.float32:
        raise ValueError("a_scale and b_scale must be float32")
    if block_k % 64 != 0:
        raise ValueError(f"block_k must be a multiple of 64, got {block_k}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must be ({n},), got {tuple(bias.shape)}")
    check_device(a, a_scale, b, b_scale, bias)
    check_fp8_support(a.device)
    a = a if a.stride(-1) == 1 else a.contiguous()
    b = b if b.stride(-1) == 1 else b.contiguous()
    a_scale, b_scale = a_scale.contiguous(), b_scale.contiguous()
    out = output(out, (m, n), out_dtype, a.device)
    run_kernel(
        fp8_block_gemm_tuned,
        tile_grid(m, n, False, config),
        config,
        a_ptr=a,
        a_scale_ptr=a_scale,
        b_ptr=b,
        b_scale_ptr=b_scale,
        bias_ptr=bias if bias is not None else out,
        out_ptr=out,
        M=m,
        N=n,
        K=k,
        stride_am=a.stride(0),
        stride_asm=a_scale.stride(0),
        stride_bn=b.stride(0),
        stride_bsn=b_scale.stride(0),
        stride_om=out.stride(0),
        M_BUCKET=m_bucket(m),
        SCALE_BLOCK_N=block_n,
        SCALE_BLOCK_K=block_k,
        HAS_BIAS=bias is not None,
    )
    return out


def quantize_activation_groups(
    x: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x (M, K)`` to FP8 ``q (M, K)`` with ``scales (M, ceil(K / group_size))`` float32.

    Each ``1 x group_size`` group is one row of the per-token kernel (a partial last
    group is padded with zeros, which leave its max unchanged); a group holding NaN/Inf
    gets a NaN scale, so the GEMM's output row for it is NaN.
    """
    m, k = x.shape
    groups = triton.cdiv(k, group_size)
    padded = (
        x if k == groups * group_size else torch.nn.functional.pad(x, (0, groups * group_size - k))
    )
    q, scales = quantize_activation_rows(
        padded.contiguous().view(m * groups, group_size), "fp8", per_token=True
    )
    return q.view(m, groups * group_size)[:, :k], scales.view(m, groups)
