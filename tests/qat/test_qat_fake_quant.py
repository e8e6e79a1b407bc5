"""Fake quantization for QAT: forward bit-exact vs the reference numerics, STE and LSQ gradients."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchquant.config import ActivationQuant, WeightQuant
from torchquant.numerics import (
    dequantize_activation,
    dequantize_int_weight,
    quantize_activation,
    quantize_int_weight,
)
from torchquant.numerics.fake_quant import (
    fake_quantize_activation_backward_reference,
    fake_quantize_activation_reference,
    fake_quantize_fp8_backward_reference,
    fake_quantize_fp8_reference,
    fake_quantize_int_backward_reference,
)
from torchquant.numerics.qparams import FP8_E4M3_MAX
from torchquant.ops import fake_quant_int_weight
from torchquant.qat.fake_quant import (
    fake_quantize_activation,
    fake_quantize_fp8_weight,
    minmax_weight_qparams,
)


def _weight(n: int, k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (torch.randn(n, k) * torch.rand(n, 1) + 0.05 * torch.randn(1, k)).to(dtype)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int_forward_is_reference_quantize_dequantize(bits, group_size, symmetric, dtype):
    w = _weight(24, 96, dtype)
    spec = WeightQuant(bits=bits, group_size=group_size, symmetric=symmetric)
    scale_dtype = dtype if group_size != -1 else torch.float32
    ref = quantize_int_weight(w, bits, group_size, symmetric, scale_dtype)
    expected = dequantize_int_weight(ref.codes, ref.scales, ref.zeros, bits, group_size, dtype)
    scales, zeros = minmax_weight_qparams(w, spec, scale_dtype)
    assert torch.equal(scales.to(scale_dtype), ref.scales)
    out = fake_quant_int_weight(w, scales, zeros, bits, group_size)
    assert out.dtype == dtype
    assert torch.equal(out, expected)


def test_int_forward_with_a_short_last_group():
    # K = 80 with groups of 32: the twin pads the last group of 16 and must not leak the padding
    w = _weight(8, 80)
    spec = WeightQuant(bits=4, group_size=32, symmetric=False)
    ref = quantize_int_weight(w, 4, 32, False, torch.float32)
    scales, zeros = minmax_weight_qparams(w, spec)
    out = fake_quant_int_weight(w, scales, zeros, 4, 32)
    assert torch.equal(out, dequantize_int_weight(ref.codes, ref.scales, ref.zeros, 4, 32))
    grad_w, grad_s, grad_z = fake_quantize_int_backward_reference(
        torch.ones_like(w), w, scales, zeros, 4, 32
    )
    assert grad_s.shape == grad_z.shape == (8, 3)


def test_fp8_forward_is_e4m3_cast():
    w = _weight(16, 64)
    scale = w.abs().amax(dim=1, keepdim=True) / FP8_E4M3_MAX
    expected = (w / scale).to(torch.float8_e4m3fn).float() * scale
    assert torch.equal(fake_quantize_fp8_weight(w, scale), expected)


@pytest.mark.parametrize("act_type", ["int8", "fp8"])
@pytest.mark.parametrize("per_token", [True, False])
def test_activation_forward_is_reference(act_type, per_token):
    x = torch.randn(3, 5, 48) * 4
    act = ActivationQuant(type=act_type, granularity="token" if per_token else "tensor")
    q, s = quantize_activation(x.reshape(-1, 48), act_type, per_token)
    expected = dequantize_activation(q, s, torch.float32).reshape(x.shape)
    assert torch.equal(fake_quantize_activation(x, act), expected)


@pytest.mark.parametrize("per_row", [True, False])
def test_fp8_autograd_is_the_numerics_reference(per_row):
    w = _weight(16, 64).requires_grad_()
    absmax = w.detach().abs().amax(dim=1, keepdim=True) if per_row else w.detach().abs().amax()
    scale = (absmax.reshape(-1, 1) / 500).requires_grad_()  # the largest weights saturate
    out = fake_quantize_fp8_weight(w, scale)
    grad = torch.randn_like(out)
    out.backward(grad)
    grad_w, grad_s = fake_quantize_fp8_backward_reference(grad, w.detach(), scale.detach())
    assert torch.equal(out, fake_quantize_fp8_reference(w.detach(), scale.detach()))
    assert torch.equal(w.grad, grad_w) and torch.equal(scale.grad, grad_s)


@pytest.mark.parametrize("act_type", ["int8", "fp8"])
def test_static_activation_autograd_is_the_numerics_reference(act_type):
    act = ActivationQuant(type=act_type, granularity="tensor", dynamic=False)
    x = (torch.randn(6, 32) * 3).requires_grad_()
    s = torch.tensor([0.02 if act_type == "int8" else 0.005], requires_grad=True)
    out = fake_quantize_activation(x, act, s)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref, used = fake_quantize_activation_reference(x.detach(), act_type, False, 100.0, s.detach())
    grad_x, grad_s = fake_quantize_activation_backward_reference(
        grad, x.detach(), used, act_type, True
    )
    assert torch.equal(out, ref)
    assert torch.equal(x.grad, grad_x) and torch.equal(s.grad, grad_s.reshape(1))


# -- straight-through gradients: exactly 1 inside the clipping range, exactly 0 outside


@pytest.mark.parametrize("symmetric", [True, False])
def test_int_ste_gradient_is_one_inside_zero_outside(symmetric):
    bits = 4
    scales = torch.full((1, 1), 0.1)
    zeros = None if symmetric else torch.full((1, 1), 3.0)
    # codes span far below 0 and far above 15 around the grid
    w = torch.linspace(-3.0, 3.0, 241).reshape(1, -1).requires_grad_()
    fake_quant_int_weight(w, scales, zeros, bits, -1).sum().backward()
    zero = 8.0 if symmetric else 3.0
    c = torch.round(w.detach() / 0.1) + zero
    inside = (c >= 0) & (c <= 15)
    assert inside.any() and (~inside).any()
    assert torch.equal(w.grad, inside.float())


def test_fp8_and_activation_ste_gradient_is_one_inside_zero_outside():
    scale = torch.ones(1, 1)
    w = torch.tensor([[-900.0, -448.0, -3.3, 0.0, 2.7, 448.0, 1000.0]], requires_grad=True)
    fake_quantize_fp8_weight(w, scale).sum().backward()
    assert torch.equal(w.grad, torch.tensor([[0.0, 1, 1, 1, 1, 1, 0]]))

    act = ActivationQuant(type="int8", granularity="tensor", dynamic=False)
    x = torch.tensor([[-300.0, -128.4, -2.2, 0.0, 5.5, 127.4, 127.6, 400.0]], requires_grad=True)
    fake_quantize_activation(x, act, torch.ones(1)).sum().backward()
    assert torch.equal(x.grad, torch.tensor([[0.0, 1, 1, 1, 1, 1, 0, 0]]))


@settings(max_examples=30, deadline=None)
@given(
    bits=st.integers(2, 8),
    scale=st.floats(1e-3, 1.0),
    zero=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_ste_property_inside_range(bits, scale, zero, seed):
    # |fq(w) - w| <= s/2 wherever the gradient is 1, and the gradient is 0 or 1 everywhere
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(4, 32, generator=gen) * scale * (1 << bits) / 2).requires_grad_()
    scales = torch.full((4, 1), scale)
    zeros = torch.full((4, 1), float(min(zero, (1 << bits) - 1)))
    out = fake_quant_int_weight(w, scales, zeros, bits, -1)
    out.sum().backward()
    assert set(w.grad.unique().tolist()) <= {0.0, 1.0}
    inside = w.grad == 1
    err = (out - w).detach().abs()
    assert (err[inside] <= scale / 2 * (1 + 1e-5)).all()


# -- LSQ scale / zero-point gradients vs finite differences
#
# LSQ's gradient is the exact derivative of the straight-through surrogate at the current
# point: the rounding residual ``round(x) - x`` and which elements are clipped are held
# fixed, everything else varies with the scale.  Central differences of that surrogate
# (float64, written out independently below) must match the fused op's gradient.


def _finite_difference(fn, t: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    base = t.detach().double().clone()
    grad = torch.zeros_like(base)
    for i in range(base.numel()):
        up, down = base.clone(), base.clone()
        up.view(-1)[i] += eps
        down.view(-1)[i] -= eps
        grad.view(-1)[i] = (fn(up) - fn(down)) / (2 * eps)
    return grad


def _expand(t: torch.Tensor, group: int, k: int) -> torch.Tensor:
    return t.repeat_interleave(group, dim=1)[:, :k]


def _int_surrogate_loss(w, s0, z, bits, group, target):
    """``s -> sum((surrogate(s) - target)**2)`` for INTn with zero points ``z`` (or None)."""
    w, target = w.double(), target.double()
    k, qmax = w.shape[1], (1 << bits) - 1
    zz = float(1 << (bits - 1)) if z is None else _expand(z.double(), group, k)
    x0 = w / _expand(s0.double(), group, k)
    r0 = torch.round(x0)
    c0 = r0 + zz
    inside = (c0 >= 0) & (c0 <= qmax)
    edge = torch.where(c0 < 0, -zz, qmax - zz) + torch.zeros_like(w)

    def loss(s: torch.Tensor) -> float:
        ss = _expand(s, group, k)
        out = torch.where(inside, (w / ss + (r0 - x0)) * ss, edge * ss)
        return ((out - target) ** 2).sum().item()

    return loss


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [-1, 32])
def test_lsq_scale_gradient_matches_finite_difference(symmetric, group_size):
    torch.manual_seed(1)
    n, k, bits = 4, 80, 3
    w = _weight(n, k)
    spec = WeightQuant(bits=bits, group_size=group_size, symmetric=symmetric)
    scales, zeros = minmax_weight_qparams(w, spec)
    scales = (scales * 0.7).requires_grad_()  # a tighter range clips some weights
    target = torch.randn(n, k)
    out = fake_quant_int_weight(w, scales, zeros, bits, group_size)
    ((out - target) ** 2).sum().backward()
    group = k if group_size == -1 else group_size
    fd = _finite_difference(_int_surrogate_loss(w, scales, zeros, bits, group, target), scales)
    torch.testing.assert_close(scales.grad.double(), fd, rtol=1e-4, atol=1e-4)


def test_zero_point_gradient_matches_finite_difference():
    torch.manual_seed(2)
    w = _weight(3, 32) * 3
    scales = torch.full((3, 1), 0.05)
    zeros = torch.full((3, 1), 7.0, requires_grad=True)
    target = torch.randn_like(w)
    ((fake_quant_int_weight(w, scales, zeros, 4, -1) - target) ** 2).sum().backward()
    # surrogate in z: inside (r0 + z - z) * s is constant, clipped (edge - z) * s
    x0 = w.double() / 0.05
    c0 = torch.round(x0) + 7

    def loss(z: torch.Tensor) -> float:
        zz = z.expand(-1, 32)
        code = torch.where(c0 < 0, 0.0, torch.where(c0 > 15, 15.0, c0 - 7 + zz))
        out = (code - zz) * 0.05
        return ((out - target.double()) ** 2).sum().item()

    assert ((c0 < 0) | (c0 > 15)).any()
    fd = _finite_difference(loss, zeros)
    torch.testing.assert_close(zeros.grad.double(), fd, rtol=1e-4, atol=1e-4)


def test_static_input_scale_gradient_matches_finite_difference():
    torch.manual_seed(3)
    act = ActivationQuant(type="int8", granularity="tensor", dynamic=False)
    s = torch.tensor([0.02], requires_grad=True)
    x = torch.randn(6, 16) * 1.5  # about 1 in 20 beyond 127 * 0.02: clipped
    target = torch.randn_like(x)
    ((fake_quantize_activation(x, act, s) - target) ** 2).sum().backward()
    x0 = x.double() / 0.02
    r0 = torch.round(x0)
    inside = (r0 >= -128) & (r0 <= 127)
    edge = torch.where(x0 < 0, -128.0, 127.0).double()
    assert (~inside).any()

    def loss(scale: torch.Tensor) -> float:
        out = torch.where(inside, (x.double() / scale + (r0 - x0)) * scale, edge * scale)
        return ((out - target.double()) ** 2).sum().item()

    torch.testing.assert_close(s.grad.double(), _finite_difference(loss, s), rtol=1e-4, atol=1e-4)


def test_fp8_scale_gradient_matches_finite_difference():
    torch.manual_seed(4)
    w = _weight(3, 16)
    scale = (w.abs().amax(dim=1, keepdim=True) / 500).requires_grad_()  # the largest saturate
    target = torch.randn_like(w)
    ((fake_quantize_fp8_weight(w, scale) - target) ** 2).sum().backward()
    x0 = w.double() / scale.detach().double()
    q0 = x0.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).double()
    inside = x0.abs() <= FP8_E4M3_MAX
    assert (~inside).any()

    def loss(s: torch.Tensor) -> float:
        out = torch.where(inside, (w.double() / s + (q0 - x0)) * s, q0 * s)
        return ((out - target.double()) ** 2).sum().item()

    fd = _finite_difference(loss, scale)
    torch.testing.assert_close(scale.grad.double(), fd, rtol=1e-4, atol=1e-4)
