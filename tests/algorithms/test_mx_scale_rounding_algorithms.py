"""Every MXFP4 weight rounding with the opt-in E8M0 scale rounding: round-to-nearest and the
scale search through ``convert_model``, GPTQ (block scales fixed first, by that rounding)
and AWQ (its fake quantization and clipped ranges), each against the numerics."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny_models import tiny_llama

from torchquant import AWQConfig, GPTQConfig, QuantConfig, QuantScheme, WeightQuant, convert_model
from torchquant.algorithms.awq import quantize_fp4_in_ranges, weight_fake_quantize
from torchquant.algorithms.gptq import accumulate_hessian, gptq_quantize_fp4
from torchquant.modules import QuantLinear
from torchquant.numerics import group_min_max
from torchquant.numerics.fp4 import (
    MXFP4_BLOCK,
    dequantize_fp4_weight,
    quantize_mxfp4_weight,
    search_mxfp4_weight,
)

pytestmark = pytest.mark.usefixtures("one_thread")

CT = "compressed-tensors"
SHAPE = {"hidden": 64, "inter": 96, "heads": 2, "kv_heads": 1, "layers": 1, "seed": 3}


def _floats() -> dict[str, torch.Tensor]:
    return {
        n: m.weight.detach().clone()
        for n, m in tiny_llama(**SHAPE).named_modules()
        if isinstance(m, torch.nn.Linear) and n != "lm_head"
    }


def _converted(scheme: QuantScheme, calibrate: bool = False):
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(4))
    data = ids if calibrate else None
    model, _ = convert_model(
        tiny_llama(**SHAPE), QuantConfig(scheme), calibration_data=data, progress=False
    )
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


@pytest.mark.parametrize("observer", ["minmax", "mse"])
def test_convert_model_rounds_every_layer_by_the_chosen_rule(observer):
    rounding = quantize_mxfp4_weight if observer == "minmax" else search_mxfp4_weight
    layers = _converted(QuantScheme(WeightQuant("mxfp4", observer=observer, scale_rounding=CT)))
    spec = _converted(QuantScheme(WeightQuant("mxfp4", observer=observer)))
    differs = False
    for name, w in _floats().items():
        want = rounding(w, scale_rounding=CT)
        assert torch.equal(layers[name].scales, want.scales), name
        assert torch.equal(layers[name].weight_format.fp4_codes(layers[name]), want.codes), name
        differs |= not torch.equal(spec[name].scales, want.scales)
    assert differs or observer == "mse"  # -- both searches may settle on the same exponents


def test_gptq_fixes_the_chosen_block_scales_and_beats_rtn_on_them():
    g = torch.Generator().manual_seed(0)
    n, k = 48, 160
    x = torch.randn(2048, k, generator=g) @ (torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k))
    w = torch.randn(n, k, generator=g)
    hessian, _ = accumulate_hessian(None, 0, x)
    rtn = quantize_mxfp4_weight(w, scale_rounding=CT)
    q = gptq_quantize_fp4(w, hessian, "mxfp4", scale_rounding=CT)
    assert torch.equal(q.scales, rtn.scales)

    def output_error(fp4) -> float:
        wq = dequantize_fp4_weight(fp4.codes, fp4.scales, None, MXFP4_BLOCK)
        return float((x @ (wq - w).t()).norm())

    assert output_error(q) < 0.9 * output_error(rtn)
    searched = gptq_quantize_fp4(w, hessian, "mxfp4", search_scales=True, scale_rounding=CT)
    assert torch.equal(searched.scales, search_mxfp4_weight(w, scale_rounding=CT).scales)


@pytest.mark.parametrize("observer", ["minmax", "mse"])
def test_convert_model_runs_gptq_with_the_chosen_scales(observer):
    """GPTQ's block scales: the rounding's (``gptq.observer="minmax"``) or the search's
    around it (any other observer, the default)."""
    gptq = GPTQConfig(observer=observer)
    scheme = QuantScheme(WeightQuant("mxfp4", scale_rounding=CT), algorithm="gptq", gptq=gptq)
    layers = _converted(scheme, True)
    rounding = quantize_mxfp4_weight if observer == "minmax" else search_mxfp4_weight
    for name, w in _floats().items():
        assert torch.equal(layers[name].scales, rounding(w, scale_rounding=CT).scales), name


def test_awq_fake_quantizes_and_clips_by_the_chosen_rule():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(16, 96, generator=g) * 0.1
    fake = weight_fake_quantize(WeightQuant("mxfp4", scale_rounding=CT))
    q = quantize_mxfp4_weight(w, scale_rounding=CT)
    assert torch.equal(fake(w), dequantize_fp4_weight(q.codes, q.scales, None, MXFP4_BLOCK))
    lo, hi = group_min_max(w, MXFP4_BLOCK)
    ranges = (lo * 0.8, hi * 0.8)
    clipped = quantize_fp4_in_ranges(w, ranges, "mxfp4", "w", CT)
    want = quantize_mxfp4_weight(
        w, block_amax=torch.maximum(-ranges[0], ranges[1]), scale_rounding=CT
    )
    assert torch.equal(clipped.scales, want.scales) and torch.equal(clipped.codes, want.codes)
    assert torch.equal(fake(w, ranges), dequantize_fp4_weight(want.codes, want.scales, None, 32))


def test_convert_model_runs_awq_with_the_chosen_rounding():
    fast = AWQConfig(grid=4, clip_grid=4, max_tokens=64)
    awq = QuantScheme(WeightQuant("mxfp4", scale_rounding=CT), algorithm="awq", awq=fast)
    spec = dataclasses.replace(awq, weight=WeightQuant("mxfp4"))
    ours, theirs = _converted(awq, True), _converted(spec, True)
    assert all(m.scheme.weight.scale_rounding == CT for m in ours.values())
    assert any(not torch.equal(m.scales, theirs[n].scales) for n, m in ours.items())
