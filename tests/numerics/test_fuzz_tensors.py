"""Fuzzing tensors: any shape, dtype or value gives a defined result or a ``QuantizationError``.

Defined results are checked, not just survived: codes and zero points inside the
bit width, positive finite scales, finite dequantized weights within (about) half
a step of the original, and layer outputs of the right shape that are finite
whenever the input and the float layer's output are.
"""

import torch
from fuzz_strategies import float_matrices, fuzz_settings, odd_tensors, special_floats
from hypothesis import given
from hypothesis import strategies as st

from torchquant import QuantizationError, QuantLinear
from torchquant.config import scheme_from_name
from torchquant.numerics import (
    dequantize_int_weight,
    expand_groups,
    pack_codes,
    quantize_activation,
    quantize_fp8_weight,
    quantize_int_weight,
    unpack_codes,
)

SCHEMES = ["w8a16", "w4a16", "w3a16", "w2a16", "w8a16-fp8", "w8a8", "fp8"]
group_sizes = st.sampled_from([-1, 16, 32, 64, 128])


def _step_bound(w, q, group_size, symmetric):
    """Half a step, widened by the rounding of the stored scale and of the weight dtype.

    The last term is one subnormal spacing of each dtype (rounding there is absolute).
    """
    k = w.shape[1]
    scale = expand_groups(q.scales, group_size, k).double()
    fs, fw = torch.finfo(q.scales.dtype), torch.finfo(w.dtype)
    subnormal = (1 << q.bits) * fs.smallest_normal * fs.eps + fw.smallest_normal * fw.eps
    return scale * (0.5 + (1 << q.bits) * fs.eps) + 2 * fw.eps * w.double().abs() + subnormal


@fuzz_settings
@given(
    w=float_matrices(),
    bits=st.integers(2, 8),
    group_size=group_sizes,
    symmetric=st.booleans(),
)
def test_int_weights_quantize_within_half_a_step_or_are_refused(w, bits, group_size, symmetric):
    try:
        q = quantize_int_weight(w, bits, group_size, symmetric)
    except QuantizationError as exc:
        assert "weight" in str(exc)
        return
    assert torch.isfinite(w).all(), "NaN/Inf weights must be refused"
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) < 1 << bits
    assert torch.isfinite(q.scales).all() and (q.scales > 0).all()
    if q.zeros is not None:
        assert int(q.zeros.max()) < 1 << bits
    deq = dequantize_int_weight(q.codes, q.scales, q.zeros, bits, group_size, w.dtype)
    assert torch.isfinite(deq).all()
    err = (deq.double() - w.double()).abs()
    assert (err <= _step_bound(w, q, group_size, symmetric)).all()


@fuzz_settings
@given(w=float_matrices(), per_channel=st.booleans())
def test_fp8_weights_saturate_or_are_refused(w, per_channel):
    try:
        q, scale = quantize_fp8_weight(w, per_channel)
    except QuantizationError:
        assert not torch.isfinite(w).all()
        return
    assert q.dtype == torch.float8_e4m3fn and torch.isfinite(q.float()).all()
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert (q.float().abs() <= 448).all()


@fuzz_settings
@given(t=odd_tensors(), bits=st.integers(-1, 10), group_size=st.sampled_from([-2, -1, 0, 7, 32]))
def test_odd_tensors_and_arguments_are_refused_or_quantized(t, bits, group_size):
    try:
        q = quantize_int_weight(t, bits, group_size, True)
    except QuantizationError:
        return
    assert t.dim() == 2 and t.numel() > 0 and t.is_floating_point() and 2 <= bits <= 8
    assert q.codes.shape == t.shape


@fuzz_settings
@given(
    w=float_matrices(max_rows=8, max_cols=96),
    scheme=st.sampled_from(SCHEMES),
    group_size=st.sampled_from([None, 16, 32]),
    bias=st.booleans(),
    x_special=st.lists(special_floats, max_size=2),
    rows=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
)
def test_quant_linear_forward_is_defined_for_any_weight_and_input(
    w, scheme, group_size, bias, x_special, rows, seed
):
    if group_size is not None and scheme.endswith("a16") and "fp8" not in scheme:
        scheme = scheme_from_name(scheme, group_size=group_size)
    else:
        scheme = scheme_from_name(scheme)
    n, k = w.shape
    gen = torch.Generator().manual_seed(seed)
    b = torch.randn(n, generator=gen).to(w.dtype) if bias else None
    try:
        layer = QuantLinear.from_weight(w, b, scheme, "block.up.weight")
    except QuantizationError as exc:
        assert "block.up.weight" in str(exc)
        return
    x = torch.randn(rows, k, generator=gen).to(w.dtype)
    for i, value in enumerate(x_special):
        x.view(-1)[(i * 7) % x.numel()] = value
    out = layer(x)
    assert out.shape == (rows, n) and out.dtype == w.dtype
    # -- rows where no partial sum can overflow, in any summation order, must come out finite
    bound = torch.nn.functional.linear(x.double().abs(), layer.dequantized_weight().double().abs())
    if b is not None:
        bound = bound + b.double().abs()
    finite_rows = torch.isfinite(x).all(dim=1) & (bound < torch.finfo(w.dtype).max / 4).all(dim=1)
    if scheme.activation is None or scheme.activation.granularity == "token":
        assert torch.isfinite(out[finite_rows]).all()
    if not torch.isfinite(x).all():
        assert not torch.isfinite(out).all(), "non-finite input must not come out finite"


def test_fp8_weight_with_a_tiny_scale_stays_finite_on_a_huge_input():
    """The codes (448 here) times 1e38 overflow bf16 before the tiny scale is applied; the
    output row, 1.8e-2, is finite and must come out so (a case the fuzzer found)."""
    w = torch.tensor([[1.8367e-40]], dtype=torch.bfloat16)
    layer = QuantLinear.from_weight(w, None, scheme_from_name("w8a16-fp8"))
    x = torch.tensor([[1e38]], dtype=torch.bfloat16)
    out = layer(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, layer.reference_forward(x))


@fuzz_settings
@given(
    x=float_matrices(max_rows=4, max_cols=64),
    dtype=st.sampled_from(["int8", "fp8", "int4", "int2"]),
    per_token=st.booleans(),
    percentile=st.sampled_from([100.0, 99.9, 50.0, 1e-3]),
)
def test_activations_quantize_into_range(x, dtype, per_token, percentile):
    try:
        q, scale = quantize_activation(x, dtype, per_token, percentile)
    except QuantizationError:
        assert dtype == "int2"
        return
    assert q.shape == x.shape
    assert (scale > 0).all()
    if dtype in ("int8", "int4"):
        assert q.dtype == torch.int8
    else:
        assert q.dtype == torch.float8_e4m3fn
        q = q.float()
        assert (q[~torch.isnan(q)].abs() <= 448).all()


@fuzz_settings
@given(
    bits=st.integers(0, 10),
    rows=st.integers(0, 3),
    k=st.integers(0, 70),
    low=st.integers(-3, 0),
    high=st.integers(1, 1024),
    seed=st.integers(0, 2**31 - 1),
)
def test_packing_accepts_codes_in_range_and_refuses_the_rest(bits, rows, k, low, high, seed):
    codes = torch.randint(low, high, (rows, k), generator=torch.Generator().manual_seed(seed))
    try:
        packed = pack_codes(codes, bits)
    except QuantizationError:
        in_range = codes.numel() == 0 or (codes.min() >= 0 and codes.max() < 1 << bits)
        assert not (2 <= bits <= 8 and in_range)
        return
    assert torch.equal(unpack_codes(packed, bits, k).long(), codes)


@fuzz_settings
@given(
    bits=st.integers(2, 8),
    width=st.integers(0, 20),
    k=st.integers(0, 100),
    seed=st.integers(0, 2**31 - 1),
)
def test_unpacking_any_words_gives_codes_or_refuses_the_width(bits, width, k, seed):
    g = torch.Generator().manual_seed(seed)
    words = torch.randint(-(2**31), 2**31, (2, width), generator=g, dtype=torch.int64)
    try:
        codes = unpack_codes(words.to(torch.int32), bits, k)
    except QuantizationError as exc:
        assert "packed width" in str(exc)
        return
    assert codes.shape == (2, k)
    assert codes.numel() == 0 or int(codes.max()) < 1 << bits
