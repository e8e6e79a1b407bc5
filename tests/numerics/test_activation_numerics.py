import pytest
import torch

from torchquant.errors import QuantizationError
from torchquant.numerics import dequantize_activation, quantize_activation


@pytest.mark.parametrize("dtype", ["int8", "fp8"])
@pytest.mark.parametrize("per_token", [True, False])
@pytest.mark.parametrize("xdtype", [torch.float32, torch.float16, torch.bfloat16])
def test_roundtrip_error(dtype, per_token, xdtype):
    x = (torch.randn(8, 96) * torch.logspace(-2, 2, 8).unsqueeze(1)).to(xdtype)
    q, s = quantize_activation(x, dtype, per_token)
    assert q.dtype == (torch.int8 if dtype == "int8" else torch.float8_e4m3fn)
    assert s.shape == ((8, 1) if per_token else (1, 1))
    deq = dequantize_activation(q, s)
    rel = ((deq - x.float()).norm(dim=1) / x.float().norm(dim=1)).max()
    if per_token:
        assert rel < (0.01 if dtype == "int8" else 0.05)


def test_int8_per_token_max_maps_to_127():
    x = torch.randn(5, 33)
    q, s = quantize_activation(x, "int8", True)
    assert torch.equal(q.abs().amax(dim=1), torch.full((5,), 127, dtype=torch.int8))
    torch.testing.assert_close(s[:, 0], x.abs().amax(dim=1) / 127)


def test_zero_rows_get_unit_scale_and_zero_codes():
    x = torch.randn(3, 16)
    x[1] = 0
    q, s = quantize_activation(x, "int8", True)
    assert s[1].item() == 1.0 and torch.all(q[1] == 0)


def test_percentile_clips_outliers():
    x = torch.randn(1, 10000)
    x[0, 0] = 1000.0
    _, s_max = quantize_activation(x, "int8", True, 100.0)
    q, s_p = quantize_activation(x, "int8", True, 99.9)
    assert s_p.item() < s_max.item() / 50
    assert q[0, 0].item() == 127


def test_smooth_divisor_and_static_scale():
    x = torch.randn(4, 8)
    smooth = torch.rand(8) + 0.5
    q, s = quantize_activation(x, "int8", True, smooth=smooth)
    ref_q, ref_s = quantize_activation(x / smooth, "int8", True)
    assert torch.equal(q, ref_q) and torch.equal(s, ref_s)
    x = torch.tensor([[0.05, -0.05, 1.0, -1.0]])
    q, s = quantize_activation(x, "int8", True, static_scale=torch.tensor(0.001))
    assert s.shape == (1, 1)
    assert q.tolist() == [[50, -50, 127, -128]]


def test_fp8_activation_saturates():
    q, _ = quantize_activation(
        torch.tensor([[1.0, 1e6]]), "fp8", True, static_scale=torch.tensor(1.0)
    )
    assert q.float().max() == 448


@pytest.mark.parametrize("x,dtype", [(torch.randn(2, 3, 4), "int8"), (torch.randn(2, 4), "int2")])
def test_bad_activation_arguments(x, dtype):
    with pytest.raises(QuantizationError):
        quantize_activation(x, dtype)
