"""The GEMM shared by the W8A8 families: 8-bit x 8-bit on tensor cores, scaled epilogue.

``a (M, K)`` and ``b (N, K)`` both int8 (int32 accumulation) or both
float8_e4m3fn (float32 accumulation); ``out = (a @ b^T) * a_scale * b_scale + bias``
with ``a_scale`` ``(M, 1)`` per token or ``(1, 1)`` per tensor and ``b_scale``
``(N, 1)`` per channel or ``(1, 1)`` per tensor, both float32; the product of the
scales is applied in float32 to the accumulator, the result is cast to the output
dtype and the bias added in the output dtype (the reference's order).  The split-K
tuning (``SPLIT_TILES``) has each K slice publish its unscaled partial tile (int32 for
INT8: the sum stays exact) and the last slice of a tile add them in split order and run
the epilogue, so a call is one launch (``_tiles.sum_split_tiles``); ``SPLIT_K`` is a
runtime value, so one binary serves every split factor.

One :class:`ScaledGemm` launcher per operand dtype (:mod:`.w8a8_gemm`, :mod:`.fp8_gemm`)
tunes this kernel and caches its choices separately.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import autotuned, check_fp8_support, m_bucket, output, run_kernel
from ._tiles import (
    prune_to_counters,
    split_k_run,
    split_workspace,
    sum_split_tiles,
    tile_config,
    tile_grid,
    tile_offsets,
)


@triton.jit
def scaled_gemm_kernel(
    a_ptr,
    b_ptr,
    a_scale_ptr,
    b_scale_ptr,
    bias_ptr,
    out_ptr,
    ws_ptr,
    lock_ptr,
    a_zero_ptr,
    b_sum_ptr,
    M,
    N,
    K,
    stride_am,
    stride_bn,
    stride_asm,
    stride_bsn,
    stride_om,
    M_BUCKET,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SPLIT_K,
    SPLIT_TILES: tl.constexpr,  # the split-K tuning: splits reduced by the last of a tile
    HAS_ZERO: tl.constexpr = False,
):
    # -- output tile, grouped along M for L2 reuse of b
    offs_m, offs_n, m_mask, n_mask = tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    # -- row bases in int64: M or N times a row stride may pass 2**31 elements.  Rows past
    # -- M (columns past N) read the last one, whose products are never stored: the loads
    # -- need only the K mask, not predicates rebuilt from the row masks at every K step
    a_rows = a_ptr + tl.minimum(offs_m, M - 1)[:, None].to(tl.int64) * stride_am
    b_cols = b_ptr + tl.minimum(offs_n, N - 1)[None, :].to(tl.int64) * stride_bn
    # -- K slice of this split, 8-bit products accumulated exactly (int32) or in float32
    t_start, t_end = split_k_run(tl.cdiv(K, BLOCK_K), SPLIT_K)
    if a_ptr.dtype.element_ty == tl.int8:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(t_start, t_end):
        offs_k = t * BLOCK_K + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        a = tl.load(a_rows + offs_k[None, :], mask=k_mask[None, :], other=0.0)
        b = tl.load(b_cols + offs_k[:, None], mask=k_mask[:, None], other=0.0)
        # -- sm_90: the FP8 wgmma keeps one group in flight across K steps; Triton 3.9 waits
        # -- for every INT8 (int32-accumulator) group before the next step, and neither
        # -- num_stages 2..4, warp_specialize, two alternating accumulators nor acc += dot
        # -- changes that (benchmarks/kernel_model.py --w8a8, column "in flight")
        acc = tl.dot(a, b, acc)
    # -- the last split of a tile sums the splits' products (exactly, for int32)
    out_mask = m_mask[:, None] & n_mask[None, :]
    last = SPLIT_K >= 1
    if SPLIT_TILES:
        if SPLIT_K > 1:
            acc, last = sum_split_tiles(
                acc, ws_ptr, lock_ptr, offs_m, offs_n, out_mask, M, N, SPLIT_K
            )
    # -- epilogue: per-row x per-column scales in float32, cast, bias in the output dtype
    if last:
        if HAS_ZERO:
            # -- asymmetric activations: acc - z_a * sum_k b, exact in int32 (the whole K sum)
            a_zero = tl.load(a_zero_ptr + offs_m * stride_asm, mask=m_mask, other=0)
            b_sum = tl.load(b_sum_ptr + offs_n, mask=n_mask, other=0)
            acc -= a_zero[:, None] * b_sum[None, :]
        a_scale = tl.load(a_scale_ptr + offs_m * stride_asm, mask=m_mask, other=0.0)
        b_scale = tl.load(b_scale_ptr + offs_n * stride_bsn, mask=n_mask, other=0.0)
        out = (acc.to(tl.float32) * a_scale[:, None] * b_scale[None, :]).to(
            out_ptr.dtype.element_ty
        )
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0)
            out = (out.to(tl.float32) + bias.to(tl.float32)[None, :]).to(out_ptr.dtype.element_ty)
        out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
        tl.store(out_ptrs, out, mask=out_mask)


# int32 holds K products of 128 * 128 (codes of -128 on both sides) up to K = 131071
INT8_MAX_K = (2**31 - 1) // (128 * 128)
# -- with zero points, sum q_a q_b and z_a sum q_b each reach 128 * 128 * K: half the K
ZERO_POINT_MAX_K = INT8_MAX_K // 2
SPLIT_K_MAX_M = 32  # decode and small batches split K so the weight streams on every SM

# -- one search space serves INT8 and FP8 (both 1-byte operands, MMA tiles 32+ along K);
# -- each dtype gets its own tuned instance, so the choices are made and cached separately
SPLIT_K_CONFIGS = [
    tile_config(16, bn, bk, sk, 4, st)
    for bn, bk in ((64, 128), (128, 128), (64, 256), (32, 256))
    for sk in (1, 2, 4, 8)
    for st in (3, 4)
] + [tile_config(32, 64, 128, sk, 4, 4) for sk in (1, 2, 4)]

TILED_CONFIGS = [
    tile_config(128, 256, 128, 1, 8, 3),
    tile_config(128, 128, 128, 1, 8, 3),
    tile_config(128, 128, 64, 1, 4, 4),
    tile_config(64, 128, 128, 1, 4, 4),
    tile_config(128, 64, 128, 1, 4, 4),
    tile_config(64, 64, 128, 1, 4, 4),
    tile_config(32, 64, 128, 1, 4, 4),
]


def check_operands(
    a: torch.Tensor,
    b: torch.Tensor,
    a_scale: torch.Tensor,
    b_scale: torch.Tensor,
    bias: torch.Tensor | None,
    dtype: torch.dtype,
) -> None:
    """Shapes and dtypes of a scaled GEMM (raises ValueError naming the operand)."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(
            f"a (M, K) and b (N, K) must share K, got {tuple(a.shape)}, {tuple(b.shape)}"
        )
    if a.dtype != dtype or b.dtype != dtype:
        raise ValueError(f"a and b must both be {dtype}, got {a.dtype} and {b.dtype}")
    m, n = a.shape[0], b.shape[0]
    if a_scale.numel() not in (1, m) or b_scale.numel() not in (1, n):
        raise ValueError(
            f"a_scale must hold 1 or {m} values and b_scale 1 or {n}, "
            f"got {tuple(a_scale.shape)} and {tuple(b_scale.shape)}"
        )
    if a_scale.dtype != torch.float32 or b_scale.dtype != torch.float32:
        raise ValueError("a_scale and b_scale must be float32")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must be ({n},), got {tuple(bias.shape)}")


class ScaledGemm:
    """The launcher of one operand dtype, with its own tuned instances (choices cached apart).

    ``gemm(a, b, a_scale, b_scale, bias, out_dtype)`` computes the module docstring's
    ``out``; ``split_k`` None picks by M, ``config`` runs one explicit config of that
    tuning instead of autotuning, ``out`` is an optional preallocated output.
    """

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        key = ["M_BUCKET", "N", "K"]
        self.split_k_tuned = autotuned(
            scaled_gemm_kernel, SPLIT_K_CONFIGS, key, prune=prune_to_counters
        )
        self.tiled_tuned = autotuned(scaled_gemm_kernel, TILED_CONFIGS, key)

    def __call__(
        self,
        a: torch.Tensor,
        b: torch.Tensor,
        a_scale: torch.Tensor,
        b_scale: torch.Tensor,
        bias: torch.Tensor | None,
        out_dtype: torch.dtype,
        split_k: bool | None = None,
        config: triton.Config | None = None,
        out: torch.Tensor | None = None,
        a_zero: torch.Tensor | None = None,
        b_sum: torch.Tensor | None = None,
    ) -> torch.Tensor:
        check_operands(a, b, a_scale, b_scale, bias, self.dtype)
        if self.dtype == torch.float8_e4m3fn:
            check_fp8_support(a.device)
        split_k = a.shape[0] <= SPLIT_K_MAX_M if split_k is None else split_k
        max_k = INT8_MAX_K if a_zero is None else ZERO_POINT_MAX_K
        if self.dtype == torch.int8 and a.shape[1] > max_k:
            chunks = (a_zero, b_sum, max_k)
            return self._k_chunks(
                a, b, a_scale, b_scale, bias, out_dtype, split_k, config, out, *chunks
            )
        a = a if a.stride(-1) == 1 else a.contiguous()
        b = b if b.stride(-1) == 1 else b.contiguous()
        a_scale = a_scale.reshape(-1, 1)
        b_scale = b_scale.reshape(-1, 1)
        (m, k), n = a.shape, b.shape[0]
        out = output(out, (m, n), out_dtype, a.device)
        grid = tile_grid(m, n, split_k, config)
        if split_k:
            ws_dtype = torch.int32 if self.dtype == torch.int8 else torch.float32
            ws, locks = split_workspace(SPLIT_K_CONFIGS, config, m, n, ws_dtype, a.device)
        else:
            ws = locks = out  # never read by the tiled tuning
        run_kernel(
            self.split_k_tuned if split_k else self.tiled_tuned,
            grid,
            config,
            a_ptr=a,
            b_ptr=b,
            a_scale_ptr=a_scale,
            b_scale_ptr=b_scale,
            bias_ptr=bias if bias is not None else out,
            out_ptr=out,
            ws_ptr=ws,
            lock_ptr=locks,
            a_zero_ptr=a_zero if a_zero is not None else a_scale,
            b_sum_ptr=b_sum if b_sum is not None else b_scale,
            M=m,
            N=n,
            K=k,
            stride_am=a.stride(0),
            stride_bn=b.stride(0),
            stride_asm=0 if a_scale.shape[0] == 1 else 1,
            stride_bsn=0 if b_scale.shape[0] == 1 else 1,
            stride_om=out.stride(0),
            M_BUCKET=m_bucket(m),
            HAS_BIAS=bias is not None,
            SPLIT_TILES=split_k,
            HAS_ZERO=a_zero is not None,
        )
        return out

    def _k_chunks(self, a, b, a_scale, b_scale, bias, out_dtype, split_k, config, out,
                  a_zero=None, b_sum=None, max_k=INT8_MAX_K):  # fmt: skip
        """INT8 with K past ``max_k``: the int32 accumulator could overflow, so K runs
        in chunks that cannot, each scaled in float32 and summed in float32 (with zero
        points, each chunk corrects with the column sums of its own slice of ``b``)."""
        k = a.shape[1]
        acc = None
        for start in range(0, k, max_k):
            stop = min(start + max_k, k)
            b_part = b[:, start:stop]
            sums = None if a_zero is None else b_part.sum(dim=1, dtype=torch.int32)
            part = self(a[:, start:stop], b_part, a_scale, b_scale, None, torch.float32,
                        split_k, config, a_zero=a_zero, b_sum=sums)  # fmt: skip
            acc = part if acc is None else acc.add_(part)
        if bias is not None:
            acc = acc.to(out_dtype).float() + bias.float()
        result = acc.to(out_dtype)
        return out.copy_(result) if out is not None else result
