"""The benchmark scripts import and their correctness path runs (``--smoke``, tiny shapes)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch
from kernel_utils import requires_kernels

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
        ("bench_act_quant", "3"),
        ("bench_w8a8", "5,40"),  # split-K and tiled GEMMs
        ("bench_fp8", "40"),
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


def test_table_ratios_and_wrong_results(benchmarks_on_path, capsys):
    bench_utils = importlib.import_module("bench_utils")
    table = bench_utils.Table("t", copy_gbs=1000.0, baselines={"ours": "theirs"})
    table.add("8x8", 1, "theirs", 30.0, 30.0, 3_000_000)
    table.add("8x8", 1, "ours", 10.0, 30.0, 3_000_000)
    ref = torch.ones(4)
    assert table.check("8x8", 1, "ours", ref * 1.001, ref, 1e-2)
    assert not table.check("8x8", 16, "broken", ref * 2, ref, 1e-2)
    with pytest.raises(SystemExit) as exit_info:
        table.finish("smoke ok", smoke=True)
    assert exit_info.value.code == 1
    out = capsys.readouterr().out
    assert "| 8x8 | 1 | ours | 10.0 | 3.00x | 3.00x vs theirs | 300 | 30% |" in out
    assert "broken WRONG" in out and "smoke ok" not in out


def test_run_all_lists_every_script():
    text = (BENCHMARKS / "run_all.sh").read_text()
    scripts = ("bench_weight_only", "bench_act_quant", "bench_w8a8", "bench_fp8", "bench_decode")
    for script in scripts:
        assert script in text and (BENCHMARKS / f"{script}.py").exists()
