"""The MSE clipping-range search: of ``grid`` shrinks of each unit's min/max range, the one
whose fake quantization has the least (optionally column-weighted) squared error.

A unit is a row of ``(units, elements)``: the whole tensor, a row, or a group of columns
(the last group possibly shorter).  Every candidate is evaluated on every element, so the
search costs ``grid`` fake quantizations of the tensor; it runs chunk by chunk of units,
every candidate on one chunk before the next, so a chunk's values, weights and error
buffer stay in the core's cache while the candidates reuse them (the whole tensor per
candidate streams it from memory ``grid`` times, about 2.5x slower on one CPU thread).
Each unit's errors are those of one pass over the whole tensor bit for bit: the same
operations on the same values, reduced along the same row.
"""

from __future__ import annotations

import torch

from torchquant.numerics.qparams import choose_int_qparams
from torchquant.numerics.weight import num_groups

MSE_GRID = 50
MSE_MIN_SHRINK = 0.2
CHUNK_ELEMENTS = 1 << 16  # -- 256 KiB of float32 per buffer: a chunk fits a core's L2


def shrink_factors(grid: int = MSE_GRID, min_shrink: float = MSE_MIN_SHRINK) -> list[float]:
    """The MSE search's ``grid`` range factors, from 1 (the full range) down to ``min_shrink``."""
    return [1.0 - (1.0 - min_shrink) * i / max(grid - 1, 1) for i in range(grid)]


def view_units(x: torch.Tensor, granularity: str, group_size: int, pad: float) -> torch.Tensor:
    """``x: (rows, cols)`` as ``(units, elements)``, a short last group padded with ``pad``."""
    if granularity == "tensor":
        return x.reshape(1, -1)
    if granularity in ("channel", "token"):
        return x
    rows, cols = x.shape
    g = num_groups(cols, group_size)
    padded = torch.nn.functional.pad(x, (0, g * group_size - cols), value=pad)
    return padded.reshape(rows * g, group_size)


def unit_errors(
    v: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | float,
    bits: int,
    weight: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum per unit ``(units, 1)`` of the (``weight``-scaled) squared fake-quantization
    error of ``v: (units, elements)`` on ``scales``/``zeros`` ``(units, 1)`` (``zeros`` a
    number when symmetric); ``out`` is a buffer like ``v`` for the error terms."""
    err = torch.div(v, scales, out=out).round_().add_(zeros).clamp_(0, (1 << bits) - 1)
    err.sub_(zeros).mul_(scales).sub_(v).pow_(2)
    if weight is not None:
        err.mul_(weight)
    return err.sum(dim=1, keepdim=True)


def mse_range(
    x: torch.Tensor,
    bits: int,
    symmetric: bool,
    granularity: str = "tensor",
    group_size: int = -1,
    grid: int = MSE_GRID,
    min_shrink: float = MSE_MIN_SHRINK,
    column_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-unit ``(lo, hi)`` among ``grid`` shrinks of min/max with the least squared error,
    each column's error scaled by ``column_weight (cols,)`` when given (e.g. the
    diagonal of a layer's input Hessian, so columns that see large inputs count more).

    Ties keep the wider range.  The padding of a short last group is zero with zero
    weight: zero is exact on every range, so it adds nothing to any candidate's error.
    """
    x = x.float()
    ranged = view_units(x, granularity, group_size, float("nan"))
    lo0 = torch.nan_to_num(ranged, nan=float("inf")).amin(dim=1, keepdim=True)
    hi0 = torch.nan_to_num(ranged, nan=float("-inf")).amax(dim=1, keepdim=True)
    v = view_units(x, granularity, group_size, 0.0)
    weight = None
    if column_weight is not None:
        full = column_weight.float().to(x.device).expand(x.shape)
        weight = view_units(full, granularity, group_size, 0.0)
    factors = shrink_factors(grid, min_shrink)
    candidates = []
    for p in factors:
        scales, zeros = choose_int_qparams(lo0 * p, hi0 * p, bits, symmetric)
        candidates.append((scales, float(1 << (bits - 1)) if zeros is None else zeros.float()))
    errors = torch.empty(len(factors), v.shape[0], 1, device=v.device)  # (grid, units, 1)
    step = max(1, CHUNK_ELEMENTS // max(v.shape[1], 1))
    buffer = torch.empty(min(step, v.shape[0]), v.shape[1], device=v.device)
    for u1 in range(0, v.shape[0], step):
        u2 = min(u1 + step, v.shape[0])
        chunk, chunk_weight = v[u1:u2], None if weight is None else weight[u1:u2]
        for c, (scales, zeros) in enumerate(candidates):
            zero = zeros if isinstance(zeros, float) else zeros[u1:u2]
            out = buffer[: u2 - u1]
            errors[c, u1:u2] = unit_errors(chunk, scales[u1:u2], zero, bits, chunk_weight, out)
    best_err = torch.full_like(lo0, float("inf"))
    best_lo, best_hi = lo0.clone(), hi0.clone()
    for p, err in zip(factors, errors, strict=True):
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, lo0 * p, best_lo)
        best_hi = torch.where(better, hi0 * p, best_hi)
    if granularity == "group":
        rows = x.shape[0]
        return best_lo.reshape(rows, -1), best_hi.reshape(rows, -1)
    return best_lo, best_hi
