"""Fuzzing configs: any JSON-like input is a valid ``QuantConfig`` or a ``ConfigError``.

A valid config must also survive a JSON round trip unchanged, resolve any layer
name, and convert a tiny model (or refuse with our own exception).
"""

import json

import torch
from fuzz_strategies import config_dicts, fuzz_settings, json_scalars, patterns, scheme_like
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from torchquant import ConfigError, QuantConfig, QuantScheme, TorchquantError, convert_model
from torchquant.config import scheme_from_name
from torchquant.config.matching import matches, validate_pattern

LAYER_NAMES = ["0", "1", "2", "lm_head", "model.lm_head", "block.up", "block.down"]


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Sequential()
        self.block.add_module("up", nn.Linear(40, 24))
        self.block.add_module("down", nn.Linear(24, 40, bias=False))
        self.lm_head = nn.Linear(40, 8)

    def forward(self, x):
        return self.lm_head(self.block.down(self.block.up(x)))


def _build(data):
    try:
        return QuantConfig.from_dict(data)
    except ConfigError:
        return None


@fuzz_settings
@given(data=config_dicts)
def test_config_dicts_give_a_config_or_config_error(data):
    config = _build(data)
    if config is None:
        return
    assert QuantConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    for name in LAYER_NAMES:
        scheme, why = config.resolve(name)
        assert scheme is None or isinstance(scheme, QuantScheme)
        assert isinstance(why, str)


@fuzz_settings
@given(default=scheme_like, overrides=st.lists(st.tuples(patterns, scheme_like), max_size=3))
def test_constructor_arguments_give_a_config_or_config_error(default, overrides):
    try:
        QuantConfig(default=default, overrides=overrides, ignore=())
    except ConfigError:
        pass


@fuzz_settings
@given(
    name=st.one_of(st.text(max_size=8), json_scalars, st.from_regex(r"[wW][0-9]{1,2}a16 ?")),
    group_size=st.one_of(st.none(), json_scalars),
    symmetric=st.one_of(st.none(), json_scalars),
)
def test_scheme_names_give_a_scheme_or_config_error(name, group_size, symmetric):
    try:
        scheme = scheme_from_name(name, group_size=group_size, symmetric=symmetric)
    except ConfigError:
        return
    assert QuantScheme.from_dict(json.loads(json.dumps(scheme.to_dict()))) == scheme


@fuzz_settings
@given(pattern=patterns, name=st.text(max_size=12))
def test_patterns_are_validated_or_refused(pattern, name):
    try:
        validate_pattern(pattern, "ignore[0]")
    except ConfigError as exc:
        assert "ignore[0]" in str(exc)
        return
    assert matches(pattern, name) in (True, False)


@fuzz_settings
@given(data=config_dicts, seed=st.integers(0, 2**16))
def test_valid_configs_convert_a_tiny_model_or_refuse_it(data, seed):
    config = _build(data)
    if config is None:
        return
    torch.manual_seed(seed)
    model = Tiny()
    x = torch.randn(3, 40)
    try:
        converted, summary = convert_model(model, config, progress=False)
    except TorchquantError:
        return
    assert set(summary.converted) | set(summary.skipped) == {"block.up", "block.down", "lm_head"}
    assert torch.isfinite(converted(x)).all()
