"""The CLI's asymmetric and INT4 activation schemes, its --act-observer option and
SmoothQuant's options (W4A8 smoothed and GPTQ-rounded)."""

import pytest
import torch
from tiny_models import tiny_llama

from torchquant.cli import main


class CharTokenizer:
    """One token per character (ids below 128), enough for the calibration windows."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 128 for c in text]}

    def save_pretrained(self, directory):
        return ()


@pytest.fixture
def tiny_model(monkeypatch):
    from torchquant.tools import models

    def tiny(spec, **_):
        return tiny_llama(vocab=128, layers=1, heads=4, kv_heads=2), CharTokenizer()

    monkeypatch.setattr(models, "load_model", tiny)


def test_static_asymmetric_scheme_with_a_chosen_observer(tmp_path, tiny_model, capsys):
    from torchquant.serialization import load_quantized

    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    out = tmp_path / "asym"
    args = ["quantize", "tiny", "--scheme", "w8a8-static-asym", "--act-observer", "kl"]
    calib_args = ["--calib", str(calib), "--calib-samples", "4", "--calib-seq-len", "64"]
    assert main([*args, *calib_args, "--out", str(out)]) == 0
    loaded = load_quantized(out, tiny_llama(vocab=128, layers=1, heads=4, kv_heads=2))
    layer = loaded.model.layers[0].mlp.down_proj
    act = layer.scheme.activation
    assert not act.symmetric and act.observer == "kl" and not act.dynamic
    assert layer.input_zero_point.dtype == torch.int8


def test_act_observer_needs_a_static_scheme(tmp_path, tiny_model, capsys):
    out = str(tmp_path / "o")
    assert (
        main(["quantize", "tiny", "--scheme", "w8a4", "--act-observer", "mse", "--out", out]) == 1
    )
    assert "--act-observer" in capsys.readouterr().err


@pytest.mark.parametrize("scheme", ["w8a4", "w4a4", "w8a8-asym"])
def test_dynamic_low_bit_schemes_need_no_calibration(tmp_path, tiny_model, capsys, scheme):
    assert main(["quantize", "tiny", "--scheme", scheme, "--out", str(tmp_path / scheme)]) == 0
    assert "converted 7 layer(s)" in capsys.readouterr().out


def _w4a8_smoothquant(tmp_path, out: str, *options: str) -> int:
    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    args = ["quantize", "tiny", "--scheme", "w4a8", "--group-size", "32"]
    args += ["--calib", str(calib), "--calib-samples", "4", "--calib-seq-len", "64"]
    return main([*args, *options, "--out", str(tmp_path / out)])


def test_smoothquant_rounding_gptq_from_the_command_line(tmp_path, tiny_model, capsys):
    from torchquant.config import SmoothQuantConfig
    from torchquant.serialization import load_quantized

    smooth = ["--algorithm", "smoothquant", "--smoothquant-alpha", "0.8"]
    gptq = [*smooth, "--smoothquant-rounding", "gptq", "--act-order", "static"]
    assert _w4a8_smoothquant(tmp_path, "gptq", *gptq) == 0
    assert _w4a8_smoothquant(tmp_path, "rtn", *smooth) == 0
    loaded = {
        name: load_quantized(tmp_path / name, tiny_llama(vocab=128, layers=1, heads=4, kv_heads=2))
        for name in ("gptq", "rtn")
    }
    layers = {name: model.model.layers[0].mlp.up_proj for name, model in loaded.items()}
    assert layers["gptq"].scheme.smoothquant == SmoothQuantConfig(0.8, rounding="gptq")
    assert layers["rtn"].scheme.smoothquant == SmoothQuantConfig(0.8)
    # -- the same smoothing (folded into the norm), rounded differently: GPTQ moved codes
    norms = [m.model.layers[0].post_attention_layernorm.weight for m in loaded.values()]
    assert torch.equal(*norms)
    assert not torch.equal(layers["gptq"].qweight, layers["rtn"].qweight)


@pytest.mark.parametrize(
    ("options", "code", "message"),
    [
        (["--smoothquant-rounding", "gptq"], 1, "apply to --algorithm smoothquant only"),
        (["--algorithm", "smoothquant", "--act-order", "static"], 1, "applies when GPTQ rounds"),
        (["--algorithm", "smoothquant", "--smoothquant-alpha", "1.5"], 2, "a number in [0, 1]"),
        (["--algorithm", "smoothquant", "--smoothquant-rounding", "hqq"], 2, "invalid choice"),
    ],
)
def test_smoothquant_options_refused(tmp_path, tiny_model, capsys, options, code, message):
    if code == 2:
        with pytest.raises(SystemExit) as exc:
            _w4a8_smoothquant(tmp_path, "r", *options)
        assert exc.value.code == 2
    else:
        assert _w4a8_smoothquant(tmp_path, "r", *options) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
