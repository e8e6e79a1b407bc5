"""Dynamic activation quantization kernel vs the reference numerics (bit for bit)."""

from __future__ import annotations

import pytest
import torch
from kernel_utils import KERNEL_DEVICE, cfg, poisoned, requires_kernels
from torchquant.triton_kernels import act_quant
from torchquant.triton_kernels.act_quant import quantize_activation_rows

from torchquant.numerics import quantize_activation as reference_quantize

pytestmark = requires_kernels


def _activations(rows: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows of very different ranges, one all-zero row and one outlier."""
    x = torch.randn(rows, k) * torch.rand(rows, 1) * 8
    x[min(2, rows - 1)] = 0.0
    x[0, k // 3] = 150.0
    return x.to(dtype).to(KERNEL_DEVICE)


def _assert_same(out, ref):
    q, s = out
    q_ref, s_ref = ref
    assert q.dtype == q_ref.dtype and s.shape == s_ref.shape
    assert torch.equal(q.cpu().view(torch.int8), q_ref.cpu().view(torch.int8))
    assert torch.equal(s.cpu(), s_ref.cpu())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("act_dtype", ["int8", "fp8"])
@pytest.mark.parametrize("per_token", [True, False])
@pytest.mark.parametrize("smooth", [False, True])
def test_matches_reference_bit_for_bit(dtype, act_dtype, per_token, smooth):
    rows, k = 7, 300
    x = _activations(rows, k, dtype)
    sm = (torch.rand(k) + 0.5).to(KERNEL_DEVICE) if smooth else None
    qdtype = torch.float8_e4m3fn if act_dtype == "fp8" else torch.int8
    out = quantize_activation_rows(x, act_dtype, per_token, sm, out=poisoned((rows, k), qdtype))
    ref = reference_quantize(
        x.cpu(), act_dtype, per_token, 100.0, None, sm.cpu() if smooth else None
    )
    assert out[0].dtype == qdtype
    _assert_same(out, ref)


def test_rounding_ties_and_saturation():
    # ties round to even, int8 clamps at [-128, 127], FP8 saturates at +-448
    x = torch.tensor([[0.5, 1.5, 2.5, -0.5, -2.5, 127.4, 200.0, -300.0, 100.0, 1e-9]])
    x = x.to(KERNEL_DEVICE)
    one = torch.ones(1, device=KERNEL_DEVICE)
    for act_dtype in ("int8", "fp8"):
        out = quantize_activation_rows(
            x * (3.0 if act_dtype == "fp8" else 1.0), act_dtype, static_scale=one
        )
        ref = reference_quantize(
            (x * (3.0 if act_dtype == "fp8" else 1.0)).cpu(), act_dtype, True, 100.0, one.cpu()
        )
        _assert_same(out, ref)
    q, _ = quantize_activation_rows(x, "int8", static_scale=one)
    assert q.cpu().tolist()[0][:8] == [0, 2, 2, 0, -2, 127, 127, -128]


@pytest.mark.parametrize("per_token", [True, False])
def test_long_rows_take_the_two_pass_path(monkeypatch, per_token):
    monkeypatch.setattr(act_quant, "MAX_ROW_BLOCK", 64)  # rows of 300 span 5 blocks
    x = _activations(5, 300, torch.bfloat16)
    for config in (cfg(BLOCK_M=1), cfg(BLOCK_M=4)):
        out = quantize_activation_rows(
            x, "int8", per_token, config=config, out=poisoned((5, 300), torch.int8)
        )
        _assert_same(out, reference_quantize(x.cpu(), "int8", per_token))


def test_static_scale_and_empty_input():
    x = _activations(4, 50, torch.float16)
    scale = torch.tensor([0.05], device=KERNEL_DEVICE)
    out = quantize_activation_rows(x, "int8", True, None, scale)
    _assert_same(out, reference_quantize(x.cpu(), "int8", True, 100.0, scale.cpu()))
    q, s = quantize_activation_rows(x[:0], "int8", True)
    assert q.shape == (0, 50) and s.shape == (0, 1)


def test_rejects_bad_input():
    x = _activations(3, 40, torch.float32)
    with pytest.raises(ValueError, match="act_dtype"):
        quantize_activation_rows(x, "int2")
    with pytest.raises(ValueError, match="2-D"):
        quantize_activation_rows(x[0], "int8")
    with pytest.raises(ValueError, match="smooth"):
        quantize_activation_rows(x, "int8", smooth=torch.ones(41, device=KERNEL_DEVICE))
