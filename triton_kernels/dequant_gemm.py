"""Weight-only GEMM on tensor cores: dequantize tiles in registers, then ``tl.dot``.

``x (M, K)`` bf16/fp16/fp32 times the dequantized weight ``(N, K)`` (formats in
:mod:`.weight`), float32 accumulation.  Each program owns a ``BLOCK_M x BLOCK_N``
output tile; weight tiles are loaded ``(BLOCK_N, BLOCK_K)`` (contiguous along K),
dequantized in float32, cast to the activation dtype and transposed into the MMA.
Two tunings of the same kernel:

* split-K (``M <= 64``, decode and small batches): the grid adds a K dimension so
  a 16-row problem still streams the weight with every SM; each split publishes its
  float32 partial tile and the last split of a tile reduces them in split order, adds
  the bias and stores the cast output (one launch per call: no zero-fill, no
  cast-copy, deterministic; see ``_tiles.sum_split_tiles``).
* tiled (larger M): one program per output tile, grouped along M for L2 reuse,
  bias and the output cast fused in the epilogue.

fp32 activations use IEEE fp32 dot products (no TF32) to stay close to the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import autotuned, output, output_args, run_kernel
from ._tiles import (
    prune_to_counters,
    split_k_run,
    split_workspace,
    store_tile,
    sum_split_tiles,
    tile_config,
    tile_grid,
    tile_offsets,
)
from .dequant import MAGIC, dequantize_tile, dot_weight_tile
from .weight import QuantWeight


@triton.jit
def _gemm_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    z_ptr,
    b_ptr,
    out_ptr,
    ws_ptr,
    lock_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_qn,
    stride_sn,
    stride_zn,
    stride_om,
    M_BUCKET,
    magic,  # MAGIC, a runtime value (see dequant.dequantize_words)
    BITS: tl.constexpr,
    PACKED: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SPLIT_K,  # a runtime value: one binary serves every split factor (fewer compiles)
    SPLIT_TILES: tl.constexpr,  # the split-K tuning: splits reduced by the last of a tile
):
    # -- output tile of this program, grouped along M so weight tiles are reused from L2
    offs_m, offs_n, m_mask, n_mask = tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    # -- row bases in int64: M or N times a row stride may pass 2**31 elements.  Rows past
    # -- M read row M - 1 (their outputs are never stored), so the activation loads need
    # -- no row mask, whose predicates the hot loop would rebuild at every K step
    rows = q_ptr + offs_n[:, None].to(tl.int64) * stride_qn
    x_rows = x_ptr + tl.minimum(offs_m, M - 1)[:, None].to(tl.int64) * stride_xm
    s_rows = s_ptr + offs_n[:, None] * stride_sn
    z_rows = z_ptr + offs_n[:, None] * stride_zn
    # -- the run of K tiles of this split
    t_start, t_end = split_k_run(tl.cdiv(K, BLOCK_K), SPLIT_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(t_start, t_end):
        offs_k = t * BLOCK_K + tl.arange(0, BLOCK_K)
        x = tl.load(x_rows + offs_k[None, :], mask=offs_k[None, :] < K, other=0.0)
        # -- dequantize the (BLOCK_N, BLOCK_K) weight tile in float32, then the MMA
        w = dequantize_tile(
            rows, s_rows, z_rows, t, n_mask, K, magic, BITS, PACKED, HAS_ZEROS, GROUP_SIZE, BLOCK_K
        )
        acc = dot_weight_tile(x, w, acc)
    # -- epilogue: bias and a cast store, by the last split of the tile when split over K
    last = SPLIT_K >= 1
    if SPLIT_TILES:
        if SPLIT_K > 1:
            mask = m_mask[:, None] & n_mask[None, :]
            acc, last = sum_split_tiles(acc, ws_ptr, lock_ptr, offs_m, offs_n, mask, M, N, SPLIT_K)
    if last:
        store_tile(acc, out_ptr, b_ptr, offs_m, offs_n, m_mask, n_mask, stride_om, HAS_BIAS, False)


# decode / small batch, the weight split over K across the SMs.  64-row tiles dequantize
# each weight once per program for every M up to 64 (wgmma needs 64 rows anyway; padding
# rows cost MMA issue slots, not dequantization); 16- and 32-row tiles (mma.sync) stay as
# candidates for the smallest batches.  The first is the default (untuned) config: no
# spills on sm_90 and the fewest instructions per weight at M = 16 and 64
# (benchmarks/kernel_model.py); the autotuner decides by time.
SPLIT_K_CONFIGS = [
    tile_config(bm, bn, bk, sk, warps, 3)
    for bm, bn, bk, warps in (
        (64, 256, 64, 8),
        (64, 128, 64, 4),
        (64, 128, 128, 8),
        (64, 64, 128, 4),
        (32, 256, 64, 8),
        (16, 256, 128, 8),
        (16, 512, 64, 8),
        (16, 256, 64, 8),
        (16, 64, 128, 4),
    )
    for sk in (4, 1, 2, 8)
]

# prefill: classic tiles, one program per output tile; the first (the default) compiles
# without spills for 4- and 8-bit weights on sm_90 and has the fewest instructions per
# weight at M = 256.  Where N is 4096 and M 256, 128x128 tiles fill half the SMs: the
# 256x32 tile dequantizes each weight once for all 256 rows and the 128x64x128 one halves
# the loop's fixed cost per weight, both 128 programs (tensor-core bound on sm_90 there)
TILED_CONFIGS = [
    tile_config(128, 128, 64, 1, 8, 3),
    tile_config(128, 128, 32, 1, 4, 4),
    tile_config(64, 128, 64, 1, 4, 4),
    tile_config(128, 64, 64, 1, 4, 4),
    tile_config(64, 64, 64, 1, 4, 4),
    tile_config(128, 256, 64, 1, 8, 3),
    tile_config(32, 64, 128, 1, 4, 4),
    tile_config(256, 32, 64, 1, 4, 4),
    tile_config(128, 64, 128, 1, 4, 3),
]

_KEY = ["M_BUCKET", "N", "K", "BITS", "GROUP_SIZE", "PACKED", "HAS_ZEROS"]
_split_k_tuned = autotuned(_gemm_kernel, SPLIT_K_CONFIGS, _KEY, prune=prune_to_counters)
_tiled_tuned = autotuned(_gemm_kernel, TILED_CONFIGS, _KEY)


def dequant_gemm(
    x: torch.Tensor,
    weight: QuantWeight,
    bias: torch.Tensor | None,
    split_k: bool = False,
    config: triton.Config | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x (M, K) @ dequant(W)^T + bias`` -> ``(M, N)`` in ``x.dtype`` on tensor cores.

    ``split_k`` picks the split-K tuning (small M, one launch); otherwise the tiled one.
    ``config`` runs one explicit config of that tuning instead of autotuning.
    """
    m, k = x.shape
    weight.check(k)
    if x.stride(-1) != 1:
        x = x.contiguous()
    n = weight.out_features
    out = output(out, (m, n), x.dtype, x.device)
    grid = tile_grid(m, n, split_k, config)
    if split_k:
        ws, locks = split_workspace(SPLIT_K_CONFIGS, config, m, n, torch.float32, x.device)
    else:
        ws = locks = out  # never read by the tiled tuning
    args = dict(x_ptr=x, ws_ptr=ws, lock_ptr=locks, stride_xm=x.stride(0), magic=MAGIC.value)
    args.update(SPLIT_TILES=split_k, **output_args(out, bias, m, n, k), **weight.kernel_args())
    run_kernel(_split_k_tuned if split_k else _tiled_tuned, grid, config, **args)
    return out
