"""PyTorch's own quantized CPU kernels, fed in the layouts and shapes they accept.

``torch._weight_int4pack_mm_for_cpu`` multiplies by 4-bit codes ``q`` (packed by
``torch._convert_weight_to_int4pack_for_cpu``, ``N`` a multiple of 16) dequantized as
``(q - 8) * scale + zero`` per block of 32, 64, 128 or 256 input columns.
``torch._weight_int8pack_mm`` multiplies by int8 ``(N, K)`` times a per-row scale and
needs ``K`` a multiple of 32 (other widths crash).  Both accumulate in float32, but
only their bfloat16 paths are vectorised (float32 and float16 run ~10x slower than
``F.linear``) and they round to bf16, so they serve bf16 activations
(:func:`uses_bf16_kernels`); float32 and float16 inputs keep the exact reference.

A :class:`CpuLayout` is derived once per layer and cached by the module; the ops
take its three fields as optional tensor arguments (``None`` when absent).  int4pack:
``packed (P, Np, Kp // 2)`` uint8, one plane per 4 bits of code, ``scales_zeros
(P, Kp // block, Np, 2)`` bf16 and ``columns (Kp,)`` int64 gathering the input columns
into block order (``K`` picks a zero column for padding), ``None`` when the input is
used as is.  int8pack: ``packed`` the int8 weight padded to ``K % 32 == 0`` (``None``
when it needs none), ``scales_zeros`` the per-row scales ``(N,)`` bf16.  FP8
(``weight_fp8.fp8_cpu_layout``): ``packed`` the E4M3 codes as bf16 ``(N, K)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from torchquant.ops import common

COMPUTE_DTYPE = torch.bfloat16
INT4PACK_BLOCKS = (256, 128, 64, 32)
INT4PACK_ROWS = 16
INT8PACK_K = 32
# -- a dequantized block of about this many weights stays in the L2 cache
DEQUANT_BLOCK_ELEMENTS = 1 << 17


def uses_bf16_kernels(x: torch.Tensor) -> bool:
    """Whether ``x`` runs the bf16 CPU kernels: only bf16 inputs, which they keep to bf16
    tolerance; float32 and float16 ones would lose precision to them, not gain speed."""
    return x.dtype == COMPUTE_DTYPE


class CpuLayout(NamedTuple):
    packed: torch.Tensor | None = None
    scales_zeros: torch.Tensor | None = None
    columns: torch.Tensor | None = None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self if t is not None)


def column_groups(k: int, group_size: int, g_idx: torch.Tensor | None) -> torch.Tensor:
    """Group of each input column ``(K,)`` int64: ``g_idx``, or ``k // group_size``."""
    if g_idx is not None:
        return g_idx.long()
    size = k if group_size == -1 else group_size
    return torch.arange(k) // size


def plan_blocks(groups: torch.Tensor, k: int) -> tuple[int, torch.Tensor, torch.Tensor]:
    """``(block, col_index (Kp,), block_group (Kp // block,))`` for the int4pack kernel.

    Columns are ordered by group and each group padded to a whole number of blocks,
    so every block lies in one group; the block is the largest size with the least
    padding (SmolLM2's K = 576 in groups of 128 becomes blocks of 64, unpadded).
    """
    order = torch.argsort(groups, stable=True)
    ids, counts = torch.unique_consecutive(groups[order], return_counts=True)

    def padded(block: int) -> int:
        return int((-(-counts // block) * block).sum())

    block = min(INT4PACK_BLOCKS, key=lambda b: (padded(b), -b))
    pieces, owners, start = [], [], 0
    for gid, count in zip(ids.tolist(), counts.tolist(), strict=True):
        nblocks = -(-count // block)
        cols = torch.full((nblocks * block,), k, dtype=torch.int64)
        cols[:count] = order[start : start + count]
        pieces.append(cols)
        owners.append(torch.full((nblocks,), gid, dtype=torch.int64))
        start += count
    return block, torch.cat(pieces), torch.cat(owners)


def int4pack_plane(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, col_index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack codes ``q (N, K)`` in 0..15 with per-block ``scale``/``zero (N, Kp // block)``.

    Returns ``(packed (Np, Kp // 2) uint8, scales_zeros (Kp // block, Np, 2) bf16)``;
    padded rows and columns get code 8 and scale 0, so they add nothing.
    """
    n = q.shape[0]
    pad_n = -n % INT4PACK_ROWS
    codes = F.pad(q.to(torch.int32), (0, 1), value=8)[:, col_index]
    codes = F.pad(codes, (0, 0, 0, pad_n), value=8)
    sz = torch.stack([scale.float(), zero.float()], dim=-1)
    sz = F.pad(sz, (0, 0, 0, 0, 0, pad_n)).transpose(0, 1).to(COMPUTE_DTYPE).contiguous()
    return torch._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1), sz


def int4pack_layout(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | float,
    groups: torch.Tensor,
) -> CpuLayout:
    """Layout for ``w = (codes - zeros) * scales``; codes ``(N, K)`` 0..255, qparams ``(N, G)``.

    Codes of up to 4 bits are one plane: ``(q - 8) * s + (8 - z) * s``, or with zero
    offset ``q = c - z + 8`` when every such code fits in 0..15 (always for 3 bits or
    fewer).  Wider codes ``c = 16 h + l`` are two planes: ``(h - 8) * 16 s + (136 - z) * s``
    and ``(l - 8) * s``, with the offset split between them so that bf16 holds it to 16
    bits.  Offsets use the bf16 scale the kernel sees, so the planes cancel exactly.
    """
    k = codes.shape[1]
    block, col_index, block_group = plan_blocks(groups, k)
    s = scales.to(COMPUTE_DTYPE).float()[:, block_group]
    z = zeros.float()[:, block_group] if isinstance(zeros, torch.Tensor) else zeros
    identity = col_index.numel() == k and torch.equal(col_index, torch.arange(k))
    shifted = codes.to(torch.int16) - _per_column(z, groups, block_group, col_index, k) + 8
    if bool(((shifted >= 0) & (shifted < 16)).all()):
        planes = [int4pack_plane(shifted, s, torch.zeros_like(s), col_index)]
    elif int(codes.max()) < 16:
        planes = [int4pack_plane(codes, s, (8 - z) * s, col_index)]
    else:
        offset = (136 - z) * s
        coarse = offset.to(COMPUTE_DTYPE).float()
        planes = [
            int4pack_plane(codes >> 4, 16 * s, coarse, col_index),
            int4pack_plane(codes & 15, s, offset - coarse, col_index),
        ]
    packed, sz = (torch.stack(t) for t in zip(*planes, strict=True))
    return CpuLayout(packed, sz, None if identity else col_index)


def _per_column(z, groups, block_group, col_index, k) -> torch.Tensor | float:
    """The zero point of each input column ``(N, K)`` from per-block zeros (or a number)."""
    if not isinstance(z, torch.Tensor):
        return z
    block_of = torch.empty(k + 1, dtype=torch.int64)
    block_of[col_index] = torch.arange(col_index.numel()) // (col_index.numel() // z.shape[1])
    return z[:, block_of[:k]]


def int4pack_linear(
    x2: torch.Tensor, layout: CpuLayout, n: int, exact: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """``x2 (M, K)`` times the weight in an :func:`int4pack_layout`, ``(M, n)``.

    One plane gives the kernel's bf16 output as it is; two planes are summed in float32.
    Their offsets cancel, so a plane's bf16 sum can overflow where the weight's does not:
    such rows are recomputed by ``exact`` (the op's reference on those rows, no bias).
    """
    xk = x2 if x2.dtype == COMPUTE_DTYPE else x2.to(COMPUTE_DTYPE)
    if layout.columns is not None:
        xk = F.pad(xk, (0, 1))[:, layout.columns]
    xk = xk.contiguous()
    packed, scales_zeros = layout.packed, layout.scales_zeros
    block = packed.shape[2] * 2 // scales_zeros.shape[1]
    out = torch._weight_int4pack_mm_for_cpu(xk, packed[0], block, scales_zeros[0])
    if packed.shape[0] == 2:
        low = torch._weight_int4pack_mm_for_cpu(xk, packed[1], block, scales_zeros[1])
        out = out.float() + low.float()
    out = out if out.shape[1] == n else out[:, :n]
    if packed.shape[0] == 2:
        out = common.recompute_overflowed_rows(out, x2, exact)
    return out


def int8pack_layout(qweight: torch.Tensor, scales: torch.Tensor) -> CpuLayout:
    """The int8 weight padded to ``K % 32 == 0`` (``None`` if it is) and bf16 row scales."""
    pad = -qweight.shape[1] % INT8PACK_K
    padded = F.pad(qweight, (0, pad)) if pad else None
    return CpuLayout(padded, scales.reshape(-1).to(COMPUTE_DTYPE))


def int8pack_linear(x2: torch.Tensor, qweight: torch.Tensor, layout: CpuLayout) -> torch.Tensor:
    """``x2 (M, K)`` times int8 ``qweight (N, K)`` with per-row scales; bf16 ``(M, N)``."""
    if x2.dtype != COMPUTE_DTYPE:
        x2 = x2.to(COMPUTE_DTYPE)
    if layout.packed is not None:
        qweight = layout.packed
        x2 = F.pad(x2, (0, qweight.shape[1] - x2.shape[1]))
    return torch._weight_int8pack_mm(x2.contiguous(), qweight, layout.scales_zeros)


def blocked_linear(
    x2: torch.Tensor, n: int, dequantize_rows: Callable[[int, int], torch.Tensor]
) -> torch.Tensor:
    """``x2 @ W.T`` with ``W`` dequantized a block of rows at a time, never all at once.

    ``dequantize_rows(start, stop)`` returns rows ``start:stop`` of ``W`` in ``x2``'s dtype.
    """
    step = max(INT4PACK_ROWS, DEQUANT_BLOCK_ELEMENTS // max(1, x2.shape[1]))
    parts = [x2 @ dequantize_rows(i, min(i + step, n)).t() for i in range(0, n, step)]
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
