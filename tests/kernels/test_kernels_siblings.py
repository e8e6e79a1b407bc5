"""One launch over sibling weights concatenated along N equals the siblings' own launches.

What ``modules.sibling_linears`` relies on: a GEMV's output rows depend only on their own
weight rows, so running q/k/v (or gate/up) as one weight of their stacked rows gives each
projection the columns its own launch gives, bit for bit under the interpreter.
"""

from __future__ import annotations

import pytest
import torch
from kernel_utils import (
    KERNEL_DEVICE,
    TOLERANCES,
    assert_matches,
    int_weight,
    requires_kernels,
    weight_only_reference,
)
from torchquant.triton_kernels.dequant_matmul import dequant_matmul
from torchquant.triton_kernels.weight import QuantWeight

pytestmark = requires_kernels

# -- (bits, group_size, symmetric): W4 g128 asymmetric (the fast 4-bit GEMV), W4 symmetric,
# -- W3 g64 (the tiled GEMV), INT8 per channel (byte storage)
FORMATS = [(4, 128, False), (4, 128, True), (3, 64, False), (8, -1, True)]
# -- a Llama-like attention triple scaled down (q wider than k and v), and gate/up
WIDTHS = [(96, 32, 32), (160, 160)]


def _siblings(widths, k, bits, group_size, symmetric):
    return [int_weight(n, k, bits, group_size, symmetric, torch.bfloat16) for n in widths]


def _concatenated(weights, bits, group_size) -> QuantWeight:
    qweight = torch.cat([w[0] for w in weights])
    scales = torch.cat([w[1] for w in weights])
    zeros = None if weights[0][2] is None else torch.cat([w[2] for w in weights])
    return QuantWeight(qweight, scales, zeros, bits, group_size)


@pytest.mark.parametrize("bits,group_size,symmetric", FORMATS)
@pytest.mark.parametrize("widths", WIDTHS)
def test_one_launch_over_concatenated_siblings_equals_separate_launches(
    bits, group_size, symmetric, widths
):
    k = 256
    weights = _siblings(widths, k, bits, group_size, symmetric)
    x = torch.randn(1, k, dtype=torch.bfloat16, device=KERNEL_DEVICE)
    fused = dequant_matmul(x, _concatenated(weights, bits, group_size), None)
    separate = [
        dequant_matmul(x, QuantWeight(q, s, z, bits, group_size), None) for q, s, z, _ in weights
    ]
    assert fused.shape == (1, sum(widths))
    torch.testing.assert_close(fused, torch.cat(separate, dim=1), rtol=0, atol=0)
    # -- and each projection's columns against the exact reference of its own weight
    offset = 0
    for (q, s, z, _), n in zip(weights, widths, strict=True):
        ref = weight_only_reference(x, q, s, z, None, bits, group_size, compute_dtype=torch.float32)
        assert_matches(fused[:, offset : offset + n], ref, torch.bfloat16)
        offset += n


def test_concatenated_biases_follow_their_rows():
    k, widths, bits, group_size = 128, (64, 32, 32), 4, 128
    weights = _siblings(widths, k, bits, group_size, False)
    biases = [torch.randn(n, dtype=torch.bfloat16, device=KERNEL_DEVICE) for n in widths]
    x = torch.randn(1, k, dtype=torch.bfloat16, device=KERNEL_DEVICE)
    fused = dequant_matmul(x, _concatenated(weights, bits, group_size), torch.cat(biases))
    separate = [
        dequant_matmul(x, QuantWeight(q, s, z, bits, group_size), b)
        for (q, s, z, _), b in zip(weights, biases, strict=True)
    ]
    rtol, atol = TOLERANCES[torch.bfloat16]
    torch.testing.assert_close(fused, torch.cat(separate, dim=1), rtol=rtol, atol=atol)
