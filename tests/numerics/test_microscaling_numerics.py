"""Microscaled activations (NVFP4, MXFP4, MXFP8) and MXFP8 weights against the specs' rules.

Scales: E8M0 ``floor(log2(amax)) - emax`` (E2M1: 2, E4M3: 8), NVFP4's E4M3 block scales
under a float32 global scale; values round to nearest even and saturate (+-6, +-448);
a K that the block does not divide leaves a shorter last block.
"""

from __future__ import annotations

import pytest
import torch

from torchquant.errors import QuantizationError
from torchquant.numerics.fp4 import (
    FP4_MAGNITUDES,
    decode_e2m1,
    quantize_mxfp4_weight,
    quantize_nvfp4_weight,
)
from torchquant.numerics.microscaling import (
    dequantize_microscaled,
    dequantize_mxfp8,
    fake_quantize_microscaled,
    quantize_microscaled,
    quantize_mxfp8_weight,
)


def test_mxfp8_scale_is_the_block_max_exponent_less_eight():
    x = torch.zeros(1, 64)
    x[0, 0], x[0, 40] = 448.0, 3.0  # log2 448 = 8.8, log2 3 = 1.58
    q = quantize_microscaled(x, "mxfp8")
    assert q.scales.tolist() == [[127 + 0, 127 + 1 - 8]]
    assert torch.equal(dequantize_microscaled(q), x)


def test_mxfp8_saturates_at_448_and_rounds_to_nearest_even():
    x = torch.zeros(1, 32)
    x[0, :4] = torch.tensor([511.0, -500.0, 1.0 + 1 / 16, 1.0 + 3 / 16])  # amax 511: scale 2**0
    q = quantize_microscaled(x, "mxfp8")
    assert int(q.scales) == 127
    # -- E4M3 steps of 1/8 near 1: 1 + 1/16 ties down to 1, 1 + 3/16 ties up to 1.25
    assert dequantize_microscaled(q)[0, :4].tolist() == [448.0, -448.0, 1.0, 1.25]


def test_mxfp4_activation_blocks_are_the_weight_numerics():
    x = torch.randn(6, 70)  # 70 = 2 x 32 + 6: a short last block
    q = quantize_microscaled(x, "mxfp4")
    w = quantize_mxfp4_weight(x)
    assert q.scales.shape == (6, 3)
    assert torch.equal(q.values, w.codes) and torch.equal(q.scales, w.scales)


def test_nvfp4_dynamic_global_scale_is_the_weight_numerics():
    x = torch.randn(5, 40)  # 40 = 2 x 16 + 8
    q = quantize_microscaled(x, "nvfp4")
    w = quantize_nvfp4_weight(x)
    assert q.scales.shape == (5, 3)
    assert torch.equal(q.global_scale, w.global_scale)
    assert torch.equal(q.values, w.codes)
    assert torch.equal(q.scales.view(torch.uint8), w.scales.view(torch.uint8))


def test_nvfp4_static_global_scale_saturates_what_it_did_not_see():
    x = torch.zeros(1, 16)
    x[0, 0], x[0, 1] = 100.0, 1.0
    calibrated = torch.tensor([448.0 * 6.0 / 10.0])  # calibrated on max |x| = 10
    q = quantize_microscaled(x, "nvfp4", calibrated)
    assert torch.equal(q.global_scale, calibrated)
    assert float(q.scales.float()) == 448.0  # E4M3 saturates
    y = dequantize_microscaled(q)
    assert float(y[0, 0]) == pytest.approx(6.0 * 448.0 / float(calibrated))  # 10, saturated


def test_fp4_values_are_on_the_e2m1_grid_times_block_scales():
    x = torch.randn(3, 48) * 5
    for fmt in ("nvfp4", "mxfp4"):
        q = quantize_microscaled(x, fmt)
        assert set(decode_e2m1(q.values).abs().unique().tolist()) <= set(FP4_MAGNITUDES)
        err = (fake_quantize_microscaled(x, fmt) - x).norm() / x.norm()
        assert 0 < float(err) < 0.15


def test_non_finite_activations_quantize_as_zeros():
    x = torch.ones(2, 32)
    x[0, 3], x[1, 5] = float("nan"), float("inf")
    for fmt in ("nvfp4", "mxfp4", "mxfp8"):
        y = fake_quantize_microscaled(x, fmt)
        assert torch.isfinite(y).all()
        assert float(y[0, 3]) == 0.0 and float(y[0, 4]) == 1.0


def test_bad_inputs_are_refused_by_name():
    with pytest.raises(QuantizationError, match="one of"):
        quantize_microscaled(torch.ones(2, 32), "fp6")
    with pytest.raises(QuantizationError, match="2-D"):
        quantize_microscaled(torch.ones(32), "mxfp8")
    with pytest.raises(QuantizationError, match="no global scale"):
        quantize_microscaled(torch.ones(2, 32), "mxfp4", torch.ones(1))
    w = torch.ones(4, 32)
    w[1, 1] = float("nan")
    with pytest.raises(QuantizationError, match="layers.0.q_proj.weight contains 1 NaN"):
        quantize_mxfp8_weight(w, "layers.0.q_proj.weight")


def test_mxfp8_weight_round_trip_error_is_small():
    w = torch.randn(16, 100)
    q = quantize_mxfp8_weight(w)
    assert q.values.dtype == torch.float8_e4m3fn and q.scales.shape == (16, 4)
    err = (dequantize_mxfp8(q.values, q.scales) - w).norm() / w.norm()
    assert float(err) < 0.04
