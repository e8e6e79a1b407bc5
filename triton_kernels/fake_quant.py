"""Fused INTn weight fake-quantization for quantization-aware training, forward and backward.

Shapes and dtypes: ``w (N, K)`` fp32/bf16/fp16; ``scales (N, G)`` and ``zeros (N, G)``
float (integer-valued zero points) or ``zeros=None`` for symmetric schemes (implied zero
``2**(bits-1)``); ``G = ceil(K / group_size)`` groups along K, the last one shorter when
``group_size`` does not divide K; ``group_size=-1`` is one group per row.

Forward: ``w_q = (clamp(round(w / s) + z, 0, 2**bits - 1) - z) * s``, in float32, cast back
to ``w.dtype`` (IEEE division, round half to even: bit-identical to the reference numerics).

Backward (straight-through estimator, LSQ scale gradient): with ``x = w / s``,
``r = round(x)`` and ``c = r + z``, an element is *inside* when ``0 <= c <= qmax``.
``grad_w = grad * inside``; ``grad_s = sum_group grad * (r - x | -z below | qmax - z above)``;
``grad_z = sum_group grad * (0 inside | -s outside)``.

Each program of the kernels owns ``BLOCK_N`` rows of one group, so the per-group sums of
the backward need no atomics.  The exact reference (the CPU path and the test oracle)
is ``torchquant.numerics.fake_quant``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._exact import round_half_even
from ._launch import check_device, output

MAX_TILE = 4096


# -- Triton kernels


@triton.jit
def _group_tile(K, GROUP, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr):
    """Row and column offsets of this program's tile: ``BLOCK_N`` rows x one group of columns
    (``BLOCK_G`` is the group padded to a power of two; the columns past it point at ``K``,
    so the bounds mask drops them)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * GROUP + tl.arange(0, BLOCK_G)
    return offs_n, tl.where(tl.arange(0, BLOCK_G) < GROUP, offs_k, K)


@triton.jit
def _load_tile(
    w_ptr, s_ptr, z_ptr, offs_n, offs_k, N, K, G, stride_wn, HAS_ZERO: tl.constexpr, ZERO_SYM
):
    """float32 tile of ``w``, its group's scale and zero (broadcast over the tile's columns)."""
    g = tl.program_id(1)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :], mask=mask, other=0.0)
    s = tl.load(s_ptr + offs_n * G + g, mask=offs_n < N, other=1.0).to(tl.float32)
    if HAS_ZERO:
        z = tl.load(z_ptr + offs_n * G + g, mask=offs_n < N, other=0.0).to(tl.float32)
    else:
        z = tl.zeros_like(s) + ZERO_SYM
    return w.to(tl.float32), s[:, None], z[:, None], mask


@triton.jit
def _fake_quant_fwd_kernel(
    w_ptr,
    s_ptr,
    z_ptr,
    out_ptr,
    N,
    K,
    G,
    GROUP,
    stride_wn,
    QMAX: tl.constexpr,
    ZERO_SYM: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    # -- the tile: BLOCK_N rows x one group of columns
    offs_n, offs_k = _group_tile(K, GROUP, BLOCK_N, BLOCK_G)
    w, s, z, mask = _load_tile(
        w_ptr, s_ptr, z_ptr, offs_n, offs_k, N, K, G, stride_wn, HAS_ZERO, ZERO_SYM
    )
    # -- quantize, clamp, dequantize (float32, IEEE division)
    c = round_half_even(tl.math.div_rn(w, s)) + z
    c = tl.minimum(tl.maximum(c, 0.0), QMAX)
    out = (c - z) * s
    tl.store(
        out_ptr + offs_n[:, None] * stride_wn + offs_k[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=mask,
    )


@triton.jit
def _fake_quant_bwd_kernel(
    grad_ptr,
    w_ptr,
    s_ptr,
    z_ptr,
    gw_ptr,
    gs_ptr,
    gz_ptr,
    N,
    K,
    G,
    GROUP,
    stride_wn,
    QMAX: tl.constexpr,
    ZERO_SYM: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    offs_n, offs_k = _group_tile(K, GROUP, BLOCK_N, BLOCK_G)
    w, s, z, mask = _load_tile(
        w_ptr, s_ptr, z_ptr, offs_n, offs_k, N, K, G, stride_wn, HAS_ZERO, ZERO_SYM
    )
    ptrs = offs_n[:, None] * stride_wn + offs_k[None, :]
    grad = tl.load(grad_ptr + ptrs, mask=mask, other=0.0).to(tl.float32)
    # -- straight-through weight gradient: pass inside the clipping range, block outside
    x = tl.math.div_rn(w, s)
    r = round_half_even(x)
    c = r + z
    inside = (c >= 0.0) & (c <= QMAX)
    tl.store(gw_ptr + ptrs, tl.where(inside, grad, 0.0).to(gw_ptr.dtype.element_ty), mask=mask)
    # -- LSQ scale gradient and zero-point gradient, summed over the group
    d_scale = tl.where(inside, r - x, tl.where(c < 0.0, -z, QMAX - z))
    grad_s = tl.sum(tl.where(mask, grad * d_scale, 0.0), axis=1)
    g = tl.program_id(1)
    tl.store(gs_ptr + offs_n * G + g, grad_s, mask=offs_n < N)
    if HAS_ZERO:
        grad_z = tl.sum(tl.where(mask & (~inside), -grad * s, 0.0), axis=1)
        tl.store(gz_ptr + offs_n * G + g, grad_z, mask=offs_n < N)


# -- launchers


def _launch_args(
    w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int, group_size: int
) -> tuple[tuple[int, int], dict]:
    """The grid and the arguments both kernels take after their pointers (shapes checked)."""
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"w must be a 2-D float tensor (N, K), got {w.dtype} {tuple(w.shape)}")
    n, k = w.shape
    group = k if group_size == -1 else group_size
    groups = -(-k // group)
    if tuple(scales.shape) != (n, groups):
        raise ValueError(f"scales must be ({n}, {groups}), got {tuple(scales.shape)}")
    block_g = triton.next_power_of_2(group)
    block_n = max(1, min(triton.next_power_of_2(n), MAX_TILE // block_g))
    args = dict(
        N=n,
        K=k,
        G=groups,
        GROUP=group,
        stride_wn=w.stride(0),
        QMAX=float((1 << bits) - 1),
        ZERO_SYM=float(1 << (bits - 1)),
        HAS_ZERO=zeros is not None,
        BLOCK_N=block_n,
        BLOCK_G=block_g,
    )
    return (triton.cdiv(n, block_n), groups), args


def fake_quant_int_forward(
    w: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(clamp(round(w/s) + z, 0, qmax) - z) * s`` as ``w.dtype`` (see the module docstring)."""
    check_device(w, scales, zeros)
    w, scales = w.contiguous(), scales.contiguous().float()
    zf = zeros.contiguous().float() if zeros is not None else scales
    grid, args = _launch_args(w, scales, zeros, bits, group_size)
    out = output(out, tuple(w.shape), w.dtype, w.device)
    _fake_quant_fwd_kernel[grid](w, scales, zf, out, **args)
    return out


def fake_quant_int_backward(
    grad: torch.Tensor,
    w: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(grad_w, grad_scales, grad_zeros)``; ``grad_zeros`` is ``None`` when ``zeros`` is."""
    check_device(grad, w, scales, zeros)
    w, grad = w.contiguous(), grad.contiguous()
    s32 = scales.contiguous().float()
    zf = zeros.contiguous().float() if zeros is not None else s32
    grid, args = _launch_args(w, s32, zeros, bits, group_size)
    if grad.shape != w.shape:
        raise ValueError(
            f"grad must have the weight's shape {tuple(w.shape)}, got {tuple(grad.shape)}"
        )
    grad_w = torch.empty_like(w)
    grad_s = torch.empty_like(s32)
    grad_z = torch.empty_like(s32) if zeros is not None else grad_s
    _fake_quant_bwd_kernel[grid](grad, w, s32, zf, grad_w, grad_s, grad_z, **args)
    gz = grad_z.to(zeros.dtype) if zeros is not None else None
    return grad_w, grad_s.to(scales.dtype), gz
