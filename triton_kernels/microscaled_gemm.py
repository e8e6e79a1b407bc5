"""GEMM of microscaled activations and weights (NVFP4, MXFP4, MXFP8) on their block scales.

Both operands come in the same format, laid out as ``microscaled_quant`` writes them:
``qweight (N, ceil(K/2))`` uint8, two E2M1 codes a byte (the even column low), or
``(N, K)`` float8_e4m3fn (MXFP8); block scales ``(rows, ceil(K/BLOCK))``: float8_e4m3fn
under a float32 global scale ``(1,)`` each (NVFP4, BLOCK 16) or uint8 E8M0 (BLOCK 32).
The activation comes as its codes and block scales the same way (``x_values (M, ...)``,
``x_scales``: the ``tl.dot_scaled`` route) or, with ``x_scales`` None, as its scaled values
``(M, K)`` bf16 (``quantize_to_scaled_values``: the dequantizing route).

Hopper and older (the dequantizing route): the activation was dequantized once, by the
quantization kernel (each value times its block scale, NVFP4's without the global one:
exact in bf16), so the loop decodes only the weight tile in registers by bit arithmetic
(E2M1 and E4M3 bits placed in a float16, E8M0 in a float32's exponent), times its block
scale (exact in bf16 too), then one bf16 MMA with float32 accumulation; NVFP4's
``1 / (x_global * w_global)`` is applied in the epilogue.  Decoding the activation in the
loop instead redid it for every N tile and, with both tiles' reshapes, spilled.  Under the
CPU interpreter the tiles are float32 (IEEE dot).  Blackwell (sm_100+), MXFP4 and MXFP8:
``tl.dot_scaled`` on the raw bytes and E8M0 scales (the native MX MMA).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from ._launch import check_device, interpreting, output, output_args, run_kernel
from ._tiles import (
    autotune_tiles,
    split_k_run,
    store_tile,
    tile_config,
    tile_launch,
    tile_offsets,
)
from .float_codes import e4m3_bits_to_float
from .fp4_gemm import load_e2m1_tile
from .microscaled_quant import FMT_MXFP8, FMT_NVFP4, FORMATS, e8m0_to_float

SPLIT_K_MAX_M = 64
# -- the native MX MMA: compute capability 10 (Blackwell) and later
DOT_SCALED_MIN_CAPABILITY = (10, 0)


@triton.jit
def _scaled_tile(
    v_rows, s_rows, t, r_mask, K, G,
    FMT: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """float32 ``(ROWS, BLOCK_K)`` of K tile ``t``: each value times its block's scale."""
    if FMT == FMT_MXFP8:
        offs_k = t * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = r_mask[:, None] & (offs_k[None, :] < K)
        value = e4m3_bits_to_float(
            tl.load(v_rows + offs_k[None, :], mask=mask, other=0).to(tl.int32)
        )
    else:
        value = load_e2m1_tile(v_rows, t, r_mask, K, ROWS, BLOCK_K)
    offs_g = t * (BLOCK_K // BLOCK) + tl.arange(0, BLOCK_K // BLOCK)
    s_mask = r_mask[:, None] & (offs_g[None, :] < G)
    s = tl.load(s_rows + offs_g[None, :], mask=s_mask, other=0).to(tl.int32)
    scale = e4m3_bits_to_float(s) if FMT == FMT_NVFP4 else e8m0_to_float(s)
    scaled = value.reshape(ROWS, BLOCK_K // BLOCK, BLOCK) * scale[:, :, None]
    return scaled.reshape(ROWS, BLOCK_K)


@triton.jit
def _microscaled_gemm_kernel(
    xv_ptr, xs_ptr, xg_ptr, wv_ptr, ws_ptr, wg_ptr, b_ptr, out_ptr,
    M, N, K, G,
    stride_xvm, stride_xsm, stride_wvn, stride_wsn, stride_om,
    M_BUCKET,
    FMT: tl.constexpr, BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT_BF16: tl.constexpr, DOT_SCALED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K, ATOMIC: tl.constexpr,
):  # fmt: skip
    # -- output tile of this program; row bases in int64 (rows times strides may pass 2**31)
    offs_m, offs_n, m_mask, n_mask = tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows_m, rows_n = offs_m[:, None].to(tl.int64), offs_n[:, None].to(tl.int64)
    xv_rows, xs_rows = xv_ptr + rows_m * stride_xvm, xs_ptr + rows_m * stride_xsm
    wv_rows, ws_rows = wv_ptr + rows_n * stride_wvn, ws_ptr + rows_n * stride_wsn
    t_start, t_end = split_k_run(tl.cdiv(K, BLOCK_K), SPLIT_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(t_start, t_end):
        if DOT_SCALED:
            # -- raw bytes and E8M0 scales straight into the MX MMA
            acc = _dot_scaled_tile(
                xv_rows, xs_rows, wv_rows, ws_rows, t, m_mask, n_mask, K, G, acc,
                FMT, BLOCK, BLOCK_K,
            )  # fmt: skip
        else:
            # -- the activation's scaled values as they are, the weight tile dequantized in
            # -- registers (both exact in bf16), one MMA
            offs_k = t * BLOCK_K + tl.arange(0, BLOCK_K)
            x_mask = m_mask[:, None] & (offs_k[None, :] < K)
            x = tl.load(xv_rows + offs_k[None, :], mask=x_mask, other=0.0)
            w = _scaled_tile(wv_rows, ws_rows, t, n_mask, K, G, FMT, BLOCK, BLOCK_N, BLOCK_K)
            if DOT_BF16:
                acc = tl.dot(x, tl.trans(w.to(tl.bfloat16)), acc)
            else:
                acc = tl.dot(x.to(tl.float32), tl.trans(w), acc, input_precision="ieee")
    # -- epilogue: NVFP4's two global scales, bias, then atomics (split-K) or a cast store
    if FMT == FMT_NVFP4:
        acc = tl.math.div_rn(acc, tl.load(xg_ptr) * tl.load(wg_ptr))
    store_tile(acc, out_ptr, b_ptr, offs_m, offs_n, m_mask, n_mask, stride_om, HAS_BIAS, ATOMIC)


@triton.jit
def _dot_scaled_tile(
    xv_rows, xs_rows, wv_rows, ws_rows, t, m_mask, n_mask, K, G, acc,
    FMT: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """``acc + x_tile @ w_tile^T`` by ``tl.dot_scaled`` (MXFP4 / MXFP8, E8M0 scales per 32)."""
    PACK: tl.constexpr = 1 if FMT == FMT_MXFP8 else 2
    ELEMENT: tl.constexpr = "e4m3" if FMT == FMT_MXFP8 else "e2m1"
    offs_v = t * (BLOCK_K // PACK) + tl.arange(0, BLOCK_K // PACK)
    v_end = (K + PACK - 1) // PACK
    xv = tl.load(
        xv_rows + offs_v[None, :], mask=m_mask[:, None] & (offs_v[None, :] < v_end), other=0
    )
    wv = tl.load(
        wv_rows + offs_v[None, :], mask=n_mask[:, None] & (offs_v[None, :] < v_end), other=0
    )
    offs_g = t * (BLOCK_K // BLOCK) + tl.arange(0, BLOCK_K // BLOCK)
    xs = tl.load(xs_rows + offs_g[None, :], mask=m_mask[:, None] & (offs_g[None, :] < G), other=0)
    ws = tl.load(ws_rows + offs_g[None, :], mask=n_mask[:, None] & (offs_g[None, :] < G), other=0)
    if FMT == FMT_MXFP8:
        xv = xv.to(tl.float8e4nv, bitcast=True)
        wv = wv.to(tl.float8e4nv, bitcast=True)
    return tl.dot_scaled(xv, xs, ELEMENT, tl.trans(wv), ws, ELEMENT, acc)


# -- the bf16 MMA where the kernel is compiled for a GPU; the interpreter's bf16 dot multiplies
# -- raw storage, so it gets float32 tiles.  Read from how Triton built the kernel, not from
# -- ``interpreting()``, which compile-only tools set to pass CPU tensors to the launchers.
DOT_BF16 = not isinstance(_microscaled_gemm_kernel, InterpretedFunction)
# -- BLOCK_K a multiple of 32, so every K tile holds whole blocks of every format
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
_KEY = ["M_BUCKET", "N", "K", "FMT", "DOT_SCALED"]
_split_k_tuned = autotune_tiles(_microscaled_gemm_kernel, SPLIT_K_CONFIGS, _KEY, split_k=True)
_tiled_tuned = autotune_tiles(_microscaled_gemm_kernel, TILED_CONFIGS, _KEY, split_k=False)


def uses_dot_scaled(fmt: str, device: torch.device) -> bool:
    """Whether the native MX MMA serves ``fmt`` on ``device`` (MX formats, sm_100+)."""
    if fmt == "nvfp4" or interpreting() or device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device) >= DOT_SCALED_MIN_CAPABILITY


def _check_operand(name: str, values: torch.Tensor, scales: torch.Tensor, fmt: str, k: int) -> None:
    _, block, _ = FORMATS[fmt]
    rows = values.shape[0]
    value_dtype = torch.float8_e4m3fn if fmt == "mxfp8" else torch.uint8
    width = k if fmt == "mxfp8" else -(-k // 2)
    scale_dtype = torch.float8_e4m3fn if fmt == "nvfp4" else torch.uint8
    for what, t, dtype, shape in (
        ("values", values, value_dtype, (rows, width)),
        ("scales", scales, scale_dtype, (rows, -(-k // block))),
    ):
        if t.dtype != dtype or t.dim() != 2 or tuple(t.shape) != shape or t.stride(-1) != 1:
            raise ValueError(
                f"{name} {what} must be a row-major {dtype} {shape}, got {t.dtype} {tuple(t.shape)}"
            )


def _check_scaled_values(x_values: torch.Tensor, x_scales: torch.Tensor | None, k: int) -> None:
    if x_scales is not None:
        raise ValueError("the dequantizing route takes the activation's scaled values, no scales")
    rows = x_values.shape[0]
    if x_values.dtype != torch.bfloat16 or x_values.dim() != 2 or x_values.shape[1] != k:
        raise ValueError(
            f"x scaled values must be bf16 ({rows}, {k}), got {x_values.dtype} "
            f"{tuple(x_values.shape)}"
        )
    if x_values.stride(-1) != 1:
        raise ValueError("x scaled values must be row-major")


def microscaled_gemm(
    x_values: torch.Tensor, x_scales: torch.Tensor | None, x_global: torch.Tensor | None,
    qweight: torch.Tensor, scales: torch.Tensor, global_scale: torch.Tensor | None,
    fmt: str, k: int, bias: torch.Tensor | None, out_dtype: torch.dtype,
    config: triton.Config | None = None, dot_scaled: bool | None = None,
) -> torch.Tensor:  # fmt: skip
    """``dequant(x) @ dequant(W)^T + bias`` -> ``(M, N)`` in ``out_dtype`` (see the module).

    ``config`` runs one explicit config (split-K for M up to 64) instead of autotuning;
    ``dot_scaled`` forces the route (default: ``tl.dot_scaled`` where :func:`uses_dot_scaled`);
    the dequantizing route takes the activation's scaled values (``x_scales`` None).
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {tuple(FORMATS)}, got {fmt!r}")
    dot_scaled = uses_dot_scaled(fmt, x_values.device) if dot_scaled is None else dot_scaled
    if dot_scaled:
        _check_operand("x", x_values, x_scales, fmt, k)
    else:
        _check_scaled_values(x_values, x_scales, k)
    _check_operand("weight", qweight, scales, fmt, k)
    if (x_global is None or global_scale is None) != (fmt != "nvfp4"):
        raise ValueError("global scales (float32 (1,)) must be given for both operands, nvfp4 only")
    check_device(x_values, x_scales, x_global, qweight, scales, global_scale, bias)
    if dot_scaled and fmt == "nvfp4":
        raise ValueError("tl.dot_scaled serves MX formats (E8M0 scales) only, not nvfp4")
    m, n = x_values.shape[0], qweight.shape[0]
    out = output(None, (m, n), out_dtype, x_values.device)
    split_k = m <= SPLIT_K_MAX_M
    acc, grid = tile_launch(out, split_k, config)
    w_scale_bytes = scales.view(torch.uint8)
    x_scale_bytes = w_scale_bytes if x_scales is None else x_scales.view(torch.uint8)
    args = dict(
        xv_ptr=x_values if x_scales is None else x_values.view(torch.uint8),
        xs_ptr=x_scale_bytes,
        xg_ptr=x_global if x_global is not None else x_scale_bytes,
        wv_ptr=qweight.view(torch.uint8), ws_ptr=w_scale_bytes,
        wg_ptr=global_scale if global_scale is not None else w_scale_bytes,
        G=scales.shape[1], stride_xvm=x_values.stride(0), stride_xsm=x_scale_bytes.stride(0),
        stride_wvn=qweight.stride(0), stride_wsn=w_scale_bytes.stride(0),
        FMT=FORMATS[fmt][0], BLOCK=FORMATS[fmt][1], DOT_BF16=DOT_BF16,
        DOT_SCALED=dot_scaled, ATOMIC=split_k, **output_args(acc, bias, m, n, k),
    )  # fmt: skip
    run_kernel(_split_k_tuned if split_k else _tiled_tuned, grid, config, **args)
    return out if acc is out else out.copy_(acc)
