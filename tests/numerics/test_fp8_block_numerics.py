"""FP8 block-wise numerics: per-block weight scales and per-token-group activation scales."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchquant.errors import QuantizationError
from torchquant.numerics import (
    block_grid,
    dequantize_activation_groups,
    dequantize_fp8_block_weight,
    quantize_activation_groups,
    quantize_fp8_block_weight,
)

BLOCK = (128, 128)


def _within_half_step(approx, exact, scale):
    """E4M3 rounds to within half a step: 2**-4 of the value (normals), 2**-10 (subnormals)."""
    bound = scale * ((exact / scale).abs() * 2.0**-4 + 2.0**-10) * (1 + 1e-6)
    assert bool(((approx - exact).abs() <= bound).all())


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 300), k=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_block_scales_map_each_block_max_onto_448(n, k, seed):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 3
    q, scales = quantize_fp8_block_weight(w, BLOCK)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (n, k)
    assert scales.dtype == torch.float32 and scales.shape == block_grid(n, k, BLOCK)
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            tile = w[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128]
            assert scales[i, j] == (tile.abs().max().double() / 448).float()
            assert q[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128].float().abs().max() == 448
    full = torch.ones(n, k)
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            full[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128] = scales[i, j]
    _within_half_step(dequantize_fp8_block_weight(q, scales, BLOCK), w, full)


def test_rectangular_blocks_partial_edges_and_zero_blocks():
    w = torch.randn(70, 90)
    w[:64, :32] = 0
    q, scales = quantize_fp8_block_weight(w, (64, 32))
    assert scales.shape == (2, 3)
    assert scales[0, 0] == 1 and bool((q[:64, :32].float() == 0).all())
    assert dequantize_fp8_block_weight(q, scales, (64, 32), torch.bfloat16).dtype == torch.bfloat16


def test_bf16_weights_quantize_like_their_float32_values():
    w = torch.randn(130, 260).bfloat16()
    q16, s16 = quantize_fp8_block_weight(w, BLOCK)
    q32, s32 = quantize_fp8_block_weight(w.float(), BLOCK)
    assert torch.equal(q16.view(torch.uint8), q32.view(torch.uint8)) and torch.equal(s16, s32)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_weights_are_refused_by_name(bad):
    w = torch.randn(8, 8)
    w[3, 5] = bad
    with pytest.raises(QuantizationError, match="layers.0.q_proj.weight contains 1 NaN/Inf"):
        quantize_fp8_block_weight(w, BLOCK, what="layers.0.q_proj.weight")


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 9), k=st.integers(1, 400), seed=st.integers(0, 2**16))
def test_activation_groups_scale_each_1x128_group(m, k, seed):
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)) * 10
    q, scales = quantize_activation_groups(x, 128)
    assert q.dtype == torch.float8_e4m3fn and scales.shape == (m, -(-k // 128))
    expected = torch.stack(
        [x[:, j : j + 128].abs().amax(dim=1) / 448 for j in range(0, k, 128)], dim=1
    )
    torch.testing.assert_close(scales, expected, rtol=0, atol=0)
    full = scales.repeat_interleave(128, dim=1)[:, :k]
    _within_half_step(dequantize_activation_groups(q, scales, 128), x, full)


def test_zero_groups_get_scale_one_and_nan_stays_in_its_row():
    x = torch.randn(3, 200)
    x[0] = 0
    x[2, 150] = float("nan")
    q, scales = quantize_activation_groups(x, 128)
    assert scales[0].tolist() == [1.0, 1.0]
    assert bool(torch.isfinite(q[:2].float()).all())
    assert bool(torch.isnan(q[2, 150].float()))


def test_activation_groups_need_rows():
    with pytest.raises(QuantizationError, match="2-D"):
        quantize_activation_groups(torch.randn(2, 3, 128), 128)
