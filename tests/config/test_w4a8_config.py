"""W4A8 schemes: the shorthands, what QuantScheme allows beside INT4 weights, and the CLI."""

from __future__ import annotations

import pytest

from torchquant import ConfigError
from torchquant.cli import _config as cli_config
from torchquant.cli import build_parser
from torchquant.config import (
    SCHEME_NAMES,
    ActivationQuant,
    GPTQConfig,
    QuantScheme,
    WeightQuant,
    scheme_from_name,
)


@pytest.mark.parametrize(("name", "act_type"), [("w4a8", "int8"), ("w4a8-fp8", "fp8")])
def test_shorthands_are_int4_g128_with_dynamic_per_token_activations(name, act_type):
    scheme = scheme_from_name(name)
    assert name in SCHEME_NAMES
    assert scheme.weight == WeightQuant("int", 4, 128, True)
    assert scheme.activation == ActivationQuant(act_type, "token", True)
    assert scheme.is_w4a8 and not scheme.weight_only
    assert scheme_from_name(name, group_size=64).weight.group_size == 64
    assert scheme_from_name(name, group_size=-1).weight.group_size == -1
    assert QuantScheme.from_dict(scheme.to_dict()) == scheme


def test_only_int4_symmetric_weights_take_w8a8_activations_beside_w8a8():
    with pytest.raises(ConfigError, match="INT4 symmetric weights"):
        scheme_from_name("w4a8", symmetric=False)
    with pytest.raises(ConfigError, match=r"INT4 symmetric weights \(w4a8\)"):
        QuantScheme(WeightQuant("int", 3, 128, True), ActivationQuant("int8"))
    with pytest.raises(ConfigError, match=r"INT4 symmetric weights \(w4a8-fp8\)"):
        QuantScheme(WeightQuant("int", 4, 128, False), ActivationQuant("fp8"))
    with pytest.raises(ConfigError, match="group_size"):
        scheme_from_name("w4a8", group_size=100)
    assert not scheme_from_name("w4a16").is_w4a8  # -- INT4 without activations


def test_w4a8_takes_every_activation_option_w8a8_takes_but_groups():
    static = ActivationQuant("int8", "tensor", dynamic=False)
    assert QuantScheme(WeightQuant("int", 4, 64, True), static).static_activation
    assert QuantScheme(WeightQuant("int", 4, 64, True), ActivationQuant(percentile=99.9)).is_w4a8
    with pytest.raises(ConfigError, match="block"):
        group = ActivationQuant("fp8", "group", group_size=128)
        QuantScheme(WeightQuant("int", 4, 128, True), group)


def test_calibrated_algorithms_on_w4a8():
    weight, act = WeightQuant("int", 4, 128, True), ActivationQuant("int8")
    for algorithm in ("gptq", "awq", "smoothquant"):
        assert QuantScheme(weight, act, algorithm).needs_calibration
    # -- act-order needs static groups: the op reads groups in column order (no g_idx)
    with pytest.raises(ConfigError, match="gptq.static_groups.*W4A8"):
        QuantScheme(weight, act, "gptq", gptq=GPTQConfig(static_groups=False))
    assert QuantScheme(weight, act, "gptq", gptq=GPTQConfig(act_order=False, static_groups=False))


@pytest.mark.parametrize("name", ["w4a8", "w4a8-fp8"])
def test_cli_scheme(name):
    args = build_parser().parse_args(["quantize", "m", "--scheme", name, "--group-size", "64",
                                      "--out", "o"])  # fmt: skip
    scheme = cli_config(args).default
    assert scheme.is_w4a8 and scheme.weight.group_size == 64
