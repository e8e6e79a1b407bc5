"""Act-order INTn weights through the grouped kernels: the sorted op's CUDA implementation
(GEMV, split-K and tiled paths) against the ``g_idx`` reference, with a random act-order
``g_idx`` and a partial last group."""

from __future__ import annotations

import pytest
import torch
from act_order_weights import act_order_weight
from kernel_utils import KERNEL_DEVICE, assert_matches, relative_error, requires_kernels

from torchquant import ops
from torchquant.ops import cuda as cuda_ops

pytestmark = requires_kernels


@pytest.mark.parametrize("m", [1, 5, 70])  # the GEMV, split-K and tiled paths
def test_sorted_op_runs_the_grouped_kernels_and_matches_the_g_idx_reference(m):
    bits, group_size, n, k = 4, 64, 40, 200
    qweight, scales, zeros, g_idx = act_order_weight(n, k, bits, group_size, False, seed=m)
    scales = scales.to(torch.float16)
    layout = ops.act_order_layout(qweight, g_idx, bits, scales.shape[1], k)
    x = torch.randn(m, k).to(torch.float16)
    bias = torch.randn(n).to(torch.float16)
    args = (layout.qweight, scales, zeros, layout.columns, bias, bits, group_size)
    kernel = cuda_ops.CUDA_KERNELS["torchquant::linear_intn_act_order"]
    on_device = [t.to(KERNEL_DEVICE) if isinstance(t, torch.Tensor) else t for t in args]
    out = kernel(x.to(KERNEL_DEVICE), *on_device).cpu()
    ref = ops.linear_intn_reference(x, qweight, scales, zeros, bias, bits, 0, g_idx)
    if m == 1:  # the GEMV keeps dequantized weights in float32: closer than fp16 rounding
        assert relative_error(out, ref) < 1e-2
    else:
        assert_matches(out, ref)
