"""W4A8 ops: the reference is the integer formula, the CPU path is the reference (INT8 bit for
bit, FP8 within float32 tolerance), partial last groups, non-finite rows and bad inputs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchquant import ops
from torchquant.errors import QuantizationError
from torchquant.numerics import pack_codes, quantize_activation, quantize_int_weight
from torchquant.ops.w4a8 import (
    BLOCK_DIAGONAL_MAX_ROWS,
    MIN_TILE_COLUMNS,
    linear_w4a8_reference,
    signed_codes,
    tile_columns,
)

OPS = {"int8": ops.linear_w4a8_int8, "fp8": ops.linear_w4a8_fp8}


def _weight(n: int, k: int, group_size: int, seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    w = torch.randn(n, k) * (torch.rand(n, 1) + 0.1)
    iw = quantize_int_weight(w, 4, group_size, True, dtype)
    return pack_codes(iw.codes, 4), iw.scales


def _formula(x, qweight, scales, group_size, act_type):
    """``s_x[m] * sum_g s_w[n, g] * sum_{k in g} q_x[m, k] q_w[n, k]``, written out: int64
    sums for INT8 codes, float64 (exact) sums for E4M3 values."""
    xq, xs = quantize_activation(x, act_type, per_token=True)
    k = x.shape[1]
    wq = signed_codes(qweight, k)
    size = k if group_size == -1 else group_size
    out = torch.zeros(x.shape[0], qweight.shape[0], dtype=torch.float64)
    for g, start in enumerate(range(0, k, size)):
        cols = slice(start, start + size)
        if act_type == "int8":
            sums = (xq[:, cols].long().unsqueeze(1) * wq[:, cols].long()).sum(-1).double()
        else:
            sums = (xq[:, cols].double().unsqueeze(1) * wq[:, cols].double()).sum(-1)
        out += sums * scales[:, g].double()
    return (out * xs.double()).float()


def _call(act_type, x, qweight, scales, group_size, bias=None, per_token=True, input_scale=None,
          smooth=None):  # fmt: skip
    return OPS[act_type](
        x, qweight, scales, bias, group_size, per_token, 100.0, input_scale, smooth
    )


def _reference(act_type, x, qweight, scales, group_size, bias=None, per_token=True,
               input_scale=None, smooth=None):  # fmt: skip
    return linear_w4a8_reference(
        x, qweight, scales, bias, group_size, act_type, per_token, 100.0, input_scale, smooth
    )


@pytest.mark.parametrize("act_type", ["int8", "fp8"])
@pytest.mark.parametrize(("k", "group_size"), [(256, 128), (200, 128), (129, 64), (96, -1)])
def test_reference_is_the_integer_formula(act_type, k, group_size):
    qweight, scales = _weight(24, k, group_size)
    x = torch.randn(5, k) * 3
    got = _reference(act_type, x, qweight, scales, group_size)
    torch.testing.assert_close(got, _formula(x, qweight, scales, group_size, act_type),
                               rtol=1e-6, atol=1e-6)  # fmt: skip


@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(1, 40),
    n=st.integers(1, 40),
    k=st.integers(1, 300),
    group_size=st.sampled_from([-1, 16, 32, 64, 128]),
    act_type=st.sampled_from(["int8", "fp8"]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_cpu_op_is_the_reference(m, n, k, group_size, act_type, dtype, seed):
    # -- rows x groups on both sides of BLOCK_DIAGONAL_MAX_ROWS; partial last groups
    qweight, scales = _weight(n, k, group_size, seed, dtype)
    x = (torch.randn(m, k) * 4).to(dtype)
    got = _call(act_type, x, qweight, scales, group_size)
    want = _reference(act_type, x, qweight, scales, group_size)
    assert got.dtype == dtype and got.shape == (m, n)
    if act_type == "int8":
        assert torch.equal(got, want)
    else:
        tol = 1e-5 if dtype == torch.float32 else 1.6e-2
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())


def test_block_diagonal_and_per_group_products_agree():
    qweight, scales = _weight(48, 512, 128)
    rows = BLOCK_DIAGONAL_MAX_ROWS // 4  # -- 4 groups: the block-diagonal call
    x = torch.randn(rows + 1, 512)
    few = _call("int8", x[:rows], qweight, scales, 128)
    many = _call("int8", x, qweight, scales, 128)  # -- one call per group
    assert torch.equal(few, many[:rows])


@pytest.mark.parametrize("act_type", ["int8", "fp8"])
@pytest.mark.parametrize("m", [70, 300])
def test_tiles_along_n_are_the_reference(act_type, m):
    # -- several N tiles, the last one partial, and a partial last group
    n, k = 3 * MIN_TILE_COLUMNS + 44, 200
    assert n > tile_columns(m, n) >= MIN_TILE_COLUMNS
    qweight, scales = _weight(n, k, 64, seed=m)
    x = torch.randn(m, k) * 2
    got = _call(act_type, x, qweight, scales, 64)
    want = _reference(act_type, x, qweight, scales, 64)
    if act_type == "int8":
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_tile_columns_hold_about_the_same_outputs():
    assert tile_columns(1, 4096) == 4096 and tile_columns(16, 4096) == 2048
    assert tile_columns(256, 4096) == MIN_TILE_COLUMNS == tile_columns(4096, 4096)
    assert tile_columns(16, 100) == 100


@pytest.mark.parametrize("act_type", ["int8", "fp8"])
def test_static_scale_smoothing_and_bias(act_type):
    qweight, scales = _weight(32, 192, 64)
    x, bias = torch.randn(2, 3, 192), torch.randn(32)
    smooth = torch.rand(192) + 0.5
    scale = torch.tensor([0.05])
    got = _call(act_type, x, qweight, scales, 64, bias, False, scale, smooth)
    want = _reference(act_type, x, qweight, scales, 64, bias, False, scale, smooth)
    assert got.shape == (2, 3, 32)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("act_type", ["int8", "fp8"])
def test_nonfinite_rows_give_nan_rows(act_type):
    qweight, scales = _weight(16, 160, 128)
    x = torch.randn(4, 160)
    x[1, 5], x[3, 0] = float("nan"), float("inf")
    for run in (_call, _reference):
        out = run(act_type, x, qweight, scales, 128)
        assert out[[1, 3]].isnan().all() and out[[0, 2]].isfinite().all()
        per_tensor = run(act_type, x, qweight, scales, 128, per_token=False)
        assert per_tensor.isnan().all()  # -- one shared scale: every row depends on it


def test_op_schema_and_fake_implementation():
    qweight, scales = _weight(16, 64, 32)
    for op in OPS.values():
        torch.library.opcheck(op, (torch.randn(3, 64), qweight, scales, None, 32, True, 100.0,
                                   None, None))  # fmt: skip


def test_bad_input_names_what_is_wrong():
    qweight, scales = _weight(16, 64, 32)
    with pytest.raises(QuantizationError, match="activation dtype must be one of"):
        linear_w4a8_reference(torch.randn(2, 64), qweight, scales, None, 32, "int2", True,
                              100.0, None, None)  # fmt: skip
