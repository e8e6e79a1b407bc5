"""Activation quantization to NVFP4 / MXFP4 / MXFP8: values and block scales in one pass.

``x (M, K)`` float32/bf16/fp16 -> ``values`` and ``scales (M, ceil(K/BLOCK))`` uint8 bytes:

- NVFP4 (``FMT_NVFP4``, BLOCK 16): ``values (M, ceil(K/2))`` uint8, two E2M1 codes a byte
  (column ``2j`` in the low nibble); ``scales`` E4M3 bytes ``to_e4m3(g * (amax / 6))``
  (``amax / 6`` rounded to ``x``'s dtype, as the numerics compute it in that dtype; a zero
  scale becomes 0.125) under the float32 global scale ``g_ptr (1,)``.
- MXFP4 (BLOCK 32): the same values; ``scales`` E8M0 ``floor(log2(amax)) - 2 + 127``, or
  with ``scale_rounding="compressed-tensors"`` (``ROUND_UP``) one more where the block max's
  significand is 1.75 or more (its two leading fraction bits set).
- MXFP8 (BLOCK 32): ``values (M, K)`` E4M3 bytes (saturated at +-448); E8M0 scales as MXFP4's with 8
  in place of 2, by either rounding.

:func:`quantize_to_scaled_values` writes instead each value on its grid times its block's
scale (NVFP4's E4M3 one, without the global scale), ``(M, K)`` bf16: exact (an E2M1 or
E4M3 value times an E4M3 scale or a power of two has at most 6 significant bits), what a
GEMM that dequantizes only the weight multiplies by.  A non-finite input is written as NaN
there, so the GEMM's output row comes out NaN with no pass of its own.

Each program quantizes ``BLOCKS`` blocks of one row: the block max, the scale, the
values divided by their block's multiplier (IEEE division), nearest-even rounding.  A
non-finite input is quantized as 0 (the op makes its output row NaN).  E8M0 exponents are
read from the float32 bits of the block max (the clamp to ``[-127, 127]`` makes zero and
subnormal maxima agree with ``frexp``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._exact import round_to_e4m3
from ._launch import autotuned, check_device, run_kernel
from .float_codes import e2m1_to_float

FMT_NVFP4 = tl.constexpr(0)
FMT_MXFP4 = tl.constexpr(1)
FMT_MXFP8 = tl.constexpr(2)
# -- format name -> (kernel code, block, exponent of the element type's largest value)
FORMATS = {"nvfp4": (0, 16, 2), "mxfp4": (1, 32, 2), "mxfp8": (2, 32, 8)}
# -- E8M0 roundings of the block max to a power of two (``ROUND_UP``: the second one's)
SCALE_ROUNDINGS = ("ocp", "compressed-tensors")
FP32_MAX = tl.constexpr(3.4028234663852886e38)
E8M0_SMALLEST = tl.constexpr(2.0**-127)  # exponent byte 0: no float32 normal's bit pattern


@triton.jit
def encode_e2m1_bits(v):
    """E2M1 codes (int32) of float32 ``v``: nearest of +-{0, .5, 1, 1.5, 2, 3, 4, 6}, ties to
    even, saturating at 6 (``>=`` at the midpoints whose upper neighbour is even)."""
    a = tl.abs(v)
    index = (
        (a > 0.25).to(tl.int32)
        + (a >= 0.75).to(tl.int32)
        + (a > 1.25).to(tl.int32)
        + (a >= 1.75).to(tl.int32)
        + (a > 2.5).to(tl.int32)
        + (a >= 3.5).to(tl.int32)
        + (a > 5.0).to(tl.int32)
    )
    return index | ((v < 0.0).to(tl.int32) << 3)


@triton.jit
def e8m0_exponent(amax, ELEMENT_EMAX: tl.constexpr, ROUND_UP: tl.constexpr):
    """Biased E8M0 byte (int32) ``clamp(floor(log2(amax)) - ELEMENT_EMAX, -127, 127) + 127``;
    ``ROUND_UP``: plus one where ``amax``'s significand is at least 1.75 (a subnormal's
    exponent is clamped to -127 either way)."""
    bits = amax.to(tl.int32, bitcast=True)
    floor_log2 = ((bits >> 23) & 0xFF) - 127
    if ROUND_UP:
        floor_log2 += (((bits >> 21) & 3) == 3).to(tl.int32)
    return tl.minimum(tl.maximum(floor_log2 - ELEMENT_EMAX, -127), 127) + 127


@triton.jit
def e8m0_to_float(e):
    """float32 ``2 ** (e - 127)`` of biased exponents ``e`` (int32)."""
    return tl.where(e == 0, E8M0_SMALLEST, (e << 23).to(tl.float32, bitcast=True))


@triton.jit
def round_to_input_dtype(v, dtype: tl.constexpr):
    """Finite non-negative float32 ``v`` rounded (nearest even) to ``dtype``, as float32; bf16
    by its bits (the interpreter's bf16 conversion truncates)."""
    if dtype == tl.bfloat16:
        bits = v.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        return bits.to(tl.float32, bitcast=True)
    else:
        return v.to(dtype).to(tl.float32)


@triton.jit
def _microscaled_quant_kernel(
    x_ptr,
    v_ptr,
    s_ptr,
    g_ptr,
    K,
    G,
    stride_xm,
    stride_vm,
    stride_sm,
    FMT: tl.constexpr,
    BLOCK: tl.constexpr,
    ELEMENT_EMAX: tl.constexpr,
    ROUND_UP: tl.constexpr,
    SCALED: tl.constexpr,
    BLOCKS: tl.constexpr,
):
    # -- BLOCKS blocks of row program_id(0); non-finite inputs as 0
    row = tl.program_id(0).to(tl.int64)
    offs_g = tl.program_id(1) * BLOCKS + tl.arange(0, BLOCKS)
    offs_k = offs_g[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    x = tl.load(x_ptr + row * stride_xm + offs_k, mask=offs_k < K, other=0.0)
    xf = x.to(tl.float32)
    finite = tl.abs(xf) <= FP32_MAX
    xf = tl.where(finite, xf, 0.0)
    amax = tl.max(tl.abs(xf), axis=1)
    # -- each block's scale byte and float32 multiplier
    if FMT == FMT_NVFP4:
        g = tl.load(g_ptr)
        per_value = round_to_input_dtype(tl.math.div_rn(amax, 6.0), x_ptr.dtype.element_ty)
        scale = round_to_e4m3(tl.minimum(g * per_value, 448.0)).to(tl.float32)
        scale = tl.where(scale == 0.0, 0.125, scale)
        scale_byte = scale.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
        multiplier = tl.math.div_rn(scale, g)
        block_scale = scale
    else:
        exponent = e8m0_exponent(amax, ELEMENT_EMAX, ROUND_UP)
        scale_byte = exponent.to(tl.uint8)
        multiplier = e8m0_to_float(exponent)
        block_scale = multiplier
    tl.store(s_ptr + row * stride_sm + offs_g, scale_byte, mask=offs_g < G)
    v = tl.math.div_rn(xf, multiplier[:, None])
    # -- values: on their grid times the block scale (bf16), E4M3 bytes, or E2M1 codes two a
    # -- byte (the even column low)
    if SCALED:
        if FMT == FMT_MXFP8:
            level = round_to_e4m3(tl.minimum(tl.maximum(v, -448.0), 448.0)).to(tl.float32)
        else:
            level = e2m1_to_float(encode_e2m1_bits(v))
        # -- a non-finite input times 0 is NaN (a NaN global constexpr would never compare equal)
        scaled = tl.where(finite, level * block_scale[:, None], x.to(tl.float32) * 0.0)
        tl.store(v_ptr + row * stride_vm + offs_k, scaled.to(tl.bfloat16), mask=offs_k < K)
    elif FMT == FMT_MXFP8:
        e4m3 = round_to_e4m3(tl.minimum(tl.maximum(v, -448.0), 448.0))
        tl.store(v_ptr + row * stride_vm + offs_k, e4m3.to(tl.uint8, bitcast=True), mask=offs_k < K)
    else:
        code = encode_e2m1_bits(v).reshape(BLOCKS, BLOCK // 2, 2)
        low, high = tl.split(code)
        offs_b = offs_g[:, None] * (BLOCK // 2) + tl.arange(0, BLOCK // 2)[None, :]
        byte = (low | (high << 4)).to(tl.uint8)
        tl.store(v_ptr + row * stride_vm + offs_b, byte, mask=offs_b < (K + 1) // 2)


# -- blocks per program (a row's K is split over programs), warps
QUANT_CONFIGS = [
    triton.Config({"BLOCKS": blocks}, num_warps=warps)
    for blocks, warps in ((8, 2), (16, 4), (4, 1))
]
_quant_tuned = autotuned(_microscaled_quant_kernel, QUANT_CONFIGS, ["K", "FMT", "SCALED"])


def quantize_microscaled(
    x: torch.Tensor,
    fmt: str,
    global_scale: torch.Tensor | None = None,
    scale_rounding: str = "ocp",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, scales)`` of ``x (M, K)`` as the module docstring lays them out.

    ``scales`` comes back as float8_e4m3fn (NVFP4) or uint8 (E8M0); ``global_scale (1,)``
    float32 is required for NVFP4 (the caller computes a dynamic one) and refused otherwise;
    ``scale_rounding`` other than ``"ocp"`` is for the MX formats only.
    """
    return _quantize(x, fmt, global_scale, scale_rounding, scaled=False)


def quantize_to_scaled_values(
    x: torch.Tensor,
    fmt: str,
    global_scale: torch.Tensor | None = None,
    scale_rounding: str = "ocp",
) -> torch.Tensor:
    """``(M, K)`` bf16: each value of ``x`` on its grid times its block's scale (NVFP4's E4M3
    scale, without ``global_scale``), arguments as :func:`quantize_microscaled`."""
    return _quantize(x, fmt, global_scale, scale_rounding, scaled=True)[0]


def _quantize(
    x: torch.Tensor,
    fmt: str,
    global_scale: torch.Tensor | None,
    scale_rounding: str,
    scaled: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {tuple(FORMATS)}, got {fmt!r}")
    if scale_rounding not in SCALE_ROUNDINGS or (scale_rounding != "ocp" and fmt == "nvfp4"):
        raise ValueError(
            f"scale_rounding must be one of {SCALE_ROUNDINGS} ('ocp' for nvfp4), "
            f"got {scale_rounding!r} for {fmt!r}"
        )
    if x.dim() != 2 or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"x must be a 2-D float32/bf16/fp16 (M, K), got {x.dtype} {x.shape}")
    code, block, emax = FORMATS[fmt]
    if (global_scale is not None) != (fmt == "nvfp4"):
        raise ValueError(f"global_scale must be given exactly for nvfp4, got fmt {fmt!r}")
    if global_scale is not None and (
        global_scale.dtype != torch.float32 or global_scale.numel() != 1
    ):
        raise ValueError(
            f"global_scale must be float32 (1,), got {global_scale.dtype} {global_scale.shape}"
        )
    check_device(x, global_scale)
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    g = -(-k // block)
    width = k if fmt == "mxfp8" or scaled else -(-k // 2)
    value_dtype = torch.bfloat16 if scaled else torch.uint8
    values = torch.empty(m, width, dtype=value_dtype, device=x.device)
    scales = torch.empty(m, g, dtype=torch.uint8, device=x.device)

    def grid(meta):
        return (m, triton.cdiv(g, meta["BLOCKS"]))

    run_kernel(
        _quant_tuned, grid, None,
        x_ptr=x, v_ptr=values, s_ptr=scales,
        g_ptr=global_scale if global_scale is not None else scales,
        K=k, G=g, stride_xm=x.stride(0), stride_vm=values.stride(0), stride_sm=scales.stride(0),
        FMT=code, BLOCK=block, ELEMENT_EMAX=emax, ROUND_UP=scale_rounding != "ocp",
        SCALED=scaled,
    )  # fmt: skip
    if scaled:
        return values, scales
    if fmt == "mxfp8":
        values = values.view(torch.float8_e4m3fn)
    if fmt == "nvfp4":
        scales = scales.view(torch.float8_e4m3fn)
    return values, scales
