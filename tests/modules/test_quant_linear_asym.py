"""QuantLinear with asymmetric and INT4 activations: buffers, cached column sums, forward."""

import torch

from torchquant import QuantLinear, scheme_from_name


def _layer(name: str) -> QuantLinear:
    torch.manual_seed(0)
    return QuantLinear.from_linear(torch.nn.Linear(48, 24), scheme_from_name(name))


def test_only_static_asymmetric_layers_hold_an_input_zero_point():
    static = _layer("w8a8-static-asym")
    assert static.input_zero_point.dtype == torch.int8 and static.input_zero_point.shape == (1,)
    assert list(static.state_dict())[-2:] == ["input_scale", "input_zero_point"]
    for name in ("w8a8", "w8a8-asym", "w8a4"):
        layer = _layer(name)
        assert layer.input_zero_point is None and "input_zero_point" not in layer.state_dict()


def test_forward_is_the_reference_and_sums_are_cached_per_weight():
    layer = _layer("w8a8-asym")
    x = torch.randn(3, 48) + 1.0
    assert torch.equal(layer(x), layer.reference_forward(x))
    sums = layer.weight_code_sums()
    assert sums is layer.weight_code_sums()  # -- derived once
    assert torch.equal(sums, layer.qweight.int().sum(dim=1))
    with torch.no_grad():
        layer.qweight[0, 0] = 7  # -- writing the weight derives them again
    assert torch.equal(layer.weight_code_sums(), layer.qweight.int().sum(dim=1))
    assert torch.equal(layer(x), layer.reference_forward(x))
    assert "_weight_sums_cache" not in layer.__getstate__()


def test_static_asymmetric_forward_uses_its_zero_point():
    layer = _layer("w8a8-static-asym")
    layer.input_scale.fill_(0.02)
    layer.input_zero_point.fill_(-100)
    x = torch.rand(4, 48) * 4
    out = layer(x)
    assert torch.equal(out, layer.reference_forward(x))
    layer.input_zero_point.fill_(0)
    assert not torch.equal(layer(x), out)


def test_int4_layer_error_is_larger_than_int8_but_bounded():
    x = torch.randn(16, 48)
    ref = torch.nn.functional.linear(x, _layer("w8a8").dequantized_weight(), _layer("w8a8").bias)
    err = {n: ((_layer(n)(x) - ref).norm() / ref.norm()).item() for n in ("w8a8", "w8a4")}
    assert err["w8a8"] < 0.02 < err["w8a4"] < 0.2
