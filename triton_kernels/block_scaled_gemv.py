"""Weight-only GEMV of block-scaled float weights (NVFP4, MXFP4, MXFP8) for decode (M = 1).

``x (M, K)`` fp32/bf16/fp16 times a :class:`.BlockScaledWeight` ``(N, K)``, accumulated in
float32 on CUDA cores, built as the 4-bit integer GEMV (``dequant_gemv``): the grid is
``(N / BLOCK_N, SPLIT_K, M)``, each thread owns whole weight rows and reduces along K
itself (16-byte loads of 32 E2M1 or 16 E4M3 codes a row, no cross-thread reduction in the
loop), and split K slices meet in the last program of a tile (one launch per call, safe
under CUDA-graph capture; see ``dequant_gemv.finish_rows``).

Each pair of codes of a 32-bit word becomes a float16 pair by bit moves
(:mod:`.float_codes`; E2M1: :func:`.e2m1_pairs`, 11 instructions a word), each float16 one
conversion to float32 and one FMA with its activation into the block's partial sum; the
block's scale (with the float16 placement's power of two folded in) multiplies that sum
once per block and row, and NVFP4's global scale divides each output once.  NVFP4 scale
rows that are 4-byte aligned are read a word (4 blocks) at a time, and rows past N read row
N - 1 (never stored), so the loop's loads carry no masks.  K must be a multiple of 32
(no partial block: other shapes run the tiled GEMM).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from ._launch import autotuned, interpreting, output, output_args, run_kernel
from ._tiles import LOCKS, split_k_locks, split_k_run
from .block_scaled_weight import BlockScaledWeight
from .dequant_gemv import MAX_SPLIT_K, activations8, finish_rows, quarters
from .float_codes import E2M1_TO_FP16, E4M3_TO_FP16, e2m1_pairs, e4m3_pair, e8m0_folded, halves


@triton.jit
def _accumulate8(part, c0, c1, c2, c3, c4, c5, c6, c7, x_row, k, X_BF16: tl.constexpr):
    """``part + sum(c_i * x[k + i])``: the eight decoded codes times their activations."""
    x0, x1, x2, x3, x4, x5, x6, x7 = activations8(x_row, k, X_BF16)
    part += c0 * x0
    part += c1 * x1
    part += c2 * x2
    part += c3 * x3
    part += c4 * x4
    part += c5 * x5
    part += c6 * x6
    return part + c7 * x7


@triton.jit
def _dot_e2m1(w, x_row, k, part, X_BF16: tl.constexpr, ASM: tl.constexpr):
    """``part + sum(code * 2**-14 * x)`` over the 8 E2M1 codes of ``w`` (x[k : k + 8])."""
    p0, p1, p2, p3 = e2m1_pairs(w, False, ASM)
    c0, c4 = halves(p0, ASM)
    c1, c5 = halves(p1, ASM)
    c2, c6 = halves(p2, ASM)
    c3, c7 = halves(p3, ASM)
    return _accumulate8(part, c0, c1, c2, c3, c4, c5, c6, c7, x_row, k, X_BF16)


@triton.jit
def _dot_e4m3(w_lo, w_hi, x_row, k, part, X_BF16: tl.constexpr, ASM: tl.constexpr):
    """``part + sum(code * 2**-8 * x)`` over the 8 E4M3 codes of ``w_lo, w_hi`` (x[k : k + 8])."""
    c0, c2 = halves(e4m3_pair(w_lo, 0), ASM)
    c1, c3 = halves(e4m3_pair(w_lo, 1), ASM)
    c4, c6 = halves(e4m3_pair(w_hi, 0), ASM)
    c5, c7 = halves(e4m3_pair(w_hi, 1), ASM)
    return _accumulate8(part, c0, c1, c2, c3, c4, c5, c6, c7, x_row, k, X_BF16)


@triton.jit
def _close_block(
    part, acc, s_step, s_words, UNIT: tl.constexpr, BLOCK: tl.constexpr,
    VALUE_BITS: tl.constexpr, HAS_GLOBAL: tl.constexpr, WORD_SCALES: tl.constexpr,
    ASM: tl.constexpr,
):  # fmt: skip
    """After 8-code unit ``UNIT`` of the step (``s_step``: the step's first block scale of
    each row; ``WORD_SCALES``: the step's scales as the words ``s_words``, 4 a word): where
    a block ends, ``acc += part * multiplier`` and a fresh ``part``."""
    UNITS_PER_BLOCK: tl.constexpr = BLOCK // 8
    if (UNIT + 1) % UNITS_PER_BLOCK == 0:
        b: tl.constexpr = UNIT // UNITS_PER_BLOCK
        if WORD_SCALES:
            w0, w1 = s_words
            word = w0 if b < 4 else w1
            if HAS_GLOBAL:
                # -- bytes j and j + 2 of a word decode as one pair (shared by both blocks)
                lo, hi = halves(e4m3_pair(word, b % 2), ASM)
                acc += part * (lo if b % 4 < 2 else hi)
            else:
                e = ((word >> (8 * (b % 4))) & 0xFF).to(tl.int32)
                mult, post = e8m0_folded(e, 14 if VALUE_BITS == 4 else 8)
                acc += (part * post) * mult
        else:
            # -- loaded (BLOCK_N, 1) in the words' layout: the sum over one element drops
            # -- the axis without a layout conversion; the block's offset is a constant
            s = tl.load(s_step + b)
            s = tl.sum(s.to(tl.int32), axis=1)
            if HAS_GLOBAL:
                # -- E4M3 bits in a float16 are the scale times 2**-8: acc is kept in units
                # -- of 2**-22 (with E2M1's 2**-14), restored once at the end
                half = (((s & 0x80) << 8) | ((s & 0x7F) << 7)).to(tl.int16)
                acc += part * half.to(tl.float16, bitcast=True).to(tl.float32)
            else:
                mult, post = e8m0_folded(s, 14 if VALUE_BITS == 4 else 8)
                acc += (part * post) * mult
        part = tl.zeros_like(part)
    return part, acc


@triton.jit
def _scale_words(s_step, WORD_SCALES: tl.constexpr, BLOCKS: tl.constexpr):
    """The step's ``BLOCKS`` scale bytes of each row as one or two uint32 words (the second
    the first again when there is one), read once a step where ``WORD_SCALES``."""
    words = s_step.to(tl.pointer_type(tl.int32), bitcast=True)
    if WORD_SCALES:
        w0 = tl.sum(tl.load(words), axis=1).to(tl.uint32, bitcast=True)
        if BLOCKS > 4:
            w1 = tl.sum(tl.load(words + 1), axis=1).to(tl.uint32, bitcast=True)
        else:
            w1 = w0
    else:
        w0 = tl.zeros((s_step.shape[0],), dtype=tl.uint32)
        w1 = w0
    return w0, w1


@triton.jit
def _block_scaled_gemv_kernel(
    x_ptr, q_ptr, s_ptr, g_ptr, b_ptr, out_ptr, ws_ptr, lock_ptr,
    M, N, K, G, stride_xm, stride_qn, stride_sn, stride_om, M_BUCKET,
    BLOCK: tl.constexpr, VALUE_BITS: tl.constexpr, HAS_GLOBAL: tl.constexpr,
    HAS_BIAS: tl.constexpr, X_BF16: tl.constexpr, ASM: tl.constexpr, S_WORDS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K,  # a runtime value: one binary serves every split factor (fewer compiles)
):  # fmt: skip
    # -- this program's BLOCK_N weight rows (one thread each), row m of x, run of K steps;
    # -- q_ptr: the rows as int32 words (stride_qn in words), row offsets in int64.  Rows
    # -- past N read row N - 1 (never stored): the loop's loads need no mask, whose
    # -- predicates and zero fills cost as much as the scales' own decode
    pid_n = tl.program_id(0)
    m = tl.program_id(2)
    x_row = x_ptr + m.to(tl.int64) * stride_xm
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    read_n = tl.minimum(offs_n, N - 1)[:, None].to(tl.int64)
    rows = q_ptr + read_n * stride_qn
    s_rows = s_ptr + read_n * stride_sn
    CODES_PER_LOAD: tl.constexpr = 128 // VALUE_BITS  # one 16-byte load: 4 words a row
    LOADS: tl.constexpr = BLOCK_K // CODES_PER_LOAD
    t_start, t_end = split_k_run(K // BLOCK_K, SPLIT_K)
    # -- NVFP4: whole words of scales a step (4-byte aligned rows), one load each, not one a
    # -- block (E8M0 bytes gain 7 instructions a trip from it and spill past 128 registers)
    WORD_SCALES: tl.constexpr = S_WORDS and HAS_GLOBAL and (BLOCK_K // BLOCK) % 4 == 0
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    part = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for t in range(t_start, t_end):
        s_step = s_rows + t * (BLOCK_K // BLOCK)
        s_words = _scale_words(s_step, WORD_SCALES, BLOCK_K // BLOCK)
        for u in tl.static_range(LOADS):
            offs_w = t * (BLOCK_K * VALUE_BITS // 32) + u * 4 + tl.arange(0, 4)[None, :]
            words = tl.load(rows + offs_w)
            w0, w1, w2, w3 = quarters(words.to(tl.uint32, bitcast=True))
            k = t * BLOCK_K + u * CODES_PER_LOAD
            if VALUE_BITS == 4:
                # -- 4 words of 8 codes: one unit each
                part = _dot_e2m1(w0, x_row, k, part, X_BF16, ASM)
                part, acc = _close_block(
                    part,
                    acc,
                    s_step,
                    s_words,
                    u * 4,
                    BLOCK,
                    VALUE_BITS,
                    HAS_GLOBAL,
                    WORD_SCALES,
                    ASM,
                )
                part = _dot_e2m1(w1, x_row, k + 8, part, X_BF16, ASM)
                part, acc = _close_block(
                    part,
                    acc,
                    s_step,
                    s_words,
                    u * 4 + 1,
                    BLOCK,
                    VALUE_BITS,
                    HAS_GLOBAL,
                    WORD_SCALES,
                    ASM,
                )
                part = _dot_e2m1(w2, x_row, k + 16, part, X_BF16, ASM)
                part, acc = _close_block(
                    part,
                    acc,
                    s_step,
                    s_words,
                    u * 4 + 2,
                    BLOCK,
                    VALUE_BITS,
                    HAS_GLOBAL,
                    WORD_SCALES,
                    ASM,
                )
                part = _dot_e2m1(w3, x_row, k + 24, part, X_BF16, ASM)
                part, acc = _close_block(
                    part,
                    acc,
                    s_step,
                    s_words,
                    u * 4 + 3,
                    BLOCK,
                    VALUE_BITS,
                    HAS_GLOBAL,
                    WORD_SCALES,
                    ASM,
                )
            else:
                # -- 4 words of 4 codes: two units
                part = _dot_e4m3(w0, w1, x_row, k, part, X_BF16, ASM)
                part, acc = _close_block(
                    part,
                    acc,
                    s_step,
                    s_words,
                    u * 2,
                    BLOCK,
                    VALUE_BITS,
                    HAS_GLOBAL,
                    WORD_SCALES,
                    ASM,
                )
                part = _dot_e4m3(w2, w3, x_row, k + 8, part, X_BF16, ASM)
                part, acc = _close_block(
                    part,
                    acc,
                    s_step,
                    s_words,
                    u * 2 + 1,
                    BLOCK,
                    VALUE_BITS,
                    HAS_GLOBAL,
                    WORD_SCALES,
                    ASM,
                )
    if HAS_GLOBAL:
        # -- NVFP4: the units of acc, then the global scale, once per output
        acc = acc * (E4M3_TO_FP16 * E2M1_TO_FP16) / tl.load(g_ptr)
    finish_rows(
        acc, offs_n, n_mask, m, N, out_ptr, stride_om, b_ptr, ws_ptr, lock_ptr, HAS_BIAS, SPLIT_K
    )


# -- configs (next to the kernel they tune) and launcher


def _configs() -> list[triton.Config]:
    """One thread per row: BLOCK_N rows per program, BLOCK_K codes per step (whole blocks).

    Split 8 comes first: the default (untuned) config for a long K, enough programs to
    occupy every SM at N = 8192 (a short K prunes it)."""
    configs = []
    for block_n, block_k, warps in ((512, 128, 4), (256, 128, 4), (512, 64, 4), (256, 32, 4)):
        for split_k in (8, 1, 2, 4, 16, 32):
            meta = {"BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split_k}
            configs.append(triton.Config(meta, num_warps=warps, num_stages=1))
    return configs


def _runs(config: triton.Config, args: dict) -> bool:
    """K steps of whole 16-byte loads dividing K, at least one a split, counters enough."""
    bk, split = config.kwargs["BLOCK_K"], config.kwargs["SPLIT_K"]
    if args["K"] % bk or bk * args["VALUE_BITS"] < 128 or split > args["K"] // bk:
        return False
    return split == 1 or triton.cdiv(args["N"], config.kwargs["BLOCK_N"]) * args["M"] <= LOCKS


def _fits(config: triton.Config, args: dict) -> bool:
    """The autotuner's candidates: configs that run, with at least two K steps a split."""
    split = config.kwargs["SPLIT_K"]
    return _runs(config, args) and split <= max(1, args["K"] // config.kwargs["BLOCK_K"] // 2)


def _prune(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    kept = [c for c in configs if _fits(c, args)]
    return kept or [c for c in configs if c.kwargs["SPLIT_K"] == 1][-1:]


# -- inline PTX where the kernel is compiled (read from how Triton built it, not from
# -- ``interpreting()``, which compile-only tools set to pass CPU tensors to the launchers)
ASM = not isinstance(_block_scaled_gemv_kernel, InterpretedFunction)
_KEY = ["M_BUCKET", "N", "K", "BLOCK", "VALUE_BITS"]
_gemv_tuned = autotuned(_block_scaled_gemv_kernel, _configs(), _KEY, prune=_prune)


def _word_aligned(scales: torch.Tensor) -> bool:
    """Rows of scale bytes readable as 32-bit words (4-byte aligned starts)."""
    aligned = scales.data_ptr() % 4 == 0 or scales.device.type == "meta"
    return aligned and scales.stride(0) % 4 == 0


def gemv_eligible(x: torch.Tensor, weight: BlockScaledWeight) -> bool:
    """True when the GEMV applies: K a multiple of 32 and 16-byte aligned rows of codes and
    activations (else the tiled GEMM runs)."""
    k = x.shape[1]
    q = weight.qweight
    return (
        k % 32 == 0
        and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
        and q.stride(0) * q.element_size() % 16 == 0
        and ((q.data_ptr() % 16 == 0 and x.data_ptr() % 16 == 0) or x.device.type == "meta")
        and (x.shape[0] == 1 or x.stride(0) % 8 == 0)
    )


def block_scaled_gemv(
    x: torch.Tensor,
    weight: BlockScaledWeight,
    bias: torch.Tensor | None,
    config: triton.Config | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x (M, K) @ W^T + bias`` -> ``(M, N)`` in ``x.dtype`` (meant for M = 1).

    ``config`` runs one explicit config instead of autotuning.  Raises ValueError where
    :func:`gemv_eligible` is false.
    """
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (M, K), got {tuple(x.shape)}")
    m, k = x.shape
    weight.check(k)
    if x.stride(-1) != 1:
        x = x.contiguous()
    if not gemv_eligible(x, weight):
        raise ValueError(
            f"the block-scaled GEMV needs K a multiple of 32 and 16-byte aligned rows, got K={k}"
        )
    n = weight.out_features
    out = output(out, (m, n), x.dtype, x.device)
    args = weight.kernel_args()
    words = args["q_ptr"].view(torch.int32)  # -- the rows as 32-bit words
    args.update(q_ptr=words, stride_qn=words.stride(0))
    if config is not None and not _runs(config, {**args, "M": m, "N": n, "K": k}):
        raise ValueError(
            f"config {config} does not fit K={k} (BLOCK_K must divide it, SPLIT_K at most "
            "K / BLOCK_K)"
        )
    ws = torch.empty((MAX_SPLIT_K, m, n), dtype=torch.float32, device=x.device)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"], m)

    launch = dict(
        x_ptr=x,
        ws_ptr=ws,
        lock_ptr=split_k_locks(x.device),
        stride_xm=x.stride(0),
        X_BF16=x.dtype == torch.bfloat16,
        ASM=ASM,
        S_WORDS=_word_aligned(weight.scales),
        **output_args(out, bias, m, n, k),
        **args,
    )
    if config is None and interpreting() and x.device.type == "cpu":
        # the interpreter times nothing and runs one config: the first that fits
        config = next(c for c in _gemv_tuned.configs if _fits(c, {**launch}))
    run_kernel(_gemv_tuned, grid, config, **launch)
    return out
