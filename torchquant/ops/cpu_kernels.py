"""PyTorch's own quantized CPU kernels, fed in the layouts and shapes they accept.

``torch._weight_int4pack_mm_for_cpu`` multiplies by 4-bit codes ``q`` (packed by
``torch._convert_weight_to_int4pack_for_cpu``, ``N`` a multiple of 16) dequantized as
``(q - 8) * scale + zero`` per block of 32, 64, 128 or 256 input columns.
``torch._weight_int8pack_mm`` multiplies by int8 ``(N, K)`` times a per-row scale and
needs ``K`` a multiple of 32 (other widths crash).  Both accumulate in float32, but
only their bfloat16 paths are vectorised (float32 and float16 run ~10x slower than
``F.linear``) and they round to bf16.  So the weight-only ops compute bf16 inputs in
bf16, and float32 ones inside :func:`float32_in_bf16` (:func:`computes_in_bf16`): a
float32 input is rounded to bf16 and the result cast back, which keeps it within
``BF16_RELATIVE_ERROR`` of the exact float32 reference (``||out - ref|| / ||ref||``,
~3e-3 measured on random layers).  Other float32 inputs, and float16 ones, keep the
exact reference.  Many rows (where these kernels, which do not use the matrix
units, lose to a bf16 GEMM) run :func:`blocked_linear`: tiles of weight rows
dequantized into one reused bf16 buffer, each multiplied by oneDNN's bf16 GEMM (AMX or
AVX-512 BF16 where the CPU has them: ~4x the float32 GEMM on such a CPU).

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

import contextlib
import contextvars
import functools
import os
import sys
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F

from torchquant.numerics import unpack_codes
from torchquant.ops import common

COMPUTE_DTYPE = torch.bfloat16
# -- ||out - ref|| / ||ref|| of every bf16 path against the exact reference, at most
BF16_RELATIVE_ERROR = 1e-2
INT4PACK_BLOCKS = (256, 128, 64, 32)
INT4PACK_ROWS = 16
INT8PACK_K = 32
# -- a dequantized tile of about this many weights (2 MiB in bf16) is wide enough for the
# -- GEMM to run at full speed (2**20 ran 3-5% faster than 2**19 at 256 rows, AVX-512)
DEQUANT_BLOCK_ELEMENTS = 1 << 20


_FLOAT32_IN_BF16 = contextvars.ContextVar("torchquant_float32_in_bf16", default=False)


@contextlib.contextmanager
def float32_in_bf16() -> Iterator[None]:
    """Within this context the weight-only and W8A8 ops compute float32 inputs in bf16 on
    these kernels, within ``BF16_RELATIVE_ERROR`` of the exact reference (what ``torchquant
    eval`` and ``demo`` run).  Outside it float32 inputs keep the exact reference, which
    calibration (each block sees the quantized blocks' outputs: checkpoints stay bit for
    bit) and comparisons with other libraries' float32 kernels rely on."""
    token = _FLOAT32_IN_BF16.set(True)
    try:
        yield
    finally:
        _FLOAT32_IN_BF16.reset(token)


def computes_in_bf16(dtype: torch.dtype) -> bool:
    """Whether a weight-only op computes inputs of ``dtype`` in bf16 on these kernels: bf16
    ones, and float32 ones inside :func:`float32_in_bf16`; others run the reference."""
    return dtype == COMPUTE_DTYPE or (dtype == torch.float32 and _FLOAT32_IN_BF16.get())


def keeps_layout(dtype: torch.dtype) -> bool:
    """Whether a CPU layer of ``dtype`` keeps a cached :class:`CpuLayout`: the ops read it
    for bf16 inputs and, inside :func:`float32_in_bf16` only, float32 ones (a float32 model
    run outside it holds no second copy of its weights)."""
    return computes_in_bf16(dtype)


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


def int4pack_product(
    layout: CpuLayout, n: int, exact: Callable[[torch.Tensor], torch.Tensor]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x2 (M, K) -> (M, n)``: ``x2`` times the weight in an :func:`int4pack_layout`, with
    each plane, the block size and the input gather taken from the layout once (a layer
    that binds it pays none of that per call).

    One plane gives the kernel's bf16 output as it is; two planes are summed in float32.
    Their offsets cancel, so a plane's bf16 sum can overflow where the weight's does not,
    and a float32 input can round up to infinity in bf16: such rows are recomputed by
    ``exact`` (the op's reference on those rows, no bias).
    """
    packed, scales_zeros, columns = layout
    block = packed.shape[2] * 2 // scales_zeros.shape[1]
    planes = [(packed[p], scales_zeros[p]) for p in range(packed.shape[0])]
    (high, high_qparams), low = planes[0], planes[1:]
    padded_n = packed.shape[1] != n  # -- rows padded to a multiple of INT4PACK_ROWS

    def product(x2: torch.Tensor) -> torch.Tensor:
        xk = x2 if x2.dtype == COMPUTE_DTYPE else x2.to(COMPUTE_DTYPE)
        if columns is not None:
            xk = F.pad(xk, (0, 1))[:, columns]
        xk = xk.contiguous()
        out = torch._weight_int4pack_mm_for_cpu(xk, high, block, high_qparams)
        if low:
            plane, qparams = low[0]
            out = out.float() + torch._weight_int4pack_mm_for_cpu(xk, plane, block, qparams)
        out = out[:, :n] if padded_n else out
        if low or x2.dtype != COMPUTE_DTYPE:
            out = common.recompute_overflowed_rows(out, x2, exact)
        return out

    return product


def int4pack_linear(
    x2: torch.Tensor, layout: CpuLayout, n: int, exact: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """``x2 (M, K)`` times the weight in an :func:`int4pack_layout`, ``(M, n)`` (see
    :func:`int4pack_product`)."""
    return int4pack_product(layout, n, exact)(x2)


def int8pack_layout(qweight: torch.Tensor, scales: torch.Tensor) -> CpuLayout:
    """The int8 weight padded to ``K % 32 == 0`` (``None`` if it is) and bf16 row scales."""
    pad = -qweight.shape[1] % INT8PACK_K
    padded = F.pad(qweight, (0, pad)) if pad else None
    return CpuLayout(padded, scales.reshape(-1).to(COMPUTE_DTYPE))


def int8pack_product(
    qweight: torch.Tensor, layout: CpuLayout
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x2 (M, K) -> (M, N)`` bf16: ``x2`` times int8 ``qweight (N, K)`` with per-row
    scales, the layout's padded weight and scales taken once."""
    weight = qweight if layout.packed is None else layout.packed
    pad, scales = weight.shape[1] - qweight.shape[1], layout.scales_zeros

    def product(x2: torch.Tensor) -> torch.Tensor:
        if x2.dtype != COMPUTE_DTYPE:
            x2 = x2.to(COMPUTE_DTYPE)
        if pad:
            x2 = F.pad(x2, (0, pad))
        return torch._weight_int8pack_mm(x2.contiguous(), weight, scales)

    return product


def int8pack_linear(x2: torch.Tensor, qweight: torch.Tensor, layout: CpuLayout) -> torch.Tensor:
    """``x2 (M, K)`` times int8 ``qweight (N, K)`` with per-row scales; bf16 ``(M, N)``."""
    return int8pack_product(qweight, layout)(x2)


def tile_rows(k: int) -> int:
    """Weight rows per dequantized tile of :func:`blocked_linear` for ``K = k``: a power of
    two (the GEMM's own blocking divides it; 576 -> 910 rows ran ~10% slower than 512)."""
    rows = max(INT4PACK_ROWS, DEQUANT_BLOCK_ELEMENTS // max(1, k))
    return 1 << (rows.bit_length() - 1)


def blocked_linear(
    x2: torch.Tensor, n: int, dequantize_rows: Callable[[int, int], torch.Tensor]
) -> torch.Tensor:
    """``x2 @ W.T`` with ``W`` dequantized a block of rows at a time, never all at once.

    ``dequantize_rows(start, stop)`` returns rows ``start:stop`` of ``W`` in ``x2``'s dtype
    (``tile_rows(K)`` rows at most; it may write them into one reused buffer).
    """
    step = tile_rows(x2.shape[1])
    # -- without AVX-512 BF16 or AMX the bf16 GEMM is emulated, ~4x slower than float32's:
    # -- multiply in float32 (float32 accumulation, as oneDNN's bf16 does)
    widened = x2.dtype == torch.bfloat16 and not native_bf16_gemm()
    xm = x2.float() if widened else x2
    tiles = [(i, min(i + step, n)) for i in range(0, n, step)]
    if len(tiles) == 1 or (xm.requires_grad and torch.is_grad_enabled()):
        # -- one tile, or an input autograd follows (``out=`` is not differentiable)
        parts = [xm @ dequantize_rows(i, j).to(xm.dtype).t() for i, j in tiles]
        out = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
    else:  # -- each tile's product written where it lies in one output: no concatenation
        # -- pass, no second output-sized allocation (each page-faults afresh on every call)
        out = torch.empty(x2.shape[0], n, dtype=xm.dtype)
        for i, j in tiles:
            torch.mm(xm, dequantize_rows(i, j).to(xm.dtype).t(), out=out[:, i:j])
    return out.to(x2.dtype) if widened else out


def _capability_allows(*capabilities: str) -> bool:
    """Whether ``ATEN_CPU_CAPABILITY`` (PyTorch's cap on the kernels it picks) is unset or
    one of ``capabilities``: a CPU capped below AVX-512 runs bf16 and int8 GEMMs as a CPU
    without those instructions does."""
    cap = os.environ.get("ATEN_CPU_CAPABILITY", "").lower()
    return not cap or cap in capabilities


@functools.cache
def native_bf16_gemm() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX-512 BF16 or AMX tiles)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    has = any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    return has and _capability_allows("avx512", "amx")


@functools.cache
def native_int8_gemm() -> bool:
    """Whether this CPU multiplies int8 natively (VNNI or AMX tiles).  Without them
    ``torch._int_mm`` measured ~20x slower than the float32 GEMM of the same shape (AVX2,
    256x4096x4096), so exact integer sums are taken from float32 GEMMs instead
    (:func:`exact_int_sums`)."""
    checks = ("_is_vnni_supported", "_is_amx_tile_supported")
    has = any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    return has and _capability_allows("avx512", "amx")


def gemm_dtype() -> torch.dtype:
    """The dtype :func:`blocked_int_linear` dequantizes into and multiplies in: bf16 where
    the CPU multiplies it natively, float32 elsewhere (which also spares a float32 input
    the rounding to bf16)."""
    return COMPUTE_DTYPE if native_bf16_gemm() else torch.float32


# -- |q_x * q_w| <= 128 * 128 = 2**14 for int8 codes: every partial sum of this many
# -- products is an integer of at most 2**24, exact in float32 whatever the GEMM's order
EXACT_FLOAT32_TERMS = 1 << 10


def exact_int_sums(xq: torch.Tensor, qweight: torch.Tensor) -> torch.Tensor:
    """``xq (M, K) @ qweight (N, K).T`` of integer codes in ``[-128, 127]``, exactly, as
    float64 ``(M, N)``: the int32 sums of ``torch._int_mm`` where the CPU multiplies int8
    natively, else float32 GEMMs over tiles of weight rows and ``EXACT_FLOAT32_TERMS``
    columns (each exact, added in float64: exact too).  ``xq`` may hold the codes as
    int8 or float32."""
    if native_int8_gemm():
        codes = xq if xq.dtype == torch.int8 else xq.to(torch.int8)
        if codes.shape[1] == 1:  # -- torch._int_mm returns garbage for K == 1 on CPU
            return codes.double() @ qweight.double().t()
        return torch._int_mm(codes, qweight.t()).double()
    m, k = xq.shape
    n = qweight.shape[0]
    xf = xq.float()
    if k <= EXACT_FLOAT32_TERMS:  # -- one chunk: float32 sums (exact), widened in one pass
        return blocked_linear(xf, n, lambda i, j: qweight[i:j].float()).double()
    chunks = [slice(c, min(c + EXACT_FLOAT32_TERMS, k)) for c in range(0, k, EXACT_FLOAT32_TERMS)]
    out = torch.empty(m, n, dtype=torch.float64)
    step = tile_rows(k)
    for start in range(0, n, step):
        rows = slice(start, min(start + step, n))
        tile = qweight[rows].float()
        acc = out[:, rows]
        for i, cols in enumerate(chunks):
            part = xf[:, cols] @ tile[:, cols].t()
            if i == 0:
                acc.copy_(part)
            else:
                acc.add_(part)
    return out


# -- widths whose codes fill whole bytes, and the integer lane each byte widens into
IN_ORDER_LANES = {2: torch.int32, 4: torch.int16, 8: torch.uint8}


def read_codes_in_order(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """The codes of packed ``qweight (rows, words)`` int32 in order, ``(rows, 32 * words /
    bits)`` uint8 (padding codes included), for 2 to 8 bits.

    Widths in :data:`IN_ORDER_LANES`: each byte holds ``8 / bits`` consecutive codes, the
    first in its low bits; widened to a lane of that many bytes, each code is moved into a
    byte of its own, and the lanes read as bytes give the codes in order (little-endian);
    other widths: :func:`spread_chunks`.
    A tile written in order needs no
    reordered input and no strided writes (which ran ~4x slower per weight)."""
    raw = qweight.contiguous().view(torch.uint8)
    if bits == 8:
        return raw
    if sys.byteorder != "little":
        return unpack_codes(qweight, bits, qweight.shape[1] * 32 // bits).to(torch.uint8)
    if bits not in IN_ORDER_LANES:
        return spread_chunks(raw, bits)
    wide = raw.to(IN_ORDER_LANES[bits])
    mask = (1 << bits) - 1
    lanes = wide & mask
    for i in range(1, 8 // bits):  # -- code i of the byte: from bit i * bits to byte i
        lanes |= (wide & (mask << (i * bits))) << (i * (8 - bits))
    return lanes.view(torch.uint8).view(raw.shape[0], -1)


def spread_chunks(raw: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`read_codes_in_order` for 3, 5, 6 or 7 bits: each chunk of ``bits`` bytes (8
    codes) is padded to one int64 and its codes moved ``8 - bits`` bits apart per position,
    halves first, then pairs, then single codes (three shift-and-mask steps)."""
    rows = raw.shape[0]
    chunks = F.pad(raw.view(rows, -1, bits), (0, 8 - bits)).view(torch.int64).view(rows, -1)
    gap = 8 - bits
    for fields in (4, 2, 1):  # -- move the upper `fields` codes of each block of 2*fields
        low = (1 << (fields * bits)) - 1
        block = 64 // (8 // (2 * fields))  # -- bits between the blocks after this step
        keep = sum(low << (b * block) for b in range(8 // (2 * fields)))
        chunks = (chunks & keep) | ((chunks & (keep << (fields * bits))) << (fields * gap))
    return chunks.view(torch.uint8).view(rows, -1)


def dequantize_tile(
    out: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | float,
) -> torch.Tensor:
    """``(codes - zeros) * scales`` written into ``out (rows, K)`` (bf16 or float32) and
    returned.

    ``codes (rows, K)`` integers (or values already in ``out``: then scaled in place);
    ``scales`` and ``zeros`` of ``out``'s dtype, ``(rows, 1)`` or per column ``(rows, K)``
    (``zeros`` may be a number).  The difference is exact in
    bf16 (integers below 256), so each weight is rounded once from the scale: within
    2**-7 of the float32 reference in bf16, and equal to it in float32.  Three passes over
    ``out``, none of them broadcasting along a short inner dimension (which PyTorch's CPU
    loops do not vectorise).
    """
    if out.data_ptr() != codes.data_ptr() or out.stride() != codes.stride():
        out.copy_(codes)  # -- else the values are already there (scaled in place)
    if isinstance(zeros, torch.Tensor) or zeros:
        out.sub_(zeros)
    return out.mul_(scales)


def dequantize_groups(
    out: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | float,
    columns: int,
) -> torch.Tensor:
    """:func:`dequantize_tile` of ``codes (rows, C)`` whose column ``i`` is in group
    ``i // columns`` of ``scales``/``zeros (rows, G)``, into ``out (rows, C)``; columns past
    the last group (padding codes) come out 0.

    The whole groups are viewed as ``(rows, groups, columns)`` against qparams
    ``(rows, groups, 1)``, which PyTorch's loops vectorise: 2-4x faster than widening the
    qparams to one per column first (an extra pass and allocation per tile).  The same
    values: each weight is ``(code - zero) * scale`` rounded once.
    """
    rows, width = codes.shape
    groups = scales.shape[1]
    whole = min(groups, width // columns)
    if whole:
        span = whole * columns
        dequantize_tile(
            out[:, :span].view(rows, whole, columns),
            codes[:, :span].view(rows, whole, columns),
            scales[:, :whole, None],
            zeros[:, :whole, None] if isinstance(zeros, torch.Tensor) else zeros,
        )
    done = whole * columns
    if whole < groups and done < width:  # -- the last group, cut short by the tile's end
        stop = min(done + columns, width)
        z = zeros[:, whole : whole + 1] if isinstance(zeros, torch.Tensor) else zeros
        dequantize_tile(out[:, done:stop], codes[:, done:stop], scales[:, whole : whole + 1], z)
        done = stop
    if done < width:
        out[:, done:].zero_()
    return out


def blocked_int_linear(
    x2: torch.Tensor,
    n: int,
    code_rows: Callable[[int, int], torch.Tensor],
    width: int,
    scales: torch.Tensor,
    zeros: torch.Tensor | float,
    group_size: int,
    g_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x2 (M, K) @ W.T`` for ``W = (codes - zeros) * scales`` (see :func:`dequantize_tile`),
    tiles of rows dequantized into one reused buffer; ``(M, n)`` in :func:`gemm_dtype`
    (bf16 where the CPU multiplies it natively; float32 elsewhere, whose tiles are the
    reference's float32 weights exactly).

    ``code_rows(start, stop)`` gives the integer codes of rows ``start:stop`` in order,
    ``(rows, width)`` with ``width >= K`` (padding codes past ``K``, whose input columns
    are zeros).  Regular groups broadcast their qparams per group; act-order groups are
    gathered per column.
    """
    m, k = x2.shape
    dtype = gemm_dtype()
    xk = x2.to(dtype)
    if width != k:
        xk = F.pad(xk, (0, width - k))
    s = scales.to(dtype)
    z = zeros.to(dtype) if isinstance(zeros, torch.Tensor) else zeros
    if g_idx is not None:
        # -- padding columns take an added group of scale 0 (their input is 0 anyway)
        columns_group = F.pad(g_idx.long(), (0, width - k), value=s.shape[1])
        s, z = F.pad(s, (0, 1)), F.pad(z, (0, 1)) if isinstance(z, torch.Tensor) else z
    buffer = torch.empty(min(n, tile_rows(width)), width, dtype=dtype)

    def per_column(q: torch.Tensor | float, start: int, stop: int) -> torch.Tensor | float:
        """Act-order qparams of rows ``start:stop``, one per column; others as they are."""
        if not isinstance(q, torch.Tensor):
            return q
        rows = q[start:stop]
        return rows if g_idx is None else rows[:, columns_group]

    def rows_of(start: int, stop: int) -> torch.Tensor:
        tile = buffer[: stop - start]
        codes = code_rows(start, stop)
        if g_idx is None and group_size != -1:
            z_rows = z[start:stop] if isinstance(z, torch.Tensor) else z
            return dequantize_groups(tile, codes, s[start:stop], z_rows, group_size)
        return dequantize_tile(tile, codes, per_column(s, start, stop), per_column(z, start, stop))

    return blocked_linear(xk, n, rows_of)


def blocked_signed_linear(
    x2: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, group_size: int
) -> torch.Tensor:
    """:func:`blocked_int_linear` for signed codes ``(N, K)`` held in order (zero point 0):
    INT8 weights as stored, W4A8's cached int8 codes."""

    def code_rows(start: int, stop: int) -> torch.Tensor:
        return codes[start:stop]

    return blocked_int_linear(
        x2, codes.shape[0], code_rows, codes.shape[1], scales, 0.0, group_size
    )
