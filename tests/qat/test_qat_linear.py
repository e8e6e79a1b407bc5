"""QatLinear: fake-quant forward, trained scales, and conversion to the QuantLinear it becomes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchquant import ConfigError, QuantConfig, QuantizationError, QuantLinear, scheme_from_name
from torchquant.config import ActivationQuant, QuantScheme, WeightQuant
from torchquant.numerics import (
    dequantize_activation,
    dequantize_activation_asymmetric,
    dequantize_fp8_weight,
    dequantize_int_weight,
    quantize_activation,
    quantize_activation_asymmetric,
    quantize_fp8_weight,
    quantize_int_weight,
)
from torchquant.qat import QatLinear, QatOptions, calibrate_input_scales

SCHEMES = {
    "w4a16 g32 asym": scheme_from_name("w4a16", 32),
    "w3a16 per-channel sym": scheme_from_name("w3a16", -1, symmetric=True),
    "w2a16 g64 asym": scheme_from_name("w2a16", 64),
    "w8a16": scheme_from_name("w8a16"),
    "w8a16 fp8": scheme_from_name("w8a16-fp8"),
    "w8a8 int8 dynamic": scheme_from_name("w8a8"),
    "fp8 dynamic": scheme_from_name("fp8"),
    "w4a8 g32 dynamic": scheme_from_name("w4a8", 32),
    "w4a8-fp8 g64 dynamic": scheme_from_name("w4a8-fp8", 64),
    "w8a8 int8 static": QuantScheme(
        WeightQuant(bits=8), ActivationQuant(granularity="tensor", dynamic=False)
    ),
    "fp8 per-tensor static": QuantScheme(
        WeightQuant(type="fp8", group_size=0),
        ActivationQuant(type="fp8", granularity="tensor", dynamic=False),
    ),
    "w8a8 int8 asym dynamic": scheme_from_name("w8a8-asym"),
    "w8a8 int8 asym static": scheme_from_name("w8a8-static-asym"),
    "w8a4 int4 dynamic": scheme_from_name("w8a4"),
}


def _layer(
    scheme: QuantScheme, options: QatOptions | None = None, dtype: torch.dtype = torch.float32
) -> QatLinear:
    linear = nn.Linear(128, 48, dtype=dtype)
    with torch.no_grad():
        linear.weight.mul_(torch.rand(48, 1, dtype=dtype) * 2 + 0.1)
    layer = QatLinear.from_linear(linear, scheme, options)
    if layer.input_scale is not None:
        calibrate_input_scales(layer, [(torch.randn(16, 128) * 2).to(dtype) for _ in range(3)])
    return layer


def _train(layer: QatLinear, steps: int = 5) -> None:
    """A few SGD steps so the weights, scales and zero points move off their start."""
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    for _ in range(steps):
        x = torch.randn(16, 128)
        loss = (layer(x) - x[:, :48]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _numerics_forward(layer: QatLinear, x: torch.Tensor) -> torch.Tensor:
    """What the layer computes from its float weight, written with the reference numerics."""
    w, act = layer.scheme.weight, layer.scheme.activation
    weight = layer.weight.detach()
    if w.type == "fp8":
        q, s = quantize_fp8_weight(weight, per_channel=w.group_size == -1)
        wq = dequantize_fp8_weight(q, s, weight.dtype)
    else:
        iw = quantize_int_weight(weight, w.bits, w.group_size, w.symmetric, layer._scale_dtype())
        wq = dequantize_int_weight(iw.codes, iw.scales, iw.zeros, w.bits, w.group_size, x.dtype)
    if act is not None and not act.symmetric:
        x2 = x.reshape(-1, x.shape[-1])
        static = (None, None)
        if not act.dynamic:
            static = (layer.input_scale.detach(), layer.input_zero_point.detach().round())
        q, s, z = quantize_activation_asymmetric(x2, act.granularity == "token", *static)
        x = dequantize_activation_asymmetric(q, s, z, x.dtype).reshape(x.shape)
    elif act is not None:
        static = None if act.dynamic else layer.input_scale.detach()
        x2 = x.reshape(-1, x.shape[-1])
        q, s = quantize_activation(x2, act.type, act.granularity == "token", 100.0, static)
        x = dequantize_activation(q, s, x.dtype).reshape(x.shape)
    return F.linear(x, wq, layer.bias.detach())


@pytest.mark.parametrize("name", list(SCHEMES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_quant_forward_is_the_numerics_reference(name, dtype):
    # -- min-max scales, learned or followed: the round-to-nearest weight, bit for bit
    for learn in (True, False):
        layer = _layer(SCHEMES[name], QatOptions(learn_scales=learn), dtype)
        x = (torch.randn(3, 5, 128) * 2).to(dtype)
        with torch.no_grad():
            assert torch.equal(layer(x), _numerics_forward(layer, x))


@pytest.mark.parametrize("name", list(SCHEMES))
@pytest.mark.parametrize("learn", [True, False])
def test_converted_layer_computes_the_trained_function(name, learn):
    layer = _layer(SCHEMES[name], QatOptions(learn_scales=learn))
    _train(layer)
    x = torch.randn(4, 7, 128) * 2
    with torch.no_grad():
        fake = layer(x)
        quant = layer.to_quant_linear("proj")
        out = quant(x)
    assert isinstance(quant, QuantLinear) and quant.scheme == layer.scheme
    # the same function up to float rounding (matmul order; activations quantized alike)
    rel = ((out - fake).norm() / fake.norm()).item()
    assert rel < 1e-5, f"{name}: relative error {rel:.2e}"


def test_fake_quant_weight_equals_converted_dequantized_weight():
    layer = _layer(SCHEMES["w4a16 g32 asym"])
    _train(layer)
    with torch.no_grad():
        fake = layer.fake_quantized_weight()
        quant = layer.to_quant_linear()
    assert torch.equal(fake, quant.dequantized_weight(torch.float32))


def test_learned_parameters_get_gradients_and_move():
    layer = _layer(SCHEMES["w4a16 g32 asym"])
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    assert set(before) == {"weight", "bias", "weight_scales", "weight_zeros"}
    _train(layer, steps=3)
    for name in ("weight", "weight_scales"):
        assert not torch.equal(before[name], getattr(layer, name)), name
    static = _layer(SCHEMES["w8a8 int8 static"])
    s0 = static.input_scale.detach().clone()
    _train(static, steps=3)
    assert not torch.equal(s0, static.input_scale)


def test_state_lives_in_parameters_and_buffers():
    # a state dict reproduces the layer exactly (what DDP and checkpoints rely on)
    a = _layer(SCHEMES["w3a16 per-channel sym"])
    _train(a)
    b = QatLinear(128, 48, a.scheme, options=a.options)
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 128)
    assert torch.equal(a(x), b(x))


def test_ptq_start_computes_what_the_ptq_layer_computes():
    scheme = SCHEMES["w4a16 g32 asym"]
    linear = nn.Linear(128, 48)
    ptq = QuantLinear.from_linear(linear, scheme)
    layer = QatLinear.from_linear(nn.Linear(128, 48), scheme)
    layer.load_quantized(ptq, "proj")
    x = torch.randn(5, 128)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ptq(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="proj: PTQ layer is"):
        layer.load_quantized(QuantLinear.from_linear(linear, SCHEMES["w8a16"]), "proj")


def test_collapsed_or_negative_scale_stays_finite():
    # a diverging step can push a learned scale to <= 0: the forward clamps to min_scale
    layer = _layer(SCHEMES["w4a16 g32 asym"])
    with torch.no_grad():
        layer.weight_scales[0, 0] = -1.0
        layer.weight_scales[1, 0] = 0.0
    out = layer(torch.randn(4, 128))
    assert torch.isfinite(out).all()


def test_bad_inputs_name_what_is_wrong():
    with pytest.raises(ConfigError, match="scheme must be a QuantScheme"):
        QatLinear(16, 8, "w4a16")
    with pytest.raises(QuantizationError, match="needs an nn.Linear"):
        QatLinear.from_linear(nn.Conv1d(4, 4, 1), SCHEMES["w8a16"], name="conv")
    layer = _layer(SCHEMES["w8a16"])
    with pytest.raises(QuantizationError, match="input has 64 features, layer expects 128"):
        layer(torch.randn(2, 64))
    with pytest.raises(ConfigError, match="proj: trained as .* config asks for skipping it"):
        layer.to_quant_linear("proj", expected=None)
    with pytest.raises(ConfigError, match="min_scale=0"):
        QatOptions(min_scale=0)


def test_static_scheme_without_calibration_is_refused():
    config = QuantConfig(SCHEMES["w8a8 int8 static"], ignore=())
    from torchquant.qat import prepare_qat

    with pytest.raises(ConfigError, match="need calibration inputs"):
        prepare_qat(nn.Sequential(nn.Linear(8, 8)), config, progress=False)
