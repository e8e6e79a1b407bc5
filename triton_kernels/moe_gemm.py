"""Mixture-of-experts weight-only GEMM: every active expert of a projection in one launch.

Routing gives each token ``k`` slots, slot ``s = t * k + j`` routed to expert
``top_k_index[t, j]`` (``E`` meaning no expert).  :func:`align_slots_by_expert` sorts
the slots by expert into blocks of ``BLOCK_M`` slots that all share one expert (each
expert's run padded to a whole block), as vLLM's ``moe_align_block_size`` does, in one
single-program launch; the slots routed to no expert form the last run.
:func:`moe_dequant_gemm` then runs one program per (block, ``BLOCK_N`` columns): it
reads its expert id, dequantizes that expert's weight tiles (the helpers of
:mod:`.dequant`) and multiplies the block's rows.

Weights are the formats of :mod:`.weight` stacked along a leading expert dimension:
``qweight (E, N, ceil(K/32)*bits)`` int32 packed codes, or ``(E, N, K)`` int8 / fp8;
``scales (E, N, G)`` (or ``(E, 1, 1)`` per tensor); ``zeros (E, N, G)`` uint8 or None;
``bias (E, N)`` or None.  ``x`` holds one row per token (slot ``s`` reads row ``s // k``)
or one row per slot.  The output has one row per slot, ``(T * k, N)`` in ``x.dtype``:
the slot's expert linear, plus bias, times the slot's routing weight when one is given;
zero for slots routed to no expert.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._launch import autotuned, check_device, m_bucket, output, run_kernel
from ._tiles import grouped_tile
from .dequant import MAGIC, dequantize_tile, dot_weight_tile
from .dequant_gemv import SlotExperts, dequant_gemv
from .weight import QuantWeight


class ExpertBlocks(NamedTuple):
    """Slots sorted by expert in blocks of ``block_m`` (the kernel's row tile).

    ``sorted_slots (blocks * block_m,)`` int32: slot ids, each expert's run padded with
    the sentinel ``slots``; ``block_experts (blocks,)`` int32: the expert of each block
    (``E`` for the run of slots routed to no expert and for unused blocks);
    ``padded_slots (1,)`` int32: how many entries of ``sorted_slots`` are in use;
    ``slots``: ``T * top_k``.
    """

    sorted_slots: torch.Tensor
    block_experts: torch.Tensor
    padded_slots: torch.Tensor
    block_m: int
    slots: int
    top_k: int


def max_padded_slots(slots: int, num_experts: int, block_m: int) -> int:
    """Entries ``sorted_slots`` needs at most: every run (at most one per slot) padded."""
    runs = min(num_experts + 1, slots)
    return triton.cdiv(slots + runs * (block_m - 1), block_m) * block_m


@triton.jit
def _align_kernel(
    expert_ptr,
    sorted_ptr,
    block_expert_ptr,
    padded_ptr,
    SLOTS,
    SIZE,
    NUM_EXPERTS,
    BLOCK_M: tl.constexpr,
    RUNS: tl.constexpr,
    CHUNK: tl.constexpr,
):
    # -- one program; runs 0..E-1 are the experts', run E the slots routed to none
    runs = tl.arange(0, RUNS)
    counts = tl.zeros((RUNS,), dtype=tl.int32)
    for start in range(0, SLOTS, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        expert = tl.load(expert_ptr + offs, mask=offs < SLOTS, other=RUNS).to(tl.int32)
        counts += tl.sum((expert[:, None] == runs[None, :]).to(tl.int32), axis=0)
    # -- each run padded to whole blocks, laid out one after the other
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    run_end = tl.cumsum(padded, axis=0)
    run_start = run_end - padded
    tl.store(padded_ptr, tl.sum(padded, axis=0))
    # -- the sentinel in every entry; the expert of each block (the run its start falls in)
    for start in range(0, SIZE, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        tl.store(sorted_ptr + offs, tl.full((CHUNK,), SLOTS, tl.int32), mask=offs < SIZE)
        ended = (run_end[None, :] <= offs[:, None] * BLOCK_M).to(tl.int32)
        block_expert = tl.minimum(tl.sum(ended, axis=1), NUM_EXPERTS)
        tl.store(block_expert_ptr + offs, block_expert, mask=offs < SIZE // BLOCK_M)
    tl.debug_barrier()  # the sentinels land before the slots overwrite them
    # -- each slot at its run's start plus its rank among the earlier slots of its expert
    seen = tl.zeros((RUNS,), dtype=tl.int32)
    for start in range(0, SLOTS, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        expert = tl.load(expert_ptr + offs, mask=offs < SLOTS, other=RUNS).to(tl.int32)
        onehot = (expert[:, None] == runs[None, :]).to(tl.int32)  # (CHUNK, RUNS)
        rank = tl.sum((tl.cumsum(onehot, axis=0) - onehot) * onehot, axis=1)
        base = tl.sum(onehot * (run_start + seen)[None, :], axis=1)
        tl.store(sorted_ptr + base + rank, offs, mask=offs < SLOTS)
        seen += tl.sum(onehot, axis=0)


ALIGN_CHUNK_ELEMENTS = 8192  # slots x runs held per step of the alignment program
# one config: nothing to tune, but launched through run_kernel like every other kernel
_align = triton.autotune([triton.Config({}, num_warps=4)], key=[])(_align_kernel)


def align_slots_by_expert(
    top_k_index: torch.Tensor, num_experts: int, block_m: int
) -> ExpertBlocks:
    """Sort the slots of ``top_k_index (T, k)`` (values ``0..E``) by expert into blocks.

    One single-program launch whose output shapes depend only on ``T``, ``k`` and ``E``
    (no host synchronisation, so a CUDA graph can capture it).  Slots of one expert keep
    their order.
    """
    check_device(top_k_index)
    expert_of_slot = top_k_index.reshape(-1)
    slots = expert_of_slot.numel()
    size = max_padded_slots(slots, num_experts, block_m)
    device = top_k_index.device
    sorted_slots = torch.empty(size, dtype=torch.int32, device=device)
    block_experts = torch.empty(size // block_m, dtype=torch.int32, device=device)
    padded_slots = torch.empty(1, dtype=torch.int32, device=device)
    if not slots:
        padded_slots.zero_()
    else:
        runs = triton.next_power_of_2(num_experts + 1)
        chunk = max(16, min(triton.next_power_of_2(size), ALIGN_CHUNK_ELEMENTS // runs))
        run_kernel(
            _align,
            lambda meta: (1,),
            None,
            expert_ptr=expert_of_slot.contiguous(),
            sorted_ptr=sorted_slots,
            block_expert_ptr=block_experts,
            padded_ptr=padded_slots,
            SLOTS=slots,
            SIZE=size,
            NUM_EXPERTS=num_experts,
            BLOCK_M=block_m,
            RUNS=runs,
            CHUNK=chunk,
        )
    return ExpertBlocks(
        sorted_slots, block_experts, padded_slots, block_m, slots, top_k_index.shape[-1]
    )


@triton.jit
def _moe_gemm_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    z_ptr,
    b_ptr,
    rw_ptr,
    out_ptr,
    sorted_ptr,
    block_expert_ptr,
    padded_ptr,
    N,
    K,
    SLOTS,
    PADDED_MAX,
    NUM_EXPERTS,
    stride_xm,
    stride_qe,
    stride_qn,
    stride_se,
    stride_sn,
    stride_ze,
    stride_zn,
    stride_be,
    stride_om,
    M_BUCKET,
    magic,  # MAGIC, a runtime value (see dequant.dequantize_words)
    SLOTS_PER_ROW: tl.constexpr,
    BITS: tl.constexpr,
    PACKED: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ROUTED_WEIGHTS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # -- this program's block of sorted slots and column tile; blocks past the used ones exit
    pid_m, pid_n = grouped_tile(tl.program_id(0), PADDED_MAX, N, BLOCK_M, BLOCK_N, GROUP_M)
    if pid_m * BLOCK_M >= tl.load(padded_ptr):
        return
    expert = tl.load(block_expert_ptr + pid_m)
    routed = expert < NUM_EXPERTS  # False for the run of slots routed to no expert: zeros
    expert = tl.minimum(expert, NUM_EXPERTS - 1).to(tl.int64)
    slot = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    slot_mask = slot < SLOTS
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    # -- the expert's weight rows; the block's activation rows (one per token or per slot)
    rows = q_ptr + expert * stride_qe + offs_n[:, None].to(tl.int64) * stride_qn
    s_rows = s_ptr + expert * stride_se + offs_n[:, None] * stride_sn
    z_rows = z_ptr + expert * stride_ze + offs_n[:, None] * stride_zn
    x_rows = x_ptr + (slot[:, None] // SLOTS_PER_ROW).to(tl.int64) * stride_xm
    steps = tl.where(routed, tl.cdiv(K, BLOCK_K), 0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(0, steps):
        offs_k = t * BLOCK_K + tl.arange(0, BLOCK_K)
        x = tl.load(x_rows + offs_k[None, :], mask=slot_mask[:, None] & (offs_k[None, :] < K))
        # -- the expert's (BLOCK_N, BLOCK_K) weight tile dequantized in float32, then the MMA
        w = dequantize_tile(
            rows, s_rows, z_rows, t, n_mask, K, magic, BITS, PACKED, HAS_ZEROS, GROUP_SIZE, BLOCK_K
        )
        acc = dot_weight_tile(x, w, acc)
    # -- epilogue: the expert's bias, the slot's routing weight, a cast store per slot row
    if HAS_BIAS:
        bias = tl.load(b_ptr + expert * stride_be + offs_n, mask=n_mask, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    if ROUTED_WEIGHTS:
        weight = tl.load(rw_ptr + slot, mask=slot_mask, other=0.0).to(tl.float32)
        acc *= weight[:, None]
    acc = tl.where(routed, acc, 0.0)
    out_ptrs = out_ptr + slot[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=slot_mask[:, None] & n_mask[None, :])


def _config(bn: int, bk: int, warps: int, stages: int, group_m: int = 8) -> triton.Config:
    return triton.Config(
        {"BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m}, num_warps=warps, num_stages=stages
    )


# BLOCK_M is fixed before the launch (the slots are aligned to it): 16-row blocks while few
# slots share an expert (decode), 64 beyond.  The first config is the one the interpreter
# runs and benchmarks/kernel_model.py reads; the autotuner decides by time on the GPU.
MOE_CONFIGS = [
    _config(256, 64, 8, 3),  # the split-K GEMM's default tile: no spills for 4-bit on sm_90
    _config(64, 128, 4, 3),
    _config(128, 64, 4, 3),
    _config(32, 128, 4, 4),
    _config(64, 64, 4, 4),
    _config(128, 128, 8, 3),
]
SMALL_BLOCK_M_MAX_SLOTS_PER_EXPERT = 32  # mean slots per expert up to this: 16-row blocks

_moe_tuned = autotuned(
    _moe_gemm_kernel,
    MOE_CONFIGS,
    ["M_BUCKET", "N", "K", "BITS", "GROUP_SIZE", "PACKED", "HAS_ZEROS", "BLOCK_M"],
)


def moe_block_m(slots: int, num_experts: int) -> int:
    """Rows per block: 16 while the experts see few slots each, 64 for prefill."""
    return 16 if slots <= SMALL_BLOCK_M_MAX_SLOTS_PER_EXPERT * num_experts else 64


def moe_dequant_gemm(
    x: torch.Tensor,
    weight: QuantWeight,
    bias: torch.Tensor | None,
    blocks: ExpertBlocks,
    routing_weights: torch.Tensor | None = None,
    config: triton.Config | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Every slot's expert linear in one launch -> ``(slots, N)`` in ``x.dtype``.

    ``weight`` stacked over the experts; ``blocks`` from :func:`align_slots_by_expert` on
    the ``(T, top_k)`` routing;
    ``x (T, K)`` (one row per token) or ``(T * top_k, K)`` (one row per slot);
    ``routing_weights`` ``(T, top_k)`` multiplies each slot's output when given.
    """
    m, k = x.shape
    num_experts, slots = weight.qweight.shape[0], blocks.slots
    if m * blocks.top_k != slots and m != slots:
        raise ValueError(f"x must have one row per token or per slot ({slots}), got {m} rows")
    qweight, scales = weight.qweight, weight.scales
    if qweight.dim() != 3 or scales.dim() != 3 or scales.shape[0] != num_experts:
        raise ValueError(
            f"qweight and scales must be stacked (E, ...), got {tuple(qweight.shape)} "
            f"and {tuple(scales.shape)}"
        )
    if x.stride(-1) != 1:
        x = x.contiguous()
    first = weight.expert(0)  # the kernel steps to the others by the expert strides
    first.check(k)
    n = first.out_features
    if bias is not None and tuple(bias.shape) != (num_experts, n):
        raise ValueError(f"bias must be ({num_experts}, N), got {tuple(bias.shape)}")
    if routing_weights is not None:
        if routing_weights.numel() != slots:
            raise ValueError(f"routing_weights must hold {slots} values (T, top_k)")
        routing_weights = routing_weights.reshape(-1).contiguous()
    padded_max = blocks.sorted_slots.numel()
    out = output(out, (slots, n), x.dtype, x.device)
    if slots == 0:
        return out

    def grid(meta):
        return (triton.cdiv(padded_max, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    run_kernel(
        _moe_tuned,
        grid,
        config,
        x_ptr=x,
        b_ptr=bias if bias is not None else out,
        rw_ptr=routing_weights if routing_weights is not None else out,
        out_ptr=out,
        sorted_ptr=blocks.sorted_slots,
        block_expert_ptr=blocks.block_experts,
        padded_ptr=blocks.padded_slots,
        N=n,
        K=k,
        SLOTS=slots,
        PADDED_MAX=padded_max,
        NUM_EXPERTS=num_experts,
        stride_xm=x.stride(0),
        stride_be=bias.stride(0) if bias is not None else 0,
        stride_om=out.stride(0),
        M_BUCKET=m_bucket(slots),
        magic=MAGIC.value,
        SLOTS_PER_ROW=slots // m,
        HAS_BIAS=bias is not None,
        ROUTED_WEIGHTS=routing_weights is not None,
        BLOCK_M=blocks.block_m,
        **weight.expert_strides(),
        **first.kernel_args(),
    )
    return out


def moe_dequant_gemv(
    x: torch.Tensor,
    weight: QuantWeight,
    top_k_index: torch.Tensor,
    routing_weights: torch.Tensor | None = None,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """One token's slots (decode) on the GEMV: each slot reads its expert's weight once.

    A token's ``k`` slots go to ``k`` distinct experts, so no weight is read twice; no
    alignment is needed and the call is one launch.  Same arguments and output as
    :func:`moe_dequant_gemm` (no bias), the routing given as ``top_k_index (1, k)``.
    """
    slots = top_k_index.numel()
    if slots % x.shape[0]:
        raise ValueError(f"x must have one row per token or per slot ({slots}), got {x.shape[0]}")
    weights = routing_weights.reshape(-1).contiguous() if routing_weights is not None else None
    routing = SlotExperts(top_k_index.reshape(-1).contiguous(), weights, slots // x.shape[0])
    return dequant_gemv(x, weight, None, config, slots=routing)
