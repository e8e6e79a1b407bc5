"""Catalogue of bad configs, tensors and float weight files, each refused by name.

Configs raise ``ConfigError`` naming the field; tensors handed to quantization
raise ``QuantizationError`` naming the tensor (or argument); float safetensors
files for streamed conversion raise ``CheckpointError`` (or ``QuantizationError``
for NaN weights) naming the file or tensor.  These complement the cases in
``test_config.py`` and the checkpoint catalogue.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from torchquant import (
    ActivationQuant,
    CheckpointError,
    ConfigError,
    QuantConfig,
    QuantizationError,
    QuantLinear,
    QuantScheme,
    WeightQuant,
    convert_model,
)
from torchquant.config import scheme_from_name
from torchquant.numerics import (
    pack_codes,
    quantize_activation,
    quantize_fp8_weight,
    quantize_int_weight,
    unpack_codes,
)
from torchquant.streaming import convert_from_safetensors


def tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 48), nn.LayerNorm(48), nn.Linear(48, 16))


CONFIG_CASES = [
    (
        "percentile-int-beyond-float",
        lambda: ActivationQuant(percentile=10**400),
        "activation.percentile",
    ),
    ("percentile-string", lambda: ActivationQuant(percentile="99"), "activation.percentile"),
    (
        "percentile-infinite",
        lambda: ActivationQuant(percentile=float("inf")),
        "activation.percentile=inf",
    ),
    ("dynamic-not-bool", lambda: ActivationQuant(dynamic=1), "activation.dynamic=1"),
    ("fp8-bits-float", lambda: WeightQuant(type="fp8", bits=8.0), "weight.bits=8.0"),
    (
        "fp8-group-size-bool",
        lambda: WeightQuant(type="fp8", group_size=False),
        "weight.group_size=False",
    ),
    (
        "fp8-group-size-128",
        lambda: WeightQuant(type="fp8", group_size=128),
        "weight.group_size=128",
    ),
    ("int-bits-float", lambda: WeightQuant(bits=4.0), "weight.bits=4.0"),
    ("group-size-float", lambda: WeightQuant(bits=4, group_size=128.0), "weight.group_size=128.0"),
    ("symmetric-string", lambda: WeightQuant(symmetric="yes"), "weight.symmetric='yes'"),
    ("weight-type-list", lambda: WeightQuant(type=["int"]), "weight.type=['int']"),
    ("weight-as-list", lambda: QuantScheme(weight=[4, 128]), "weight=[4, 128]"),
    ("activation-as-string", lambda: QuantScheme(activation="int8"), "activation='int8'"),
    (
        "w8a8-with-asymmetric-weights",
        lambda: QuantScheme(WeightQuant(symmetric=False), ActivationQuant()),
        "weight=",
    ),
    (
        "fp8-activations-int-weights",
        lambda: QuantScheme.from_dict({"activation": {"type": "fp8"}}),
        "weight.type='int'",
    ),
    (
        "scheme-dict-unknown-key",
        lambda: QuantScheme.from_dict({"weights": {}}),
        "unknown field(s) ['weights']",
    ),
    ("scheme-name-not-a-string", lambda: scheme_from_name(4), "scheme=4"),
    (
        "scheme-name-group-size-bad",
        lambda: scheme_from_name("w4a16", group_size=100),
        "weight.group_size=100",
    ),
    ("ignore-an-int", lambda: QuantConfig("w4a16", ignore=5), "ignore: expected a pattern"),
    ("ignore-a-bool", lambda: QuantConfig("w4a16", ignore=True), "ignore: expected a pattern"),
    ("ignore-empty-pattern", lambda: QuantConfig("w4a16", ignore=["lm_head", ""]), "ignore[1]"),
    (
        "regex-repeat-too-large",
        lambda: QuantConfig("w4a16", ignore=["re:a{4294967296}"]),
        "ignore[0]: invalid regular expression",
    ),
    (
        "regex-nested-too-deep",
        lambda: QuantConfig("w4a16", ignore=["re:" + "(" * 5000]),
        "ignore[0]: invalid regular expression",
    ),
    ("overrides-a-string", lambda: QuantConfig("w4a16", overrides="0"), "overrides: expected"),
    (
        "overrides-item-a-triple",
        lambda: QuantConfig("w4a16", overrides=[("0", "w8a16", 1)]),
        "overrides[0]: expected (pattern, scheme)",
    ),
    (
        "overrides-pattern-not-string",
        lambda: QuantConfig("w4a16", overrides=[(3, "w8a16")]),
        "overrides[0]: a pattern must be a non-empty string",
    ),
    (
        "overrides-scheme-a-list",
        lambda: QuantConfig("w4a16", overrides={"0": ["w8a16"]}),
        "overrides['0']: expected a QuantScheme",
    ),
    ("default-a-number", lambda: QuantConfig(default=8), "default: expected a QuantScheme"),
    ("config-from-a-list", lambda: QuantConfig.from_dict(["w4a16"]), "config: expected a mapping"),
    (
        "only-skipping-overrides",
        lambda: QuantConfig(None, overrides={"0": None}),
        "nothing to quantize",
    ),
    (
        "override-matches-no-layer",
        lambda: convert_model(tiny(), QuantConfig("w4a16", overrides={"decoder.*": "w8a16"})),
        "pattern 'decoder.*' matches no linear layer",
    ),
    (
        "convert-with-a-dict",
        lambda: convert_model(tiny(), {"default": "w4a16"}),
        "config must be a QuantConfig, got dict",
    ),
]


def weight_with(value, dtype=torch.float32):
    w = torch.randn(16, 64, dtype=dtype)
    w[2, 5] = value
    return w


TENSOR_CASES = [
    (
        "nan-weight",
        lambda: quantize_int_weight(weight_with(float("nan")), 4, 32, False),
        "weight contains 1 NaN/Inf",
    ),
    (
        "inf-weight",
        lambda: quantize_int_weight(weight_with(float("inf")), 8, -1, True),
        "weight contains 1 NaN/Inf",
    ),
    (
        "minus-inf-fp8-weight",
        lambda: quantize_fp8_weight(weight_with(-float("inf"))),
        "weight contains 1 NaN/Inf",
    ),
    (
        "one-dimensional-weight",
        lambda: quantize_int_weight(torch.randn(64), 4, 32, True),
        "weight must be 2-D",
    ),
    (
        "three-dimensional-weight",
        lambda: quantize_fp8_weight(torch.randn(2, 3, 4)),
        "weight must be 2-D",
    ),
    (
        "integer-weight",
        lambda: quantize_int_weight(torch.ones(4, 8, dtype=torch.int8), 4, -1, True),
        "weight must be fp32/fp16/bf16, got torch.int8",
    ),
    (
        "fp8-weight-requantized",
        lambda: quantize_int_weight(torch.ones(4, 8).to(torch.float8_e4m3fn), 4, -1, True),
        "got torch.float8_e4m3fn",
    ),
    (
        "empty-weight",
        lambda: quantize_int_weight(torch.ones(8, 0), 4, -1, True),
        "weight is empty (shape (8, 0))",
    ),
    ("bits-nine", lambda: quantize_int_weight(torch.randn(4, 8), 9, -1, True), "bits for weight"),
    (
        "group-size-negative",
        lambda: quantize_int_weight(torch.randn(4, 8), 4, -2, True),
        "group_size for weight must be -1 or positive, got -2",
    ),
    (
        "float16-at-the-limit",
        lambda: quantize_int_weight(weight_with(65504.0, torch.float16), 2, 32, False),
        "would dequantize beyond",
    ),
    ("codes-out-of-range", lambda: pack_codes(torch.tensor([[0, 16]]), 4), "codes must lie in"),
    ("codes-negative", lambda: pack_codes(torch.tensor([[-1, 3]]), 4), "codes must lie in"),
    ("codes-float", lambda: pack_codes(torch.zeros(2, 4), 4), "integer tensor, got torch.float32"),
    (
        "packed-width-wrong",
        lambda: unpack_codes(torch.zeros(2, 3, dtype=torch.int32), 4, 32),
        "packed width 3 does not hold 32 codes of 4 bits",
    ),
    (
        "packed-not-int32",
        lambda: unpack_codes(torch.zeros(2, 4, dtype=torch.int64), 4, 32),
        "2-D int32 tensor",
    ),
    (
        "activation-dtype-int2",
        lambda: quantize_activation(torch.randn(2, 8), "int2"),
        "activation dtype must be one of",
    ),
    (
        "activation-three-dimensional",
        lambda: quantize_activation(torch.randn(2, 3, 8)),
        "activation must be 2-D",
    ),
    (
        "layer-input-wrong-width",
        lambda: QuantLinear.from_weight(torch.randn(8, 64), None, scheme_from_name("w4a16"))(
            torch.randn(2, 63)
        ),
        "input has 63 features, layer expects 64",
    ),
    (
        "layer-weight-nan-named",
        lambda: QuantLinear.from_weight(
            weight_with(float("nan")),
            None,
            scheme_from_name("fp8"),
            "model.layers.3.mlp.up_proj.weight",
        ),
        "model.layers.3.mlp.up_proj.weight contains 1 NaN/Inf",
    ),
    (
        "convert-meta-weights",
        lambda: convert_model(tiny().to("meta"), QuantConfig("w4a16"), progress=False),
        "0: weight is on the meta device",
    ),
]


def float_file(tmp_path, change):
    state = dict(tiny().state_dict())
    change(state)
    path = tmp_path / "float.safetensors"
    save_file(state, str(path))
    return [path]


def two_files(tmp_path):
    state = tiny().state_dict()
    save_file(dict(state), str(tmp_path / "a.safetensors"))
    save_file({"0.bias": state["0.bias"]}, str(tmp_path / "b.safetensors"))
    return [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]


def truncated(tmp_path):
    [path] = float_file(tmp_path, lambda s: None)
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    return [path]


def poke(name, value):
    def change(state):
        state[name] = state[name].clone()
        state[name].view(-1)[0] = value

    return change


def set_tensor(name, value):
    return lambda state: state.__setitem__(name, value)


STREAM_CASES = [
    (
        "weight-missing",
        lambda p: float_file(p, lambda s: s.pop("2.weight")),
        CheckpointError,
        "'2.weight' is not in the float weights",
    ),
    (
        "weight-wrong-shape",
        lambda p: float_file(p, set_tensor("2.weight", torch.ones(16, 47))),
        CheckpointError,
        "'2.weight': float.safetensors declares (16, 47)",
    ),
    (
        "weight-stored-as-int",
        lambda p: float_file(p, set_tensor("0.weight", torch.ones(48, 64, dtype=torch.int32))),
        CheckpointError,
        "'0.weight': float.safetensors stores torch.int32",
    ),
    (
        "norm-stored-as-int",
        lambda p: float_file(p, set_tensor("1.weight", torch.ones(48, dtype=torch.int64))),
        CheckpointError,
        "'1.weight': float.safetensors stores torch.int64",
    ),
    (
        "bias-missing",
        lambda p: float_file(p, lambda s: s.pop("0.bias")),
        CheckpointError,
        "'0.bias' is not in the float weights",
    ),
    (
        "nan-in-float-weight",
        lambda p: float_file(p, poke("2.weight", float("nan"))),
        QuantizationError,
        "2.weight contains 1 NaN/Inf",
    ),
    ("tensor-in-two-files", two_files, CheckpointError, "'0.bias' appears in two files"),
    ("file-truncated", truncated, CheckpointError, "float.safetensors"),
]


@pytest.mark.parametrize("build,fragment", [pytest.param(b, f, id=i) for i, b, f in CONFIG_CASES])
def test_bad_config_is_refused_naming_the_field(build, fragment):
    with pytest.raises(ConfigError) as info:
        build()
    assert fragment in str(info.value)


@pytest.mark.parametrize("build,fragment", [pytest.param(b, f, id=i) for i, b, f in TENSOR_CASES])
def test_bad_tensor_is_refused_naming_it(build, fragment):
    with pytest.raises(QuantizationError) as info:
        build()
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    "files,error,fragment", [pytest.param(f, e, m, id=i) for i, f, e, m in STREAM_CASES]
)
def test_bad_float_weights_are_refused_naming_the_tensor(tmp_path, files, error, fragment):
    skeleton = tiny().to("meta")
    config = QuantConfig("w4a16", ignore=())
    with pytest.raises(error) as info:
        convert_from_safetensors(skeleton, files(tmp_path), config, progress=False)
    assert fragment in str(info.value)


def test_catalogue_is_distinct():
    ids = [case[0] for case in CONFIG_CASES + TENSOR_CASES + STREAM_CASES]
    assert len(ids) == len(set(ids))
