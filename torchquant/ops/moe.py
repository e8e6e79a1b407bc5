"""Mixture-of-experts weight-only linear: every routed slot's expert in one op.

Routing ``top_k_index (T, k)`` gives token ``t`` the slots ``s = t * k + j``, each
routed to an expert in ``0..E-1`` (``E``: to none).  ``x`` holds one row per token
(``(T, K)``: a layer's first projection) or one per slot (``(T * k, K)``: the
projection after it).  Weights are one weight-only format stacked over the experts:
``qweight (E, N, ...)``, ``scales (E, N, G)`` (or ``(E, 1, 1)``), ``zeros (E, N, G)``
or None, ``bias (E, N)`` or None; the format follows ``qweight``'s dtype as in
``weight_int`` (int32 packed), ``weight_int8`` (int8) and ``weight_fp8`` (fp8).

The output ``(T * k, N)`` in ``x.dtype`` holds, per slot, its expert's linear times
``top_k_weights[t, j]`` (when given), and zeros for slots routed to no expert.  The
reference runs the per-expert reference ops; the CPU path the same loop on the CPU
kernels; CUDA one Triton launch over all experts (``triton_kernels.moe_gemm``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from torchquant.ops.common import register_cpu, register_cuda, warn_fallback
from torchquant.ops.weight_fp8 import linear_fp8_weight_cpu, linear_fp8_weight_reference
from torchquant.ops.weight_int import linear_intn_cpu, linear_intn_reference
from torchquant.ops.weight_int8 import linear_int8_weight_cpu, linear_int8_weight_reference


def _by_storage(intn: Callable, int8: Callable, fp8: Callable) -> Callable[..., torch.Tensor]:
    """One expert's linear, by the storage of its weight: packed INTn, INT8 or FP8."""

    def linear(x, qweight, scales, zeros, bias, bits, group_size):
        if qweight.dtype == torch.int8:
            return int8(x, qweight, scales, bias, group_size)
        if qweight.dtype == torch.float8_e4m3fn:
            return fp8(x, qweight, scales, bias)
        return intn(x, qweight, scales, zeros, bias, bits, group_size)

    return linear


def _per_expert(linear: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """The op computed as a loop over the experts, each running ``linear`` on its slots."""

    def run(x, qweight, scales, zeros, bias, top_k_index, top_k_weights, bits, group_size):
        expert_of_slot = top_k_index.reshape(-1)
        slots = expert_of_slot.numel()
        per_slot = x.shape[0] == slots
        out = x.new_zeros(slots, qweight.shape[1])
        for e in range(qweight.shape[0]):
            slot = (expert_of_slot == e).nonzero()[:, 0]
            if slot.numel() == 0:
                continue
            rows = x[slot if per_slot else slot // top_k_index.shape[-1]]
            z = zeros[e] if zeros is not None else None
            b = bias[e] if bias is not None else None
            y = linear(rows, qweight[e], scales[e], z, b, bits, group_size)
            if top_k_weights is not None:
                y = y * top_k_weights.reshape(-1)[slot, None]
            out[slot] = y.to(out.dtype)
        return out

    return run


moe_linear_reference = _per_expert(
    _by_storage(linear_intn_reference, linear_int8_weight_reference, linear_fp8_weight_reference)
)
moe_linear_reference.__doc__ = "The exact maths: each expert's reference op on its slots."
moe_linear_cpu = _per_expert(
    _by_storage(linear_intn_cpu, linear_int8_weight_cpu, linear_fp8_weight_cpu)
)


moe_linear_weight_only = torch.library.custom_op(
    "torchquant::moe_linear_weight_only",
    moe_linear_reference,
    mutates_args=(),
    schema="(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor? bias, "
    "Tensor top_k_index, Tensor? top_k_weights, SymInt bits, SymInt group_size) -> Tensor",
)
moe_linear_weight_only.__doc__ = (
    "Each routed slot's expert linear (weight-only INTn, INT8 or FP8) -> ``(T * k, N)``."
)


@moe_linear_weight_only.register_fake
def _fake(x, qweight, scales, zeros, bias, top_k_index, *args):
    return x.new_empty(top_k_index.numel(), qweight.shape[1])


register_cpu(moe_linear_weight_only, moe_linear_cpu)


def moe_linear_cuda(*args: torch.Tensor | int | None) -> torch.Tensor:
    """The op on the Triton kernels: one token's slots on the grouped GEMV; more tokens'
    slots aligned by expert, then one grouped GEMM."""
    from torchquant.triton_kernels.fp8_gemm import fp8_supported
    from torchquant.triton_kernels.moe_gemm import (
        align_slots_by_expert,
        moe_block_m,
        moe_dequant_gemm,
        moe_dequant_gemv,
    )
    from torchquant.triton_kernels.weight import QuantWeight

    x, qweight, scales, zeros, bias, top_k_index, top_k_weights, bits, group_size = args
    if qweight.dtype == torch.float8_e4m3fn and not fp8_supported(x.device):
        warn_fallback("moe_linear_weight_only", "FP8 conversions need compute capability >= 8.9")
        return moe_linear_reference(*args)
    if qweight.dtype == torch.float8_e4m3fn:
        group_size = -1  # a scale per row or per tensor: no groups along K
    weight = QuantWeight(qweight, scales, zeros, bits, group_size)
    if top_k_index.shape[0] == 1 and bias is None:  # decode of one token: the GEMV
        return moe_dequant_gemv(x, weight, top_k_index, top_k_weights)
    num_experts = qweight.shape[0]
    block_m = moe_block_m(top_k_index.numel(), num_experts)
    blocks = align_slots_by_expert(top_k_index, num_experts, block_m)
    return moe_dequant_gemm(x, weight, bias, blocks, top_k_weights)


register_cuda("torchquant::moe_linear_weight_only", moe_linear_cuda)
