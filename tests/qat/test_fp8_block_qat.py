"""QAT for FP8 block-wise: block scales learned by LSQ, per-group activations, convert_qat."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torchquant import QatOptions, QuantConfig, QuantLinear, convert_qat, prepare_qat
from torchquant.config import ActivationQuant, WeightQuant
from torchquant.numerics import (
    dequantize_activation_groups,
    dequantize_fp8_block_weight,
    quantize_activation_groups,
    quantize_fp8_block_weight,
)
from torchquant.qat.fake_quant import (
    fake_quantize_activation,
    fake_quantize_weight,
    minmax_weight_qparams,
    weight_qparam_shape,
)

BLOCK = WeightQuant("fp8", block=(128, 128))
N, K = 200, 300


def test_block_weight_fake_quant_is_the_numerics_round_trip():
    w = torch.randn(N, K)
    assert weight_qparam_shape(BLOCK, N, K) == (2, 3)
    scales, zeros = minmax_weight_qparams(w, BLOCK)
    q, s = quantize_fp8_block_weight(w, (128, 128))
    assert zeros is None and torch.equal(scales, s)
    fake = fake_quantize_weight(w, BLOCK, scales, None)
    assert torch.equal(fake, dequantize_fp8_block_weight(q, s, (128, 128)))


def test_block_scales_get_one_summed_lsq_gradient_each():
    w = torch.randn(N, K, requires_grad=True)
    scales = minmax_weight_qparams(w, BLOCK)[0].clone().requires_grad_(True)
    fake_quantize_weight(w, BLOCK, scales, None).pow(2).sum().backward()
    assert scales.grad.shape == (2, 3) and bool((scales.grad != 0).all())
    assert torch.equal(w.grad, 2 * fake_quantize_weight(w, BLOCK, scales, None).detach())


def test_group_activation_fake_quant_is_the_numerics_round_trip():
    act = ActivationQuant("fp8", "group", group_size=128)
    x = (torch.randn(3, 5, K) * 4).requires_grad_(True)
    q, s = quantize_activation_groups(x.detach().reshape(-1, K), 128)
    expected = dequantize_activation_groups(q, s, 128).reshape(x.shape)
    out = fake_quantize_activation(x, act)
    assert torch.equal(out, expected)
    out.sum().backward()  # -- straight through inside the range
    assert torch.equal(x.grad, torch.ones_like(x))


@pytest.mark.parametrize("name", ["fp8-block", "w8a16-fp8-block"])
@pytest.mark.parametrize("learn", [True, False])
def test_convert_qat_reproduces_the_qat_forward(name, learn):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(K, N), nn.ReLU(), nn.Linear(N, 64))
    qat, _ = prepare_qat(model, QuantConfig(name, ignore=()), QatOptions(learn_scales=learn),
                         progress=False)  # fmt: skip
    x = torch.randn(4, K)
    opt = torch.optim.SGD(qat.parameters(), lr=1e-3)
    qat(x).pow(2).mean().backward()
    opt.step()
    with torch.no_grad():
        want = qat(x)
    inference, _ = convert_qat(qat, progress=False)
    assert isinstance(inference[0], QuantLinear) and inference[0].scales.shape == (2, 3)
    torch.testing.assert_close(inference(x), want, rtol=1e-5, atol=1e-5)
