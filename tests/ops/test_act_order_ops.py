"""Act-order INTn weights repacked with their columns sorted by group (``act_order_layout``)
vs the ``g_idx`` reference: the repack is exact and the sorted op computes the same linear."""

from __future__ import annotations

import pytest
import torch
from act_order_weights import act_order_weight

from torchquant import ops
from torchquant.numerics import dequantize_int_weight, unpack_codes
from torchquant.ops.weight_int import dequantize_gidx, linear_intn_act_order_reference

# (bits, group_size, K): a partial last group (200 = 3 x 64 + 8), codes straddling words
CASES = [(4, 64, 200, False), (3, 32, 96, True), (8, 128, 576, False), (2, 16, 40, True)]


@pytest.mark.parametrize("bits,group_size,k,symmetric", CASES)
def test_repacked_weight_is_the_act_order_weight_with_sorted_columns(
    bits, group_size, k, symmetric
):
    qweight, scales, zeros, g_idx = act_order_weight(12, k, bits, group_size, symmetric, seed=bits)
    layout = ops.act_order_layout(qweight, g_idx, bits, scales.shape[1], k)
    assert layout is not None and layout.group_size == group_size
    assert torch.equal(g_idx[layout.columns].long(), torch.arange(k) // group_size)
    codes = unpack_codes(qweight, bits, k)
    want = dequantize_gidx(codes, scales, zeros, g_idx, bits, torch.float32)[:, layout.columns]
    sorted_codes = unpack_codes(layout.qweight, bits, k)
    got = dequantize_int_weight(sorted_codes, scales, zeros, bits, group_size, torch.float32)
    assert torch.equal(got, want)


@pytest.mark.parametrize("bits,group_size,k,symmetric", CASES[:2])
def test_sorted_op_matches_the_g_idx_reference(bits, group_size, k, symmetric):
    qweight, scales, zeros, g_idx = act_order_weight(20, k, bits, group_size, symmetric, seed=7)
    layout = ops.act_order_layout(qweight, g_idx, bits, scales.shape[1], k)
    x = torch.randn(3, 5, k)
    bias = torch.randn(20)
    ref = ops.linear_intn_reference(x, qweight, scales, zeros, bias, bits, 0, g_idx)
    out = ops.linear_intn_act_order(
        x, layout.qweight, scales, zeros, layout.columns, bias, bits, group_size
    )
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)


def test_groupings_that_do_not_sort_into_runs_of_one_size_keep_the_g_idx_op():
    qweight, scales, _, g_idx = act_order_weight(4, 64, 4, 16, True, seed=0)
    uneven = g_idx.clone()
    uneven[uneven == 1] = 0  # group 0 twice as large as the others, group 1 empty
    assert ops.act_order_layout(qweight, uneven, 4, scales.shape[1], 64) is None
    assert ops.act_order_layout(qweight, g_idx, 4, scales.shape[1] + 1, 64) is None
    assert ops.act_order_layout(qweight, g_idx[:-1], 4, scales.shape[1], 64) is None


def test_sorted_reference_gathers_the_input_once():
    qweight, scales, zeros, g_idx = act_order_weight(6, 32, 4, 8, False, seed=3)
    layout = ops.act_order_layout(qweight, g_idx, 4, scales.shape[1], 32)
    x = torch.randn(2, 32)
    out = linear_intn_act_order_reference(
        x, layout.qweight, scales, zeros, layout.columns, None, 4, 8
    )
    plain = ops.linear_intn_reference(
        x[:, layout.columns], layout.qweight, scales, zeros, None, 4, 8
    )
    assert torch.equal(out, plain)
