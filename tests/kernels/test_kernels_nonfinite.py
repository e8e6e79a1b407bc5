"""NaN/Inf activations through the kernels: the same defined result as the reference ops.

A W8A8 layer turns exactly the rows a float linear would spoil into NaN (every row when one
dynamic per-tensor scale covers them all), never finite garbage; the activation
quantization kernel marks such rows with a NaN scale (per tensor: every row) and, where the
scale is NaN, code 0; everything else is the reference numerics' result.
"""

from __future__ import annotations

import pytest
import torch
from kernel_utils import KERNEL_DEVICE, cfg, requires_kernels
from torchquant.triton_kernels import act_quant
from torchquant.triton_kernels.act_quant import quantize_activation_rows

from torchquant import QuantLinear, scheme_from_name
from torchquant.numerics import quantize_activation as reference_quantize
from torchquant.ops import cuda as cuda_ops

pytestmark = [
    requires_kernels,
    # the interpreter's numpy reports the Inf * 0 the kernels use to detect non-finite rows
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]

BAD = [float("nan"), float("inf"), -float("inf")]


def _spoiled(rows: int, k: int, bad: float) -> torch.Tensor:
    x = torch.randn(rows, k) * 2
    x[1, 7] = bad
    x[rows - 1, k - 1] = bad  # the last element of the last row: masks must not hide it
    return x.to(KERNEL_DEVICE)


def _expected(x, act_dtype, mode, static=None, row_scales=False):
    """The reference numerics on the finite values, NaN scales and code 0 where defined so.

    Per token a row holding NaN/Inf gets a NaN scale and codes 0; per tensor every row
    does; a static scale quantizes +-Inf to the saturated code and NaN to 0.
    """
    x = x.cpu()
    bad = ~torch.isfinite(x).all(dim=1, keepdim=True)
    if mode == "static":
        big = torch.finfo(x.dtype).max
        finite = torch.nan_to_num(x, nan=0.0, posinf=big, neginf=-big)
        q, scale = reference_quantize(finite, act_dtype, True, 100.0, static.cpu())
    else:
        q, scale = reference_quantize(x.masked_fill(bad, 0.0), act_dtype, mode == "token")
        if mode == "tensor":
            q, scale = torch.zeros_like(q), torch.full_like(scale, float("nan"))
    if row_scales or mode == "token":
        scale = torch.where(bad, float("nan"), scale.expand(x.shape[0], 1))
    return q, scale


def _assert_same(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor]):
    assert torch.equal(got[0].cpu().view(torch.int8), want[0].cpu().view(torch.int8))
    torch.testing.assert_close(got[1].cpu(), want[1].cpu(), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("act_dtype", ["int8", "fp8"])
@pytest.mark.parametrize("mode", ["token", "tensor", "static"])
def test_activation_quantization_marks_nonfinite_rows(mode, act_dtype, bad):
    x = _spoiled(5, 40, bad)
    static = torch.tensor([0.02], device=KERNEL_DEVICE) if mode == "static" else None
    args = (x, act_dtype, mode == "token", None, static)
    for row_scales in (False, True):
        got = quantize_activation_rows(*args, config=cfg(BLOCK_M=2), row_scales=row_scales)
        want = _expected(x, act_dtype, mode, static, row_scales)
        _assert_same(got, want)
        scale = got[1].cpu().flatten()
        if mode == "tensor":
            assert scale.isnan().all()
        elif mode == "token" or row_scales:
            assert scale.isnan().tolist() == [False, True, False, False, True]
        assert not (got[0].cpu().float()[[1, 4]].isnan().any())


@pytest.mark.parametrize("per_token", [True, False])
def test_two_pass_rows_mark_nonfinite_rows(monkeypatch, per_token):
    monkeypatch.setattr(act_quant, "MAX_ROW_BLOCK", 64)  # rows of 300 span 5 blocks
    x = _spoiled(5, 300, float("nan"))
    got = quantize_activation_rows(x, "int8", per_token, config=cfg(BLOCK_M=4), row_scales=True)
    _assert_same(got, _expected(x, "int8", "token" if per_token else "tensor", row_scales=True))


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("scheme", ["w8a8", "fp8"])
@pytest.mark.parametrize("mode", ["token", "tensor", "static"])
def test_w8a8_glue_poisons_the_rows_the_reference_poisons(mode, scheme, bad):
    layer = QuantLinear.from_linear(torch.nn.Linear(40, 24), scheme_from_name(scheme))
    x = _spoiled(5, 40, bad).cpu()
    static = torch.tensor([0.05]) if mode == "static" else None
    per_token = mode == "token"
    args = (layer.qweight, layer.scales, layer.bias, per_token, 100.0, static, None)
    reference = layer.scheme.activation.type == "int8"
    op = (
        torch.ops.torchquant.linear_w8a8_int8 if reference else torch.ops.torchquant.linear_w8a8_fp8
    )
    glue = cuda_ops.linear_w8a8_int8_cuda if reference else cuda_ops.linear_w8a8_fp8_cuda
    want = op(x, *args)
    on = [t.to(KERNEL_DEVICE) if isinstance(t, torch.Tensor) else t for t in (x, *args)]
    got = glue(*on).cpu()
    assert torch.equal(got.isnan(), want.isnan())
    assert want.isnan().any(dim=1).tolist() == (
        [True] * 5 if mode == "tensor" else [False, True, False, False, True]
    )
    finite = ~want.isnan().any(dim=1)
    torch.testing.assert_close(got[finite], want[finite], rtol=2e-5, atol=1e-4)
