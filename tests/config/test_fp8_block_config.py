"""FP8 block-wise schemes: shorthands, validation, JSON round trip, unchanged older dicts."""

import json

import pytest

from torchquant import ActivationQuant, ConfigError, QuantConfig, QuantScheme, WeightQuant
from torchquant.config import SCHEME_NAMES, scheme_from_name


def test_fp8_block_shorthands():
    scheme = scheme_from_name("fp8-block")
    assert scheme.weight == WeightQuant(type="fp8", block=(128, 128))
    assert scheme.activation == ActivationQuant("fp8", "group", group_size=128)
    assert scheme_from_name("w8a16-fp8-block").activation is None
    assert scheme_from_name("W8A16-FP8-BLOCK").weight.block == (128, 128)
    assert {"fp8-block", "w8a16-fp8-block"} <= set(SCHEME_NAMES)
    assert scheme.describe() == "w-fp8 block128x128 a8 fp8 dyn group128"
    assert scheme_from_name("w8a16-fp8-block").describe() == "w-fp8 block128x128 a16"


@pytest.mark.parametrize("name", ["fp8-block", "w8a16-fp8-block"])
def test_fp8_block_json_round_trip(name):
    config = QuantConfig(default=name, overrides={"*.down_proj": "fp8"})
    data = json.loads(json.dumps(config.to_dict()))
    assert data["default"]["weight"]["block"] == [128, 128]
    assert QuantConfig.from_dict(data) == config


def test_older_schemes_serialize_without_block_fields():
    for name in ("fp8", "w8a16-fp8", "w8a8", "w4a16"):
        data = scheme_from_name(name).to_dict()
        assert "block" not in data["weight"]
        assert data["activation"] is None or "group_size" not in data["activation"]


def test_block_given_as_json_list_is_a_tuple():
    weight = WeightQuant(type="fp8", block=[64, 256])
    assert weight.block == (64, 256)
    assert hash(weight) == hash(WeightQuant(type="fp8", block=(64, 256)))


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: WeightQuant(type="int", block=(128, 128)), "'fp8' for block-wise"),
        (lambda: WeightQuant(type="fp8", block=(128,)), "weight.block"),
        (lambda: WeightQuant(type="fp8", block=(100, 128)), "weight.block"),
        (lambda: WeightQuant(type="fp8", block=(128, True)), "weight.block"),
        (lambda: WeightQuant(type="fp8", block="128x128"), "weight.block"),
        (lambda: WeightQuant(type="fp8", group_size=0, block=(128, 128)), "-1 when block"),
        (lambda: ActivationQuant("fp8", "group"), "activation.group_size=None"),
        (lambda: ActivationQuant("fp8", "group", group_size=100), "activation.group_size"),
        (lambda: ActivationQuant("fp8", "token", group_size=128), "activation.group_size=128"),
        (lambda: ActivationQuant("int8", "group", group_size=128), "'fp8' for group"),
        (
            lambda: ActivationQuant("fp8", "group", dynamic=False, group_size=128),
            "'tensor' for static",
        ),
        (
            lambda: QuantScheme(WeightQuant(type="fp8", block=(128, 128)), ActivationQuant("fp8")),
            "'group' activations",
        ),
        (
            lambda: QuantScheme(
                WeightQuant(type="fp8"), ActivationQuant("fp8", "group", group_size=128)
            ),
            "'group' activations",
        ),
        (
            lambda: QuantScheme(
                WeightQuant(type="fp8", block=(128, 128)),
                ActivationQuant("fp8", "group", group_size=64),
            ),
            "block columns",
        ),
        (
            lambda: QuantScheme(WeightQuant(type="fp8", block=(128, 128)), algorithm="awq"),
            "'int' weights",
        ),
        (
            lambda: QuantScheme(WeightQuant(type="fp8"), algorithm="gptq"),
            "'int' weights",
        ),
        (lambda: WeightQuant(type="fp8", observer="mse"), "block-wise fp8"),
        (
            lambda: QuantScheme(
                WeightQuant(type="fp8", block=(128, 128), observer="mse"), algorithm="gptq"
            ),
            "round-to-nearest",
        ),
    ],
)
def test_bad_fp8_block_configs_are_refused_by_name(build, match):
    with pytest.raises(ConfigError, match=match):
        build()


def test_fp8_block_scale_search_and_gptq_schemes():
    for name in ("fp8-block-mse", "w8a16-fp8-block-mse"):
        scheme = scheme_from_name(name)
        assert scheme.weight == WeightQuant(type="fp8", block=(128, 128), observer="mse")
        assert (scheme.activation is None) == name.startswith("w8a16")
        assert name in SCHEME_NAMES
    assert scheme_from_name("fp8-block-mse").describe().endswith("group128 mse")
    gptq = QuantScheme(scheme_from_name("fp8-block").weight, algorithm="gptq")
    assert gptq.needs_calibration and gptq.rounds_with_gptq


@pytest.mark.parametrize("name", ["fp8-block-mse", "w8a16-fp8-block-mse"])
def test_fp8_block_search_json_round_trip(name):
    config = QuantConfig(default=name)
    data = json.loads(json.dumps(config.to_dict()))
    assert data["default"]["weight"]["observer"] == "mse"
    assert QuantConfig.from_dict(data) == config


def test_fp8_block_gptq_json_round_trip():
    scheme = QuantScheme(
        WeightQuant(type="fp8", block=(128, 128)),
        ActivationQuant("fp8", "group", group_size=128),
        algorithm="gptq",
    )
    data = json.loads(json.dumps(QuantConfig(default=scheme).to_dict()))
    assert data["default"]["algorithm"] == "gptq" and "observer" not in data["default"]["weight"]
    assert QuantConfig.from_dict(data).default == scheme
