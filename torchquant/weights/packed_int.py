"""INT2..8 weights as packed int32 codes, with an optional GPTQ act-order ``g_idx``.

``qweight (N, ceil(K/32)*bits)`` int32 (see ``numerics.packing``), ``scales (N, G)``,
``zeros (N, G)`` uint8 for asymmetric weights (symmetric ones imply ``2**(bits-1)``),
``g_idx (K,)`` int32 the group of each input column when act-order reordered them.
Off the CPU, an act-order layer binds its weight repacked with the columns sorted by group
(``ops.act_order_layout``, derived once per bind: a second copy of ``qweight``), so the
grouped kernels serve it; the buffers, and so checkpoints, keep the stored order.
INT8 symmetric weights are not packed: :mod:`torchquant.weights.int8` holds them.
W4A8 layers (INT4 symmetric codes times quantized activations) keep their signed codes as
int8 ``(N, K)`` for the CPU op (see ``ops.w4a8``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from torchquant import ops
from torchquant.config import WeightQuant
from torchquant.numerics import num_groups, pack_codes, packed_width, unpack_codes
from torchquant.ops import cpu_kernels
from torchquant.ops.cpu_kernels import CpuLayout
from torchquant.weights.base import Buffers, IntWeightFormat, QuantizedLayer, store_qparams


class PackedIntFormat(IntWeightFormat):
    name = "packed INT"

    def holds(self, weight: WeightQuant) -> bool:
        return weight.type == "int" and not (weight.bits == 8 and weight.symmetric)

    def takes_g_idx(self, weight: WeightQuant) -> bool:
        return weight.group_size > 0

    def weight_buffers(
        self, n: int, k: int, weight: WeightQuant, dtype: torch.dtype, device: torch.device | None
    ) -> Buffers:
        g = num_groups(k, weight.group_size)
        sdt = self.scale_dtype(weight, dtype)
        width = packed_width(k, weight.bits)
        zeros = None if weight.symmetric else torch.empty(n, g, dtype=torch.uint8, device=device)
        return {
            "qweight": torch.empty(n, width, dtype=torch.int32, device=device),
            "scales": torch.empty(n, g, dtype=sdt, device=device),
            "zeros": zeros,
        }

    def encode(self, codes: Tensor, weight: WeightQuant) -> Tensor:
        return pack_codes(codes, weight.bits)

    def decode(self, qweight: Tensor, weight: WeightQuant, k: int) -> Tensor:
        return unpack_codes(qweight, weight.bits, k)

    def set_packed_codes(
        self, layer: QuantizedLayer, packed: Tensor, scales: Tensor, zeros: Tensor | None
    ) -> None:
        layer.qweight.copy_(packed)  # already the stored layout: kept bit for bit
        store_qparams(layer, scales, zeros)

    def reference_linear(self, layer: QuantizedLayer, x: Tensor, bias: Tensor | None) -> Tensor:
        w, g_idx = layer.scheme.weight, layer.g_idx
        group_size = w.group_size if g_idx is None else 0
        q, s, z = layer.qweight, layer.scales, layer.zeros
        return ops.linear_intn_reference(x, q, s, z, bias, w.bits, group_size, g_idx)

    def bind_linear(self, layer: QuantizedLayer, bias: Tensor | None) -> Callable[[Tensor], Tensor]:
        w, g_idx, layout = layer.scheme.weight, layer.g_idx, layer.cpu_layout()
        q, s, z = layer.qweight, layer.scales, layer.zeros
        if g_idx is not None:
            if (act_order := _act_order_layout(layer)) is not None:
                sorted_q, columns, group_size = act_order
                args = (sorted_q, s, z, columns, bias, w.bits, group_size)
                return ops.bind(ops.linear_intn_act_order, *args)
            on_cpu = ops.bind_intn_cpu(q, s, z, g_idx, bias, w.bits, 0, layout)
            args = (q, s, z, g_idx, bias, w.bits, *layout)
            return ops.bind(ops.linear_intn_gidx, *args, on_cpu=on_cpu)
        on_cpu = ops.bind_intn_cpu(q, s, z, None, bias, w.bits, w.group_size, layout)
        args = (q, s, z, bias, w.bits, w.group_size, *layout)
        return ops.bind(ops.linear_intn, *args, on_cpu=on_cpu)

    def cpu_layout(self, layer: QuantizedLayer) -> CpuLayout:
        if layer.scheme.is_w4a8:
            return ops.w4a8_cpu_layout(layer.qweight, layer.in_features)  # every input dtype
        if not cpu_kernels.keeps_layout(layer.dtype):
            return CpuLayout()  # the op runs the reference for this dtype (ops.cpu_kernels)
        g_idx = layer.g_idx
        if g_idx is not None and not _groups_in_range(g_idx, layer.scales.shape[1]):
            return CpuLayout()  # not written yet (codes are set before g_idx): derive later
        w = layer.scheme.weight
        group_size = w.group_size if g_idx is None else 0
        return ops.intn_cpu_layout(
            layer.qweight, layer.scales, layer.zeros, g_idx, w.bits, group_size, layer.in_features
        )


def _act_order_layout(layer: QuantizedLayer) -> ops.ActOrderLayout | None:
    """The sorted act-order weight for the kernels off the CPU (where the ``g_idx`` op runs
    the reference); None on CPU (its layout already sorts columns by group), while
    compiling (derive it eagerly first) and for groupings that do not sort into runs."""
    if layer.qweight.device.type == "cpu" or torch.compiler.is_compiling():
        return None
    w = layer.scheme.weight
    with torch.no_grad():
        return ops.act_order_layout(
            layer.qweight, layer.g_idx, w.bits, layer.scales.shape[1], layer.in_features
        )


def _groups_in_range(g_idx: Tensor, groups: int) -> bool:
    return bool(((g_idx >= 0) & (g_idx < groups)).all())
