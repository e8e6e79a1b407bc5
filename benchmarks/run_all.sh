#!/usr/bin/env bash
# Run every benchmark on the GPU and keep the tables in benchmarks/results/.
#   benchmarks/run_all.sh            # full H100 tables (kernels, then end-to-end decode)
#   benchmarks/run_all.sh --smoke    # correctness paths only, tiny shapes
#   RESULTS=/tmp/tables benchmarks/run_all.sh   # tables elsewhere (relative to benchmarks/)
# A script that finds a wrong result still prints its table; the run goes on and exits
# non-zero at the end, naming the scripts that failed.
set -uo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python}"
OUT="${RESULTS:-results}"
mkdir -p "$OUT"
failed=()
for bench in bench_act_quant bench_weight_only bench_block_scaled bench_w8a8 bench_fp8 bench_w4a8 bench_decode; do
    echo "== $bench $*"
    "$PYTHON" "$bench.py" "$@" | tee "$OUT/$bench.md" || failed+=("$bench")
done
if [ "${#failed[@]}" -gt 0 ]; then
    echo "FAILED: ${failed[*]}" >&2
    exit 1
fi
