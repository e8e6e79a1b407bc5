"""Weight-only GEMM of block-scaled float weights (NVFP4, MXFP4, MXFP8) on tensor cores.

``x (M, K)`` bf16/fp16/fp32 times a :class:`.BlockScaledWeight` ``(N, K)`` (formats there),
float32 accumulation, on the tile machinery of ``dequant_gemm``: split-K for small M (each
split publishes its partial tile, the last split of a tile reduces them in split order:
one launch, no zero-fill or cast-copy) and tiled above.  The weight tile is decoded in
registers by bit arithmetic (:mod:`.float_codes`).  E2M1 rows whose bytes form whole
32-bit words, under bf16 activations (fp16: NVFP4 only), stay 16-bit: each pair of codes
becomes a bf16/fp16 pair, rearranged into neighbours along K and multiplied by its block's
multiplier in one packed multiply (``_paired_tile``; 13% fewer instructions a weight than
INT4's float32 dequantization in ``benchmarks/kernel_model.py``).  Other word rows (fp32
activations, MXFP8) go through float32, times the block scale with the float16
placement's power of two folded in.  Either way a weight is the code times the scale
exactly (E2M1 x E4M3 and E4M3 x E8M0 products fit bf16 and fp16), so the MMA's operand
is exact too.  Other rows (odd ``ceil(K/2)``) split bytes into nibbles.  A K that every
tile divides drops the K masks (``EVEN_K``).  NVFP4's global scale divides each output
once, in the epilogue.
``dequantize_block_scaled`` writes the reference's weight for the cuBLAS path (large M).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

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
from .block_scaled_weight import BlockScaledWeight
from .dequant import dot_weight_tile
from .float_codes import (
    E2M1_TO_FP16,
    as_halves,
    e2m1_pairs,
    e2m1_to_float,
    e4m3_bits_to_float,
    e4m3_pair,
    e8m0_folded,
    exact_halves,
    float_pair,
    halves,
    scaled_k_pairs,
)

SPLIT_K_MAX_M = 64


@triton.jit
def load_e2m1_tile(q_rows, t, r_mask, K, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """float32 ``(ROWS, BLOCK_K)`` E2M1 values of K tile ``t`` from rows of packed bytes."""
    # -- (ROWS, BLOCK_K / 2) bytes, split into nibbles in column order
    offs_b = t * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
    b_mask = r_mask[:, None] & (offs_b[None, :] < (K + 1) // 2)
    byte = tl.load(q_rows + offs_b[None, :], mask=b_mask, other=0).to(tl.int16)
    return e2m1_to_float(tl.join(byte & 0xF, byte >> 4).reshape(ROWS, BLOCK_K))


@triton.jit
def _block_multipliers(
    s_rows, t, n_mask, G, BLOCK_K: tl.constexpr, BLOCK: tl.constexpr,
    HAS_GLOBAL: tl.constexpr, FOLD_E2M1: tl.constexpr, EVEN_K: tl.constexpr = False,
):  # fmt: skip
    """float32 ``(BLOCK_N, BLOCK_K // BLOCK)`` scale of each block of K tile ``t`` (NVFP4's
    without the global scale; ``FOLD_E2M1``: times 2**14, for E2M1 float16 placements)."""
    s = _block_scale_codes(s_rows, t, n_mask, G, BLOCK_K, BLOCK, EVEN_K)
    if HAS_GLOBAL:
        fold: tl.constexpr = E2M1_TO_FP16 if FOLD_E2M1 else 1.0
        return e4m3_bits_to_float(s) * fold
    else:
        return e8m0_folded(s, 0)[0]


@triton.jit
def _block_scale_codes(
    s_rows, t, n_mask, G, BLOCK_K: tl.constexpr, BLOCK: tl.constexpr, EVEN_K: tl.constexpr
):
    """int32 ``(BLOCK_N, BLOCK_K // BLOCK)`` scale bytes of K tile ``t`` (0 past ``G``)."""
    offs_g = t * (BLOCK_K // BLOCK) + tl.arange(0, BLOCK_K // BLOCK)
    if EVEN_K:
        mask = n_mask[:, None]
    else:
        mask = n_mask[:, None] & (offs_g[None, :] < G)
    return tl.load(s_rows + offs_g[None, :], mask=mask, other=0).to(tl.int32)


@triton.jit
def _pair_multipliers(
    s_rows, t, n_mask, G, BLOCK_K: tl.constexpr, BLOCK: tl.constexpr,
    HAS_GLOBAL: tl.constexpr, BF16: tl.constexpr, EVEN_K: tl.constexpr, ASM: tl.constexpr,
):  # fmt: skip
    """uint32 ``(BLOCK_N, BLOCK_K // BLOCK)``: each block's multiplier of the 16-bit code
    pairs (:func:`_paired_tile`) in both halves of a bfloat16 / float16 pair.  NVFP4: the
    E4M3 scale, times ``2**119`` in bfloat16 (with the codes' ``2**-126`` a weight times
    ``2**-7``: every product a normal, the largest scale still finite); MXFP4: ``2**(e-127)``
    (exponent byte 0 a bfloat16 subnormal)."""
    s = _block_scale_codes(s_rows, t, n_mask, G, BLOCK_K, BLOCK, EVEN_K)
    if HAS_GLOBAL:
        half = (((s & 0x80) << 8) | ((s & 0x7F) << 7)).to(tl.int16).to(tl.float16, bitcast=True)
        fold: tl.constexpr = 2.0**127 if BF16 else 256.0  # -- the E4M3 bits are scale * 2**-8
        return float_pair(half.to(tl.float32) * fold, BF16, ASM)
    else:
        bits = tl.where(s == 0, 0x40, s << 7).to(tl.uint32)
        return bits | (bits << 16)


@triton.jit
def _pair_floats(pair, BF16: tl.constexpr):
    """float32 halves (low, high) of a bfloat16 / float16 pair (the interpreter's twin)."""
    if BF16:
        pair = pair.to(tl.uint32, bitcast=True)
        return (pair << 16).to(tl.float32, bitcast=True), (pair & 0xFFFF0000).to(
            tl.float32, bitcast=True
        )
    else:
        return halves(pair, False)


@triton.jit
def _paired_tile(
    q_rows, s_rows, t, n_mask, K, G, BLOCK: tl.constexpr, HAS_GLOBAL: tl.constexpr,
    BF16: tl.constexpr, EVEN_K: tl.constexpr, ASM: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """bfloat16 / float16 ``(BLOCK_N, BLOCK_K)`` E2M1 weights of K tile ``t`` (word rows),
    each code times its block's multiplier (:func:`_pair_multipliers`), exact.

    Never through float32: each word's codes become four 16-bit pairs by bit moves
    (:func:`.e2m1_pairs`), two ``PRMT``s turn two pairs into neighbours along K, and one
    packed multiply a pair applies the block's multiplier (two where the codes first take
    their own values: float16, and MXFP4's E8M0 multipliers, which no single bfloat16
    constant folds); the pairs are already the operand's registers."""
    WORDS: tl.constexpr = BLOCK_K // 8
    WORDS_PER_BLOCK: tl.constexpr = BLOCK // 8
    offs_w = t * WORDS + tl.arange(0, WORDS)
    if EVEN_K:
        mask = n_mask[:, None]
    else:
        mask = n_mask[:, None] & (offs_w[None, :] < tl.cdiv(K, 8))
    w = tl.load(q_rows + offs_w[None, :], mask=mask, other=0).to(tl.uint32, bitcast=True)
    w = w.reshape(BLOCK_N, BLOCK_K // BLOCK, WORDS_PER_BLOCK)
    mult = _pair_multipliers(s_rows, t, n_mask, G, BLOCK_K, BLOCK, HAS_GLOBAL, BF16, EVEN_K, ASM)
    mult = mult[:, :, None]
    p0, p1, p2, p3 = e2m1_pairs(w, BF16, ASM)
    if ASM:
        q01, q45 = scaled_k_pairs(p0, p1, mult, BF16, not HAS_GLOBAL)
        q23, q67 = scaled_k_pairs(p2, p3, mult, BF16, not HAS_GLOBAL)
        # -- pair i = 2a + b of a word (codes 2i, 2i + 1) at elements 2i and 2i + 1
        pairs = tl.join(tl.join(q01, q45), tl.join(q23, q67))
        pairs = tl.join(pairs, pairs).reshape(BLOCK_N, BLOCK_K)
        return as_halves(pairs, BF16)
    else:
        # -- the same products in float32 (exact), then one exact cast
        if BF16:
            power: tl.constexpr = 1.0 if HAS_GLOBAL else 2.0**126
        else:
            power: tl.constexpr = E2M1_TO_FP16
        m = _pair_floats(mult, BF16)[0] * power
        c0, c4 = _pair_floats(p0, BF16)
        c1, c5 = _pair_floats(p1, BF16)
        c2, c6 = _pair_floats(p2, BF16)
        c3, c7 = _pair_floats(p3, BF16)
        even = tl.join(tl.join(c0 * m, c4 * m), tl.join(c2 * m, c6 * m))
        odd = tl.join(tl.join(c1 * m, c5 * m), tl.join(c3 * m, c7 * m))
        w = tl.join(even, odd).reshape(BLOCK_N, BLOCK_K)
        if BF16:
            return w.to(tl.bfloat16)
        else:
            return w.to(tl.float16)


@triton.jit
def _decoded_words(
    q_rows, t, n_mask, K, BLOCK_K: tl.constexpr, VALUE_BITS: tl.constexpr,
    EXACT: tl.constexpr, ASM: tl.constexpr, EVEN_K: tl.constexpr,
):  # fmt: skip
    """float32 ``(BLOCK_N, BLOCK_K)`` codes of K tile ``t`` from rows of 32-bit words, in K
    order: their values (``EXACT``) or float16 placements (E2M1 times ``2**-14``)."""
    CODES: tl.constexpr = 32 // VALUE_BITS
    WORDS: tl.constexpr = BLOCK_K // CODES
    offs_w = t * WORDS + tl.arange(0, WORDS)
    if EVEN_K:
        mask = n_mask[:, None]
    else:
        mask = n_mask[:, None] & (offs_w[None, :] < tl.cdiv(K, CODES))
    w = tl.load(q_rows + offs_w[None, :], mask=mask, other=0).to(tl.uint32, bitcast=True)
    if VALUE_BITS == 4:
        p0, p1, p2, p3 = e2m1_pairs(w, False, ASM)
        if EXACT:
            c0, c4 = exact_halves(p0, 4, ASM)
            c1, c5 = exact_halves(p1, 4, ASM)
            c2, c6 = exact_halves(p2, 4, ASM)
            c3, c7 = exact_halves(p3, 4, ASM)
        else:
            c0, c4 = halves(p0, ASM)
            c1, c5 = halves(p1, ASM)
            c2, c6 = halves(p2, ASM)
            c3, c7 = halves(p3, ASM)
        # -- code j = 4a + 2b + c sits at join levels (a inner, b middle, c outer)
        even = tl.join(tl.join(c0, c4), tl.join(c2, c6))
        odd = tl.join(tl.join(c1, c5), tl.join(c3, c7))
        codes = tl.join(even, odd)
    else:
        c0, c2 = exact_halves(e4m3_pair(w, 0), 8, ASM)
        c1, c3 = exact_halves(e4m3_pair(w, 1), 8, ASM)
        codes = tl.join(tl.join(c0, c2), tl.join(c1, c3))  # code j = 2a + b
    return tl.reshape(codes, (q_rows.shape[0], BLOCK_K))


@triton.jit
def _weight_tile(
    q_rows, s_rows, t, n_mask, K, G,
    BLOCK: tl.constexpr, VALUE_BITS: tl.constexpr, HAS_GLOBAL: tl.constexpr,
    WORDS: tl.constexpr, ASM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
):  # fmt: skip
    """float32 ``(BLOCK_N, BLOCK_K)``: each code of K tile ``t`` times its block scale.

    Word rows: NVFP4 folds E2M1's ``2**-14`` into its (float32) block scale; the E8M0
    formats take the codes' values from one packed float16 multiply a pair (an E8M0 scale
    times ``2**14`` can overflow float32)."""
    FOLD: tl.constexpr = WORDS and HAS_GLOBAL
    EXACT: tl.constexpr = not HAS_GLOBAL
    if WORDS:
        value = _decoded_words(q_rows, t, n_mask, K, BLOCK_K, VALUE_BITS, EXACT, ASM, EVEN_K)
    elif VALUE_BITS == 4:
        value = load_e2m1_tile(q_rows, t, n_mask, K, BLOCK_N, BLOCK_K)
    else:
        offs_k = t * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = n_mask[:, None] & (offs_k[None, :] < K)
        byte = tl.load(q_rows + offs_k[None, :], mask=mask, other=0)
        value = e4m3_bits_to_float(byte.to(tl.int32))
    mult = _block_multipliers(s_rows, t, n_mask, G, BLOCK_K, BLOCK, HAS_GLOBAL, FOLD, EVEN_K)
    w = value.reshape(BLOCK_N, BLOCK_K // BLOCK, BLOCK) * mult[:, :, None]
    return w.reshape(BLOCK_N, BLOCK_K)


@triton.jit
def _fp4_gemm_kernel(
    x_ptr, q_ptr, s_ptr, g_ptr, b_ptr, out_ptr, ws_ptr, lock_ptr,
    M, N, K, G, stride_xm, stride_qn, stride_sn, stride_om, M_BUCKET,
    BLOCK: tl.constexpr, VALUE_BITS: tl.constexpr, HAS_GLOBAL: tl.constexpr,
    WORDS: tl.constexpr, ASM: tl.constexpr, HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr, PAIRS16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K,  # a runtime value: one binary serves every split factor (fewer compiles)
    SPLIT_TILES: tl.constexpr,  # the split-K tuning: splits reduced by the last of a tile
):  # fmt: skip
    # -- output tile of this program; row bases in int64 (rows times strides may pass 2**31).
    # -- Rows past M read row M - 1 (never stored), so activation loads need no row mask
    offs_m, offs_n, m_mask, n_mask = tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    x_rows = x_ptr + tl.minimum(offs_m, M - 1)[:, None].to(tl.int64) * stride_xm
    q_rows = q_ptr + offs_n[:, None].to(tl.int64) * stride_qn
    s_rows = s_ptr + offs_n[:, None].to(tl.int64) * stride_sn
    t_start, t_end = split_k_run(tl.cdiv(K, BLOCK_K), SPLIT_K)
    BF16: tl.constexpr = x_ptr.dtype.element_ty == tl.bfloat16
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(t_start, t_end):
        offs_k = t * BLOCK_K + tl.arange(0, BLOCK_K)
        if EVEN_K:
            x = tl.load(x_rows + offs_k[None, :])
        else:
            x = tl.load(x_rows + offs_k[None, :], mask=offs_k[None, :] < K, other=0.0)
        # -- the weight tile, each code times its block scale, then the MMA
        if PAIRS16:
            w = _paired_tile(
                q_rows, s_rows, t, n_mask, K, G, BLOCK, HAS_GLOBAL, BF16, EVEN_K, ASM,
                BLOCK_N, BLOCK_K,
            )  # fmt: skip
        else:
            w = _weight_tile(
                q_rows, s_rows, t, n_mask, K, G, BLOCK, VALUE_BITS, HAS_GLOBAL, WORDS, ASM,
                BLOCK_N, BLOCK_K, EVEN_K,
            )  # fmt: skip
        acc = dot_weight_tile(x, w, acc)
    # -- epilogue: NVFP4's global scale (bfloat16 pairs: and the weights' 2**-7), then bias
    # -- and a cast store (by the last split)
    if HAS_GLOBAL:
        if PAIRS16 and BF16:
            acc = acc * 128.0
        acc = acc / tl.load(g_ptr)
    last = SPLIT_K >= 1
    if SPLIT_TILES:
        if SPLIT_K > 1:
            mask = m_mask[:, None] & n_mask[None, :]
            acc, last = sum_split_tiles(acc, ws_ptr, lock_ptr, offs_m, offs_n, mask, M, N, SPLIT_K)
    if last:
        store_tile(acc, out_ptr, b_ptr, offs_m, offs_n, m_mask, n_mask, stride_om, HAS_BIAS, False)


# -- the tiles of the integer weights (dequant_gemm), BLOCK_K a multiple of 32 so every K
# -- tile holds whole blocks; the first of each list is the default (untuned) config
SPLIT_K_CONFIGS = [
    tile_config(bm, bn, bk, sk, warps, 3)
    for bm, bn, bk, warps in (
        (64, 256, 64, 8),
        (64, 128, 64, 4),
        (64, 128, 128, 8),
        (64, 64, 128, 4),
        (32, 256, 64, 8),
        (16, 256, 128, 8),
        (16, 256, 64, 8),
        (16, 64, 128, 4),
    )
    for sk in (4, 1, 2, 8)
]
TILED_CONFIGS = [
    tile_config(128, 128, 64, 1, 8, 3),
    tile_config(128, 128, 32, 1, 4, 4),
    tile_config(64, 128, 64, 1, 4, 4),
    tile_config(128, 64, 64, 1, 4, 4),
    tile_config(64, 64, 64, 1, 4, 4),
    tile_config(128, 256, 64, 1, 8, 3),
    tile_config(256, 32, 64, 1, 4, 4),
    tile_config(128, 64, 128, 1, 4, 3),
]
# -- inline PTX where the kernel is compiled (see ``float_codes.halves``)
ASM = not isinstance(_fp4_gemm_kernel, InterpretedFunction)
_KEY = ["M_BUCKET", "N", "K", "BLOCK", "VALUE_BITS", "WORDS"]
_split_k_tuned = autotuned(_fp4_gemm_kernel, SPLIT_K_CONFIGS, _KEY, prune=prune_to_counters)
_tiled_tuned = autotuned(_fp4_gemm_kernel, TILED_CONFIGS, _KEY)


# -- every tile's BLOCK_K divides it: K a multiple of it drops the kernel's K masks
EVEN_K_TILE = 128


def _pairs16(dtype: torch.dtype, weight: BlockScaledWeight) -> bool:
    """E2M1 weights as 16-bit pairs for the MMA (``_paired_tile``): bfloat16 activations, or
    float16 with NVFP4's E4M3 scales (an E8M0 multiplier has no float16 pair)."""
    if weight.value_bits != 4:
        return False
    return dtype == torch.bfloat16 or (dtype == torch.float16 and weight.global_scale is not None)


def _word_rows(weight_args: dict) -> dict:
    """The weight rows as int32 words where their bytes allow it (``WORDS``), else bytes."""
    q = weight_args["q_ptr"]
    words = q.shape[1] % 4 == 0 and (q.data_ptr() % 4 == 0 or q.device.type == "meta")
    if words:
        w = q.view(torch.int32)
        return {**weight_args, "q_ptr": w, "stride_qn": w.stride(0), "WORDS": True}
    return {**weight_args, "WORDS": False}


def fp4_gemm(
    x: torch.Tensor,
    weight: BlockScaledWeight,
    bias: torch.Tensor | None,
    config: triton.Config | None = None,
    out: torch.Tensor | None = None,
    split_k: bool | None = None,
) -> torch.Tensor:
    """``x (M, K) @ W^T + bias`` -> ``(M, N)`` in ``x.dtype`` (formats in the module docstring).

    ``split_k`` picks the split-K tuning (default: for M up to ``SPLIT_K_MAX_M``), else the
    tiled one; ``config`` runs one explicit config of that tuning instead of autotuning.
    """
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (M, K), got {tuple(x.shape)}")
    m, k = x.shape
    weight.check(k)
    if x.stride(-1) != 1:
        x = x.contiguous()
    n = weight.out_features
    split_k = m <= SPLIT_K_MAX_M if split_k is None else split_k
    out = output(out, (m, n), x.dtype, x.device)
    grid = tile_grid(m, n, split_k, config)
    if split_k:
        ws, locks = split_workspace(SPLIT_K_CONFIGS, config, m, n, torch.float32, x.device)
    else:
        ws = locks = out  # never read by the tiled tuning
    args = dict(x_ptr=x, ws_ptr=ws, lock_ptr=locks, stride_xm=x.stride(0), SPLIT_TILES=split_k)
    even_k = k % EVEN_K_TILE == 0 and (config is None or k % config.kwargs["BLOCK_K"] == 0)
    args.update(ASM=ASM, EVEN_K=even_k)
    args.update(**output_args(out, bias, m, n, k), **_word_rows(weight.kernel_args()))
    args["PAIRS16"] = args["WORDS"] and _pairs16(x.dtype, weight)
    run_kernel(_split_k_tuned if split_k else _tiled_tuned, grid, config, **args)
    return out


# -- dequantize kernel (the large-M path: the reference's weight once, then cuBLAS)


@triton.jit
def _dequantize_kernel(
    q_ptr, s_ptr, g_ptr, w_ptr, N, K, G, stride_qn, stride_sn, stride_wn,
    BLOCK: tl.constexpr, VALUE_BITS: tl.constexpr, HAS_GLOBAL: tl.constexpr,
    WORDS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # -- tile of the (N, K) weight owned by this program: the reference's values
    # -- (code times scale / global, rounded once to w's dtype)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    n = offs_n[:, None].to(tl.int64)
    n_mask = offs_n < N
    q_rows = q_ptr + n * stride_qn
    s_rows = s_ptr + n * stride_sn
    if VALUE_BITS == 4:
        value = load_e2m1_tile(q_rows, tl.program_id(1), n_mask, K, BLOCK_N, BLOCK_K)
    else:
        mask = n_mask[:, None] & (offs_k[None, :] < K)
        value = e4m3_bits_to_float(
            tl.load(q_rows + offs_k[None, :], mask=mask, other=0).to(tl.int32)
        )
    mult = _block_multipliers(
        s_rows, tl.program_id(1), n_mask, G, BLOCK_K, BLOCK, HAS_GLOBAL, False
    )
    if HAS_GLOBAL:
        mult = tl.div_rn(mult, tl.load(g_ptr))  # -- the reference's multiplier, per block
    w = value.reshape(BLOCK_N, BLOCK_K // BLOCK, BLOCK) * mult[:, :, None]
    w = w.reshape(BLOCK_N, BLOCK_K)
    mask = n_mask[:, None] & (offs_k[None, :] < K)
    tl.store(w_ptr + n * stride_wn + offs_k[None, :], w.to(w_ptr.dtype.element_ty), mask=mask)


_DEQUANT_CONFIGS = [
    triton.Config({"BLOCK_N": 32, "BLOCK_K": 256}, num_warps=4),
    triton.Config({"BLOCK_N": 64, "BLOCK_K": 128}, num_warps=4),
    triton.Config({"BLOCK_N": 16, "BLOCK_K": 512}, num_warps=8),
]
_dequantize_tuned = autotuned(
    _dequantize_kernel, _DEQUANT_CONFIGS, key=["N", "K", "BLOCK", "VALUE_BITS"]
)


def dequantize_block_scaled(
    weight: BlockScaledWeight,
    k: int,
    dtype: torch.dtype = torch.bfloat16,
    config: triton.Config | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense ``(N, K)`` weight in ``dtype``: the reference's values, rounded once."""
    weight.check(k)
    n = weight.out_features
    w = output(out, (n, k), dtype, weight.qweight.device)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(k, meta["BLOCK_K"]))

    args = {**weight.kernel_args(), "WORDS": False}
    run_kernel(_dequantize_tuned, grid, config, w_ptr=w, N=n, K=k, stride_wn=w.stride(0), **args)
    return w
