"""FP4 weight schemes (NVFP4, MXFP4): shorthands, fixed blocks, JSON round trip, refusals."""

import json

import pytest

from torchquant import ActivationQuant, ConfigError, QuantConfig, QuantScheme, WeightQuant
from torchquant.config import SCHEME_NAMES, scheme_from_name


@pytest.mark.parametrize(("name", "block"), [("nvfp4a16", 16), ("mxfp4a16", 32)])
def test_fp4_shorthands_give_four_bits_on_the_type_block(name, block):
    scheme = scheme_from_name(name.upper())
    kind = name[:5]
    assert scheme.weight == WeightQuant(type=kind, bits=4, group_size=block, symmetric=True)
    assert scheme.weight == WeightQuant(type=kind)
    assert scheme.activation is None and scheme.algorithm == "rtn"
    assert name in SCHEME_NAMES
    assert scheme.describe() == f"w-{kind} g{block} a16"


@pytest.mark.parametrize("name", ["nvfp4a16", "mxfp4a16"])
def test_fp4_json_round_trip(name):
    config = QuantConfig(default=name, overrides={"*.down_proj": "w4a16", "lm_head": None})
    data = json.loads(json.dumps(config.to_dict()))
    assert data["default"]["weight"] == {
        "type": name[:5],
        "bits": 4,
        "group_size": {"nvfp4a16": 16, "mxfp4a16": 32}[name],
        "symmetric": True,
    }
    assert QuantConfig.from_dict(data) == config


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"type": "nvfp4", "group_size": 32}, "weight.group_size=32.*16 .*nvfp4"),
        ({"type": "mxfp4", "group_size": 16}, "weight.group_size=16.*32 .*mxfp4"),
        ({"type": "mxfp4", "bits": 2, "group_size": 32}, "weight.bits=2.*4 for mxfp4"),
        ({"type": "nvfp4", "bits": 3}, "weight.bits=3.*4 for nvfp4"),
        ({"type": "nvfp4", "symmetric": False}, "weight.symmetric=False.*True for nvfp4"),
        ({"type": "nvfp4", "group_size": 0}, "weight.group_size=0"),
        ({"type": "mxfp4", "block": (128, 128)}, "'fp8' for block-wise"),
        ({"type": "fp4"}, "weight.type='fp4'.*nvfp4.*mxfp4"),
    ],
)
def test_bad_fp4_weights_are_refused_with_the_field_named(fields, match):
    with pytest.raises(ConfigError, match=match):
        WeightQuant(**fields)


@pytest.mark.parametrize("kind", ["nvfp4", "mxfp4"])
def test_fp4_weights_refuse_int_algorithms_and_activations(kind):
    with pytest.raises(ConfigError, match="'int' weights for algorithm 'hqq'"):
        QuantScheme(WeightQuant(type=kind), algorithm="hqq")  # -- GPTQ rounds FP4 too
    with pytest.raises(ConfigError, match="'fp8' when activations are fp8"):
        QuantScheme(WeightQuant(type=kind), ActivationQuant(type="fp8"))
    with pytest.raises(ConfigError, match="INT8 symmetric per-channel"):
        QuantScheme(WeightQuant(type=kind), ActivationQuant(type="int8"))
