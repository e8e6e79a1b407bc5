"""``quantize_weight``: every algorithm rounds through one entry, each as its own function does."""

import dataclasses

import pytest
import torch

from torchquant.algorithms.awq import quantize_in_ranges, search_clip
from torchquant.algorithms.gptq import accumulate_hessian, gptq_quantize
from torchquant.algorithms.quantize import WEIGHT_ROUNDING, WeightStats, quantize_weight
from torchquant.config import ALGORITHMS, ActivationQuant, AWQConfig, QuantScheme, WeightQuant
from torchquant.errors import CalibrationError, ConfigError, QuantizationError
from torchquant.numerics import quantize_fp8_weight, quantize_int_weight

W4 = WeightQuant(bits=4, group_size=32, symmetric=False)


def weight(n: int = 24, k: int = 80) -> torch.Tensor:  # 80 = 2.5 groups of 32
    return torch.randn(n, k, generator=torch.Generator().manual_seed(1))


def inputs(tokens: int = 256, k: int = 80) -> torch.Tensor:
    x = torch.randn(tokens, k, generator=torch.Generator().manual_seed(2))
    x[:, :4] *= 10.0
    return x


def hessian(x: torch.Tensor) -> torch.Tensor:
    return accumulate_hessian(None, 0, x)[0]


def assert_same(got, codes, scales, zeros, g_idx=None):
    assert torch.equal(got.codes, codes)
    assert torch.equal(got.scales, scales) and got.scales.dtype == scales.dtype
    assert (got.zeros is None) == (zeros is None)
    if zeros is not None:
        assert torch.equal(got.zeros, zeros)
    assert (got.g_idx is None) == (g_idx is None)
    if g_idx is not None:
        assert torch.equal(got.g_idx, g_idx)


def test_every_configured_algorithm_has_a_rounding():
    assert sorted(WEIGHT_ROUNDING) == sorted(ALGORITHMS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("wq", [W4, WeightQuant(bits=8, group_size=-1, symmetric=True)])
def test_round_to_nearest_is_the_numerics(wq, dtype):
    w = weight().to(dtype)
    got = quantize_weight(QuantScheme(wq), w)
    want = quantize_int_weight(w, wq.bits, wq.group_size, wq.symmetric)
    assert_same(got, want.codes, want.scales, want.zeros)


@pytest.mark.parametrize("group_size", [-1, 0])
def test_fp8_round_to_nearest_is_the_numerics(group_size):
    w = weight()
    got = quantize_weight(QuantScheme(WeightQuant(type="fp8", group_size=group_size)), w)
    values, scales = quantize_fp8_weight(w, per_channel=group_size == -1)
    assert got.codes.dtype == torch.float8_e4m3fn
    assert torch.equal(got.codes.view(torch.uint8), values.view(torch.uint8))
    assert torch.equal(got.scales, scales)


@pytest.mark.parametrize("act_order,static_groups", [(True, True), (True, False), (False, False)])
def test_gptq_rounds_with_the_measured_hessian(act_order, static_groups):
    w, h = weight(), hessian(inputs())
    scheme = QuantScheme(W4, algorithm="gptq")
    scheme = dataclasses.replace(
        scheme,
        gptq=dataclasses.replace(scheme.gptq, act_order=act_order, static_groups=static_groups),
    )
    got = quantize_weight(scheme, w, WeightStats(hessian=h))
    p = scheme.gptq
    want = gptq_quantize(
        w, h, 4, 32, False, p.block_size, p.dampening, act_order, static_groups, p.observer
    )
    assert_same(got, want.codes, want.scales, want.zeros, want.g_idx)
    assert (got.g_idx is not None) == (act_order and not static_groups)


def test_awq_rounds_on_the_searched_ranges():
    w, x = weight(), inputs()
    ranges = search_clip(w, x, 4, 32, False, grid=8)
    got = quantize_weight(QuantScheme(W4, algorithm="awq"), w, WeightStats(clip_range=ranges))
    want = quantize_in_ranges(w, ranges, 4, 32, False)
    assert_same(got, want.codes, want.scales, want.zeros)
    rtn = quantize_int_weight(w, 4, 32, False)
    assert not torch.equal(got.codes, rtn.codes)  # -- the clipped ranges did change the rounding


def test_awq_with_gptq_rounding_is_gptq():
    w, h = weight(), hessian(inputs())
    scheme = QuantScheme(W4, algorithm="awq", awq=AWQConfig(rounding="gptq"))
    got = quantize_weight(scheme, w, WeightStats(hessian=h))
    gptq = quantize_weight(dataclasses.replace(scheme, algorithm="gptq"), w, WeightStats(h))
    assert_same(got, gptq.codes, gptq.scales, gptq.zeros, gptq.g_idx)


@pytest.mark.parametrize("algorithm", ["gptq", "awq"])
def test_calibrated_rounding_without_measurements_is_round_to_nearest(algorithm):
    """A layer calibration never reached (an unused expert) keeps the plain rounding."""
    w = weight()
    got = quantize_weight(QuantScheme(W4, algorithm=algorithm), w, WeightStats())
    want = quantize_int_weight(w, 4, 32, False)
    assert_same(got, want.codes, want.scales, want.zeros)


def test_smoothquant_rounds_to_nearest_and_ignores_stats():
    wq = WeightQuant(bits=8, group_size=-1, symmetric=True)
    scheme = QuantScheme(wq, ActivationQuant(), algorithm="smoothquant")
    w = weight()
    want = quantize_int_weight(w, 8, -1, True)
    for stats in (None, WeightStats(hessian=hessian(inputs()))):
        assert_same(quantize_weight(scheme, w, stats), want.codes, want.scales, want.zeros)


@pytest.mark.parametrize("algorithm", ["gptq", "awq"])
def test_calibrated_rounding_without_stats_names_the_weight(algorithm):
    with pytest.raises(CalibrationError, match=rf"layers\.0\.q\.weight: algorithm '{algorithm}'"):
        quantize_weight(QuantScheme(W4, algorithm=algorithm), weight(), name="layers.0.q.weight")


def test_unknown_algorithm_names_the_field():
    with pytest.raises(ConfigError, match=r"algorithm='magic'.*one of"):
        QuantScheme(W4, algorithm="magic")
    forged = QuantScheme(W4)
    object.__setattr__(forged, "algorithm", "magic")  # -- past the config's own check
    with pytest.raises(ConfigError, match=r"algorithm='magic' has no weight rounding.*'rtn'"):
        quantize_weight(forged, weight())


def test_a_weight_must_be_two_dimensional():
    with pytest.raises(QuantizationError, match=r"w: expected a 2-D weight, got \(4, 4, 4\)"):
        quantize_weight(QuantScheme(W4), torch.randn(4, 4, 4), name="w")
