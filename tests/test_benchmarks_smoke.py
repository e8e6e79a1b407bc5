"""The benchmark scripts import and their correctness path runs (``--smoke``, tiny shapes)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
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


def test_run_all_lists_every_script():
    text = (BENCHMARKS / "run_all.sh").read_text()
    for script in ("bench_weight_only", "bench_act_quant", "bench_w8a8", "bench_fp8"):
        assert script in text and (BENCHMARKS / f"{script}.py").exists()
