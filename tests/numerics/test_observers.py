import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchquant.errors import CalibrationError, ConfigError
from torchquant.numerics import group_min_max, quantize_int_weight
from torchquant.numerics.observers import Observer, kl_threshold, mse_range, weight_qparams


def test_minmax_accumulates_over_batches():
    obs = Observer("minmax", "tensor")
    obs.update(torch.tensor([[-1.0, 2.0]]))
    obs.update(torch.tensor([[-3.0, 0.5]]))
    lo, hi = obs.range()
    assert lo.item() == -3.0 and hi.item() == 2.0
    assert obs.absmax().item() == 3.0


def test_moving_minmax_is_an_exponential_average():
    obs = Observer("moving_minmax", "tensor", momentum=0.5)
    obs.update(torch.tensor([[0.0, 4.0]]))
    obs.update(torch.tensor([[0.0, 2.0]]))
    assert obs.range()[1].item() == pytest.approx(3.0)


def test_per_channel_token_and_group_shapes():
    x = torch.randn(6, 200)
    for gran, shape in (("channel", (6, 1)), ("token", (6, 1)), ("tensor", (1, 1))):
        obs = Observer("minmax", gran)
        obs.update(x)
        assert obs.range()[0].shape == shape
    obs = Observer("minmax", "group", group_size=64)
    obs.update(x)
    lo, hi = obs.range()
    ref_lo, ref_hi = group_min_max(x, 64)
    assert lo.shape == (6, 4)  # 200 = 3 x 64 + a short group of 8
    assert torch.equal(lo, ref_lo) and torch.equal(hi, ref_hi)


def test_percentile_clips_a_single_outlier():
    x = torch.randn(1, 10000)
    x[0, 0] = 1000.0
    obs = Observer("percentile", "tensor", percentile=99.9)
    obs.update(x)
    assert obs.absmax().item() < 10.0
    per_group = Observer("percentile", "group", group_size=100, percentile=99.0)
    per_group.update(x)
    assert per_group.range()[1].shape == (1, 100)


def test_kl_threshold_clips_outliers_but_keeps_the_bulk():
    torch.manual_seed(0)
    x = torch.randn(1, 200_000)
    x[0, :5] = 50.0
    obs = Observer("kl", "tensor")
    obs.update(x[:, :100_000])
    obs.update(x[:, 100_000:] * 2)  # a wider batch forces the histogram to re-bin
    t = obs.absmax().item()
    assert 2.0 < t < 50.0


def test_kl_threshold_of_uniform_histogram_keeps_the_full_range():
    hist = torch.ones(2048)
    assert kl_threshold(hist, 1.0) == pytest.approx(2048, rel=0.01)


def test_mse_range_beats_minmax_on_heavy_tails():
    torch.manual_seed(0)
    w = torch.distributions.StudentT(2.0).sample((16, 256))
    lo, hi = mse_range(w, 4, False, "channel")
    lo0, hi0 = group_min_max(w, -1)
    assert bool((hi <= hi0 + 1e-6).all()) and bool((lo >= lo0 - 1e-6).all())
    s, z = weight_qparams(w, 4, -1, False, "mse")
    rtn = quantize_int_weight(w, 4, -1, False)

    def err(scales, zeros):
        codes = torch.clamp(torch.round(w / scales) + zeros.float(), 0, 15)
        return ((codes - zeros.float()) * scales - w).pow(2).sum()

    assert err(s, z) < err(rtn.scales, rtn.zeros)


def test_mse_range_weighs_columns():
    torch.manual_seed(0)
    w = torch.distributions.StudentT(2.0).sample((8, 64))
    heavy = torch.ones(64)
    heavy[w[0].abs().argmax()] = 1e6  # the largest weight of row 0 must be kept exactly
    lo, hi = mse_range(w, 3, False, "group", 32, column_weight=heavy)
    plain = mse_range(w, 3, False, "group", 32)
    assert lo.shape == plain[0].shape == (8, 2)
    g = int(w[0].abs().argmax()) // 32
    assert float(hi[0, g] - lo[0, g]) >= float(plain[1][0, g] - plain[0][0, g])
    uniform = mse_range(w, 3, False, "group", 32, column_weight=torch.full((64,), 3.0))
    torch.testing.assert_close(uniform, plain)


@settings(max_examples=25, deadline=None)
@given(
    kind=st.sampled_from(["minmax", "moving_minmax", "percentile", "mse"]),
    gran=st.sampled_from(["tensor", "channel", "token", "group"]),
    rows=st.integers(1, 5),
    cols=st.integers(1, 70),
)
def test_observed_range_lies_within_data_range(kind, gran, rows, cols):
    x = torch.randn(rows, cols)
    obs = Observer(kind, gran, group_size=16)
    obs.update(x)
    lo, hi = obs.range()
    assert float(lo.min()) >= float(x.min()) - 1e-5
    assert float(hi.max()) <= float(x.max()) + 1e-5
    assert bool((lo <= hi).all())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kind": "entropy"},
        {"granularity": "row"},
        {"kind": "kl", "granularity": "channel"},
        {"granularity": "group", "group_size": 0},
        {"percentile": 0.0},
    ],
)
def test_bad_observer_settings_name_the_field(kwargs):
    with pytest.raises(ConfigError):
        Observer(**kwargs)


def test_observer_refuses_nan_and_empty():
    obs = Observer("minmax", name="layers.0.q_proj")
    with pytest.raises(CalibrationError, match="layers.0.q_proj"):
        obs.range()
    with pytest.raises(CalibrationError, match="NaN"):
        obs.update(torch.tensor([[1.0, math.nan]]))


def test_shape_change_is_refused_for_per_token_accumulation():
    obs = Observer("minmax", "token")
    obs.update(torch.randn(3, 8))
    with pytest.raises(CalibrationError, match="shape changed"):
        obs.update(torch.randn(4, 8))
