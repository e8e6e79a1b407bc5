"""Weight-only INTn (2..8 bit, packed) linear: the op, its reference, CPU and CUDA paths.

``qweight (N, ceil(K/32)*bits)`` int32 packed codes (see ``numerics.packing``),
``scales (N, G)``, ``zeros (N, G)`` uint8 or ``None`` for symmetric (zero
``2**(bits-1)``); ``w = (code - zero) * scale``.  Column ``k`` is in group
``k // group_size``, or ``g_idx[k]`` for GPTQ act-order (``linear_intn_gidx``).
An act-order weight whose groups each hold ``group_size`` columns (what GPTQ's act-order
writes) is repacked once with its columns sorted by group (:func:`act_order_layout`):
``linear_intn_act_order`` then gathers the input columns into that order and runs the
plain grouped kernels, instead of the reference the ``g_idx`` op falls back to on CUDA.

CPU, bf16 inputs, and float32 ones inside ``cpu_kernels.float32_in_bf16`` (rounded to
bf16 and the result cast back): up to
``INT4PACK_MAX_ROWS[planes]`` rows run PyTorch's int4pack kernel on the layer's cached
layout (``QuantLinear.cpu_layout``, see ``cpu_kernels``), codes of 5..8 bits as two 4-bit
planes; more rows dequantize tiles of weight rows into one reused bf16 buffer and
multiply them by the bf16 GEMM (the int4pack kernel does not use the matrix units).
Both stay within ``cpu_kernels.BF16_RELATIVE_ERROR`` (``||out - ref|| / ||ref||``) of
the exact reference for either input dtype.  Other inputs run the reference.  CUDA: the
Triton kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from torchquant.numerics import dequantize_int_weight, pack_codes, unpack_codes
from torchquant.ops import common, cpu_kernels

# -- above this many rows (per number of 4-bit planes) dequantize-and-multiply is faster
INT4PACK_MAX_ROWS = {1: 80, 2: 48}


def dequantize_gidx(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    g_idx: torch.Tensor,
    bits: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``(codes - zeros[:, g_idx]) * scales[:, g_idx]`` computed in float32, as ``dtype``."""
    idx = g_idx.long()
    zero = zeros[:, idx].float() if zeros is not None else float(1 << (bits - 1))
    return ((codes.float() - zero) * scales[:, idx].float()).to(dtype)


def _dequantize_rows(qweight, scales, zeros, g_idx, bits, group_size, k, dtype):
    def rows_of(start: int, stop: int) -> torch.Tensor:
        codes = unpack_codes(qweight[start:stop], bits, k)
        z = zeros[start:stop] if zeros is not None else None
        if g_idx is not None:
            return dequantize_gidx(codes, scales[start:stop], z, g_idx, bits, dtype)
        return dequantize_int_weight(codes, scales[start:stop], z, bits, group_size, dtype)

    return rows_of


def linear_intn_reference(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
    bias: torch.Tensor | None, bits: int, group_size: int, g_idx: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """The exact maths: dequantize the whole weight in float32, then matmul in ``x.dtype``."""
    k = x.shape[-1]
    w = _dequantize_rows(qweight, scales, zeros, g_idx, bits, group_size, k, x.dtype)(
        0, qweight.shape[0]
    )
    return F.linear(x, w, bias)


def intn_cpu_layout(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
    g_idx: torch.Tensor | None, bits: int, group_size: int, in_features: int,
) -> cpu_kernels.CpuLayout:  # fmt: skip
    """The int4pack layout of a packed INTn weight (derived once per layer on CPU)."""
    codes = unpack_codes(qweight, bits, in_features)
    zero = zeros if zeros is not None else float(1 << (bits - 1))
    groups = cpu_kernels.column_groups(in_features, group_size, g_idx)
    return cpu_kernels.int4pack_layout(codes, scales, zero, groups)


def _intn_cpu(x, qweight, scales, zeros, g_idx, bias, bits, group_size, layout):
    if not cpu_kernels.computes_in_bf16(x.dtype):
        return linear_intn_reference(x, qweight, scales, zeros, bias, bits, group_size, g_idx)
    x2, n, k = common.rows(x), qweight.shape[0], x.shape[-1]
    planes = 1 if bits <= 4 else 2

    def exact(rows: torch.Tensor) -> torch.Tensor:
        return linear_intn_reference(rows, qweight, scales, zeros, None, bits, group_size, g_idx)

    if x2.shape[0] > INT4PACK_MAX_ROWS[planes]:
        zero = zeros if zeros is not None else float(1 << (bits - 1))

        def code_rows(start: int, stop: int) -> torch.Tensor:
            return cpu_kernels.read_codes_in_order(qweight[start:stop], bits)

        width = qweight.shape[1] * 32 // bits  # -- K padded to whole 32-code blocks
        out = cpu_kernels.blocked_int_linear(
            x2, n, code_rows, width, scales, zero, group_size, g_idx
        )
        out = common.recompute_overflowed_rows(out, x2, exact)
    else:
        if layout.packed is None:
            layout = intn_cpu_layout(qweight, scales, zeros, g_idx, bits, group_size, k)
        out = cpu_kernels.int4pack_linear(x2, layout, n, exact)
    return common.finish(out, bias, x)


def bind_intn_cpu(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
    g_idx: torch.Tensor | None, bias: torch.Tensor | None, bits: int, group_size: int,
    layout: cpu_kernels.CpuLayout,
) -> Callable[[torch.Tensor], torch.Tensor] | None:  # fmt: skip
    """The layer's eager CPU call, ``x -> _intn_cpu(x, ...)`` with the int4pack planes, block
    size and exact fallback taken once from its cached ``layout`` (None without one): at
    one row the kernel takes ~15-120 us, and re-deriving them per call cost ~40 us more."""
    if layout.packed is None:
        return None
    planes = 1 if bits <= 4 else 2
    max_rows = INT4PACK_MAX_ROWS[planes]

    def exact(rows: torch.Tensor) -> torch.Tensor:
        return linear_intn_reference(rows, qweight, scales, zeros, None, bits, group_size, g_idx)

    product = cpu_kernels.int4pack_product(layout, qweight.shape[0], exact)

    def call(x: torch.Tensor) -> torch.Tensor:
        x2 = common.rows(x)
        if x2.shape[0] > max_rows or not cpu_kernels.computes_in_bf16(x.dtype):
            return _intn_cpu(x, qweight, scales, zeros, g_idx, bias, bits, group_size, layout)
        return common.finish(product(x2), bias, x)

    return call


def _intn_reference(x, qweight, scales, zeros, bias, bits, group_size, *layout):
    return linear_intn_reference(x, qweight, scales, zeros, bias, bits, group_size)


def _intn_gidx_reference(x, qweight, scales, zeros, g_idx, bias, bits, *layout):
    return linear_intn_reference(x, qweight, scales, zeros, bias, bits, 0, g_idx)


def linear_intn_cpu(x, qweight, scales, zeros, bias, bits, group_size, *layout):
    layout = cpu_kernels.CpuLayout(*layout)
    return _intn_cpu(x, qweight, scales, zeros, None, bias, bits, group_size, layout)


def linear_intn_gidx_cpu(x, qweight, scales, zeros, g_idx, bias, bits, *layout):
    layout = cpu_kernels.CpuLayout(*layout)
    return _intn_cpu(x, qweight, scales, zeros, g_idx, bias, bits, 0, layout)


def linear_intn_cuda(x, qweight, scales, zeros, bias, bits, group_size, *layout):
    """The Triton kernels (``dequant_matmul`` picks the path by the number of rows)."""
    from torchquant.triton_kernels.dequant_matmul import dequant_matmul
    from torchquant.triton_kernels.weight import QuantWeight

    weight = QuantWeight(qweight, scales, zeros, bits, group_size)
    return common.unflatten(dequant_matmul(common.rows(x), weight, bias), x)


_INTN_ARGUMENTS = "Tensor x, Tensor qweight, Tensor scales, Tensor? zeros"
linear_intn = common.define_layout_op(
    "linear_intn",
    f"{_INTN_ARGUMENTS}, Tensor? bias, SymInt bits, SymInt group_size",
    _intn_reference,
    linear_intn_cpu,
    linear_intn_cuda,
    "Weight-only INTn linear; ``packed*`` are the layer's cached ``CpuLayout``, if any.",
)
linear_intn_gidx = common.define_layout_op(
    "linear_intn_gidx",
    f"{_INTN_ARGUMENTS}, Tensor g_idx, Tensor? bias, SymInt bits",
    _intn_gidx_reference,
    linear_intn_gidx_cpu,
    None,
    "Weight-only INTn linear with act-order groups: column ``k`` in group ``g_idx[k]``.",
)


# -- act-order weights repacked with their columns sorted by group

REPACK_ROWS = 2048  # weight rows unpacked at a time while repacking (bounds the scratch)


class ActOrderLayout(NamedTuple):
    """A packed INTn weight with its input columns sorted by act-order group.

    ``qweight (N, ceil(K/32)*bits)`` holds original column ``columns[j]`` at position ``j``,
    so column ``j`` is in group ``j // group_size``; ``columns (K,)`` int64 is the gather
    that puts an input into that order: ``x @ W^T == x[:, columns] @ W_sorted^T``.
    """

    qweight: torch.Tensor
    columns: torch.Tensor
    group_size: int


def act_order_layout(
    qweight: torch.Tensor, g_idx: torch.Tensor, bits: int, num_groups: int, in_features: int
) -> ActOrderLayout | None:
    """The sorted layout of an act-order weight, or None where its groups are not runs of
    one size once sorted (the last may be shorter) -- such a ``g_idx`` keeps the ``g_idx`` op."""
    k = in_features
    if g_idx.shape != (k,) or k == 0:
        return None
    columns = torch.argsort(g_idx.long(), stable=True)
    group_size = int((g_idx == 0).sum())
    if group_size == 0 or -(-k // group_size) != num_groups:
        return None
    expected = torch.arange(k, device=g_idx.device) // group_size
    if not torch.equal(g_idx.long()[columns], expected):
        return None
    packed = torch.empty_like(qweight)
    for start in range(0, qweight.shape[0], REPACK_ROWS):
        rows = slice(start, start + REPACK_ROWS)
        packed[rows] = pack_codes(unpack_codes(qweight[rows], bits, k)[:, columns], bits)
    return ActOrderLayout(packed, columns, group_size)


def linear_intn_act_order_reference(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
    columns: torch.Tensor, bias: torch.Tensor | None, bits: int, group_size: int,
) -> torch.Tensor:  # fmt: skip
    """The exact maths of a sorted act-order weight: gather the input columns, then the
    grouped reference."""
    xs = x.index_select(-1, columns)
    return linear_intn_reference(xs, qweight, scales, zeros, bias, bits, group_size)


def linear_intn_act_order_cuda(x, qweight, scales, zeros, columns, bias, bits, group_size):
    """One gather of the input columns, then the grouped Triton kernels."""
    xs = x.index_select(-1, columns)
    return linear_intn_cuda(xs, qweight, scales, zeros, bias, bits, group_size)


linear_intn_act_order = torch.library.custom_op(
    "torchquant::linear_intn_act_order", linear_intn_act_order_reference, mutates_args=()
)
linear_intn_act_order.__doc__ = (
    "Weight-only INTn linear of an act-order weight repacked by :func:`act_order_layout`."
)
common.register_cpu(linear_intn_act_order, linear_intn_act_order_reference)
linear_intn_act_order.register_fake(common.fake_linear)
common.register_cuda("torchquant::linear_intn_act_order", linear_intn_act_order_cuda)
