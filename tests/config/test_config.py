import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from torchquant import ActivationQuant, ConfigError, QuantConfig, QuantScheme, WeightQuant
from torchquant.config import scheme_from_name

int_weights = st.builds(
    WeightQuant,
    type=st.just("int"),
    bits=st.integers(2, 8),
    group_size=st.sampled_from([-1, 32, 64, 128, 256]),
    symmetric=st.booleans(),
)
schemes = st.one_of(
    st.builds(QuantScheme, weight=int_weights),
    st.just(scheme_from_name("w8a8")),
    st.just(scheme_from_name("fp8")),
    st.just(scheme_from_name("w8a16-fp8")),
)
patterns = st.one_of(
    st.from_regex(r"[a-z_]{1,8}(\.[a-z0-9_]{1,8}){0,3}", fullmatch=True),
    st.from_regex(r"\*\.[a-z_]{1,8}", fullmatch=True),
    st.from_regex(r"re:\.\*[a-z_]{1,8}", fullmatch=True),
)


@settings(max_examples=60, deadline=None)
@given(
    default=st.one_of(st.none(), schemes),
    overrides=st.lists(st.tuples(patterns, st.one_of(st.none(), schemes)), max_size=4),
    ignore=st.lists(patterns, max_size=3),
)
def test_config_json_roundtrip(default, overrides, ignore):
    if default is None and not any(s for _, s in overrides):
        overrides = [*overrides, ("x", scheme_from_name("w4a16"))]
    config = QuantConfig(default=default, overrides=overrides, ignore=ignore)
    again = QuantConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config


def test_first_matching_override_wins_and_none_skips():
    config = QuantConfig(
        default="w4a16",
        overrides={
            "model.layers.0.mlp.down_proj": "w8a16",
            "re:.*down_proj": "w3a16",
            "*.q_proj": None,
        },
    )
    assert config.resolve("model.layers.0.mlp.down_proj")[0].weight.bits == 8
    assert config.resolve("model.layers.1.mlp.down_proj")[0].weight.bits == 3
    assert config.resolve("model.layers.1.self_attn.q_proj") == (None, "skipped by '*.q_proj'")
    assert config.resolve("lm_head") == (None, "ignored by 'lm_head'")
    assert config.resolve("model.layers.1.mlp.up_proj")[0].weight.bits == 4


def test_shorthands():
    assert scheme_from_name("w4a16").weight == WeightQuant("int", 4, 128, False)
    assert scheme_from_name("w3a16", group_size=64).weight.group_size == 64
    assert scheme_from_name("w8a16").weight == WeightQuant("int", 8, -1, True)
    assert scheme_from_name("w8a16-fp8").weight.type == "fp8"
    assert scheme_from_name("w8a8").activation == ActivationQuant("int8", "token")
    assert scheme_from_name("fp8").activation.type == "fp8"


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: WeightQuant(bits=1), "weight.bits=1"),
        (lambda: WeightQuant(bits=9), "weight.bits=9"),
        (lambda: WeightQuant(bits=True), "weight.bits"),
        (lambda: WeightQuant(group_size=100), "weight.group_size=100"),
        (lambda: WeightQuant(group_size=0), "weight.group_size=0"),
        (lambda: WeightQuant(type="int4"), "weight.type"),
        (lambda: WeightQuant(type="fp8", bits=4), "8 for fp8"),
        (lambda: WeightQuant(type="fp8", symmetric=False), "symmetric"),
        (lambda: ActivationQuant(type="int2"), "activation.type"),
        (lambda: ActivationQuant(granularity="channel"), "activation.granularity"),
        (lambda: ActivationQuant(percentile=0), "activation.percentile"),
        (lambda: ActivationQuant(percentile=100.5), "activation.percentile"),
        (lambda: ActivationQuant(percentile=float("nan")), "activation.percentile"),
        (lambda: ActivationQuant(dynamic=False, granularity="token"), "static"),
        (lambda: ActivationQuant(observer="magic"), "activation.observer"),
        (lambda: QuantScheme(algorithm="magic"), "algorithm"),
        (lambda: QuantScheme(WeightQuant(bits=3), ActivationQuant()), "w8a8"),
        (lambda: QuantScheme(WeightQuant(), ActivationQuant(type="fp8")), "fp8"),
        (lambda: scheme_from_name("w9a16"), "scheme='w9a16'"),
        (lambda: scheme_from_name("int4"), "scheme"),
        (lambda: QuantConfig(default=None), "nothing to quantize"),
        (lambda: QuantConfig("w4a16", overrides={"re:(": "w8a16"}), "invalid regular expression"),
        (lambda: QuantConfig("w4a16", overrides={"": "w8a16"}), "non-empty"),
        (lambda: QuantConfig("w4a16", overrides={"x": 42}), "expected a QuantScheme"),
        (lambda: QuantConfig("w4a16", ignore=[3]), "ignore"),
        (lambda: QuantConfig.from_dict({"default": "w4a16", "bogus": 1}), "unknown field"),
        (lambda: QuantScheme.from_dict({"weight": {"bitz": 4}}), "unknown field"),
    ],
)
def test_bad_config_is_refused_with_the_field_named(build, match):
    with pytest.raises(ConfigError, match=match):
        build()
