#!/usr/bin/env bash
# The whole GPU check in one call of about 8 minutes: GPU-marked tests, the kernel tests of
# the later families compiled (W4A8, FP4, MXFP8, microscaled, FP8 blocks, MoE, act-order),
# compiled-kernel correctness for every scheme, then the tables of run_all.sh with their
# baselines (bf16 F.linear, tinygemm, torch._int_mm + torch scaling, torch._scaled_mm, copy
# bandwidth) measured in the same run, W4A8 beside our W8A8 and W4A16, the block-scaled
# weight-only table (NVFP4, MXFP4, MXFP8 beside INT4 W4A16 and bf16), the Mixtral-shaped
# MoE decode (bf16 vs W4A16), and the cost model's predictions beside them (its MoE, W8A8,
# W4A8, FP4, microscaled and FP8 block rows included).  The FP8 table's "scaled_mm faster"
# lines -- the entries of torchquant.ops.fp8_gemm_choice.SCALED_MM_FASTER -- are collected
# in scaled_mm_faster.txt.
# Nothing newer than Python 3.12, torch 2.11 and Triton 3.6 is needed.
#
#   OUT=/tmp/check benchmarks/gpu_check.sh           # everything under $OUT
#   benchmarks/gpu_check.sh --dry-run                # print the steps, run nothing
#
# Every step has its own timeout, and no step runs past the whole check's deadline
# (TOTAL_S, 480 s), so one hang cannot eat the window; a failing step is logged and
# the next one runs.  The summary (summary.md) lists each step's status
# and seconds; the exit code is non-zero if any step failed.  Benchmarks rotate their
# inputs through more than 4x the L2 (bench_utils.ROTATE_BYTES; the H200's L2 is 60 MB)
# and do_bench flushes the L2 before each run.  The autotuner's choices are printed by
# Triton (TRITON_PRINT_AUTOTUNING=1) and collected in autotune.txt.
set -u
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
OUT="${OUT:-/tmp/torchquant_gpu_check}"
PYTHON="${PYTHON:-python}"
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
mkdir -p "$OUT"
export TRITON_PRINT_AUTOTUNING=1 TRITON_DEFAULT_FP_FUSION=1 PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
# the shapes the targets are set at; REP is do_bench's repetition time in ms
SHAPES="${SHAPES:-8192x8192,4096x14336,14336x4096}"
REP="${REP:-25}"
TOTAL_S="${TOTAL_S:-480}"

names=() statuses=() seconds=()
step() {  # step NAME TIMEOUT_S COMMAND... : run with a timeout, log to $OUT/NAME.log
    local name="$1" limit="$2"
    shift 2
    if [ "$DRY" = 1 ]; then
        echo "[dry-run] $name (timeout ${limit}s): $*"
        names+=("$name") statuses+=("dry-run") seconds+=(0)
        return 0
    fi
    local left=$((TOTAL_S - SECONDS))
    if [ "$left" -lt 10 ]; then
        names+=("$name") statuses+=("SKIPPED (deadline)") seconds+=(0)
        echo "== $name skipped: the ${TOTAL_S}s deadline is reached"
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (timeout ${limit}s): $*"
    local start=$SECONDS rc
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    local status="ok"
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then status="TIMEOUT"; elif [ "$rc" != 0 ]; then status="FAILED ($rc)"; fi
    names+=("$name") statuses+=("$status") seconds+=($((SECONDS - start)))
    echo "   $status after $((SECONDS - start))s; tail of $OUT/$name.log:"
    tail -n 5 "$OUT/$name.log" | sed 's/^/   | /'
}

# -- 0. the cost model, on the host CPUs while the GPU steps run (compile-only, no GPU): every
# -- config of the first families, the default configs of the later ones
if [ "$DRY" = 0 ]; then
    env -u TRITON_PRINT_AUTOTUNING timeout 400 nice -n 10 "$PYTHON" benchmarks/kernel_model.py \
        --json --arch 90 --machine h200,h100 --shapes "$SHAPES" --moe --w8a8 \
        >"$OUT/kernel_model.json" 2>"$OUT/kernel_model.log" &
    model_pid=$!
    env -u TRITON_PRINT_AUTOTUNING timeout 400 nice -n 10 "$PYTHON" benchmarks/kernel_model.py \
        --json --arch 90 --machine h200 --shapes "$SHAPES" --quick --schemes w4a16 \
        --batches 1,16,256,4096 --w4a8 --fp4 --microscaled --fp8-block \
        >"$OUT/kernel_model_later.json" 2>"$OUT/kernel_model_later.log" &
    later_pid=$!
else
    echo "[dry-run] kernel_model, kernel_model_later (background, timeout 400s)"
fi

# -- 1. the machine: GPU, versions, copy bandwidth
step env 45 "$PYTHON" - <<'EOF'
import subprocess, torch, triton
print(subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout)
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
print("device", torch.cuda.get_device_name(), torch.cuda.get_device_capability())
import sys; sys.path.insert(0, "benchmarks")
from bench_utils import copy_bandwidth_gbs
print(f"copy bandwidth: {copy_bandwidth_gbs(False):.0f} GB/s")
EOF

# -- 2. GPU-marked tests: compiled kernels vs the PyTorch reference, compile and graphs
step gpu_tests 150 "$PYTHON" -m pytest -p no:cacheprovider -m gpu tests/kernels/test_kernels_gpu.py \
    tests/calibration/test_calibration_engine.py tests/modules/test_sibling_linears.py \
    tests/modules/test_rms_norms.py tests/kernels/test_kernels_rms_norm.py
# -- 3. compiled-kernel correctness for every scheme on small shapes (bf16 tl.dot included)
step smoke 75 env RESULTS="$OUT/smoke" benchmarks/run_all.sh --smoke

# -- 4. the tables, baselines in the same run
step weight_only 130 "$PYTHON" benchmarks/bench_weight_only.py --shapes "$SHAPES" --rep "$REP"
# -- the decode targets next, so a short window still measures them
step decode 60 "$PYTHON" benchmarks/bench_decode.py --batches 1,16 --rep 100
step moe_decode 90 "$PYTHON" benchmarks/bench_moe_decode.py --batches 1,16 --rep 50
step block_scaled 90 "$PYTHON" benchmarks/bench_block_scaled.py --shapes 8192x8192 \
    --batches 1,16,256,4096 --rep "$REP"
step w8a8 45 "$PYTHON" benchmarks/bench_w8a8.py --shapes 8192x8192 --rep "$REP"
step fp8 60 "$PYTHON" benchmarks/bench_fp8.py --shapes "$SHAPES" --batches 16,256,4096 --rep "$REP"
step act_quant 25 "$PYTHON" benchmarks/bench_act_quant.py --shapes 8192x8192 --rep "$REP"
# -- W4A8 INT8 / FP8 beside our W8A8 and W4A16 in the same run (split-K and tiled tunings)
step w4a8 90 "$PYTHON" benchmarks/bench_w4a8.py --shapes 8192x8192 --batches 16,64,256,4096 \
    --rep "$REP"

# -- 5. the later families' kernel tests, compiled (under the interpreter on CPU in CI), last:
# -- the steps before them are the targets' tables
step kernel_tests 120 "$PYTHON" -m pytest -p no:cacheprovider tests/kernels/test_kernels_w4a8.py \
    tests/kernels/test_kernels_fp4.py tests/kernels/test_kernels_block_scaled.py \
    tests/kernels/test_kernels_microscaled.py \
    tests/kernels/test_kernels_fp8_block.py tests/kernels/test_kernels_moe.py \
    tests/kernels/test_kernels_act_order.py tests/kernels/test_kernels_asym_int4.py \
    tests/kernels/test_kernels_siblings.py tests/kernels/test_kernels_rms_norm.py

# -- 6. autotune choices, the model beside the measurements, the summary
if [ "$DRY" = 0 ]; then
    grep -h "best config selected" "$OUT"/*.log >"$OUT/autotune.txt" 2>/dev/null
    grep -h "^scaled_mm faster: " "$OUT/fp8.log" >"$OUT/scaled_mm_faster.txt" 2>/dev/null
    for pid in "$model_pid" "$later_pid"; do
        while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt $((TOTAL_S - 15)) ]; do
            sleep 2  # the models may use what is left of the deadline, no more
        done
        kill "$pid" 2>/dev/null  # timeout passes the signal on to the model
    done
    wait "$model_pid" 2>/dev/null
    echo "model exit: $?" >>"$OUT/kernel_model.log"
    wait "$later_pid" 2>/dev/null
    echo "model exit: $?" >>"$OUT/kernel_model_later.log"
    step compare 15 "$PYTHON" benchmarks/kernel_model.py --compare "$OUT/kernel_model.json" \
        "$OUT/weight_only.log"
fi
{
    echo "## gpu_check $(date -u +%FT%TZ)"
    echo "| step | status | seconds |"
    echo "|---|---|---|"
    for i in "${!names[@]}"; do echo "| ${names[$i]} | ${statuses[$i]} | ${seconds[$i]} |"; done
    echo "total: ${SECONDS}s of ${TOTAL_S}s"
} | tee "$OUT/summary.md"
for status in "${statuses[@]}"; do
    case "$status" in ok | dry-run) ;; *) exit 1 ;; esac
done
