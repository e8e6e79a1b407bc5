#!/usr/bin/env bash
# Run every kernel benchmark on the GPU and keep the tables in benchmarks/results/.
#   benchmarks/run_all.sh            # full H100 tables
#   benchmarks/run_all.sh --smoke    # correctness paths only, tiny shapes
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python}"
OUT="results"
mkdir -p "$OUT"
for bench in bench_act_quant bench_weight_only bench_w8a8 bench_fp8; do
    echo "== $bench $*"
    "$PYTHON" "$bench.py" "$@" | tee "$OUT/$bench.md"
done
