"""Asymmetric INT8 and INT4 activation numerics: code ranges, zero points, packing, bad input."""

import pytest
import torch
from fuzz_strategies import fuzz_settings
from hypothesis import given
from hypothesis import strategies as st

from torchquant.errors import QuantizationError
from torchquant.numerics import (
    asymmetric_activation_qparams,
    dequantize_activation_asymmetric,
    pack_int4_activation,
    quantize_activation,
    quantize_activation_asymmetric,
    unpack_int4_activation,
)


@st.composite
def activations(draw, max_rows: int = 6, max_cols: int = 64) -> torch.Tensor:
    """Finite float32 ``(rows, K)`` with a random offset and scale (one-sided ones too)."""
    rows, cols = draw(st.integers(1, max_rows)), draw(st.integers(1, max_cols))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1e-6, 0.05, 1.0, 300.0]))
    offset = draw(st.sampled_from([0.0, 1.0, -2.5, 40.0]))
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) + offset
    return x * scale


@fuzz_settings
@given(x=activations(), per_token=st.booleans())
def test_asym_codes_and_zero_points_stay_in_int8(x, per_token):
    q, s, z = quantize_activation_asymmetric(x, per_token)
    assert q.dtype == torch.int8 and z.dtype == torch.int32
    assert s.shape == z.shape == ((x.shape[0], 1) if per_token else (1, 1))
    assert bool(((z >= -128) & (z <= 127)).all()) and bool((s > 0).all())
    # -- inside the range, the error is at most half a step (plus float rounding)
    err = (dequantize_activation_asymmetric(q, s, z) - x).abs()
    assert bool((err <= s * 0.5 * (1 + 1e-4) + 1e-30).all())


@fuzz_settings
@given(x=activations())
def test_asym_zero_is_exact_and_range_ends_map_to_code_ends(x):
    x = torch.cat([x, torch.zeros(x.shape[0], 1)], dim=1)
    q, s, z = quantize_activation_asymmetric(x, per_token=True)
    assert torch.equal(dequantize_activation_asymmetric(q, s, z)[:, -1], torch.zeros(x.shape[0]))
    lo, hi = x.amin(dim=1).clamp(max=0), x.amax(dim=1).clamp(min=0)
    # -- a row's min (or 0) sits on code -128 and its max (or 0) on 127, within one step
    assert bool((q.int().amin(dim=1)[lo < 0] <= -127).all())
    assert bool((q.int().amax(dim=1)[hi > 0] >= 126).all())


def test_asym_spends_every_code_on_a_one_sided_row():
    x = torch.linspace(0, 10, 256).reshape(1, -1)
    q, s, z = quantize_activation_asymmetric(x)
    assert z.item() == -128 and s.item() == pytest.approx(10 / 255)
    assert q.unique().numel() == 256
    sym, _ = quantize_activation(x, "int8", True)
    assert sym.unique().numel() == 128  # -- the symmetric grid wastes its negative half


def test_asym_qparams_of_an_empty_or_bad_range():
    s, z = asymmetric_activation_qparams(torch.zeros(2, 1), torch.zeros(2, 1))
    assert torch.equal(s, torch.ones(2, 1)) and torch.equal(z, torch.full((2, 1), -128))
    s, z = asymmetric_activation_qparams(torch.tensor([[-1.0]]), torch.tensor([[float("inf")]]))
    assert torch.isnan(s).all() and z.item() == 0


def test_asym_static_pair_is_used_and_nan_codes_are_zero():
    x = torch.tensor([[0.0, 1.0, -1.0, float("nan")]])
    q, s, z = quantize_activation_asymmetric(x, True, torch.tensor([0.01]), torch.tensor([5]))
    assert s.item() == pytest.approx(0.01) and z.item() == 5
    assert q.tolist() == [[5, 105, -95, 5]]


def test_asym_bad_input_is_refused():
    with pytest.raises(QuantizationError, match="2-D"):
        quantize_activation_asymmetric(torch.randn(4))
    with pytest.raises(QuantizationError, match="input_zero_point"):
        quantize_activation_asymmetric(torch.randn(2, 3), True, torch.tensor([1.0]), None)


@pytest.mark.parametrize("per_token", [True, False])
def test_int4_codes_are_in_plus_minus_7_with_scale_max_over_7(per_token):
    x = torch.randn(5, 40) * torch.logspace(-1, 2, 5).unsqueeze(1)
    q, s = quantize_activation(x, "int4", per_token)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 7
    bound = x.abs().amax(dim=1, keepdim=True) if per_token else x.abs().amax().reshape(1, 1)
    torch.testing.assert_close(s, bound / 7)


@fuzz_settings
@given(rows=st.integers(1, 5), cols=st.integers(1, 33), seed=st.integers(0, 2**31 - 1))
def test_int4_packing_round_trips(rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, (rows, cols), generator=g, dtype=torch.int8)
    packed = pack_int4_activation(q)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, (cols + 1) // 2)
    assert torch.equal(unpack_int4_activation(packed, cols), q)
    assert int(packed[0, 0]) & 0xF == int(q[0, 0]) & 0xF  # -- column 0 in the low nibble


def test_int4_packing_refuses_other_dtypes():
    with pytest.raises(QuantizationError, match="int8"):
        pack_int4_activation(torch.zeros(2, 4, dtype=torch.int32))
