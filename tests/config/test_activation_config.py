"""Asymmetric and INT4 activation options: validation, shorthands, serialization."""

import pytest

from torchquant.config import ActivationQuant, QuantScheme, WeightQuant, scheme_from_name
from torchquant.errors import ConfigError

W8 = WeightQuant(bits=8, group_size=-1)


def test_symmetric_schemes_serialize_without_the_new_field():
    assert "symmetric" not in scheme_from_name("w8a8").to_dict()["activation"]
    data = scheme_from_name("w8a8-asym").to_dict()
    assert data["activation"]["symmetric"] is False
    assert QuantScheme.from_dict(data) == scheme_from_name("w8a8-asym")


@pytest.mark.parametrize(
    "name,act",
    [
        ("w8a8-asym", ActivationQuant("int8", symmetric=False)),
        ("w8a8-static-asym", ActivationQuant("int8", "tensor", False, symmetric=False)),
        ("w8a4", ActivationQuant("int4")),
    ],
)
def test_shorthands(name, act):
    scheme = scheme_from_name(name)
    assert scheme.weight == W8 and scheme.activation == act
    assert scheme.needs_calibration == (not act.dynamic)


def test_describe_marks_asymmetric_and_int4():
    assert scheme_from_name("w8a8-asym").describe().endswith("a8 int8 dyn token asym")
    assert "a4 int4 dyn token" in scheme_from_name("w8a4").describe()
    assert scheme_from_name("w8a8").describe() == "w-int8 per-channel sym a8 int8 dyn token"


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"type": "fp8", "symmetric": False}, "activation.symmetric"),
        ({"type": "int4", "symmetric": False}, "activation.symmetric"),
        ({"type": "int4", "dynamic": False, "granularity": "tensor"}, "activation.dynamic"),
        ({"symmetric": False, "percentile": 99.0}, "activation.percentile"),
        ({"symmetric": "no"}, "activation.symmetric"),
    ],
)
def test_bad_activation_options_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        ActivationQuant(**kwargs)


def test_static_asymmetric_may_use_a_percentile_observer():
    act = ActivationQuant("int8", "tensor", False, 99.9, "percentile", symmetric=False)
    assert not act.symmetric and act.percentile == 99.9


def test_int4_activations_need_int8_per_channel_or_int4_symmetric_weights():
    assert scheme_from_name("w4a4").weight == WeightQuant(bits=4, group_size=128)
    with pytest.raises(ConfigError, match="int4"):
        QuantScheme(WeightQuant(bits=4, group_size=128, symmetric=False), ActivationQuant("int4"))
    with pytest.raises(ConfigError, match="int4"):
        QuantScheme(WeightQuant(bits=8, group_size=128), ActivationQuant("int4"))


def test_asymmetric_activations_need_int8_per_channel_weights():
    with pytest.raises(ConfigError, match="asymmetric activations"):
        QuantScheme(WeightQuant(bits=4, group_size=128), ActivationQuant(symmetric=False))
