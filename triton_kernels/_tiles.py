"""What the tiled GEMM kernels share: tile order, K runs of a split, split-K epilogues, the grid.

Every tiled kernel (weight-only and W8A8) owns a ``BLOCK_M x BLOCK_N`` output tile and
runs over the K tiles of its split; the grid is ``(tiles, SPLIT_K)``.  A split-K launch
either adds float32 partial tiles atomically into a zeroed buffer, cast to the output
dtype afterwards (float32 outputs accumulate in place), or -- one launch per call -- has
each split publish its partial tile to a workspace and bump a per-tile counter, the last
split of a tile reducing the partials in split order (:func:`sum_split_tiles`).
"""

import torch
import triton
import triton.language as tl

from ._launch import autotuned, output, output_args


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Output tile ``(pid_m, pid_n)`` of program ``pid``, ordered in bands of ``GROUP_M`` tile
    rows so that programs running together reuse the same weight tiles from L2."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def tile_offsets(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Row and column offsets of this program's output tile, with their bounds masks."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_m, offs_n, offs_m < M, offs_n < N


@triton.jit
def split_k_run(steps, SPLIT_K):
    """``[start, end)`` of the K steps owned by split ``program_id(1)`` of ``SPLIT_K``."""
    per_split = tl.cdiv(steps, SPLIT_K)
    start = tl.program_id(1) * per_split
    return start, tl.minimum(start + per_split, steps)


@triton.jit
def store_tile(
    acc,
    out_ptr,
    b_ptr,
    offs_m,
    offs_n,
    m_mask,
    n_mask,
    stride_om,
    HAS_BIAS: tl.constexpr,
    ATOMIC: tl.constexpr,
):
    """Epilogue of a float32 tile: bias (added by split 0 only), then an atomic add into
    the float32 split-K buffer (``ATOMIC``) or a store cast to the output dtype."""
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        if ATOMIC:
            bias = tl.where(tl.program_id(1) == 0, bias, 0.0)
        acc += bias[None, :]
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    if ATOMIC:
        tl.atomic_add(out_ptrs, acc, mask=out_mask, sem="relaxed")
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def sum_split_tiles(acc, ws_ptr, lock_ptr, offs_m, offs_n, mask, M, N, SPLIT_K):
    """``(total, last)`` for split ``program_id(1)`` of ``SPLIT_K`` of this tile.

    Each split writes its float32 partial tile to its ``(M, N)`` plane of ``ws_ptr`` and
    counts itself done on the tile's counter; the last one gets the planes added in split
    order (deterministic) and ``last`` true, and resets the counter to zero, so counters
    are zero between launches (safe under CUDA-graph capture).  Only the last split of
    a tile stores it.
    """
    plane = tl.cast(M, tl.int64) * N  # -- M may be the constant 1 (Triton specializes it)
    partials = ws_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    tl.store(partials + tl.program_id(1) * plane, acc, mask=mask)
    tl.debug_barrier()  # every thread's stores precede the release below
    lock = lock_ptr + tl.program_id(0)
    last = tl.atomic_add(lock, 1, sem="acq_rel") == SPLIT_K - 1
    total = acc
    if last:
        total = tl.zeros_like(acc)
        for s in range(0, SPLIT_K):
            total += tl.load(partials + s * plane, mask=mask, other=0.0, cache_modifier=".cg")
        tl.atomic_xchg(lock, 0, sem="relaxed")
    return total, last


LOCKS = 1 << 16  # split-K tile counters per device; a launch needing more runs unsplit
_locks: dict[torch.device, torch.Tensor] = {}


def split_k_locks(device: torch.device) -> torch.Tensor:
    """The device's split-K tile counters: zeroed once, left at zero by every launch.

    Shared by the kernels that reduce their splits in the last program of a tile; such
    launches must not run concurrently on two streams of one device.
    """
    locks = _locks.get(device)
    if locks is None:
        locks = _locks[device] = torch.zeros(LOCKS, dtype=torch.int32, device=device)
    return locks


def fits_counters(config: triton.Config, m: int, n: int) -> bool:
    """A launch reducing its splits in the last program of a tile needs a counter per tile."""
    tiles = triton.cdiv(m, config.kwargs["BLOCK_M"]) * triton.cdiv(n, config.kwargs["BLOCK_N"])
    return config.kwargs["SPLIT_K"] == 1 or tiles <= LOCKS


def prune_to_counters(configs, named_args, **kwargs):
    """The autotuner's prune for such launches: configs whose tiles fit the counters."""
    args = {**named_args, **kwargs}
    kept = [c for c in configs if fits_counters(c, args["M"], args["N"])]
    return kept or [c for c in configs if c.kwargs["SPLIT_K"] == 1][:1]


def split_workspace(
    configs: list[triton.Config],
    config: triton.Config | None,
    m: int,
    n: int,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(workspace, counters)`` of a launch reducing its splits in the last program of a
    tile: one ``(m, n)`` plane of ``dtype`` per split of ``config`` (or of the largest
    split among ``configs``; ``torch.empty`` launches nothing) and the device's counters."""
    if config is not None and not fits_counters(config, m, n):
        raise ValueError(f"a split-K config needs at most {LOCKS} output tiles, got {config}")
    planes = max(c.kwargs["SPLIT_K"] for c in ([config] if config is not None else configs))
    ws = torch.empty((planes, m, n), dtype=dtype, device=device)
    return ws, split_k_locks(device)


def split_k_accumulator(out: torch.Tensor, split_k: bool) -> torch.Tensor:
    """The buffer a launch writes: ``out`` itself, or zeroed float32 partial sums for split-K."""
    if not split_k:
        return out
    if out.dtype == torch.float32:
        return out.zero_()
    return torch.zeros_like(out, dtype=torch.float32)


def tile_grid(m: int, n: int, split_k: bool, config: triton.Config | None):
    """The ``(tiles, SPLIT_K)`` grid; a tiled launch refuses an explicit split config."""
    if config is not None and not split_k and config.kwargs["SPLIT_K"] != 1:
        raise ValueError("the tiled GEMM takes SPLIT_K=1 configs only")

    def grid(meta):
        tiles = triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])
        return (tiles, meta["SPLIT_K"])

    return grid


def autotune_tiles(kernel, configs: list[triton.Config], key: list[str], split_k: bool):
    """An autotuned instance of a tiled ``kernel``; a split-K instance zeroes its float32
    buffer (``out_ptr``) before each timing, as the launch does once."""
    return autotuned(kernel, configs, key, reset_to_zero=["out_ptr"] if split_k else None)


def tile_launch(out: torch.Tensor, split_k: bool, config: triton.Config | None):
    """The buffer a tiled launch into ``out (M, N)`` writes (see :func:`split_k_accumulator`;
    a float32 buffer other than ``out`` is copied into it afterwards) and its grid."""
    m, n = out.shape
    return split_k_accumulator(out, split_k), tile_grid(m, n, split_k, config)


def weight_tiles(
    x: torch.Tensor,
    weight_args: dict,
    n: int,
    bias: torch.Tensor | None,
    split_k: bool,
    config: triton.Config | None,
    out: torch.Tensor | None,
):
    """``(out, acc, grid, args)`` of a weight-only tiled launch of ``x (M, K)`` against a
    weight of ``n`` rows described by ``weight_args``: the ``(M, N)`` output in ``x.dtype``,
    the buffer the kernel writes (copied into ``out`` afterwards when they differ), the grid
    and the kernel arguments."""
    m, k = x.shape
    out = output(out, (m, n), x.dtype, x.device)
    acc, grid = tile_launch(out, split_k, config)
    args = dict(x_ptr=x, stride_xm=x.stride(0), ATOMIC=split_k, **output_args(acc, bias, m, n, k))
    return out, acc, grid, {**args, **weight_args}


def tile_config(bm, bn, bk, split_k, warps, stages, group_m=8) -> triton.Config:
    """A tiled-GEMM config: block shape, split factor, band height, warps and stages."""
    meta = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split_k, "GROUP_M": group_m}
    return triton.Config(meta, num_warps=warps, num_stages=stages)
