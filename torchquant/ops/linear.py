"""Reference (CPU) implementations of the quantized linear ops.

Shapes: ``x`` is ``(..., K)``; the output is ``(..., N)`` in ``x.dtype``.
``linear_intn``: ``qweight (N, ceil(K/32)*bits)`` int32 packed codes (see
``numerics.packing``), ``scales (N, G)``, ``zeros (N, G)`` uint8 or ``None`` for
symmetric.  ``linear_int8_weight``: ``qweight (N, K)`` int8, ``scales (N, G)``.
FP8 ops: ``qweight (N, K)`` float8_e4m3fn, float32 ``scales (N, 1)`` or ``(1, 1)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from torchquant.numerics import (
    dequantize_int_weight,
    quantize_activation,
    unpack_codes,
)


def _out_shape(x: torch.Tensor, n: int) -> list[int]:
    return [*x.shape[:-1], n]


def _fake_linear(x: torch.Tensor, qweight: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return x.new_empty(_out_shape(x, qweight.shape[0]))


@torch.library.custom_op("torchquant::linear_intn", mutates_args=())
def linear_intn(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    """Weight-only INTn (2..8 bit, packed) linear: dequantize, then matmul in ``x.dtype``."""
    k = x.shape[-1]
    codes = unpack_codes(qweight, bits, k)
    w = dequantize_int_weight(codes, scales, zeros, bits, group_size, x.dtype)
    return F.linear(x, w, bias)


@torch.library.custom_op("torchquant::linear_int8_weight", mutates_args=())
def linear_int8_weight(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    group_size: int,
) -> torch.Tensor:
    """Weight-only INT8 symmetric linear (per channel or per group)."""
    codes = qweight.to(torch.int16) + 128
    w = dequantize_int_weight(codes, scales, None, 8, group_size, x.dtype)
    return F.linear(x, w, bias)


@torch.library.custom_op("torchquant::linear_fp8_weight", mutates_args=())
def linear_fp8_weight(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Weight-only FP8 E4M3 linear (per-channel or per-tensor float32 scale)."""
    w = (qweight.float() * scales.float()).to(x.dtype)
    return F.linear(x, w, bias)


def _w8a8(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    act_type: str,
    per_token: bool,
    percentile: float,
    input_scale: torch.Tensor | None,
    smooth: torch.Tensor | None,
) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    xq, xs = quantize_activation(x2, act_type, per_token, percentile, input_scale, smooth)
    # -- integer (or fp8) products accumulated exactly: float64 holds every int32 sum here
    acc = xq.to(torch.float64) @ qweight.to(torch.float64).t()
    out = acc * xs.double() * scales.double().reshape(1, -1)
    out = out.to(x.dtype)
    if bias is not None:
        out = out + bias.to(x.dtype)
    out = _poison_nonfinite_rows(x2, out, shared_scale=not per_token and input_scale is None)
    return out.reshape(_out_shape(x, qweight.shape[0]))


def _poison_nonfinite_rows(x2: torch.Tensor, out: torch.Tensor, shared_scale: bool) -> torch.Tensor:
    """NaN/Inf in an input row makes that output row NaN, as a float linear would.

    Quantizing a non-finite value has no meaning (NaN casts to an arbitrary integer),
    so without this a bad activation would come out as plausible finite garbage.
    With one dynamic scale for the whole tensor every row depends on it, so the
    whole output becomes NaN.
    """
    bad = ~torch.isfinite(x2).all(dim=-1, keepdim=True)
    if shared_scale:
        bad = bad.any().expand_as(bad)
    return torch.where(bad, torch.full_like(out, float("nan")), out)


@torch.library.custom_op("torchquant::linear_w8a8_int8", mutates_args=())
def linear_w8a8_int8(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    per_token: bool,
    percentile: float,
    input_scale: torch.Tensor | None,
    smooth: torch.Tensor | None,
) -> torch.Tensor:
    """INT8 weights x INT8 activations (dynamic per token/tensor, or static), int32 accumulate."""
    return _w8a8(x, qweight, scales, bias, "int8", per_token, percentile, input_scale, smooth)


@torch.library.custom_op("torchquant::linear_w8a8_fp8", mutates_args=())
def linear_w8a8_fp8(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    per_token: bool,
    percentile: float,
    input_scale: torch.Tensor | None,
    smooth: torch.Tensor | None,
) -> torch.Tensor:
    """FP8 E4M3 weights x FP8 activations, fp32 accumulate, scaled epilogue."""
    return _w8a8(x, qweight, scales, bias, "fp8", per_token, percentile, input_scale, smooth)


@torch.library.custom_op("torchquant::quantize_activation", mutates_args=())
def quantize_activation_op(
    x: torch.Tensor,
    act_type: str,
    per_token: bool,
    percentile: float,
    smooth: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic activation quantization of ``x: (rows, K)``: ``(q, scale (rows|1, 1))``."""
    return quantize_activation(x, act_type, per_token, percentile, None, smooth)


for _op in (linear_intn, linear_int8_weight, linear_fp8_weight, linear_w8a8_int8, linear_w8a8_fp8):
    _op.register_fake(_fake_linear)


@quantize_activation_op.register_fake
def _(x, act_type, per_token, percentile, smooth):
    qdtype = torch.int8 if act_type == "int8" else torch.float8_e4m3fn
    rows = x.shape[0] if per_token else 1
    return x.new_empty(x.shape, dtype=qdtype), x.new_empty((rows, 1), dtype=torch.float32)
