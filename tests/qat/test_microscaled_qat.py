"""QAT of microscaled schemes (NVFP4, MXFP4, MXFP8 weights and activations): the fake-quant
forward against the numerics, straight-through and global-scale gradients, convert_qat.

convert_qat's tolerance: the converted layer's weight and the quantized input are the QAT
forward's bit for bit, so weight-only layers compute the QAT forward exactly; layers that
quantize the input too differ only in accumulation (the op's reference multiplies in
float64, the QAT forward in the layer's dtype).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torchquant import ConfigError, QuantConfig, QuantLinear, QuantScheme, scheme_from_name
from torchquant.config import ActivationQuant, WeightQuant
from torchquant.errors import QuantizationError
from torchquant.numerics.fp4 import FP4_MAX, decode_e2m1, encode_e2m1, expand_blocks
from torchquant.numerics.microscaling import (
    block_multipliers,
    dequantize_microscaled,
    quantize_microscaled,
)
from torchquant.qat import (
    QatLinear,
    QatOptions,
    calibrate_input_scales,
    check_qat_state,
    convert_qat,
    prepare_qat,
)
from torchquant.qat.microscaled import fake_quantize_microscaled

NVFP4_STATIC = QuantScheme(WeightQuant("nvfp4"), ActivationQuant("nvfp4", dynamic=False))
CT = "compressed-tensors"  # -- the MX formats' opt-in E8M0 scale rounding
MXFP4_CT = QuantScheme(
    WeightQuant("mxfp4", scale_rounding=CT), ActivationQuant("mxfp4", scale_rounding=CT)
)
SCHEMES = {
    "nvfp4a16": scheme_from_name("nvfp4a16"),
    "mxfp4a16": scheme_from_name("mxfp4a16"),
    "mxfp8a16": QuantScheme(WeightQuant("mxfp8")),
    "nvfp4": scheme_from_name("nvfp4"),
    "nvfp4 static": NVFP4_STATIC,
    "mxfp4": scheme_from_name("mxfp4"),
    "mxfp8": scheme_from_name("mxfp8"),
    "mxfp4a16 ct": QuantScheme(WeightQuant("mxfp4", scale_rounding=CT)),
    "mxfp4 ct": MXFP4_CT,
    "mxfp8 ct": QuantScheme(
        WeightQuant("mxfp8", scale_rounding=CT), ActivationQuant("mxfp8", scale_rounding=CT)
    ),
}
FORMATS = ("nvfp4", "mxfp4", "mxfp8")
N, K = 40, 72  # 72 = 4.5 x 16 = 2.25 x 32: a short last block in every format


def _round_trip(x: torch.Tensor, fmt: str, global_scale: torch.Tensor | None = None):
    return dequantize_microscaled(quantize_microscaled(x, fmt, global_scale), x.dtype)


def _prepared(scheme: QuantScheme, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(K, N), nn.ReLU(), nn.Linear(N, 24)).to(dtype)
    calibration = [torch.randn(8, K, dtype=dtype) for _ in range(2)]
    qat, _ = prepare_qat(
        model, QuantConfig(scheme, ignore=()), calibration=calibration, progress=False
    )
    return qat


def _train(model: nn.Module, steps: int, lr: float = 1e-2) -> list[float]:
    """Adam on ``model`` fitting a fixed random linear map; the losses seen."""
    torch.manual_seed(1)
    target = nn.Linear(K, 24)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        x = torch.randn(32, K)
        with torch.no_grad():
            want = target(x)
        loss = (model(x.to(model[0].weight.dtype)).float() - want).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("fmt", FORMATS)
def test_fake_quant_is_the_numerics_round_trip(fmt):
    x = torch.randn(5, 3, K) * 3
    want = _round_trip(x.reshape(-1, K), fmt).reshape(x.shape)
    assert torch.equal(fake_quantize_microscaled(x, fmt), want)


@pytest.mark.parametrize("name", ["nvfp4a16", "mxfp4a16", "mxfp8a16", "mxfp4a16 ct"])
@pytest.mark.parametrize("learn", [True, False])
def test_fake_quantized_weight_starts_as_round_to_nearest(name, learn):
    linear = nn.Linear(K, N)
    layer = QatLinear.from_linear(linear, SCHEMES[name], QatOptions(learn_scales=learn))
    ptq = QuantLinear.from_linear(linear, SCHEMES[name])
    with torch.no_grad():
        assert torch.equal(layer.fake_quantized_weight(), ptq.dequantized_weight())
    learns_global = learn and name == "nvfp4a16"
    assert (layer.weight_global_scale is not None) == learns_global
    assert layer.weight_scales is None


@pytest.mark.parametrize("fmt", FORMATS)
def test_straight_through_inside_and_blocked_where_a_value_saturates(fmt):
    x = torch.randn(4, K)
    # -- MX scales are floor(log2(block max)) - emax: a block max of 1.9 * 2**k sits past
    # -- the largest element (6 * 2**(k-2) for E2M1, 448 * 2**(k-8) for E4M3) and saturates
    x[0, 0] = 1.9 * 2**3
    x = x.requires_grad_(True)
    fake_quantize_microscaled(x, fmt).sum().backward()
    q = quantize_microscaled(x.detach(), fmt)
    element = expand_blocks(block_multipliers(q), q.block, K)
    limit = FP4_MAX if fmt != "mxfp8" else 448.0
    inside = (x.detach() / element).abs() <= limit
    assert torch.equal(x.grad, inside.float())
    if fmt != "nvfp4":  # -- NVFP4's E4M3 block scale covers its block max
        assert not bool(inside[0, 0])
    assert bool(inside.float().mean() > 0.9)


def test_nvfp4_global_scale_gets_the_lsq_gradient_with_block_scales_held():
    w = torch.randn(N, K)
    g = (448 * 6 / w.abs().amax()).reshape(1) * 1.1
    g = g.requires_grad_(True)
    grad = torch.randn(N, K)
    (fake_quantize_microscaled(w, "nvfp4", g) * grad).sum().backward()
    # -- the same maths written with autograd: the block scales' E4M3 codes are constants,
    # -- their multiplier s / g is not, and rounding onto E2M1 is straight through inside
    q = quantize_microscaled(w, "nvfp4", g.detach())
    s = expand_blocks(q.scales.float(), 16, K)
    g2 = g.detach().clone().requires_grad_(True)
    xs = w / (s / g2)
    level = decode_e2m1(encode_e2m1(xs.detach()))
    inside = xs.detach().abs() <= FP4_MAX
    ste = torch.where(inside, xs + (level - xs).detach(), level)
    (ste * (s / g2) * grad).sum().backward()
    assert float(g.grad.abs()) > 0
    torch.testing.assert_close(g.grad, g2.grad, rtol=1e-4, atol=0)


def test_learned_global_scales_move_and_stay_state():
    qat = _prepared(NVFP4_STATIC)
    layer = qat[0]
    names = {n for n, _ in layer.named_parameters()}
    assert names == {"weight", "bias", "weight_global_scale", "input_scale"}
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    _train(qat, steps=3, lr=50.0)
    for name in ("weight_global_scale", "input_scale"):
        assert not torch.equal(before[name], getattr(layer, name)), name
    twin = _prepared(NVFP4_STATIC)
    twin.load_state_dict(qat.state_dict())
    x = torch.randn(3, K)
    assert torch.equal(qat(x), twin(x))


def test_static_nvfp4_calibration_sets_the_global_scale_of_the_max_seen():
    layer = QatLinear.from_linear(nn.Linear(K, N), NVFP4_STATIC)
    batches = [torch.randn(8, K), torch.randn(8, K) * 5, torch.randn(8, K)]
    calibrate_input_scales(layer, batches)
    amax = max(float(b.abs().amax()) for b in batches)
    torch.testing.assert_close(layer.input_scale.detach(), torch.tensor([448 * 6 / amax]))


@pytest.mark.parametrize("name", list(SCHEMES))
def test_convert_qat_reproduces_the_qat_forward(name):
    qat = _prepared(SCHEMES[name])
    _train(qat, steps=3)
    x = torch.randn(2, 5, K)
    with torch.no_grad():
        want = qat(x)
        fakes = [qat[i].fake_quantized_weight() for i in (0, 2)]
    inference, summary = convert_qat(qat, QuantConfig(SCHEMES[name], ignore=()), progress=False)
    assert len(summary.converted) == 2
    for i, fake in zip((0, 2), fakes, strict=True):
        assert isinstance(inference[i], QuantLinear)
        assert torch.equal(inference[i].dequantized_weight(), fake)
    with torch.no_grad():
        hidden = inference[1](inference[0].reference_forward(x))
        reference = inference[2].reference_forward(hidden)
        got = inference(x)
    if SCHEMES[name].activation is None:
        assert torch.equal(reference, want)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(reference, want, rtol=1e-5, atol=1e-6)


def test_convert_qat_keeps_bf16_weights_bit_exact():
    qat = _prepared(scheme_from_name("nvfp4a16"), torch.bfloat16)
    _train(qat, steps=2)
    with torch.no_grad():
        fake = qat[0].fake_quantized_weight()
        x = torch.randn(4, K, dtype=torch.bfloat16)
        want = qat(x)
    inference, _ = convert_qat(qat, progress=False)
    assert fake.dtype == torch.bfloat16
    assert torch.equal(inference[0].dequantized_weight(), fake)
    with torch.no_grad():
        hidden = inference[1](inference[0].reference_forward(x))
        assert torch.equal(inference[2].reference_forward(hidden), want)


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp8"])
def test_the_compressed_tensors_rounding_reaches_weights_and_inputs_with_its_gradient(fmt):
    x = torch.randn(4, K)
    x[0, 0] = 1.9 * 2**3  # -- the spec's scale saturates it; the rounded-up one holds it
    x = x.requires_grad_(True)
    fake = fake_quantize_microscaled(x, fmt, None, CT)
    q = quantize_microscaled(x.detach(), fmt, scale_rounding=CT)
    assert torch.equal(fake, dequantize_microscaled(q))
    assert not torch.equal(fake, fake_quantize_microscaled(x, fmt))
    fake.sum().backward()
    element = expand_blocks(block_multipliers(q), q.block, K)
    inside = (x.detach() / element).abs() <= (FP4_MAX if fmt == "mxfp4" else 448.0)
    assert torch.equal(x.grad, inside.float()) and bool(inside[0, 0])
    layer = QatLinear.from_linear(nn.Linear(K, N), SCHEMES[f"{fmt} ct"])
    with torch.no_grad():
        w = layer.weight.detach()
        want_w = dequantize_microscaled(quantize_microscaled(w, fmt, scale_rounding=CT))
        assert torch.equal(layer.fake_quantized_weight(), want_w)
        xd = _round_trip(x.detach(), fmt, None)
        ours = dequantize_microscaled(quantize_microscaled(x.detach(), fmt, scale_rounding=CT))
        assert torch.equal(layer(x.detach()), nn.functional.linear(ours, want_w, layer.bias))
        assert not torch.equal(ours, xd)


@pytest.mark.parametrize("name", ["nvfp4a16", "nvfp4", "mxfp4", "mxfp8", "mxfp4 ct"])
def test_training_steps_reduce_the_loss(name):
    losses = _train(_prepared(SCHEMES[name]), steps=40)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, f"{name}: loss {first:.3f} -> {last:.3f}"


def test_bad_inputs_are_refused_by_name():
    with pytest.raises(ConfigError, match=r"weight.observer='mse'.*expected weight.observer="):
        QatLinear(K, N, scheme_from_name("nvfp4a16-mse"))
    linear = nn.Linear(K, N)
    layer = QatLinear.from_linear(linear, scheme_from_name("nvfp4a16"))
    ptq = QuantLinear.from_linear(linear, scheme_from_name("nvfp4a16"))
    with pytest.raises(ConfigError, match="proj: QAT of w-nvfp4.*without ptq_model"):
        layer.load_quantized(ptq, "proj")
    with pytest.raises(ConfigError, match="need calibration inputs"):
        prepare_qat(nn.Sequential(nn.Linear(K, N)), QuantConfig(NVFP4_STATIC, ignore=()),
                    progress=False)  # fmt: skip
    with pytest.raises(QuantizationError, match="microscaled format must be one of"):
        fake_quantize_microscaled(torch.randn(2, K), "nvfp8")
    with pytest.raises(QuantizationError, match="input has 64 features, layer expects 72"):
        layer(torch.randn(2, 64))
    with torch.no_grad():
        layer.weight_global_scale.fill_(-1.0)
    with pytest.raises(QuantizationError, match=r"weight_global_scale: 1 value\(s\) at or below"):
        check_qat_state(nn.Sequential(layer))
