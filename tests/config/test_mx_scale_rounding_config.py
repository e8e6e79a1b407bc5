"""The MX (MXFP4, MXFP8) E8M0 scale rounding option on the scheme and the command line: validated by
name, written only when opted into (so every other checkpoint's config keeps its bytes),
round-tripped through JSON, and picked with ``--mx-scale-rounding``."""

from __future__ import annotations

import dataclasses

import pytest
from tiny_models import tiny_llama

from torchquant import ActivationQuant, ConfigError, QuantScheme, WeightQuant, scheme_from_name
from torchquant.cli import main
from torchquant.config import MX_SCALE_ROUNDINGS

CT = "compressed-tensors"


def test_the_default_is_the_spec_and_is_not_written():
    for name in ("mxfp4a16", "mxfp4", "nvfp4", "mxfp8", "w4a16"):
        scheme = scheme_from_name(name)
        assert scheme.weight.scale_rounding == "ocp"
        data = scheme.to_dict()
        assert "scale_rounding" not in data["weight"]
        assert data["activation"] is None or "scale_rounding" not in data["activation"]
    assert MX_SCALE_ROUNDINGS == ("ocp", CT)


def test_the_option_round_trips_and_describes_itself():
    scheme = QuantScheme(
        WeightQuant("mxfp4", scale_rounding=CT), ActivationQuant("mxfp4", scale_rounding=CT)
    )
    data = scheme.to_dict()
    assert data["weight"]["scale_rounding"] == CT and data["activation"]["scale_rounding"] == CT
    assert QuantScheme.from_dict(data) == scheme
    assert scheme.describe().endswith("scales compressed-tensors")
    weight_only = QuantScheme(WeightQuant("mxfp4", observer="mse", scale_rounding=CT))
    assert QuantScheme.from_dict(weight_only.to_dict()) == weight_only
    gptq = QuantScheme(WeightQuant("mxfp4", scale_rounding=CT), algorithm="gptq")
    assert QuantScheme.from_dict(gptq.to_dict()).weight.scale_rounding == CT
    mxfp8 = QuantScheme(
        WeightQuant("mxfp8", scale_rounding=CT), ActivationQuant("mxfp8", scale_rounding=CT)
    )
    assert QuantScheme.from_dict(mxfp8.to_dict()) == mxfp8


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: WeightQuant("mxfp4", scale_rounding="nearest"), "weight.scale_rounding='nearest'"),
        (lambda: WeightQuant("mxfp4", scale_rounding=None), "weight.scale_rounding=None"),
        (lambda: WeightQuant("nvfp4", scale_rounding=CT), "weight.scale_rounding.*'ocp' for nvfp4"),
        (lambda: WeightQuant("int", 4, 32, scale_rounding=CT), "weight.scale_rounding.*int"),
        (lambda: ActivationQuant("nvfp4", scale_rounding=CT), "activation.scale_rounding.*nvfp4"),
        (lambda: ActivationQuant("int8", scale_rounding=CT), "activation.scale_rounding.*int8"),
        (lambda: ActivationQuant("mxfp4", scale_rounding=1), "activation.scale_rounding=1"),
    ],
)
def test_bad_values_are_refused_with_the_field_named(build, match):
    with pytest.raises(ConfigError, match=match):
        build()


def test_from_dict_refuses_a_bad_rounding_by_name():
    data = scheme_from_name("mxfp4").to_dict()
    data["activation"]["scale_rounding"] = "up"
    with pytest.raises(ConfigError, match="activation.scale_rounding='up'"):
        QuantScheme.from_dict(data)


class CharTokenizer:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 128 for c in text]}

    def save_pretrained(self, directory):
        return ()


@pytest.mark.parametrize("name", ["mxfp4a16", "mxfp4", "mxfp8"])
def test_the_command_line_picks_it_for_mx_weights_and_activations(
    tmp_path, monkeypatch, capsys, name
):
    from torchquant.serialization import load_quantized
    from torchquant.tools import models

    monkeypatch.setattr(
        models, "load_model", lambda spec, **_: (tiny_llama(vocab=128), CharTokenizer())
    )
    out = tmp_path / name
    args = ["quantize", "tiny", "--scheme", name, "--mx-scale-rounding", CT, "--out", str(out)]
    assert main(args) == 0
    layer = load_quantized(out, tiny_llama(vocab=128)).model.layers[0].mlp.down_proj
    want = scheme_from_name(name)
    fmt = name.removesuffix("a16")
    want = dataclasses.replace(want, weight=WeightQuant(fmt, scale_rounding=CT))
    if want.activation is not None:
        want = dataclasses.replace(want, activation=ActivationQuant(fmt, scale_rounding=CT))
    assert layer.scheme == want


def test_the_command_line_refuses_it_for_other_schemes(tmp_path, capsys):
    out = str(tmp_path / "o")
    args = ["quantize", "m", "--scheme", "nvfp4a16", "--mx-scale-rounding", CT, "--out", out]
    assert main(args) == 1
    assert (
        "--mx-scale-rounding applies to mxfp4a16, mxfp4 and mxfp8 only" in capsys.readouterr().err
    )
    with pytest.raises(SystemExit):
        main(["quantize", "m", "--scheme", "mxfp4", "--mx-scale-rounding", "up", "--out", out])
