"""W4A8 GEMM: 8-bit activations x 4-bit grouped weights on INT8 (or FP8) tensor cores.

``w4a8_gemm(a, a_scale, qweight, scales, group_size, bias, out_dtype)``: ``a (M, K)``
int8 or float8_e4m3fn (activations quantized per row, see :mod:`.act_quant`),
``a_scale (M, 1)`` float32; ``qweight (N, ceil(K/32)*4)`` int32, the packed unsigned
4-bit codes (8 nibbles a word along K, low bits first; the weight is ``code - 8``),
``scales (N, G)`` one per group of ``group_size`` input columns (-1: one per row; the
last group shorter when it does not divide K).  Returns ``(M, N)`` in ``out_dtype``:

    out[m, n] = a_scale[m] * sum_g scales[n, g] * sum_{k in g} a[m, k] (code[n, k] - 8)

Each K tile's codes are unpacked in registers to int8 (exact) or E4M3 (exact: -8..7)
and multiplied on tensor cores; a group's products accumulate exactly in int32 (INT8)
or in float32 (FP8) and are scaled by the group's weight scale when the group ends
(``BLOCK_K`` divides the group), the per-row activation scale is applied once in the
epilogue (NaN scales of non-finite rows make those output rows NaN), then the cast and
the bias in the output dtype, as the reference orders them.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._launch import autotuned, check_device, check_fp8_support, output, output_args, run_kernel
from ._tiles import store_tile, tile_offsets

CODES_PER_WORD = 8  # -- 4-bit codes in one int32 word
CODE_ZERO = 8
MAX_BLOCK_K = 64  # -- INT8 / FP8 MMA steps of 32 along K, two per tile


@triton.jit
def _byte(x, J: tl.constexpr):
    """Byte ``J`` of every word of ``x`` as int8 (a byte select, no arithmetic)."""
    return (x >> (8 * J)).to(tl.int8)


@triton.jit
def unpack_sixteenths(words):
    """int8 ``16 * (code - 8)`` ``(rows, 8 * words)`` of 4-bit codes packed along K in int32
    ``words (rows, words)`` (8 a word, low bits first), four codes an instruction (SWAR).

    A code sitting in the high nibble of a byte, with its top bit flipped, is the int8
    ``16 * (code - 8)``: offset binary turned two's complement, times 16.  So the odd
    codes of a word are one ``LOP3`` ``(w & 0xF0F0F0F0) ^ 0x80808080`` and the even ones
    the same after ``w << 4``: three instructions for eight codes, no per-code subtract
    or conversion.  The products are 16 times the codes' (exact in int32: ``|16 * 127 *
    8| * K < 2**31`` for K below 2**17); the caller divides the group sum by 16.
    """
    words = words.to(tl.uint32, bitcast=True)
    odd = (words & 0xF0F0F0F0) ^ 0x80808080
    even = ((words << 4) & 0xF0F0F0F0) ^ 0x80808080
    c0, c2, c4, c6 = _byte(even, 0), _byte(even, 1), _byte(even, 2), _byte(even, 3)
    c1, c3, c5, c7 = _byte(odd, 0), _byte(odd, 1), _byte(odd, 2), _byte(odd, 3)
    # -- code j = 4a + 2b + c sits at join levels (a inner, b middle, c outer)
    lows = tl.join(tl.join(c0, c4), tl.join(c2, c6))
    highs = tl.join(tl.join(c1, c5), tl.join(c3, c7))
    return tl.reshape(tl.join(lows, highs), (words.shape[0], words.shape[1] * 8))


@triton.jit
def w4a8_gemm_kernel(
    a_ptr, a_scale_ptr, w_ptr, scales_ptr, b_ptr, out_ptr,
    M, N, K, GROUP_SIZE, stride_am, stride_wn, stride_sn, stride_om, M_BUCKET,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    # -- output tile, grouped along M for L2 reuse of the weight
    offs_m, offs_n, m_mask, n_mask = tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    a_rows = a_ptr + offs_m[:, None].to(tl.int64) * stride_am
    w_cols = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
    s_cols = scales_ptr + offs_n.to(tl.int64) * stride_sn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    tiles_per_group = tl.cdiv(GROUP_SIZE, BLOCK_K)
    for g in range(0, tl.cdiv(K, GROUP_SIZE)):
        # -- one group: exact int32 sums (INT8) or float32 sums (FP8) of its K tiles
        if a_ptr.dtype.element_ty == tl.int8:
            part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        else:
            part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for t in range(0, tiles_per_group):
            offs_k = g * GROUP_SIZE + t * BLOCK_K + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            a = tl.load(a_rows + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            # -- unpack: each word once, its 8 nibbles (low bits first) along K
            offs_w = (g * GROUP_SIZE + t * BLOCK_K) // 8 + tl.arange(0, BLOCK_K // 8)
            if a_ptr.dtype.element_ty == tl.int8:
                # -- (BLOCK_N, words): a weight row's words, unpacked four codes at a time
                w_mask = n_mask[:, None] & (offs_w < tl.cdiv(K, 8))[None, :]
                words = tl.load(w_rows + offs_w[None, :], mask=w_mask, other=0)
                part = tl.dot(a, tl.trans(unpack_sixteenths(words)), part)
            else:
                w_mask = (offs_w < tl.cdiv(K, 8))[:, None] & n_mask[None, :]
                words = tl.load(w_cols + offs_w[:, None], mask=w_mask, other=0)
                nibbles = (words[:, None, :] >> (tl.arange(0, 8) * 4)[None, :, None]) & 0xF
                codes = tl.reshape(nibbles, (BLOCK_K, BLOCK_N)) - 8
                b = codes.to(tl.float32).to(a_ptr.dtype.element_ty)
                part = tl.dot(a, b, part)
        # -- the group's weight scale, per output column (INT8 sums are 16x, exactly)
        scale = tl.load(s_cols + g, mask=n_mask, other=0.0).to(tl.float32)
        if a_ptr.dtype.element_ty == tl.int8:
            part = part >> 4
        acc += part.to(tl.float32) * scale[None, :]
    # -- epilogue: per-row activation scale, cast, bias in the output dtype
    a_scale = tl.load(a_scale_ptr + offs_m, mask=m_mask, other=0.0)
    acc = acc * a_scale[:, None]
    acc = acc.to(out_ptr.dtype.element_ty).to(tl.float32)
    store_tile(acc, out_ptr, b_ptr, offs_m, offs_n, m_mask, n_mask, stride_om, HAS_BIAS, False)


def _config(bm: int, bn: int, warps: int, stages: int, group_m: int = 8) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": group_m}, num_warps=warps, num_stages=stages
    )


# -- decode and small batches: short tiles along M, wide along N; larger M: square tiles
CONFIGS = [
    _config(16, 64, 4, 4),
    _config(16, 128, 4, 4),
    _config(32, 64, 4, 4),
    _config(64, 64, 4, 3),
    _config(64, 128, 4, 3),
    _config(128, 128, 8, 3),
]
w4a8_tuned = autotuned(w4a8_gemm_kernel, CONFIGS, key=["M_BUCKET", "N", "K", "GROUP_SIZE"])


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
    if group_size != -1 and (group_size < 16 or group_size & (group_size - 1)):
        raise ValueError(f"group_size must be -1 or a power of two >= 16, got {group_size}")
    groups = 1 if group_size == -1 else -(-k // group_size)
    if tuple(scales.shape) != (n, groups):
        raise ValueError(f"scales must be ({n}, {groups}), got {tuple(scales.shape)}")
    if a_scale.dtype != torch.float32 or a_scale.numel() != m:
        raise ValueError(f"a_scale must be {m} float32 values, got {a_scale.dtype} {a_scale.shape}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must be ({n},), got {tuple(bias.shape)}")


def _tiles_grid(m: int, n: int, meta: dict) -> tuple[int]:
    return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)


def w4a8_gemm(
    a: torch.Tensor, a_scale: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
    group_size: int, bias: torch.Tensor | None, out_dtype: torch.dtype,
    config: triton.Config | None = None, out: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """The module docstring's ``out``; ``config`` runs one explicit config instead of
    autotuning, ``out`` is an optional preallocated output."""
    check_operands(a, a_scale, qweight, scales, group_size, bias)
    check_device(a, a_scale, qweight, scales, bias)
    if a.dtype == torch.float8_e4m3fn:
        check_fp8_support(a.device)
    a = a if a.stride(-1) == 1 else a.contiguous()
    (m, k), n = a.shape, qweight.shape[0]
    group = k if group_size == -1 else group_size
    block_k = MAX_BLOCK_K if group_size == -1 else min(MAX_BLOCK_K, group_size)
    out = output(out, (m, n), out_dtype, a.device)
    run_kernel(
        w4a8_tuned,
        functools.partial(_tiles_grid, m, n),
        config,
        **dict(a_ptr=a, a_scale_ptr=a_scale.reshape(-1), stride_am=a.stride(0)),
        **dict(w_ptr=qweight, scales_ptr=scales, stride_wn=qweight.stride(0)),
        **dict(stride_sn=scales.stride(0), GROUP_SIZE=group, BLOCK_K=block_k),
        **output_args(out, bias, m, n, k),
    )
    return out
