"""RMSNorm as one kernel: ``out = x * rsqrt(mean(x^2) + eps)`` times a weight, per row.

``x (rows, N)`` fp32/bf16/fp16 with unit column stride, ``weight (N,)`` fp32/bf16/fp16 ->
``out (rows, N)`` in ``out_dtype``.  One program normalizes one row.  The mean of squares
and the normalized row are float32; ``1 / sqrt`` is correctly rounded (``sqrt_rn``,
``div_rn``), as PyTorch's CPU ``rsqrt`` computes it.  Two ways to apply the weight, as
the model families write them (``torchquant.ops.rms_norm`` holds the exact formulas):

* ``weight_after_cast`` (Hugging Face Llama, Mistral, Qwen): the normalized row is
  rounded to ``x``'s dtype, then multiplied by the weight (in float32, exact for two
  16-bit operands, rounded once to ``out_dtype``).
* otherwise (``torch.nn.RMSNorm``, Gemma's ``1 + weight`` with ``weight_offset=1``,
  OLMo-2): ``(weight + weight_offset)`` multiplies the float32 row, rounded once.

A row up to ``MAX_ROW_BLOCK`` elements stays in registers (one read of ``x``); a longer
one is read twice, the second time mostly from L2.  Each block width has one launch
config, so nothing is ever timed: a first call inside a CUDA-graph capture only compiles.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import autotuned, check_device, output, run_kernel

MAX_ROW_BLOCK = 16384
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
WARPS = (4, 8, 16)


def _warps_for(block_n: int) -> int:
    """Warps for a row block: 4 up to 1,024 elements, 8 up to 4,096, 16 beyond."""
    return 4 if block_n <= 1024 else 8 if block_n <= 4096 else 16


def _one_config(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """The one config of the row block: the autotuner then times nothing."""
    warps = _warps_for({**named_args, **kwargs}["BLOCK_N"])
    return [c for c in configs if c.num_warps == warps]


@triton.jit
def _rms_norm_kernel(
    x_ptr, w_ptr, out_ptr, N, stride_xm, stride_om, eps, weight_offset,
    WEIGHT_AFTER_CAST: tl.constexpr, BLOCK_N: tl.constexpr, ONE_BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    out_row = out_ptr + row * stride_om
    offs_n = tl.arange(0, BLOCK_N)
    # -- sum of squares in float32 (masked lanes load 0)
    if ONE_BLOCK:
        mask = offs_n < N
        x = tl.load(x_row + offs_n, mask=mask, other=0.0).to(tl.float32)
        total = tl.sum(x * x, axis=0)
    else:
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            mask = start + offs_n < N
            xs = tl.load(x_row + start + offs_n, mask=mask, other=0.0).to(tl.float32)
            acc += xs * xs
        total = tl.sum(acc, axis=0)
    # -- 1 / sqrt(mean + eps), both roundings IEEE
    rstd = tl.div_rn(1.0, tl.sqrt_rn(total / N + eps))
    # -- normalize, apply the weight, store
    if ONE_BLOCK:
        _store_row(x, rstd, w_ptr, out_row, offs_n, mask, weight_offset, x_ptr, WEIGHT_AFTER_CAST)
    else:
        for start in range(0, N, BLOCK_N):
            mask = start + offs_n < N
            xs = tl.load(x_row + start + offs_n, mask=mask, other=0.0).to(tl.float32)
            _store_row(
                xs, rstd, w_ptr + start, out_row + start, offs_n, mask, weight_offset, x_ptr,
                WEIGHT_AFTER_CAST,
            )  # fmt: skip


@triton.jit
def _store_row(x, rstd, w_ptr, out_row, offs_n, mask, weight_offset, x_ptr,
               WEIGHT_AFTER_CAST: tl.constexpr):  # fmt: skip
    """Store ``x * rstd`` (float32) times the weight, as the module docstring's two ways."""
    w = tl.load(w_ptr + offs_n, mask=mask, other=0.0).to(tl.float32)
    y = x * rstd
    if WEIGHT_AFTER_CAST:
        out = w * y.to(x_ptr.dtype.element_ty).to(tl.float32)
    else:
        out = y * (w + weight_offset)
    tl.store(out_row + offs_n, out.to(out_row.dtype.element_ty), mask=mask)


_rms_norm = autotuned(
    _rms_norm_kernel,
    [triton.Config({}, num_warps=w) for w in WARPS],
    key=["BLOCK_N"],
    prune=_one_config,
)


def rms_norm_rows(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    weight_offset: float,
    weight_after_cast: bool,
    out_dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x (rows, N)`` normalized per row and scaled by ``weight (N,)``, as ``out_dtype``.

    ``weight_after_cast`` rounds the normalized rows to ``x``'s dtype before the weight
    multiplies them; otherwise ``weight + weight_offset`` multiplies them in float32.
    """
    check_device(x, weight)
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (rows, N), got shape {tuple(x.shape)}")
    rows, n = x.shape
    if weight.dim() != 1 or weight.shape[0] != n:
        raise ValueError(f"weight must have shape ({n},) to match x, got {tuple(weight.shape)}")
    for name, t in (("x", x), ("weight", weight)):
        if t.dtype not in DTYPES:
            raise ValueError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    if out_dtype not in DTYPES:
        raise ValueError(f"out_dtype must be float32, bfloat16 or float16, got {out_dtype}")
    if weight_after_cast and weight_offset != 0.0:
        raise ValueError("weight_offset must be 0 when the weight multiplies after the cast")
    if n == 0:
        raise ValueError("x has no columns to normalize")
    if x.stride(1) != 1 and rows > 0:
        x = x.contiguous()
    weight = weight.contiguous()
    out = output(out, (rows, n), out_dtype, x.device)
    if rows == 0:
        return out
    block_n = min(triton.next_power_of_2(n), MAX_ROW_BLOCK)
    run_kernel(
        _rms_norm,
        lambda meta: (rows,),
        None,
        x_ptr=x,
        w_ptr=weight,
        out_ptr=out,
        N=n,
        stride_xm=x.stride(0),
        stride_om=out.stride(0),
        eps=float(eps),
        weight_offset=float(weight_offset),
        WEIGHT_AFTER_CAST=bool(weight_after_cast),
        BLOCK_N=block_n,
        ONE_BLOCK=n <= block_n,
    )
    return out
