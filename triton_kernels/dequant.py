"""Weight dequantization: the Triton helpers the weight-only kernels share, a dequantize kernel.

The weight formats are described in :mod:`.weight`; these helpers read any of them
(``PACKED`` int32 bitstreams of 2..8-bit codes, or 8-bit int8/fp8 storage) and
dequantize in float32, as the reference numerics do.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import autotuned, output, run_kernel
from .weight import QuantWeight

# -- Triton helpers shared by the GEMV, GEMM and dequantize kernels


@triton.jit
def load_codes(
    row_ptr,
    k,
    mask,
    BITS: tl.constexpr,
    PACKED: tl.constexpr,
):
    """float32 code values at input index ``k`` of the rows ``row_ptr`` points to.

    ``row_ptr`` and ``k`` are broadcastable index tensors (any orientation).  Packed
    codes are read word by word from the row's bitstream; a code that straddles a
    word boundary takes its high bits from the next word.
    """
    if PACKED:
        bit = k * BITS
        word = bit >> 5
        shift = (bit & 31).to(tl.uint32)
        w0 = tl.load(row_ptr + word, mask=mask, other=0).to(tl.uint32, bitcast=True)
        code = w0 >> shift
        if 32 % BITS != 0:
            spill = mask & (shift + BITS > 32)
            w1 = tl.load(row_ptr + word + 1, mask=spill, other=0).to(tl.uint32, bitcast=True)
            code = code | (w1 << ((32 - shift) & 31))
        code = code & ((1 << BITS) - 1)
        return code.to(tl.int32).to(tl.float32)
    else:
        return tl.load(row_ptr + k, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def load_code_tile(
    row_ptr,
    t,
    row_mask,
    K,
    BITS: tl.constexpr,
    PACKED: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """float32 codes ``(rows, BLOCK_K)`` of K tile ``t`` for the rows ``row_ptr (rows, 1)``.

    Widths that divide 32 (2, 4, 8 bits) load whole int32 words contiguously
    (vectorised) and split each into its ``32 // BITS`` codes in registers; other
    widths gather per code with :func:`load_codes`.  Codes past ``K`` in the last
    word are the zero padding of the packed layout; callers mask their activations.
    """
    if PACKED and 32 % BITS == 0:
        CODES_PER_WORD: tl.constexpr = 32 // BITS
        WORDS: tl.constexpr = BLOCK_K // CODES_PER_WORD
        offs_w = t * WORDS + tl.arange(0, WORDS)
        k_words = tl.cdiv(K, 32) * BITS
        mask = row_mask & (offs_w[None, :] < k_words)
        words = tl.load(row_ptr + offs_w[None, :], mask=mask, other=0)
        words = words.to(tl.uint32, bitcast=True)
        shifts = (tl.arange(0, CODES_PER_WORD) * BITS).to(tl.uint32)
        codes = (words[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
        codes = tl.reshape(codes, (row_ptr.shape[0], BLOCK_K))
        return codes.to(tl.int32).to(tl.float32)
    else:
        offs_k = t * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = row_mask & (offs_k[None, :] < K)
        return load_codes(row_ptr, offs_k[None, :], mask, BITS, PACKED)


@triton.jit
def load_qparams(
    s_row_ptr,
    z_row_ptr,
    g,
    mask,
    BITS: tl.constexpr,
    PACKED: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
):
    """float32 ``(scale, zero)`` of group ``g`` for the rows the pointers point to."""
    scale = tl.load(s_row_ptr + g, mask=mask, other=0.0).to(tl.float32)
    if HAS_ZEROS:
        zero = tl.load(z_row_ptr + g, mask=mask, other=0).to(tl.float32)
    elif PACKED:
        zero = tl.zeros_like(scale) + (1 << (BITS - 1))
    else:
        zero = tl.zeros_like(scale)
    return scale, zero


@triton.jit
def group_index(k, GROUP_SIZE: tl.constexpr):
    """Group of input index ``k``; ``GROUP_SIZE == 0`` means one group per row."""
    if GROUP_SIZE > 0:
        return k // GROUP_SIZE
    else:
        return k * 0


MAGIC = tl.constexpr(0x4B000000)  # bits of the float 2**23, whose mantissa LSB is 1


@triton.jit
def _code_value(words, magic, J: tl.constexpr, BITS: tl.constexpr, zero, scale):
    """float32 ``(c_J - zero) * scale`` of code ``J`` of every word (magic-number trick).

    Code ``J`` masked in place at bit ``P`` and or-ed into the bits of ``2**23`` is the
    float ``2**23 + c * 2**P`` (one ``LOP3``); subtracting ``2**23 + z * 2**P`` leaves
    ``(c - z) * 2**P`` exactly, and ``scale * 2**-P`` turns it into the reference's
    ``(c - z) * scale`` bit for bit (for scales above ``2**-100``: no subnormal step).
    A code that would reach bit 23 is taken from the word shifted right by 16.  ``magic``
    (``MAGIC``) is a runtime value so that ptxas keeps it in one register: as an
    immediate it rematerialises a mask constant per code for the two-constant ``LOP3``.
    """
    START: tl.constexpr = J * BITS
    HIGH: tl.constexpr = START + BITS > 23
    P: tl.constexpr = START - 16 if HIGH else START
    if HIGH:
        words = words >> 16
    bits = (words & (((1 << BITS) - 1) << P)) | magic
    value = bits.to(tl.float32, bitcast=True)
    return (value - (zero * (1 << P) + 8388608.0)) * (scale * (1.0 / (1 << P)))


@triton.jit
def dequantize_words(
    row_ptr,
    t,
    row_mask,
    K,
    scale,
    zero,
    magic,
    BITS: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """float32 ``(code - zero) * scale`` ``(rows, BLOCK_K)`` of K tile ``t`` for 4- or 8-bit
    codes packed in int32 words (low bits first), one group per row in the tile.

    Each word's codes are dequantized position by position (:func:`_code_value`, no
    integer-to-float conversion, ``scale`` and ``zero`` ``(rows, 1)`` float32 applied per
    row), then interleaved back into K order in registers (``tl.join`` keeps the new axis
    inside each thread: no data movement).
    """
    CODES_PER_WORD: tl.constexpr = 32 // BITS
    WORDS: tl.constexpr = BLOCK_K // CODES_PER_WORD
    offs_w = t * WORDS + tl.arange(0, WORDS)
    mask = row_mask & (offs_w[None, :] < tl.cdiv(K, 32) * BITS)
    words = tl.load(row_ptr + offs_w[None, :], mask=mask, other=0).to(tl.uint32, bitcast=True)
    magic = magic.to(tl.uint32, bitcast=True)
    c0 = _code_value(words, magic, 0, BITS, zero, scale)
    c1 = _code_value(words, magic, 1, BITS, zero, scale)
    c2 = _code_value(words, magic, 2, BITS, zero, scale)
    c3 = _code_value(words, magic, 3, BITS, zero, scale)
    if BITS == 8:
        # code j = 2a + b sits at join levels (a inner, b outer)
        w = tl.join(tl.join(c0, c2), tl.join(c1, c3))
    else:
        c4 = _code_value(words, magic, 4, BITS, zero, scale)
        c5 = _code_value(words, magic, 5, BITS, zero, scale)
        c6 = _code_value(words, magic, 6, BITS, zero, scale)
        c7 = _code_value(words, magic, 7, BITS, zero, scale)
        # code j = 4a + 2b + c sits at join levels (a inner, b middle, c outer)
        even = tl.join(tl.join(c0, c4), tl.join(c2, c6))
        odd = tl.join(tl.join(c1, c5), tl.join(c3, c7))
        w = tl.join(even, odd)
    return tl.reshape(w, (row_ptr.shape[0], BLOCK_K))


@triton.jit
def dequantize_tile(
    rows,
    s_rows,
    z_rows,
    t,
    n_mask,
    K,
    magic,
    BITS: tl.constexpr,
    PACKED: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """float32 weight tile ``(rows, BLOCK_K)`` of K tile ``t``: ``(code - zero) * scale``.

    ``rows``, ``s_rows``, ``z_rows``: ``(rows, 1)`` pointers; ``n_mask``: ``(rows,)``.
    The qparams are loaded once per row when one group spans the tile, per element otherwise;
    4- and 8-bit packed codes are dequantized with :func:`dequantize_words` (``magic``:
    ``MAGIC``, passed by the launcher).
    """
    row_mask = n_mask[:, None]
    if GROUP_SIZE == 0 or GROUP_SIZE % BLOCK_K == 0:
        g = group_index(t * BLOCK_K, GROUP_SIZE)
        scale, zero = load_qparams(s_rows, z_rows, g, row_mask, BITS, PACKED, HAS_ZEROS)
        if PACKED and (BITS == 4 or BITS == 8):
            return dequantize_words(rows, t, row_mask, K, scale, zero, magic, BITS, BLOCK_K)
        codes = load_code_tile(rows, t, row_mask, K, BITS, PACKED, BLOCK_K)
    else:
        codes = load_code_tile(rows, t, row_mask, K, BITS, PACKED, BLOCK_K)
        offs_k = t * BLOCK_K + tl.arange(0, BLOCK_K)
        g = group_index(offs_k[None, :], GROUP_SIZE)
        w_mask = row_mask & (offs_k[None, :] < K)
        scale, zero = load_qparams(s_rows, z_rows, g, w_mask, BITS, PACKED, HAS_ZEROS)
    return (codes - zero) * scale


@triton.jit
def dot_weight_tile(x, w, acc):
    """``acc + x @ w^T`` on tensor cores, ``w`` cast to ``x``'s dtype; IEEE for float32 ``x``."""
    w = w.to(x.dtype)
    if x.dtype == tl.float32:
        return tl.dot(x, tl.trans(w), acc, input_precision="ieee")
    else:
        return tl.dot(x, tl.trans(w), acc)


# -- dequantize kernel (the large-M path: dequantize once, then cuBLAS)


@triton.jit
def _dequantize_kernel(
    q_ptr,
    s_ptr,
    z_ptr,
    w_ptr,
    N,
    K,
    stride_qn,
    stride_sn,
    stride_zn,
    stride_wn,
    BITS: tl.constexpr,
    PACKED: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # -- tile of the (N, K) weight owned by this program
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    n = offs_n[:, None].to(tl.int64)  # N * K may pass 2**31 elements
    k = offs_k[None, :]
    mask = (n < N) & (k < K)
    # -- codes and qparams, then (code - zero) * scale in float32
    codes = load_code_tile(q_ptr + n * stride_qn, tl.program_id(1), n < N, K, BITS, PACKED, BLOCK_K)
    g = group_index(k, GROUP_SIZE)
    scale, zero = load_qparams(
        s_ptr + n * stride_sn, z_ptr + n * stride_zn, g, mask, BITS, PACKED, HAS_ZEROS
    )
    w = (codes - zero) * scale
    tl.store(w_ptr + n * stride_wn + k, w.to(w_ptr.dtype.element_ty), mask=mask)


_DEQUANT_CONFIGS = [
    triton.Config({"BLOCK_N": 32, "BLOCK_K": 256}, num_warps=4),
    triton.Config({"BLOCK_N": 64, "BLOCK_K": 128}, num_warps=4),
    triton.Config({"BLOCK_N": 16, "BLOCK_K": 512}, num_warps=8),
]
_dequantize_tuned = autotuned(
    _dequantize_kernel, _DEQUANT_CONFIGS, key=["N", "K", "BITS", "GROUP_SIZE"]
)


def dequantize_weight(
    weight: QuantWeight,
    k: int,
    dtype: torch.dtype = torch.bfloat16,
    config: triton.Config | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense ``(N, K)`` weight in ``dtype`` from any format of :mod:`.weight` (Triton)."""
    weight.check(k)
    n = weight.out_features
    w = output(out, (n, k), dtype, weight.qweight.device)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(k, meta["BLOCK_K"]))

    run_kernel(
        _dequantize_tuned,
        grid,
        config,
        w_ptr=w,
        N=n,
        K=k,
        stride_wn=w.stride(0),
        **weight.kernel_args(),
    )
    return w
