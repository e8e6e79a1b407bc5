"""Weight dequantization: the Triton helpers the weight-only kernels share, a dequantize kernel.

Weight formats (``N`` output features, ``K`` input features):

* packed INTn, ``bits`` in 2..8: ``qweight (N, ceil(K/32)*bits)`` int32 -- one
  little-endian bitstream per output row, code ``k`` at bits ``[k*bits, (k+1)*bits)``,
  word 0 holding the lowest bits; 3/5/6/7-bit codes may straddle two words.  Codes
  are unsigned; ``w = (code - zero) * scale`` with ``zeros (N, G)`` uint8, or the
  implied zero ``2**(bits-1)`` when ``zeros`` is None (symmetric).
* 8-bit storage ``qweight (N, K)``: int8 (symmetric INT8, ``w = q * scale``) or
  float8_e4m3fn (``w = float(q) * scale``).
* ``scales (N, G)`` in fp32/bf16/fp16, ``G = ceil(K / group_size)`` (the last group
  may be partial), or ``(N, 1)`` per channel (``group_size == -1``) or ``(1, 1)`` per
  tensor.  Values are dequantized in float32, as the reference numerics do.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import autotune_benchmark, check_device, check_fp8_support, output, run_kernel

PACKED_DTYPES = (torch.int32,)
BYTE_DTYPES = (torch.int8, torch.float8_e4m3fn)


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


@triton.jit
def dequantize_tile(
    rows,
    s_rows,
    z_rows,
    t,
    n_mask,
    K,
    BITS: tl.constexpr,
    PACKED: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """float32 weight tile ``(rows, BLOCK_K)`` of K tile ``t``: ``(code - zero) * scale``.

    ``rows``, ``s_rows``, ``z_rows``: ``(rows, 1)`` pointers; ``n_mask``: ``(rows,)``.
    The qparams are loaded once per row when one group spans the tile, per element otherwise.
    """
    row_mask = n_mask[:, None]
    codes = load_code_tile(rows, t, row_mask, K, BITS, PACKED, BLOCK_K)
    if GROUP_SIZE == 0 or GROUP_SIZE % BLOCK_K == 0:
        g = group_index(t * BLOCK_K, GROUP_SIZE)
        scale, zero = load_qparams(s_rows, z_rows, g, row_mask, BITS, PACKED, HAS_ZEROS)
    else:
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
_dequantize_tuned = triton.autotune(
    _DEQUANT_CONFIGS,
    key=["N", "K", "BITS", "GROUP_SIZE"],
    cache_results=True,
    do_bench=autotune_benchmark,
)(_dequantize_kernel)


# -- launcher-side checks shared by the matmul families


def kernel_group_size(group_size: int, num_groups: int) -> int:
    """Constexpr group size for the kernels: 0 for per-channel or per-tensor scales."""
    return 0 if group_size == -1 or num_groups == 1 else group_size


def check_weight(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    k: int,
) -> None:
    """Validate a weight against the formats in the module docstring (raises ValueError)."""
    check_device(qweight, scales, zeros)
    n = qweight.shape[0]
    if qweight.dtype in PACKED_DTYPES:
        if not 2 <= bits <= 8:
            raise ValueError(f"packed qweight needs bits in 2..8, got {bits}")
        width = -(-k // 32) * bits
        if tuple(qweight.shape) != (n, width):
            raise ValueError(
                f"qweight must be ({n}, {width}) for K={k}, got {tuple(qweight.shape)}"
            )
    elif qweight.dtype in BYTE_DTYPES:
        if bits != 8 or tuple(qweight.shape) != (n, k):
            raise ValueError(f"{qweight.dtype} qweight must be (N, {k}) with bits=8")
        if zeros is not None:
            raise ValueError("8-bit int8/fp8 storage is symmetric: zeros must be None")
        if qweight.dtype == torch.float8_e4m3fn:
            check_fp8_support(qweight.device)
    else:
        raise ValueError(f"qweight dtype {qweight.dtype} is not int32 (packed), int8 or fp8")
    if qweight.stride(-1) != 1:
        raise ValueError("qweight must be contiguous along K")
    g = 1 if group_size == -1 else -(-k // group_size)
    if group_size != -1 and group_size <= 0:
        raise ValueError(f"group_size must be -1 or positive, got {group_size}")
    if scales.dim() != 2 or scales.shape[1] != g or scales.shape[0] not in (1, n):
        raise ValueError(f"scales must be ({n}, {g}) (or (1, 1)), got {tuple(scales.shape)}")
    if zeros is not None and (zeros.dtype != torch.uint8 or tuple(zeros.shape) != (n, g)):
        raise ValueError(f"zeros must be uint8 ({n}, {g}), got {zeros.dtype} {tuple(zeros.shape)}")


def weight_meta(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
) -> dict:
    """Kernel arguments describing the weight (pointers, strides, constexpr flags)."""
    return dict(
        q_ptr=qweight,
        s_ptr=scales,
        z_ptr=zeros if zeros is not None else scales,
        stride_qn=qweight.stride(0),
        stride_sn=scales.stride(0) if scales.shape[0] > 1 else 0,
        stride_zn=zeros.stride(0) if zeros is not None else 0,
        BITS=bits,
        PACKED=qweight.dtype in PACKED_DTYPES,
        HAS_ZEROS=zeros is not None,
        GROUP_SIZE=kernel_group_size(group_size, scales.shape[1]),
    )


def dequantize_weight(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    k: int,
    dtype: torch.dtype = torch.bfloat16,
    config: triton.Config | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense ``(N, K)`` weight in ``dtype`` from any format above (Triton)."""
    check_weight(qweight, scales, zeros, bits, group_size, k)
    n = qweight.shape[0]
    w = output(out, (n, k), dtype, qweight.device)

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
        **weight_meta(qweight, scales, zeros, bits, group_size),
    )
    return w
