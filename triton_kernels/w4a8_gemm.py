"""W4A8 GEMM: 8-bit activations x 4-bit grouped weights on INT8 (or FP8) tensor cores.

``w4a8_gemm(a, a_scale, qweight, scales, group_size, bias, out_dtype)``: ``a (M, K)``
int8 or float8_e4m3fn (activations quantized per row, see :mod:`.act_quant`),
``a_scale (M, 1)`` float32; ``qweight (N, ceil(K/32)*4)`` int32, the packed unsigned
4-bit codes (8 nibbles a word along K, low bits first; the weight is ``code - 8``),
``scales (N, G)`` one per group of ``group_size`` input columns (-1: one per row; the
last group shorter when it does not divide K).  Returns ``(M, N)`` in ``out_dtype``:

    out[m, n] = a_scale[m] * sum_g scales[n, g] * sum_{k in g} a[m, k] (code[n, k] - 8)

Each K tile's codes are unpacked in registers, three bit operations and two byte
permutes for eight codes (:func:`unpack_codes`), and multiplied on tensor cores:

* INT8: a code in the high nibble of a byte with its top bit flipped is the int8
  ``16 * (code - 8)``; a group's products accumulate exactly in int32 and the group's
  weight scale over 16 turns them into float32 (a power of two: the same rounding).
* FP8: a code in the low nibble of a byte is the E4M3 bit pattern of ``code * 2**-9``
  (subnormals and the first binade are evenly spaced), so no conversion is needed; the
  offset is folded into the group step, ``sum a (code - 8) = 2**9 (sum a code 2**-9 -
  2**-6 sum a)``, the row sums of the activation tile taken in float32.

A group's sums are scaled when it ends (its ``GROUP_TILES`` K tiles unrolled), the per-row
activation scale is applied once in the epilogue (NaN scales of non-finite rows make those
output rows NaN), then the cast and the bias in the output dtype, as the reference orders
them.  Decode and small batches (``M <= SPLIT_K_MAX_M``) split the groups over ``SPLIT_K``
programs per tile, the last of which adds the float32 partial tiles in split order and
stores (``_tiles.sum_split_tiles``: one launch); larger M runs whole-K tiles.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._launch import (
    BUILT_FOR_INTERPRETER,
    autotuned,
    check_device,
    check_fp8_support,
    interpreting,
    m_bucket,
    output,
    output_args,
    run_kernel,
)
from ._tiles import prune_to_counters, split_k_run, split_workspace, sum_split_tiles, tile_offsets

CODES_PER_WORD = tl.constexpr(8)  # -- 4-bit codes in one int32 word
CODE_ZERO = tl.constexpr(8)  # -- the implied zero point of symmetric 4-bit codes
MAX_BLOCK_K = 128  # -- K tile: a group of up to 128 codes, four INT8 / FP8 MMA steps of 32
SPLIT_K_MAX_M = 64  # -- up to this many rows, the groups are split over programs
# -- the offset binary codes of an int4 weight, as E4M3: code c is c * 2**-9 (exact)
FP8_CODE_UNIT = tl.constexpr(2.0**-9)
# -- int32 holds a group's sums of |16 * (code - 8) * a| <= 128 * 128 for this many columns
INT8_MAX_GROUP = (2**31 - 1) // (128 * 128)
# -- prmt.b32 on the GPU; the interpreter runs the same byte selection as shifts and masks
BYTE_PERMUTE_ASM = tl.constexpr(not BUILT_FOR_INTERPRETER)


@triton.jit
def _byte(x, J: tl.constexpr):
    """Byte ``J`` of every word of ``x`` as int8 (a byte select, no arithmetic)."""
    return (x >> (8 * J)).to(tl.int8)


@triton.jit
def interleave_bytes(even, odd, ASM: tl.constexpr):
    """``(low, high)``: bytes ``e0 o0 e1 o1`` and ``e2 o2 e3 o3`` of uint32 ``even`` and
    ``odd`` (byte 0 lowest), one ``prmt`` each on the GPU."""
    if ASM:
        low, high = tl.inline_asm_elementwise(
            "prmt.b32 $0, $2, $3, 0x5140; prmt.b32 $1, $2, $3, 0x7362;",
            "=r,=r,r,r",
            [even, odd],
            dtype=(tl.uint32, tl.uint32),
            is_pure=True,
            pack=1,
        )
    else:
        low = (even & 0xFF) | ((odd & 0xFF) << 8) | ((even & 0xFF00) << 8) | ((odd & 0xFF00) << 16)
        high = (
            ((even >> 16) & 0xFF)
            | ((odd >> 8) & 0xFF00)
            | ((even >> 8) & 0xFF0000)
            | (odd & 0xFF000000)
        )
    return low, high


@triton.jit
def _bytes_in_order(x):
    """The four bytes of each word of ``x (rows, words)`` along a new axis ``(rows, words,
    2, 2)`` in memory order: a register view, no instructions on the GPU."""
    return tl.join(tl.join(_byte(x, 0), _byte(x, 2)), tl.join(_byte(x, 1), _byte(x, 3)))


@triton.jit
def unpack_codes(words, FP8: tl.constexpr):
    """The 4-bit codes of int32 ``words (rows, words)`` (8 a word along K, low bits first)
    as ``(rows, 8 * words)`` MMA operands: int8 ``16 * (code - 8)`` or, with ``FP8``, the
    E4M3 values ``code * 2**-9``.

    The odd codes of a word are its high nibbles, the even ones its low nibbles: one bit
    operation each (after a shift) puts four codes into the bytes of a register, and two
    byte permutes interleave them into K order.
    """
    words = words.to(tl.uint32, bitcast=True)
    if FP8:
        even = words & 0x0F0F0F0F
        odd = (words >> 4) & 0x0F0F0F0F
    else:
        flipped = words ^ 0x88888888
        odd = flipped & 0xF0F0F0F0
        even = (flipped << 4) & 0xF0F0F0F0
    low, high = interleave_bytes(even, odd, BYTE_PERMUTE_ASM)
    # -- (rows, words, 2 [low, high], 4 bytes): codes 0..3 of a word, then 4..7
    codes = tl.permute(tl.join(_bytes_in_order(low), _bytes_in_order(high)), (0, 1, 4, 2, 3))
    codes = tl.reshape(codes, (words.shape[0], words.shape[1] * 8))
    if FP8:
        codes = codes.to(tl.float8e4nv, bitcast=True)
    return codes


@triton.jit
def tile_products(
    a_rows, w_rows, k0, K, part, row_sums, ones,
    BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, FP8: tl.constexpr,
):  # fmt: skip
    """``part + a[:, k0:k0+BLOCK_K] @ w^T`` of one K tile (and, for FP8, the tile's row sums
    of ``a`` added to ``row_sums``, ``ones (16, BLOCK_K)`` E4M3); columns past K read zero
    activations."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    offs_w = k0 // CODES_PER_WORD + tl.arange(0, BLOCK_K // CODES_PER_WORD)
    if EVEN_K:
        a = tl.load(a_rows + offs_k[None, :])
        words = tl.load(w_rows + offs_w[None, :])
    else:
        a = tl.load(a_rows + offs_k[None, :], mask=(offs_k < K)[None, :], other=0.0)
        w_mask = (offs_w < tl.cdiv(K, CODES_PER_WORD))[None, :]
        words = tl.load(w_rows + offs_w[None, :], mask=w_mask, other=0)
    # -- (BLOCK_N, BLOCK_K) codes of the tile's weight rows, multiplied transposed
    part = tl.dot(a, tl.trans(unpack_codes(words, FP8)), part)
    if FP8:
        # -- row sums on the tensor cores: a times a 16-column block of ones (every column
        # -- the same sum, so their mean is exact)
        row_sums += tl.sum(tl.dot(a, tl.trans(ones)), axis=1) * (1.0 / 16.0)
    return part, row_sums


@triton.jit
def scaled_sums(part, row_sums, scale, FP8: tl.constexpr):
    """A group's products ``part`` as float32 sums of ``a * (code - 8)`` times ``scale``, in
    units of :func:`sums_unit` (a power of two the epilogue applies once per output, not
    once per column of every group: the same roundings)."""
    if FP8:
        offset = row_sums[:, None] * (CODE_ZERO * FP8_CODE_UNIT)
        return (part - offset) * scale[None, :]
    return part.to(tl.float32) * scale[None, :]


@triton.jit
def sums_unit(FP8: tl.constexpr):
    """What :func:`scaled_sums` leaves out: ``2**9`` of the E4M3 codes, ``1/16`` of the
    INT8 ones (``16 * (code - 8)``)."""
    if FP8:
        return 1.0 / FP8_CODE_UNIT
    return 1.0 / 16.0


@triton.jit
def w4a8_gemm_kernel(
    a_ptr, a_scale_ptr, w_ptr, scales_ptr, b_ptr, out_ptr, ws_ptr, lock_ptr, ones_ptr,
    M, N, K, stride_am, stride_wn, stride_sn, stride_om, M_BUCKET, SPLIT_K,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, GROUP_TILES: tl.constexpr, EVEN_K: tl.constexpr,
    SPLIT_TILES: tl.constexpr,
):  # fmt: skip
    FP8: tl.constexpr = a_ptr.dtype.element_ty != tl.int8
    # -- output tile, grouped along M for L2 reuse of the weight; rows past M (columns past
    # -- N) read the last one, whose products are never stored: loads need no row masks
    offs_m, offs_n, m_mask, n_mask = tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows_m = tl.minimum(offs_m, M - 1)
    cols_n = tl.minimum(offs_n, N - 1)
    a_rows = a_ptr + rows_m[:, None].to(tl.int64) * stride_am
    w_rows = w_ptr + cols_n[:, None].to(tl.int64) * stride_wn
    s_offs = cols_n * stride_sn  # -- int32: N x G scales never reach 2**31
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    part_dtype: tl.constexpr = tl.float32 if FP8 else tl.int32
    ones = a_scale_ptr  # -- INT8: no row sums
    if FP8:
        # -- the row sums' MMA operand, loaded once: a constant tile would be rebuilt in
        # -- registers and stored to shared memory byte by byte every K tile
        offs_ones = tl.arange(0, 16)[:, None] * BLOCK_K + tl.arange(0, BLOCK_K)[None, :]
        ones = tl.load(ones_ptr + offs_ones)
    if GROUP_TILES == 0:
        # -- one scale per row: the K tiles of this split, scaled once
        start, end = split_k_run(tl.cdiv(K, BLOCK_K), SPLIT_K)
        part = tl.zeros((BLOCK_M, BLOCK_N), dtype=part_dtype)
        row_sums = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for t in range(start, end):
            part, row_sums = tile_products(
                a_rows, w_rows, t * BLOCK_K, K, part, row_sums, ones, BLOCK_K, EVEN_K, FP8
            )
        scale = tl.load(scales_ptr + s_offs).to(tl.float32)
        acc = scaled_sums(part, row_sums, scale, FP8)
    else:
        # -- the groups of this split: exact int32 (INT8) or float32 (FP8) sums, then scaled
        start, end = split_k_run(tl.cdiv(K, BLOCK_K * GROUP_TILES), SPLIT_K)
        for g in range(start, end):
            part = tl.zeros((BLOCK_M, BLOCK_N), dtype=part_dtype)
            row_sums = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for j in tl.static_range(GROUP_TILES):
                k0 = (g * GROUP_TILES + j) * BLOCK_K
                part, row_sums = tile_products(
                    a_rows, w_rows, k0, K, part, row_sums, ones, BLOCK_K, EVEN_K, FP8
                )
            scale = tl.load((scales_ptr + g) + s_offs).to(tl.float32)
            acc += scaled_sums(part, row_sums, scale, FP8)
    # -- the last split of a tile adds the splits' float32 partial tiles in split order
    out_mask = m_mask[:, None] & n_mask[None, :]
    last = SPLIT_K >= 1
    if SPLIT_TILES:
        if SPLIT_K > 1:
            acc, last = sum_split_tiles(
                acc, ws_ptr, lock_ptr, offs_m, offs_n, out_mask, M, N, SPLIT_K
            )
    # -- epilogue: per-row activation scale, cast, bias in the output dtype
    if last:
        a_scale = tl.load(a_scale_ptr + rows_m)
        out = (acc * sums_unit(FP8) * a_scale[:, None]).to(out_ptr.dtype.element_ty)
        if HAS_BIAS:
            bias = tl.load(b_ptr + cols_n).to(tl.float32)
            out = (out.to(tl.float32) + bias[None, :]).to(out_ptr.dtype.element_ty)
        out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
        tl.store(out_ptrs, out, mask=out_mask)


def _config(
    bm: int, bn: int, split_k: int, warps: int, stages: int, group_m: int = 8
) -> triton.Config:
    meta = {"BLOCK_M": bm, "BLOCK_N": bn, "SPLIT_K": split_k, "GROUP_M": group_m}
    return triton.Config(meta, num_warps=warps, num_stages=stages)


# -- decode and small batches: short tiles along M, groups split over programs so that the
# -- weight streams on every SM; 64 rows in one tile unpack each weight once per program.
# -- The first config of each list is the one run untuned (interpreter, --quick model)
SPLIT_K_CONFIGS = [
    _config(bm, bn, sk, 4, st)
    for bm, bn in ((64, 128), (16, 128), (16, 64), (32, 128), (64, 64))
    for sk in (2, 1, 4, 8)
    for st in (3, 4)
]
# -- FP8: sm_90's E4M3 MMA is the warpgroup one (64-row tiles); shorter tiles take the
# -- mma.sync path, where Triton widens both operands to fp16 element by element
FP8_SPLIT_K_CONFIGS = [c for c in SPLIT_K_CONFIGS if c.kwargs["BLOCK_M"] == 64]
# -- larger M: whole-K tiles, wgmma-sized
TILED_CONFIGS = [
    _config(64, 128, 1, 4, 4),
    _config(128, 64, 1, 4, 4),
    _config(64, 256, 1, 8, 3),
    _config(256, 64, 1, 8, 3),
    _config(128, 128, 1, 8, 3),
]
# -- split-K partial tiles: a launch's float32 workspace (splits x M x N) stays under this
SPLIT_WORKSPACE_BYTES = 16 << 20


@functools.cache
def device_sms(device: torch.device) -> int | None:
    """Streaming multiprocessors of a CUDA ``device``; None elsewhere (no fill limit)."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_limit(m: int, n: int, k_steps: int, config: triton.Config, sms: int | None) -> int:
    """The most splits worth trying for ``config`` on ``m x n`` outputs: the fewest (a power
    of two) whose programs cover all ``sms`` SMs, at most one per K step (group) and no
    more than :data:`SPLIT_WORKSPACE_BYTES` of partial tiles allows (at least 1)."""
    rows = m_bucket(m)
    tiles = triton.cdiv(rows, config.kwargs["BLOCK_M"]) * triton.cdiv(n, config.kwargs["BLOCK_N"])
    fill = triton.next_power_of_2(triton.cdiv(sms, tiles)) if sms else k_steps
    room = SPLIT_WORKSPACE_BYTES // (4 * rows * n)
    return max(1, min(fill, k_steps, room))


def k_steps(k: int, block_k: int, group_tiles: int) -> int:
    """The K steps a launch splits: its groups (``GROUP_TILES`` K tiles each), or its K tiles
    when one scale covers a row (``GROUP_TILES`` 0)."""
    return triton.cdiv(k, block_k * max(1, group_tiles))


def prune_splits(configs, named_args, **kwargs):
    """The split tuning's prune: no config splits more than :func:`split_limit` allows it,
    and tiles fit the split-K counters."""
    args = {**named_args, **kwargs}
    steps = k_steps(args["K"], args["BLOCK_K"], args["GROUP_TILES"])
    m, n, sms = args["M"], args["N"], device_sms(args["a_ptr"].device)
    kept = [c for c in configs if c.kwargs["SPLIT_K"] <= split_limit(m, n, steps, c, sms)]
    return prune_to_counters(kept, named_args, **kwargs)


_KEY = ["M_BUCKET", "N", "K", "GROUP_TILES", "EVEN_K"]
# -- (split-K, tiled) tunings per activation dtype: choices made and cached apart
TUNED = {
    torch.int8: (
        autotuned(w4a8_gemm_kernel, SPLIT_K_CONFIGS, _KEY, prune=prune_splits),
        autotuned(w4a8_gemm_kernel, TILED_CONFIGS, _KEY),
    ),
    torch.float8_e4m3fn: (
        autotuned(w4a8_gemm_kernel, FP8_SPLIT_K_CONFIGS, _KEY, prune=prune_splits),
        autotuned(w4a8_gemm_kernel, TILED_CONFIGS, _KEY),
    ),
}


def check_operands(
    a: torch.Tensor, a_scale: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
    group_size: int, bias: torch.Tensor | None,
) -> None:  # fmt: skip
    """Shapes and dtypes of a W4A8 GEMM (raises ValueError naming the operand)."""
    if a.dim() != 2 or a.dtype not in (torch.int8, torch.float8_e4m3fn):
        raise ValueError(f"a must be (M, K) int8 or float8_e4m3fn, got {a.dtype} {tuple(a.shape)}")
    (m, k), n = a.shape, qweight.shape[0]
    words = -(-k // 32) * 4
    if qweight.dtype != torch.int32 or tuple(qweight.shape) != (n, words):
        raise ValueError(
            f"qweight must be int32 (N, {words}) for K = {k}, got {qweight.dtype} "
            f"{tuple(qweight.shape)}"
        )
    if group_size != -1 and (group_size < 32 or group_size & (group_size - 1)):
        raise ValueError(
            f"group_size must be -1 or a power of two >= 32 (one 8-bit MMA step), got {group_size}"
        )
    if a.dtype == torch.int8 and (k if group_size == -1 else group_size) > INT8_MAX_GROUP:
        raise ValueError(
            f"an INT8 group's int32 sums hold at most {INT8_MAX_GROUP} columns, got "
            f"{k if group_size == -1 else group_size} (group_size {group_size}, K = {k})"
        )
    groups = 1 if group_size == -1 else -(-k // group_size)
    if tuple(scales.shape) != (n, groups):
        raise ValueError(f"scales must be ({n}, {groups}), got {tuple(scales.shape)}")
    if a_scale.dtype != torch.float32 or a_scale.numel() != m:
        raise ValueError(f"a_scale must be {m} float32 values, got {a_scale.dtype} {a_scale.shape}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must be ({n},), got {tuple(bias.shape)}")


def k_tiling(k: int, group_size: int) -> dict:
    """``BLOCK_K``, ``GROUP_TILES`` (K tiles per group; 0: one scale per row) and
    ``EVEN_K`` (every tile full: no K masks) of a launch."""
    block_k = MAX_BLOCK_K if group_size == -1 else min(MAX_BLOCK_K, group_size)
    group_tiles = 0 if group_size == -1 else group_size // block_k
    return dict(BLOCK_K=block_k, GROUP_TILES=group_tiles, EVEN_K=k % block_k == 0)


@functools.cache
def fp8_ones(device: torch.device) -> torch.Tensor:
    """``(16, MAX_BLOCK_K)`` E4M3 ones, the FP8 row sums' MMA operand (made once per
    device, read once per program)."""
    return torch.ones(16, MAX_BLOCK_K, device=device).to(torch.float8_e4m3fn)


def _tiles_grid(m: int, n: int, meta: dict) -> tuple[int, int]:
    tiles = triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])
    return (tiles, meta["SPLIT_K"])


def w4a8_gemm(
    a: torch.Tensor, a_scale: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
    group_size: int, bias: torch.Tensor | None, out_dtype: torch.dtype,
    config: triton.Config | None = None, out: torch.Tensor | None = None,
    split_k: bool | None = None,
) -> torch.Tensor:  # fmt: skip
    """The module docstring's ``out``; ``split_k`` None picks the tuning by M, ``config``
    runs one explicit config of it instead of autotuning, ``out`` is an optional
    preallocated output."""
    check_operands(a, a_scale, qweight, scales, group_size, bias)
    check_device(a, a_scale, qweight, scales, bias)
    if a.dtype == torch.float8_e4m3fn:
        check_fp8_support(a.device)
    a = a if a.stride(-1) == 1 else a.contiguous()
    qweight = qweight if qweight.stride(-1) == 1 else qweight.contiguous()
    (m, k), n = a.shape, qweight.shape[0]
    split_k = m <= SPLIT_K_MAX_M if split_k is None else split_k
    if config is not None and not split_k and config.kwargs["SPLIT_K"] != 1:
        raise ValueError(f"the tiled W4A8 GEMM takes SPLIT_K=1 configs only, got {config}")
    out = output(out, (m, n), out_dtype, a.device)
    tiling = k_tiling(k, group_size)
    if split_k:
        tuned, args = TUNED[a.dtype][0], dict(M=m, N=n, K=k, a_ptr=a, **tiling)
        configs = prune_splits(tuned.configs, args) if config is None else []
        if config is None and interpreting() and a.device.type == "cpu":
            config = configs[0]  # -- the interpreter times nothing: the first config kept runs
        ws, locks = split_workspace(configs, config, m, n, torch.float32, a.device)
    else:
        ws = locks = out  # -- never read by the tiled tuning
    run_kernel(
        TUNED[a.dtype][0 if split_k else 1],
        functools.partial(_tiles_grid, m, n),
        config,
        **dict(a_ptr=a, a_scale_ptr=a_scale.reshape(-1), stride_am=a.stride(0)),
        **dict(w_ptr=qweight, scales_ptr=scales, stride_wn=qweight.stride(0)),
        **dict(stride_sn=scales.stride(0), ws_ptr=ws, lock_ptr=locks, SPLIT_TILES=split_k),
        ones_ptr=fp8_ones(a.device) if a.dtype == torch.float8_e4m3fn else a,
        **tiling,
        **output_args(out, bias, m, n, k),
    )
    return out
