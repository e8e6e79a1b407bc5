import json

import pytest
import torch
from tiny_models import tiny_llama

from torchquant.cli import main


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["quantize"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2


def test_failures_exit_1_with_one_line(capsys, tmp_path):
    assert main(["eval", str(tmp_path / "missing-model")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("torchquant: error:") and "\n" not in err
    assert main(["quantize", "x.gguf", "--scheme", "w9a16", "--out", str(tmp_path / "o")]) == 1
    assert "w9a16" in capsys.readouterr().err


def test_quantize_then_eval_the_real_model(shared_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCHQUANT_DATA", str(shared_data))
    text = shared_data / "text" / "austen" / "prideprejudice.txt"
    out = tmp_path / "w4"
    assert main(["quantize", "smollm2-135m", "--scheme", "w4a16", "--out", str(out)]) == 0
    assert "converted 210 layer(s)" in capsys.readouterr().out
    args = ["eval", str(out), "--text", str(text), "--max-tokens", "512", "--seq-len", "256"]
    assert main([*args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] == 512 and result["windows"] == 2
    assert 5 < result["perplexity"] < 100
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "torchquant"
    assert (out / "tokenizer.json").exists()


class CharTokenizer:
    """One token per character (ids below 128), enough for the calibration windows."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 128 for c in text]}

    def save_pretrained(self, directory):
        return ()


def test_quantize_with_gptq_calibrates_on_the_given_file(tmp_path, monkeypatch, capsys):
    from torchquant.serialization import load_quantized
    from torchquant.tools import models

    def tiny(seed=0):
        return tiny_llama(vocab=128, layers=2, heads=4, kv_heads=2, seed=seed)

    monkeypatch.setattr(models, "load_model", lambda spec, **_: (tiny(), CharTokenizer()))
    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    out = tmp_path / "gptq"
    args = ["quantize", "tiny", "--scheme", "w4a16", "--group-size", "32", "--out", str(out)]
    calib_args = ["--calib", str(calib), "--calib-samples", "4", "--calib-seq-len", "64"]
    assert main([*args, "--algorithm", "gptq", *calib_args]) == 0
    assert "converted 14 layer(s)" in capsys.readouterr().out
    loaded = load_quantized(out, tiny())
    assert loaded.model.layers[1].mlp.down_proj.scheme.algorithm == "gptq"
    # -- calibrated codes differ from round-to-nearest ones
    assert main([*args[:-1], str(tmp_path / "rtn")]) == 0
    rtn = load_quantized(tmp_path / "rtn", tiny())
    assert not torch.equal(
        rtn.model.layers[1].mlp.down_proj.qweight, loaded.model.layers[1].mlp.down_proj.qweight
    )


def test_calibrated_algorithms_need_a_calibration_file(tmp_path, monkeypatch, capsys):
    from torchquant.tools import models

    def refuse(spec):
        raise AssertionError("the model must not be loaded before the arguments are checked")

    monkeypatch.setattr(models, "load_model", refuse)
    out = str(tmp_path / "o")
    assert main(["quantize", "m", "--algorithm", "gptq", "--out", out]) == 1
    assert "--calib" in capsys.readouterr().err
    assert main(["quantize", "m", "--algorithm", "smoothquant", "--out", out]) == 1
    assert "activation" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["quantize", "m", "--algorithm", "magic", "--out", out])


def test_quantize_with_hqq_needs_no_calibration_file(tmp_path, monkeypatch, capsys):
    from torchquant.serialization import load_quantized
    from torchquant.tools import models

    monkeypatch.setattr(
        models, "load_model", lambda spec, **_: (tiny_llama(vocab=128), CharTokenizer())
    )
    args = ["quantize", "tiny", "--scheme", "w4a16", "--group-size", "32"]
    assert main([*args, "--algorithm", "hqq", "--out", str(tmp_path / "hqq")]) == 0
    assert "converted 7 layer(s)" in capsys.readouterr().out
    hqq = load_quantized(tmp_path / "hqq", tiny_llama(vocab=128)).model.layers[0].mlp.down_proj
    assert hqq.scheme.algorithm == "hqq"
    assert main([*args, "--out", str(tmp_path / "rtn")]) == 0
    rtn = load_quantized(tmp_path / "rtn", tiny_llama(vocab=128)).model.layers[0].mlp.down_proj
    assert not torch.equal(hqq.scales, rtn.scales)  # -- the solver moved the qparams
    calib = tmp_path / "calib.txt"
    calib.write_text("unused " * 50, encoding="utf-8")
    out = ["--out", str(tmp_path / "again")]
    assert main([*args, "--algorithm", "hqq", "--calib", str(calib), *out]) == 0
    assert "--calib is unused with --algorithm hqq" in capsys.readouterr().err


@pytest.mark.parametrize("extra", [["--algorithm", "gptq"], []])
def test_quantize_block_fp8_with_gptq_or_the_scale_search(tmp_path, monkeypatch, capsys, extra):
    from torchquant.serialization import load_quantized
    from torchquant.tools import models

    def tiny(seed=0):
        return tiny_llama(vocab=128, layers=2, heads=4, kv_heads=2, seed=seed)

    monkeypatch.setattr(models, "load_model", lambda spec, **_: (tiny(), CharTokenizer()))
    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    scheme = "fp8-block" if extra else "fp8-block-mse"
    out = tmp_path / scheme
    args = ["quantize", "tiny", "--scheme", scheme, "--out", str(out), *extra]
    calib_args = ["--calib", str(calib), "--calib-samples", "4", "--calib-seq-len", "64"]
    assert main([*args, *(calib_args if extra else [])]) == 0
    assert "converted 14 layer(s)" in capsys.readouterr().out
    layer = load_quantized(out, tiny()).model.layers[1].mlp.down_proj
    assert layer.scheme.algorithm == ("gptq" if extra else "rtn")
    assert layer.scheme.weight.observer == ("minmax" if extra else "mse")
    assert layer.qweight.dtype == torch.float8_e4m3fn
