"""Weight-only FP4 E2M1 GEMM (NVFP4, MXFP4): codes decoded in registers, then ``tl.dot``.

``x (M, K)`` bf16/fp16/fp32 times ``W (N, K)`` held as ``qweight (N, ceil(K/2))``
uint8, two E2M1 codes a byte (column ``2j`` in the low nibble of byte ``j``), with
one scale per ``BLOCK`` values along K: ``scales (N, ceil(K/BLOCK))`` read as raw
bytes, E4M3 divided by the float32 ``global_scale (1,)`` (NVFP4, BLOCK 16) or E8M0
``2**(e-127)`` (MXFP4, BLOCK 32).  Every conversion is bit arithmetic (no FP8 or FP4
instructions, so any GPU Triton runs on will do): a code's 3 magnitude bits shifted
into a float16's exponent and mantissa are the value times ``2**-14``, an E4M3 byte's
7 low bits the scale times ``2**-8``.  The weight tile is the reference's own values
(float32, then cast to ``x``'s dtype for the MMA); accumulation is float32.
Split-K tiles for M up to 64, one program per output tile above (as ``dequant_gemm``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._launch import check_device, run_kernel
from ._tiles import autotune_tiles, split_k_run, store_tile, tile_config, tile_offsets, weight_tiles
from .dequant import dot_weight_tile

SPLIT_K_MAX_M = 64
# -- constexpr: the compiled kernels read them as constants
E2M1_TO_FP16 = tl.constexpr(16384.0)  # 2**14: an E2M1 code's bits in a float16, to its value
E4M3_TO_FP16 = tl.constexpr(256.0)  # 2**8: the same for an E4M3 byte's exponent and mantissa
E8M0_SMALLEST = tl.constexpr(2.0**-127)  # exponent byte 0: no float32 normal's bit pattern


@triton.jit
def _block_multipliers(
    s_rows, g_ptr, t, n_mask, G, BLOCK_K: tl.constexpr, BLOCK: tl.constexpr, E8M0: tl.constexpr
):
    """float32 ``(BLOCK_N, BLOCK_K // BLOCK)``: the multiplier of each block of K tile ``t``."""
    offs_g = t * (BLOCK_K // BLOCK) + tl.arange(0, BLOCK_K // BLOCK)
    mask = n_mask[:, None] & (offs_g[None, :] < G)
    s = tl.load(s_rows + offs_g[None, :], mask=mask, other=0).to(tl.int32)
    if E8M0:
        power = (s << 23).to(tl.float32, bitcast=True)
        mult = tl.where(s == 0, E8M0_SMALLEST, power)
    else:
        mult = tl.div_rn(e4m3_bits_to_float(s), tl.load(g_ptr).to(tl.float32))
    return mult


@triton.jit
def load_e2m1_tile(q_rows, t, r_mask, K, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """float32 ``(ROWS, BLOCK_K)`` E2M1 values of K tile ``t`` from rows of packed bytes."""
    # -- (ROWS, BLOCK_K / 2) bytes, split into nibbles in column order
    offs_b = t * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
    b_mask = r_mask[:, None] & (offs_b[None, :] < (K + 1) // 2)
    byte = tl.load(q_rows + offs_b[None, :], mask=b_mask, other=0).to(tl.int16)
    return e2m1_to_float(tl.join(byte & 0xF, byte >> 4).reshape(ROWS, BLOCK_K))


@triton.jit
def e2m1_to_float(code):
    """float32 values of E2M1 codes (int16/int32): in a float16 by bits, the sign to bit 15,
    exponent and mantissa to bits 9-11, are the value times ``2**-14``."""
    bits = (((code & 8) << 12) | ((code & 7) << 9)).to(tl.int16)
    return bits.to(tl.float16, bitcast=True).to(tl.float32) * E2M1_TO_FP16


@triton.jit
def e4m3_bits_to_float(byte):
    """float32 values of E4M3 bytes (int32; no NaN byte: values are saturated): the 7 low
    bits in a float16's exponent and mantissa are the value times ``2**-8``."""
    half = (((byte & 0x80) << 8) | ((byte & 0x7F) << 7)).to(tl.int16).to(tl.float16, bitcast=True)
    return half.to(tl.float32) * E4M3_TO_FP16


@triton.jit
def _fp4_gemm_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    g_ptr,
    b_ptr,
    out_ptr,
    M,
    N,
    K,
    G,
    stride_xm,
    stride_qn,
    stride_sn,
    stride_om,
    M_BUCKET,
    BLOCK: tl.constexpr,
    E8M0: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SPLIT_K,
    ATOMIC: tl.constexpr,
):
    # -- output tile of this program; row bases in int64 (rows times strides may pass 2**31)
    offs_m, offs_n, m_mask, n_mask = tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    q_rows = q_ptr + offs_n[:, None].to(tl.int64) * stride_qn
    s_rows = s_ptr + offs_n[:, None].to(tl.int64) * stride_sn
    t_start, t_end = split_k_run(tl.cdiv(K, BLOCK_K), SPLIT_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(t_start, t_end):
        offs_k = t * BLOCK_K + tl.arange(0, BLOCK_K)
        x_mask = m_mask[:, None] & (offs_k[None, :] < K)
        x = tl.load(x_rows + offs_k[None, :], mask=x_mask, other=0.0)
        value = load_e2m1_tile(q_rows, t, n_mask, K, BLOCK_N, BLOCK_K)
        # -- one multiplier per block of BLOCK values, then the MMA
        mult = _block_multipliers(s_rows, g_ptr, t, n_mask, G, BLOCK_K, BLOCK, E8M0)
        w = value.reshape(BLOCK_N, BLOCK_K // BLOCK, BLOCK) * mult[:, :, None]
        acc = dot_weight_tile(x, w.reshape(BLOCK_N, BLOCK_K), acc)
    # -- epilogue: bias, then atomics into float32 (split-K) or a cast store
    store_tile(acc, out_ptr, b_ptr, offs_m, offs_n, m_mask, n_mask, stride_om, HAS_BIAS, ATOMIC)


# -- BLOCK_K a multiple of 32, so every K tile holds whole NVFP4 and MXFP4 blocks
SPLIT_K_CONFIGS = [
    tile_config(16, bn, bk, sk, 4, st)
    for bn, bk in ((64, 128), (128, 64), (32, 128))
    for sk in (1, 2, 4, 8)
    for st in (3, 4)
]
TILED_CONFIGS = [
    tile_config(128, 128, 64, 1, 8, 3),
    tile_config(64, 128, 64, 1, 4, 4),
    tile_config(128, 64, 64, 1, 4, 4),
    tile_config(64, 64, 64, 1, 4, 4),
]
_KEY = ["M_BUCKET", "N", "K", "BLOCK"]
_split_k_tuned = autotune_tiles(_fp4_gemm_kernel, SPLIT_K_CONFIGS, _KEY, split_k=True)
_tiled_tuned = autotune_tiles(_fp4_gemm_kernel, TILED_CONFIGS, _KEY, split_k=False)


@dataclass(frozen=True)
class Fp4Weight:
    """An FP4 weight in the module docstring's layout: NVFP4 when ``global_scale`` is given
    (E4M3 ``scales``, ``block`` 16), MXFP4 when it is None (uint8 E8M0, ``block`` 32)."""

    qweight: torch.Tensor
    scales: torch.Tensor
    global_scale: torch.Tensor | None
    block: int

    def check(self, k: int) -> None:
        """Shapes and dtypes of the weight for ``K = k``, named in the error."""
        if self.block not in (16, 32):
            raise ValueError(f"block must be 16 (NVFP4) or 32 (MXFP4), got {self.block}")
        n = self.qweight.shape[0]
        scale_dtype = torch.uint8 if self.global_scale is None else torch.float8_e4m3fn
        expected = {
            "qweight": (self.qweight, torch.uint8, (n, -(-k // 2))),
            "scales": (self.scales, scale_dtype, (n, -(-k // self.block))),
        }
        if self.global_scale is not None:
            expected["global_scale"] = (self.global_scale, torch.float32, (1,))
        for name, (t, dtype, shape) in expected.items():
            if t.dtype != dtype or tuple(t.shape) != shape:
                raise ValueError(f"{name} must be {dtype} {shape}, got {t.dtype} {tuple(t.shape)}")

    def kernel_args(self) -> dict:
        """Kernel arguments describing the weight (the scales read as raw bytes)."""
        scale_bytes = self.scales.view(torch.uint8)
        return dict(
            q_ptr=self.qweight,
            s_ptr=scale_bytes,
            g_ptr=self.global_scale if self.global_scale is not None else scale_bytes,
            G=self.scales.shape[1],
            stride_qn=self.qweight.stride(0),
            stride_sn=scale_bytes.stride(0),
            BLOCK=self.block,
            E8M0=self.global_scale is None,
        )


def fp4_gemm(
    x: torch.Tensor,
    weight: Fp4Weight,
    bias: torch.Tensor | None,
    config: triton.Config | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x (M, K) @ W^T + bias`` -> ``(M, N)`` in ``x.dtype`` (shapes in the module docstring).

    ``config`` runs one explicit config (split-K for M up to 64) instead of autotuning.
    """
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (M, K), got {tuple(x.shape)}")
    weight.check(x.shape[1])
    check_device(x, weight.qweight, weight.scales, weight.global_scale, bias)
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    n = weight.qweight.shape[0]
    split_k = m <= SPLIT_K_MAX_M
    out, acc, grid, args = weight_tiles(x, weight.kernel_args(), n, bias, split_k, config, out)
    run_kernel(_split_k_tuned if split_k else _tiled_tuned, grid, config, **args)
    return out if acc is out else out.copy_(acc)
