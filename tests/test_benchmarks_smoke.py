"""The benchmark scripts import and their correctness path runs (``--smoke``, tiny shapes)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kernel_utils import requires_kernels

from torchquant import QuantLinear, scheme_from_name

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

pytestmark = requires_kernels


@pytest.fixture(scope="module")
def benchmarks_on_path():
    sys.path.insert(0, str(BENCHMARKS))
    yield
    sys.path.remove(str(BENCHMARKS))


@pytest.mark.parametrize(
    "script,batches",
    [
        ("bench_weight_only", "1,5,80"),  # GEMV, split-K and tiled paths
        ("bench_block_scaled", "1,5,80"),
        ("bench_act_quant", "3"),
        ("bench_w8a8", "5,40"),  # split-K and tiled GEMMs
        ("bench_fp8", "40"),
        ("bench_w4a8", "5,80"),  # split-K and tiled W4A8 GEMMs
    ],
)
def test_smoke_run(benchmarks_on_path, capsys, script, batches):
    module = importlib.import_module(script)
    module.main(["--smoke", "--shapes", "24x64", "--batches", batches])
    assert "smoke ok" in capsys.readouterr().out


def test_decode_smoke_run(benchmarks_on_path, capsys):
    module = importlib.import_module("bench_decode")
    module.main(["--smoke", "--batches", "2"])
    out = capsys.readouterr().out
    assert "smoke ok" in out
    for scheme in module.SCHEMES:
        assert f"| 2 | {scheme} |" in out


def test_decode_step_bytes_count_weights_cache_rows_and_used_embeddings(benchmarks_on_path):
    bench_decode = importlib.import_module("bench_decode")
    shape, context = bench_decode.SMOKE_SHAPE, 16
    model = bench_decode.build(shape, 4, context, "bf16", torch.float32, torch.device("cpu"))
    weights = sum(p.numel() for n, p in model.named_parameters() if n != "embed_tokens.weight")
    cache_per_sequence = shape.layers * 2 * shape.kv_heads * context * shape.hidden // shape.heads
    for batch in (1, 4):
        expected = 4 * (weights + batch * (cache_per_sequence + shape.hidden))
        assert bench_decode.step_bytes(model, batch) == expected


def test_table_ratios_and_wrong_results(benchmarks_on_path, capsys):
    bench_utils = importlib.import_module("bench_utils")
    table = bench_utils.Table("t", copy_gbs=1000.0, baselines={"ours": "theirs"})
    table.add("8x8", 1, "theirs", 30.0, 30.0, 3_000_000)
    table.add("8x8", 1, "ours", 10.0, 30.0, 3_000_000)
    ref = torch.ones(4)
    assert table.check("8x8", 1, "ours", ref * 1.001, ref, 1e-2)
    assert not table.check("8x8", 16, "broken", ref * 2, ref, 1e-2)
    table.unavailable("8x8", 16, "theirs", RuntimeError("K must be a multiple of 128\nmore"))
    with pytest.raises(SystemExit) as exit_info:
        table.finish("smoke ok", smoke=True)
    assert exit_info.value.code == 1
    out = capsys.readouterr().out
    assert "| 8x8 | 1 | ours | 10.0 | 3.00x | 3.00x vs theirs | 300 | 30% |" in out
    assert "broken WRONG" in out and "smoke ok" not in out
    assert "theirs unavailable (RuntimeError: K must be a multiple of 128)" in out
    assert out.count("WRONG") == 2  # the row and the summary; an unavailable baseline is not


def test_run_all_lists_every_script():
    text = (BENCHMARKS / "run_all.sh").read_text()
    scripts = ("bench_weight_only", "bench_act_quant", "bench_w8a8", "bench_fp8", "bench_w4a8")
    scripts += ("bench_decode",)
    for script in scripts:
        assert script in text and (BENCHMARKS / f"{script}.py").exists()


def test_kernel_resources_compiles_for_a_gpu_without_one():
    """The ahead-of-time compile check runs the real Triton pipeline down to ptxas."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    script = BENCHMARKS / "kernel_resources.py"
    args = ["--arch", "80", "--first", "--only", "gemv w8"]
    done = subprocess.run(
        [sys.executable, str(script), *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    row = next(line for line in done.stdout.splitlines() if line.startswith("| gemv w8"))
    registers = int(row.split("|")[4])
    assert 0 < registers <= 255


def _table_rows(out: str, title: str) -> dict[str, list[str]]:
    """The rows of the table under the line starting with ``title``, by their first cell."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title)) + 2
    rows = {}
    for line in lines[start:]:
        if not line.strip() or line.startswith(("per op", "bytes per")):
            break
        label, cells = line[:14].strip(), line[14:].split()
        rows[label] = cells
    return rows


def test_cpu_smoke_without_torchao_says_so_and_leaves_its_columns_out(
    benchmarks_on_path, capsys, monkeypatch
):
    monkeypatch.setitem(sys.modules, "torchao", None)  # `import torchao` now fails
    bench_cpu = importlib.import_module("bench_cpu")
    bench_cpu.main(["--smoke"])
    out = capsys.readouterr().out
    assert out.startswith("torchao: not importable here (ModuleNotFoundError")
    assert "ao w8a16" not in out and "kept bf16" not in out
    header = out.splitlines()[2]
    assert header.split()[:4] == ["K->N", "M", "fp32", "ms"]
    assert all(label in header for label, _, _ in bench_cpu.SCHEMES)
    rows = _table_rows(out, "bytes per decoder layer")
    assert list(rows) == ["fp32", "bf16"] + [label for label, _, _ in bench_cpu.SCHEMES]
    assert rows["fp32"][:4] == ["30.0", "0.0", "30.0", "1.000"]  # 2 x 96 x 40 x 4 bytes
    assert rows["bf16"][:4] == ["15.0", "0.0", "15.0", "0.500"]


def test_cpu_bytes_per_layer_are_the_modules_buffers_and_cached_layout(benchmarks_on_path):
    bench_cpu = importlib.import_module("bench_cpu")
    _, half = bench_cpu.float_pair(96, 40, bias=False)
    layer = QuantLinear.from_linear(half, scheme_from_name("w4a16", 32))
    assert layer.cpu_layout_nbytes() > 0  # a bf16 INT layer keeps the int4pack layout
    table = bench_cpu.layer_bytes_table({"only": (96, 40)}, {})
    cells = _table_rows(table, "bytes per decoder layer")["w4a16 g32"]
    buffers, layout, held = (float(c) for c in cells[:3])
    assert buffers == round(layer.nbytes() / 1024, 1)
    assert layout == round(layer.cpu_layout_nbytes() / 1024, 1)
    assert held == round((layer.nbytes() + layer.cpu_layout_nbytes()) / 1024, 1)


def test_cpu_smoke_with_torchao_adds_its_columns(benchmarks_on_path, capsys):
    pytest.importorskip("torchao")
    bench_cpu = importlib.import_module("bench_cpu")
    bench_cpu.main(["--smoke"])
    out = capsys.readouterr().out
    assert out.startswith("torchao ") and "not importable" not in out
    assert all(label in out.splitlines()[2] for label in bench_cpu.TORCHAO_ROWS)
    rows = _table_rows(out, "bytes per decoder layer")
    assert rows["ao w4a16 g32"][-1] == "bf16)"  # N = 40 fails its int4 packing; K = 40 is kept


def test_cpu_end_to_end_rows_load_the_saved_checkpoint(benchmarks_on_path, model_dir, monkeypatch):
    bench_cpu = importlib.import_module("bench_cpu")
    monkeypatch.setattr(bench_cpu, "WORKER_TIMEOUT_S", 600)
    options = {
        "eval_tokens": 64,
        "seq_len": 32,
        "prompt": 8,
        "new_tokens": 2,
        "repeats": 1,
        "threads": 1,
    }
    text = str(model_dir / "text.txt")
    rows = bench_cpu.e2e_rows(["fp32", "w4a16 g32"], str(model_dir), text, options)
    fp32, w4 = rows
    assert [fp32["label"], w4["label"]] == ["fp32", "w4a16 g32"]
    assert fp32["eval_tokens"] == w4["eval_tokens"] == 64
    assert fp32["layout_mib"] == 0 < w4["layout_mib"]  # derived after loading the checkpoint
    assert w4["held_mib"] < fp32["held_mib"] / 1.9  # bf16 embeddings, 4-bit linears
    for r in rows:
        assert r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 and r["eval_s"] > 0
        assert r["run_peak_rss_mib"] >= r["load_peak_rss_mib"] >= r["rss_mib"] > 0
    assert w4["perplexity"] == pytest.approx(fp32["perplexity"], rel=0.1)
    table = bench_cpu.e2e_table(rows, options).splitlines()
    assert table[1].split()[:3] == ["model", "decode", "tok/s"]
    assert table[2].startswith("fp32") and table[2].split()[2] == "1.00"
    assert table[3].startswith("w4a16 g32")


def test_cpu_rows_quantize_lm_head_only_where_their_label_opts_in(benchmarks_on_path):
    bench_cpu = importlib.import_module("bench_cpu")
    default = bench_cpu.config_of("w4a16 g128")
    opted = bench_cpu.config_of(f"w4a16 g128{bench_cpu.WITH_LM_HEAD}")
    assert default.resolve("lm_head")[0] is None
    assert opted.resolve("lm_head")[0] == opted.default == default.default
    assert opted.default.weight.group_size == 128
    assert opted.resolve("model.layers.0.mlp.up_proj")[0] == default.default


def test_cpu_decode_floor_smoke_run(benchmarks_on_path, capsys):
    module = importlib.import_module("cpu_decode_floor")
    module.main(["--smoke", "--threads", "1"])
    out = capsys.readouterr().out
    assert "smoke ok" in out
    assert "| 14 body linears free |" in out and "| and lm_head free |" in out  # 2 x 7
