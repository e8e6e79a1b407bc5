"""The CLI on a tiny Hugging Face folder: quantize to every format, inspect, eval, bench."""

import json

import pytest

from torchquant.cli import main
from torchquant.formats.dispatch import load_checkpoint
from torchquant.modules import QuantLinear

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("fmt", ["native", "compressed-tensors", "gptq", "awq"])
def test_quantize_inspect_eval_each_format(model_dir, tmp_path, capsys, fmt):
    out = tmp_path / fmt
    args = ["quantize", str(model_dir), "--scheme", "w4a16", "--group-size", "32"]
    assert main([*args, "--symmetric", "--format", fmt, "--out", str(out)]) == 0
    assert f"saved {out} as {fmt}" in capsys.readouterr().out
    assert main(["inspect", str(out)]) == 0
    table = capsys.readouterr().out
    assert "model.layers.0.mlp.down_proj" in table and "compression" in table
    assert main(["inspect", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == fmt and len(report["layers"]) == 7
    assert {(r["bits"], r["group_size"]) for r in report["layers"]} == {(4, 32)}
    assert report["compression_ratio"] > 1.5
    text = model_dir / "text.txt"
    eval_args = ["eval", str(out), "--text", str(text), "--max-tokens", "64", "--seq-len", "32"]
    assert main([*eval_args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] == 64 and result["windows"] == 2 and result["perplexity"] > 1


def test_bench_compares_16_bit_and_quantized(model_dir, tmp_path, capsys):
    out = tmp_path / "ct"
    args = ["quantize", str(model_dir), "--format", "compressed-tensors", "--out", str(out)]
    assert main([*args, "--group-size", "32"]) == 0
    capsys.readouterr()
    bench = ["bench", str(out), "--prompt-len", "8", "--new-tokens", "2", "--repeats", "1"]
    assert main([*bench, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["device"] in ("cpu", "cuda")
    labels = [r["label"] for r in result["rows"]]
    on_cpu = result["device"] == "cpu"  # a CPU user runs float32: measured too
    assert labels == ["float32"] * on_cpu + ["bfloat16", "quantized"]
    assert all(
        r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0 for r in result["rows"]
    )
    assert result["rows"][-1]["weight_bytes"] < result["rows"][-2]["weight_bytes"]


@pytest.mark.parametrize("command", ["quantize", "eval", "inspect", "bench", "demo"])
def test_every_command_has_help(capsys, command):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert f"usage: torchquant {command}" in capsys.readouterr().out


def test_bad_format_is_a_usage_error(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["quantize", "m", "--format", "exl2", "--out", str(tmp_path / "o")])
    assert exc.value.code == 2
    assert "invalid choice: 'exl2'" in capsys.readouterr().err


def test_inspect_failures_exit_1_with_one_line(capsys, tmp_path, model_dir):
    assert main(["inspect", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"torchquant: error: checkpoint directory {tmp_path / 'missing'} does not exist"
    assert main(["inspect", str(model_dir)]) == 1
    assert "is not a quantized checkpoint" in capsys.readouterr().err


def test_format_that_cannot_hold_the_scheme_fails_cleanly(capsys, tmp_path, model_dir):
    args = ["quantize", str(model_dir), "--scheme", "w3a16", "--group-size", "32"]
    assert main([*args, "--format", "awq", "--out", str(tmp_path / "a")]) == 1
    assert "AWQ holds 4-bit only" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_examples_convert_then_load_a_compressed_tensors_folder(model_dir, tmp_path, monkeypatch):
    import runpy
    from pathlib import Path

    examples = Path(__file__).resolve().parents[2] / "examples"
    out = tmp_path / "ct"
    monkeypatch.setattr("sys.argv", ["x", str(model_dir), str(out), "--group-size", "32"])
    runpy.run_path(str(examples / "convert_hf_model.py"), run_name="__main__")
    assert json.loads((out / "config.json").read_text())["quantization_config"]["format"] == (
        "pack-quantized"
    )
    monkeypatch.setattr("sys.argv", ["x", str(out), "w1 w2 w3"])
    runpy.run_path(str(examples / "load_compressed_tensors.py"), run_name="__main__")


def test_quantize_dtype_sets_the_unquantized_tensors(model_dir, tmp_path, capsys):
    sizes = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        args = ["quantize", str(model_dir), "--format", "compressed-tensors", "--out", str(out)]
        assert main([*args, "--group-size", "32", "--dtype", dtype]) == 0
        assert main(["inspect", str(out), "--json"]) == 0
        sizes[dtype] = json.loads(capsys.readouterr().out.splitlines()[-1])["float_tensor_bytes"]
    assert sizes["float32"] == 2 * sizes["bfloat16"]


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq"])
def test_gptq_act_order_quantize_inspect_eval(model_dir, tmp_path, capsys, fmt):
    out = tmp_path / fmt
    text = str(model_dir / "text.txt")
    args = ["quantize", str(model_dir), "--scheme", "w4a16", "--group-size", "32"]
    args += ["--algorithm", "gptq", "--act-order", "group", "--calib", text]
    args += ["--calib-samples", "4", "--calib-seq-len", "16"]
    assert main([*args, "--format", fmt, "--out", str(out)]) == 0
    assert f"saved {out} as {fmt}" in capsys.readouterr().out
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    if fmt == "gptq":
        assert qc["desc_act"] is True
    else:
        assert {g["weights"]["actorder"] for g in qc["config_groups"].values()} == {"group"}
    layers = [m for m in load_checkpoint(out).modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 7 and all(m.g_idx is not None for m in layers)
    assert main(["inspect", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == fmt
    assert all(row["scheme"].endswith(" act-order") for row in report["layers"])
    eval_args = ["eval", str(out), "--text", text, "--max-tokens", "32", "--seq-len", "16"]
    assert main([*eval_args, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == 32


def test_act_order_choices_and_refusals(model_dir, tmp_path, capsys):
    text = str(model_dir / "text.txt")
    base = ["quantize", str(model_dir), "--group-size", "32", "--calib", text]
    base += ["--calib-samples", "2", "--calib-seq-len", "16"]
    assert main([*base, "--act-order", "group", "--out", str(tmp_path / "r")]) == 1
    assert "--act-order applies when GPTQ rounds" in capsys.readouterr().err
    awq = [*base, "--algorithm", "gptq", "--format", "awq", "--act-order"]
    assert main([*awq, "group", "--out", str(tmp_path / "a")]) == 1
    assert "g_idx, which AWQ cannot store" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    # static groups keep contiguous groups: no g_idx, so AWQ holds them
    assert main([*awq, "static", "--out", str(tmp_path / "a")]) == 0
    layers = [m for m in load_checkpoint(tmp_path / "a").modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 7 and all(m.g_idx is None for m in layers)
    with pytest.raises(SystemExit) as exc:
        main([*awq, "sideways", "--out", str(tmp_path / "b")])
    assert exc.value.code == 2 and "invalid choice: 'sideways'" in capsys.readouterr().err
