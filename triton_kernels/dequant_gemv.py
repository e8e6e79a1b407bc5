"""Weight-only GEMV for decode (M = 1): stream the quantized weight once, one launch per call.

``x (M, K)`` fp32/bf16/fp16 times the dequantized weight ``(N, K)`` (formats in
:mod:`.weight`), accumulated in float32 on CUDA cores (one row of activations cannot
fill an MMA tile).  The grid is ``(N / BLOCK_N, SPLIT_K, M)``: each program reduces one
K slice of ``BLOCK_N`` weight rows for one row of ``x``.  With ``SPLIT_K > 1`` every
program writes its float32 partial sums to a workspace and bumps a per-tile counter;
the last program of a tile adds the partials in split order, adds the bias, casts,
stores the output and resets the counter to zero.  So a call is one launch (no
zero-fill of an atomic buffer, no cast-copy), deterministic, and safe to capture in a
CUDA graph (the counters are zero between calls).  The counters are per device: split
GEMVs must not run concurrently on two streams of one device.

Two kernels share that epilogue:

* ``_gemv_w4_kernel`` -- 4-bit packed codes whose K steps lie inside one group (the
  common W4 layouts).  Each thread owns whole weight rows and reduces along K itself:
  no cross-thread reduction or layout conversion inside the loop.  A code becomes a
  float with one ``LOP3`` (the magic-number trick: ``bits(c << p | 0x4B000000)`` is
  ``2**23 + c * 2**p``, and subtracting ``2**23 + z * 2**p`` leaves ``(c - z) * 2**p``
  exactly), one ``FADD`` and one ``FFMA`` into the accumulator of its bit position
  ``p``; the powers of two and the scale are applied once per K step and row
  (``s * sum_p 2**-p * acc_p``), as in ``s * sum((c - z) * x)``.
* ``_gemv_kernel`` -- every other format (INT2-8 with any group, 8-bit storage, FP8):
  a ``(BLOCK_N, BLOCK_K)`` tile per step, scales applied per tile when the tile lies
  in one group (``s * (sum(x*c) - z*sum(x))``), else per weight.

(With the factoring an infinite activation meeting a zero code gives NaN where the
unfactored product gives +-Inf: the row is non-finite either way.)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._launch import autotuned, interpreting, output, output_args, run_kernel
from ._tiles import LOCKS, split_k_locks, split_k_run
from .dequant import MAGIC, group_index, load_code_tile, load_qparams
from .weight import PACKED_DTYPES, QuantWeight

MAX_SPLIT_K = 32


# -- the split-K epilogue shared by both kernels


@triton.jit
def finish_rows(
    acc,
    offs_n,
    n_mask,
    m,
    N,
    out_ptr,
    stride_om,
    b_ptr,
    ws_ptr,
    lock_ptr,
    HAS_BIAS: tl.constexpr,
    SPLIT_K,
):
    """Store ``acc (BLOCK_N,)`` of row ``m``: directly, or via the last split of the tile."""
    out_row = out_ptr + m.to(tl.int64) * stride_om
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(out_row + offs_n, acc.to(out_ptr.dtype.element_ty), mask=n_mask)
    else:
        # -- publish this split's partial sums, then count the splits that are done
        pid_k = tl.program_id(1)
        rows = m.to(tl.int64) * N + offs_n
        plane = tl.num_programs(2).to(tl.int64) * N  # one (M, N) plane per split
        tl.store(ws_ptr + pid_k * plane + rows, acc, mask=n_mask)
        tl.debug_barrier()  # every thread's stores precede the release below
        lock = lock_ptr + m * tl.num_programs(0) + tl.program_id(0)
        done = tl.atomic_add(lock, 1, sem="acq_rel")
        if done == SPLIT_K - 1:
            # -- the last split: sum the partials in split order, bias, cast, reset
            total = tl.zeros_like(acc)
            for s in range(0, SPLIT_K):
                part = ws_ptr + s * plane + rows
                total += tl.load(part, mask=n_mask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            tl.store(out_row + offs_n, total.to(out_ptr.dtype.element_ty), mask=n_mask)
            tl.atomic_xchg(lock, 0, sem="relaxed")


# -- grouped calls (mixture of experts): output row m is a slot, weights stacked by expert


class SlotExperts(NamedTuple):
    """Routing of a grouped call: output row ``s`` is slot ``s``, computed with expert
    ``expert_of_slot[s]``'s slice of the weight stacked along a leading expert dimension
    (``E``: routed to none, the row is zero), from ``x`` row ``s // slots_per_row``, times
    ``routing_weights[s]`` when given."""

    expert_of_slot: torch.Tensor
    routing_weights: torch.Tensor | None
    slots_per_row: int


@triton.jit
def _slot_rows(
    q_ptr,
    s_ptr,
    z_ptr,
    x_ptr,
    e_ptr,
    m,
    stride_xm,
    stride_qe,
    stride_se,
    stride_ze,
    NUM_EXPERTS,
    SLOTS_PER_ROW: tl.constexpr,
    GROUPED: tl.constexpr,
):
    """Weight and activation bases of output row ``m``, and whether it is routed."""
    if GROUPED:
        expert = tl.load(e_ptr + m).to(tl.int32)
        e = tl.minimum(expert, NUM_EXPERTS - 1).to(tl.int64)
        x_row = x_ptr + (m // SLOTS_PER_ROW).to(tl.int64) * stride_xm
        return q_ptr + e * stride_qe, s_ptr + e * stride_se, z_ptr + e * stride_ze, x_row, expert
    else:
        return q_ptr, s_ptr, z_ptr, x_ptr + m.to(tl.int64) * stride_xm, 0


# -- 4-bit codes, one thread per weight row


@triton.jit
def quarters(v):
    """The four ``(...)`` slices of ``v (..., 4)`` along its last axis (no data movement)."""
    a, b = tl.split(tl.reshape(v, v.shape[:-1] + (2, 2)))
    v0, v2 = tl.split(a)
    v1, v3 = tl.split(b)
    return v0, v1, v2, v3


@triton.jit
def _pair(p):
    """Two bf16 values packed in an int32 (low first) as float32: exact bit moves."""
    p = p.to(tl.uint32, bitcast=True)
    return (p << 16).to(tl.float32, bitcast=True), (p & 0xFFFF0000).to(tl.float32, bitcast=True)


@triton.jit
def activations8(x_row, k, X_BF16: tl.constexpr):
    """The eight float32 activations ``x[k : k + 8]`` as scalars (one vector load)."""
    if X_BF16:
        pairs = x_row.to(tl.pointer_type(tl.int32), bitcast=True) + k // 2
        p0, p1, p2, p3 = quarters(tl.load(pairs + tl.arange(0, 4)))
        x0, x1 = _pair(p0)
        x2, x3 = _pair(p1)
        x4, x5 = _pair(p2)
        x6, x7 = _pair(p3)
    else:
        v = tl.reshape(tl.load(x_row + k + tl.arange(0, 8)).to(tl.float32), (2, 4))
        lo, hi = tl.split(tl.permute(v, (1, 0)))  # x[k:k+4], x[k+4:k+8]
        x0, x1, x2, x3 = quarters(lo)
        x4, x5, x6, x7 = quarters(hi)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _dot_word(w, magic, x_row, k, a0, a1, a2, a3, a4, m0, m1, m2, m3, m4, X_BF16: tl.constexpr):
    """Accumulate the 8 codes of ``w (BLOCK_N,)`` (x[k : k+8]) into the position sums.

    Codes 0-4 sit at bits 0, 4, 8, 12, 16 of ``w`` and codes 5-7 at bits 4, 8, 12 of
    ``w >> 16`` (no code needs bit 23 and up), so each is one LOP3 from the float
    ``2**23 + c * 2**p``; ``m_p = 2**23 + z * 2**p``.
    ``magic`` is a runtime value so that ptxas keeps it in a register.
    """
    x0, x1, x2, x3, x4, x5, x6, x7 = activations8(x_row, k, X_BF16)
    h = w >> 16
    a0 += (((w & 0xF) | magic).to(tl.float32, bitcast=True) - m0) * x0
    a1 += (((w & 0xF0) | magic).to(tl.float32, bitcast=True) - m1) * x1
    a2 += (((w & 0xF00) | magic).to(tl.float32, bitcast=True) - m2) * x2
    a3 += (((w & 0xF000) | magic).to(tl.float32, bitcast=True) - m3) * x3
    a4 += (((w & 0xF0000) | magic).to(tl.float32, bitcast=True) - m4) * x4
    a1 += (((h & 0xF0) | magic).to(tl.float32, bitcast=True) - m1) * x5
    a2 += (((h & 0xF00) | magic).to(tl.float32, bitcast=True) - m2) * x6
    a3 += (((h & 0xF000) | magic).to(tl.float32, bitcast=True) - m3) * x7
    return a0, a1, a2, a3, a4


@triton.jit
def _gemv_w4_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    z_ptr,
    b_ptr,
    out_ptr,
    ws_ptr,
    lock_ptr,
    magic,
    M,
    N,
    K,
    stride_xm,
    stride_qn,
    stride_sn,
    stride_zn,
    stride_om,
    e_ptr,
    rw_ptr,
    stride_qe,
    stride_se,
    stride_ze,
    NUM_EXPERTS,
    M_BUCKET,
    BITS: tl.constexpr,
    PACKED: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    X_BF16: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUPED: tl.constexpr,
    ROUTED_WEIGHTS: tl.constexpr,
    SLOTS_PER_ROW: tl.constexpr,
    SPLIT_K,  # a runtime value: one binary serves every split factor (fewer compiles)
):
    # -- this program's BLOCK_N weight rows (one thread each), row m of x, run of K steps
    # (row offsets in int64: N * row stride may pass 2**31 elements)
    pid_n = tl.program_id(0)
    m = tl.program_id(2)
    q_ptr, s_ptr, z_ptr, x_row, expert = _slot_rows(
        q_ptr, s_ptr, z_ptr, x_ptr, e_ptr, m, stride_xm, stride_qe, stride_se, stride_ze,
        NUM_EXPERTS, SLOTS_PER_ROW, GROUPED,
    )  # fmt: skip
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    rows = q_ptr + offs_n[:, None].to(tl.int64) * stride_qn
    s_rows = s_ptr + offs_n[:, None] * stride_sn
    z_rows = z_ptr + offs_n[:, None] * stride_zn
    magic = magic.to(tl.uint32, bitcast=True)
    STEP_WORDS: tl.constexpr = BLOCK_K // 8
    t_start, t_end = split_k_run(K // BLOCK_K, SPLIT_K)
    if GROUPED:
        t_end = tl.where(expert < NUM_EXPERTS, t_end, t_start)  # unrouted: no steps, zeros
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for t in range(t_start, t_end):
        # -- the step's qparams, loaded (BLOCK_N, 1) in the words' layout (a sum over one
        # element drops the axis without a layout conversion); m_p = 2**23 + z * 2**p
        g = group_index(t * BLOCK_K, GROUP_SIZE)
        scale, zero = load_qparams(s_rows, z_rows, g, n_mask[:, None], BITS, PACKED, HAS_ZEROS)
        scale = tl.sum(scale, axis=1)
        zero = tl.sum(zero, axis=1)
        m0 = zero + 8388608.0
        m1 = zero * 16.0 + 8388608.0
        m2 = zero * 256.0 + 8388608.0
        m3 = zero * 4096.0 + 8388608.0
        m4 = zero * 65536.0 + 8388608.0
        a0 = tl.zeros((BLOCK_N,), dtype=tl.float32)
        a1 = tl.zeros((BLOCK_N,), dtype=tl.float32)
        a2 = tl.zeros((BLOCK_N,), dtype=tl.float32)
        a3 = tl.zeros((BLOCK_N,), dtype=tl.float32)
        a4 = tl.zeros((BLOCK_N,), dtype=tl.float32)
        # -- 16-byte loads of 4 words (32 codes) per row, each word reduced in-thread
        for u in tl.static_range(STEP_WORDS // 4):
            offs_w = t * STEP_WORDS + u * 4 + tl.arange(0, 4)[None, :]
            words = tl.load(rows + offs_w, mask=n_mask[:, None], other=0).to(
                tl.uint32, bitcast=True
            )
            w0, w1, w2, w3 = quarters(words)
            k = t * BLOCK_K + u * 32
            a0, a1, a2, a3, a4 = _dot_word(
                w0, magic, x_row, k, a0, a1, a2, a3, a4, m0, m1, m2, m3, m4, X_BF16
            )
            a0, a1, a2, a3, a4 = _dot_word(
                w1, magic, x_row, k + 8, a0, a1, a2, a3, a4, m0, m1, m2, m3, m4, X_BF16
            )
            a0, a1, a2, a3, a4 = _dot_word(
                w2, magic, x_row, k + 16, a0, a1, a2, a3, a4, m0, m1, m2, m3, m4, X_BF16
            )
            a0, a1, a2, a3, a4 = _dot_word(
                w3, magic, x_row, k + 24, a0, a1, a2, a3, a4, m0, m1, m2, m3, m4, X_BF16
            )
        # -- undo the bit positions, then the scale: once per step and row
        dot = a0 + a1 * 0.0625 + a2 * 0.00390625 + a3 * 0.000244140625 + a4 * 0.0000152587890625
        acc += scale * dot
    if ROUTED_WEIGHTS:
        acc *= tl.load(rw_ptr + m).to(tl.float32)
    finish_rows(
        acc, offs_n, n_mask, m, N, out_ptr, stride_om, b_ptr, ws_ptr, lock_ptr, HAS_BIAS, SPLIT_K
    )


# -- every other format: (BLOCK_N, BLOCK_K) tiles


@triton.jit
def _gemv_kernel(
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
    e_ptr,
    rw_ptr,
    stride_qe,
    stride_se,
    stride_ze,
    NUM_EXPERTS,
    M_BUCKET,
    BITS: tl.constexpr,
    PACKED: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUPED: tl.constexpr,
    ROUTED_WEIGHTS: tl.constexpr,
    SLOTS_PER_ROW: tl.constexpr,
    SPLIT_K,
):
    pid_n = tl.program_id(0)
    m = tl.program_id(2)
    # -- the BLOCK_N weight rows and the run of K tiles owned by this program
    # (row offsets in int64: N * row stride may pass 2**31 elements)
    q_ptr, s_ptr, z_ptr, x_row, expert = _slot_rows(
        q_ptr, s_ptr, z_ptr, x_ptr, e_ptr, m, stride_xm, stride_qe, stride_se, stride_ze,
        NUM_EXPERTS, SLOTS_PER_ROW, GROUPED,
    )  # fmt: skip
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    rows = q_ptr + offs_n[:, None].to(tl.int64) * stride_qn
    s_rows = s_ptr + offs_n * stride_sn
    z_rows = z_ptr + offs_n * stride_zn
    t_start, t_end = split_k_run(tl.cdiv(K, BLOCK_K), SPLIT_K)
    if GROUPED:
        t_end = tl.where(expert < NUM_EXPERTS, t_end, t_start)  # unrouted: no steps, zeros
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
    if ROUTED_WEIGHTS:
        acc *= tl.load(rw_ptr + m).to(tl.float32)
    finish_rows(
        acc, offs_n, n_mask, m, N, out_ptr, stride_om, b_ptr, ws_ptr, lock_ptr, HAS_BIAS, SPLIT_K
    )


# -- configs (next to the kernels they tune) and launcher


def _w4_configs() -> list[triton.Config]:
    """One thread per row: BLOCK_N = rows per program; BLOCK_K = codes per step (in a group).

    Split 8 comes first: the default (untuned) config for a long K, enough programs to
    occupy every SM at N = 8192 (short K prunes it and falls to split 1)."""
    configs = []
    for block_n, block_k, warps in ((512, 128, 4), (256, 128, 4), (512, 64, 4), (256, 32, 4)):
        for split_k in (8, 1, 2, 4, 16, 32):
            configs.append(
                triton.Config(
                    {"BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split_k},
                    num_warps=warps,
                    num_stages=1,
                )
            )
    return configs


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


def _fits(config: triton.Config, args: dict, w4: bool) -> bool:
    """Splits that have work and fit the counters; K steps inside one group."""
    group, k, bk = args["GROUP_SIZE"], args["K"], config.kwargs["BLOCK_K"]
    split = config.kwargs["SPLIT_K"]
    tiles = triton.cdiv(args["N"], config.kwargs["BLOCK_N"]) * args["M"]
    if w4 and (k % bk or (group and group % bk)):
        return False
    if split > 1 and tiles > LOCKS:
        return False
    return (group == 0 or group % bk == 0) and split <= max(1, triton.cdiv(k, bk) // 2)


def _prune(w4: bool):
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        kept = [c for c in configs if _fits(c, args, w4)]
        return kept or [c for c in configs if c.kwargs["SPLIT_K"] == 1][:1]

    return prune


_KEY = ["M_BUCKET", "N", "K", "BITS", "GROUP_SIZE", "PACKED", "HAS_ZEROS"]
_gemv_tuned = autotuned(_gemv_w4_kernel, _w4_configs(), _KEY, prune=_prune(True))
_gemv_tiles_tuned = autotuned(_gemv_kernel, _gemv_configs(), _KEY, prune=_prune(False))


def w4_eligible(x: torch.Tensor, qweight: torch.Tensor, bits: int, group: int) -> bool:
    """True when the one-thread-per-row 4-bit kernel applies (else the tiled one runs)."""
    k = x.shape[1]
    return (
        bits == 4
        and qweight.dtype in PACKED_DTYPES
        and k % 32 == 0
        and (group == 0 or (group % 32 == 0 and k % group == 0))
        and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
        and (x.data_ptr() % 16 == 0 or x.device.type == "meta")
        and (x.shape[0] == 1 or x.stride(0) % 8 == 0)
    )


def _slot_args(slots: SlotExperts | None, stacked: QuantWeight, out: torch.Tensor) -> dict:
    if slots is None:
        return dict(
            e_ptr=out, rw_ptr=out, stride_qe=0, stride_se=0, stride_ze=0, NUM_EXPERTS=1,
            GROUPED=False, ROUTED_WEIGHTS=False, SLOTS_PER_ROW=1,
        )  # fmt: skip
    rw = slots.routing_weights
    return dict(
        e_ptr=slots.expert_of_slot,
        rw_ptr=rw if rw is not None else out,
        NUM_EXPERTS=stacked.qweight.shape[0],
        GROUPED=True,
        ROUTED_WEIGHTS=rw is not None,
        SLOTS_PER_ROW=slots.slots_per_row,
        **stacked.expert_strides(),
    )


def dequant_gemv(
    x: torch.Tensor,
    weight: QuantWeight,
    bias: torch.Tensor | None,
    config: triton.Config | None = None,
    out: torch.Tensor | None = None,
    slots: SlotExperts | None = None,
) -> torch.Tensor:
    """``x (M, K) @ dequant(W)^T + bias`` -> ``(M, N)`` in ``x.dtype`` (meant for M = 1).

    ``config`` runs one explicit config: on the 4-bit kernel when it fits it (K steps
    inside one group, dividing K), else on the tiled kernel.  ``slots`` makes it a grouped
    call (see :class:`SlotExperts`; ``weight`` is stacked over the experts, no bias): one
    output row per slot.
    """
    k = x.shape[1]
    m = x.shape[0] if slots is None else slots.expert_of_slot.numel()
    stacked = weight
    if slots is not None:
        weight = stacked.expert(0)  # the kernel steps to the others by the expert strides
    weight.check(k)
    if slots is not None and bias is not None:
        raise ValueError("a grouped GEMV takes no bias")
    if x.stride(-1) != 1:
        x = x.contiguous()
    n = weight.out_features
    out = output(out, (m, n), x.dtype, x.device)
    meta = weight.kernel_args()
    args = dict(M=m, N=n, K=k, GROUP_SIZE=meta["GROUP_SIZE"])
    w4 = w4_eligible(x, weight.qweight, weight.bits, weight.kernel_group_size)
    if config is not None:
        w4 = w4 and _fits(config, args, True)
    # one workspace plane per split (torch.empty launches nothing), shared counters
    ws = torch.empty((MAX_SPLIT_K, m, n), dtype=torch.float32, device=x.device)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"], m)

    launch = dict(
        x_ptr=x,
        ws_ptr=ws,
        lock_ptr=split_k_locks(x.device),
        stride_xm=x.stride(0),
        **output_args(out, bias, m, n, k),
        **_slot_args(slots, stacked, out),
        **meta,
    )
    if w4:
        launch.update(magic=MAGIC.value, X_BF16=x.dtype == torch.bfloat16)
    tuned = _gemv_tuned if w4 else _gemv_tiles_tuned
    if config is None and interpreting() and x.device.type == "cpu":
        # the interpreter times nothing and runs one config: the first that fits
        config = next((c for c in tuned.configs if _fits(c, args, w4)), None)
    run_kernel(tuned, grid, config, **launch)
    return out
