"""QAT of asymmetric INT8 activations: LSQ gradients of the scale and zero point, calibration."""

from __future__ import annotations

import torch
from torch import nn

from torchquant import scheme_from_name
from torchquant.numerics.fake_quant import fake_quantize_activation_asym_backward_reference
from torchquant.qat import QatLinear, calibrate_input_scales
from torchquant.qat.fake_quant import fake_quantize_activation


def test_ste_and_lsq_gradients_inside_and_outside_the_code_range():
    x = torch.tensor([[0.0, 0.26, 1.0, 5.0, -3.0]])  # -- 5.0 and -3.0 fall outside
    scale, zero = torch.tensor([[0.01]]), torch.tensor([[-100]])
    grad = torch.ones_like(x)
    gx, gs, gz = fake_quantize_activation_asym_backward_reference(grad, x, scale, zero, True)
    assert gx.tolist() == [[1.0, 1.0, 1.0, 0.0, 0.0]]
    xs = x / 0.01
    inside = (torch.round(xs) - xs)[0, :3].sum()
    clipped = (127 - (-100)) + (-128 - (-100))  # -- levels q - z of the clipped elements
    assert gs.item() == (inside + clipped).item()
    assert gz.item() == (-torch.tensor(0.01) * 2).item()  # -- -s per clipped element, 0 inside


def test_scale_and_zero_point_are_trained_and_converted_exactly():
    torch.manual_seed(0)
    layer = QatLinear.from_linear(nn.Linear(32, 16), scheme_from_name("w8a8-static-asym"))
    calibrate_input_scales(layer, [torch.rand(8, 32) * 3 for _ in range(2)])
    assert layer.input_zero_point.item() < -100  # -- non-negative inputs: the zero sits low
    start = (layer.input_scale.detach().clone(), layer.input_zero_point.detach().clone())
    opt = torch.optim.SGD([layer.input_scale, layer.input_zero_point], lr=1e-3)
    for _ in range(3):
        x = torch.rand(8, 32) * 6 - 1.5  # -- wider than calibration: clipping on both sides
        loss = (layer(x) - nn.functional.linear(x, layer.weight, layer.bias)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        assert layer.input_scale.grad.abs().item() > 0
        assert layer.input_zero_point.grad.abs().item() > 0
        opt.step()
    assert not torch.equal(layer.input_scale.detach(), start[0])
    assert not torch.equal(layer.input_zero_point.detach(), start[1])
    quant = layer.to_quant_linear()
    assert quant.input_zero_point.item() == torch.round(layer.input_zero_point).item()
    x = torch.rand(5, 32) * 3
    with torch.no_grad():
        torch.testing.assert_close(quant(x), layer(x), rtol=1e-5, atol=1e-6)


def test_dynamic_asymmetric_input_gets_straight_through_gradient():
    act = scheme_from_name("w8a8-asym").activation
    x = (torch.rand(4, 16) * 2).requires_grad_()
    fake_quantize_activation(x, act).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # -- min-max range: nothing is clipped
