"""The calibration steps one by one, on a small block: a norm feeding two linears, then a third."""

import pytest
import torch
from torch import nn

from torchquant.calibration.block import CalibrationBlock
from torchquant.calibration.capture import BlockInput, run_block
from torchquant.calibration.engine import gather_statistics
from torchquant.calibration.mappings import BalanceMapping
from torchquant.calibration.stats import StatsRequest
from torchquant.calibration.steps import (
    CALIBRATION_STEPS,
    AwqStep,
    GptqStep,
    SmoothQuantStep,
    StaticScaleStep,
)
from torchquant.config import ActivationQuant, AWQConfig, GPTQConfig, QuantScheme, WeightQuant
from torchquant.modules import QuantLinear
from torchquant.plan import ConversionSummary

pytestmark = pytest.mark.usefixtures("one_thread")

W4 = WeightQuant(bits=4, group_size=16, symmetric=False)
W8 = WeightQuant(bits=8, group_size=-1, symmetric=True)
FAST_AWQ = AWQConfig(grid=4, clip_grid=4, max_tokens=64)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(32)
        self.up = nn.Linear(32, 48)
        self.gate = nn.Linear(32, 48)
        self.down = nn.Linear(48, 32)
        with torch.no_grad():
            self.norm.weight[:3] *= 20.0  # -- outlier channels, as in real models

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return x + self.down(torch.relu(self.gate(h)) * self.up(h))


MAPPINGS = (
    BalanceMapping("norm", ("up", "gate"), None),
    BalanceMapping("up", ("down",), None, True),
)


def calibration_block(scheme: QuantScheme, samples: int = 4) -> CalibrationBlock:
    torch.manual_seed(0)
    block = Block().eval()
    inputs = [BlockInput(torch.randn(1, 16, 32), {}) for _ in range(samples)]
    schemes = dict.fromkeys(("up", "gate", "down"), scheme)
    cpu = torch.device("cpu")
    return CalibrationBlock(block, block, "", schemes, MAPPINGS, cpu, inputs, ConversionSummary())


def gather(cal: CalibrationBlock, *step_types) -> list:
    """The statistics pass as the engine runs it, for the given steps."""
    steps = [step(cal) for step in step_types]
    gather_statistics(cal, steps)
    return steps


def outputs(cal: CalibrationBlock) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([run_block(cal.module, s, cal.device) for s in cal.samples])


def test_steps_run_rescaling_first_and_gptq_last():
    assert CALIBRATION_STEPS == (SmoothQuantStep, AwqStep, StaticScaleStep, GptqStep)


def test_each_step_requests_only_what_its_algorithm_reads():
    cal = calibration_block(QuantScheme(W4))
    sq = QuantScheme(W8, ActivationQuant(), "smoothquant")
    awq = QuantScheme(W4, algorithm="awq", awq=AWQConfig(max_tokens=100))
    awq_gptq = QuantScheme(W4, algorithm="awq", awq=AWQConfig(rounding="gptq"))
    gptq = QuantScheme(W4, algorithm="gptq")
    requests = {
        step.__name__: [step(cal).request(s) for s in (QuantScheme(W4), sq, awq, awq_gptq, gptq)]
        for step in CALIBRATION_STEPS
    }
    assert requests == {
        "SmoothQuantStep": [None, StatsRequest(absmax=True), None, None, None],
        "AwqStep": [None, None, StatsRequest(samples=512), StatsRequest(samples=4096), None],
        "StaticScaleStep": [None] * 5,
        "GptqStep": [None, None, None, StatsRequest(hessian=True), StatsRequest(hessian=True)],
    }
    assert StatsRequest(absmax=True) | StatsRequest(hessian=True, samples=8) == StatsRequest(
        True, True, 8
    )


def test_smoothquant_folds_into_the_norm_and_keeps_the_function():
    cal = calibration_block(QuantScheme(W8, ActivationQuant(), "smoothquant"))
    before, norm = outputs(cal), cal.module.norm.weight.clone()
    (step,) = gather(cal, SmoothQuantStep)
    step.apply()
    torch.testing.assert_close(outputs(cal), before, rtol=1e-4, atol=1e-4)
    assert not torch.equal(cal.module.norm.weight, norm)
    assert cal.smooth == {}  # -- folded: nothing left to divide at run time; down is not smoothed


def test_awq_scales_into_the_norm_and_records_clip_ranges():
    cal = calibration_block(QuantScheme(W4, algorithm="awq", awq=FAST_AWQ))
    before = outputs(cal)
    (step,) = gather(cal, AwqStep)
    step.apply()
    torch.testing.assert_close(outputs(cal), before, rtol=1e-4, atol=1e-4)
    # -- up's output channels scale down's input: the second mapping folds into up
    assert set(cal.divisor) == {"up", "gate", "down"}
    assert set(cal.clip_ranges) == {"up", "gate", "down"}
    lo, hi = cal.clip_ranges["down"]
    assert lo.shape == hi.shape == (32, 3) and bool((lo <= hi).all())


def test_rescaling_steps_record_what_they_rescaled():
    """What the statistics pass saw of a rescaled module is stale: SmoothQuant and AWQ say
    which modules they rescaled, and a module counts as rescaled when one inside it was."""
    cal = calibration_block(QuantScheme(W8, ActivationQuant(), algorithm="smoothquant"))
    (step,) = gather(cal, SmoothQuantStep)
    assert cal.rescaled == set()
    step.apply()
    assert cal.rescaled == {"norm", "up", "gate"}  # -- down's input comes from a linear
    assert cal.rescaled_within("up") and not cal.rescaled_within("down")
    assert cal.rescaled_within("")  # -- the block itself
    cal = calibration_block(QuantScheme(W4, algorithm="awq", awq=FAST_AWQ))
    (step,) = gather(cal, AwqStep)
    step.apply()
    assert cal.rescaled == {"norm", "up", "gate", "down"}


def test_static_scales_are_the_observed_input_bound():
    act = ActivationQuant(dynamic=False, granularity="tensor")
    cal = calibration_block(QuantScheme(W8, act))
    inputs: dict[str, list[torch.Tensor]] = {"up": [], "down": []}
    for rel, store in inputs.items():
        cal.linears[rel].register_forward_pre_hook(lambda m, a, store=store: store.append(a[0]))
    StaticScaleStep(cal).apply()
    for rel, seen in inputs.items():
        bound = torch.cat(seen).abs().amax()
        torch.testing.assert_close(cal.input_scales[rel], (bound / 127).reshape(1))


def test_gptq_quantizes_stage_by_stage_and_counts_each_layer():
    cal = calibration_block(QuantScheme(W4, algorithm="gptq", gptq=GPTQConfig(sequential=True)))
    (step,) = gather(cal, GptqStep)
    assert step.stages(cal.samples[0]) == [["gate", "up"], ["down"]]  # -- in execution order
    step.apply()
    assert all(isinstance(cal.module.get_submodule(r), QuantLinear) for r in cal.schemes)
    assert cal.quantized == {"up", "gate", "down"}
    assert list(cal.summary.converted) == ["up", "gate", "down"]
    # -- down's Hessian was regathered from the quantized first stage, not the float block
    x = torch.cat([torch.relu(cal.module.gate(h)) * cal.module.up(h) for h in normed(cal)])
    torch.testing.assert_close(cal.stats["down"].hessian, 2 * x.t() @ x / x.shape[0])


def normed(cal: CalibrationBlock) -> list[torch.Tensor]:
    with torch.no_grad():
        return [cal.module.norm(s.hidden).reshape(-1, 32) for s in cal.samples]


def test_quantize_leaves_what_a_step_quantized():
    cal = calibration_block(QuantScheme(W4, algorithm="gptq"))
    (step,) = gather(cal, GptqStep)
    step.apply()
    first = cal.module.up
    cal.quantize(set(cal.schemes))
    assert cal.module.up is first and len(cal.summary.converted) == 3


@pytest.mark.parametrize("observer", ["minmax", "percentile", "kl", "mse"])
def test_static_asymmetric_scales_and_zero_points_cover_the_observed_range(observer):
    act = ActivationQuant(dynamic=False, granularity="tensor", observer=observer, symmetric=False)
    cal = calibration_block(QuantScheme(W8, act))
    seen: list[torch.Tensor] = []
    cal.linears["down"].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    StaticScaleStep(cal).apply()
    scale, zero = cal.input_scales["down"], cal.input_zero_points["down"]
    assert scale.shape == zero.shape == (1,) and zero.dtype == torch.int8
    x = torch.cat(seen)
    lo, hi = float(x.min()), float(x.max())
    # -- the range of the codes never passes what was seen, and min-max takes all of it
    top, bottom = float((127 - zero.float()) * scale), float((-128 - zero.float()) * scale)
    assert top <= hi * (1 + 1e-3) + float(scale) and bottom >= lo - float(scale)
    if observer == "minmax":
        assert float(scale) == pytest.approx((hi - lo) / 255, rel=1e-5)
        assert top == pytest.approx(hi, abs=float(scale))
    cal.quantize({"down"})
    layer = cal.module.get_submodule("down")
    assert torch.equal(layer.input_zero_point, zero) and torch.equal(layer.input_scale, scale)


INSPECTED = (
    BalanceMapping("norm", ("up", "gate"), None),
    BalanceMapping("up", ("down",), "down", True),  # -- a linear: scored row by row
)


@pytest.mark.parametrize("search_rows", [24, 64])
def test_awq_scores_a_token_wise_inspect_on_search_rows(search_rows):
    awq = AWQConfig(grid=4, clip_grid=4, max_tokens=64, search_rows=search_rows)
    cal = calibration_block(QuantScheme(W4, algorithm="awq", awq=awq))
    cal.balance = list(INSPECTED)
    (step,) = gather(cal, AwqStep)
    seen: list[tuple[int, ...]] = []
    cal.module.down.register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape)))
    step.apply()
    if search_rows == 24:  # -- 64 rows: above the cap, one call on 24 evenly spaced rows
        assert seen == [(1, 24, 48)] * 5  # -- the float reference, then the 4 candidates
    else:  # -- sample by sample: the reference, each candidate's first, then what is left
        assert set(seen) == {(1, 16, 48)} and 4 + 4 <= len(seen) <= 4 * 5
    assert "down" in cal.divisor
