import json

import pytest

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
