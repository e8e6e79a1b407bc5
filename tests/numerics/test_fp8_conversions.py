"""The vectorised E4M3 conversions equal PyTorch's float8 casts bit for bit."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchquant.numerics.qparams import (
    e4m3_to_float,
    fp8_e4m3_values,
    fp8_e4m3_values_,
    to_fp8_e4m3,
)

ALL_CODES = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal float32 bit patterns, any NaN matching any NaN."""
    assert a.dtype == b.dtype == torch.float32
    equal = (a.view(torch.int32) == b.view(torch.int32)) | (a.isnan() & b.isnan())
    return bool(equal.all())


def hard_inputs() -> torch.Tensor:
    """Every E4M3 value, the ties halfway between neighbours and the floats either side of
    them (round-to-nearest-even decides those), float32 subnormals, zeros of both signs,
    the saturation edge, infinities and NaN, and random values over 30 decades."""
    values = ALL_CODES.float()
    values = values[values.isfinite()].unique()
    ties = (values[1:] + values[:-1]) / 2
    up, down = torch.tensor(float("inf")), torch.tensor(float("-inf"))
    special = torch.tensor(
        [0.0, -0.0, 1e-45, 1e-40, 2.0**-10, 2.0**-9 * 0.5, 448.0, 464.0, 480.0, 1e10, 3e38]
        + [float("inf"), float("nan")]
    )
    generator = torch.Generator().manual_seed(0)
    spread = torch.randn(200_000, generator=generator) * torch.logspace(-15, 15, 200_000)
    x = torch.cat([values, ties, torch.nextafter(ties, up), torch.nextafter(ties, down)])
    x = torch.cat([x, special, spread])
    return torch.cat([x, -x])


@pytest.mark.parametrize("flush_denormal", [False, True])
def test_rounding_to_e4m3_values_equals_the_cast(flush_denormal):
    x = hard_inputs()
    torch.set_flush_denormal(flush_denormal)
    try:
        got = fp8_e4m3_values(x)
    finally:
        torch.set_flush_denormal(False)
    assert same_bits(got, to_fp8_e4m3(x).float())


@given(st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=1))
@settings(max_examples=200, deadline=None)
def test_rounding_any_float32_equals_the_cast(values):
    x = torch.tensor(values, dtype=torch.float32)
    assert same_bits(fp8_e4m3_values(x), to_fp8_e4m3(x).float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rounding_narrow_inputs_equals_the_cast(dtype):
    x = hard_inputs().to(dtype)
    assert same_bits(fp8_e4m3_values(x), to_fp8_e4m3(x).float())


@pytest.mark.parametrize("flush_denormal", [False, True])
def test_decoding_every_code_equals_the_cast(flush_denormal):
    codes = ALL_CODES.reshape(16, 16).t()  # -- a strided view too
    torch.set_flush_denormal(flush_denormal)
    try:
        got = e4m3_to_float(codes)
    finally:
        torch.set_flush_denormal(False)
    assert same_bits(got, codes.float())
    assert got.isnan().sum() == 2  # -- 0x7F and 0xFF


def test_rounded_values_decode_to_themselves():
    x = hard_inputs()
    assert same_bits(e4m3_to_float(to_fp8_e4m3(x)), fp8_e4m3_values(x))


def test_rounding_in_place_writes_over_its_input():
    x = hard_inputs()
    v = x.clone()
    out = fp8_e4m3_values_(v)
    assert out.data_ptr() == v.data_ptr() and same_bits(out, to_fp8_e4m3(x).float())
