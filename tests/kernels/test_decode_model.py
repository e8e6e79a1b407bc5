"""The decode-step model (benchmarks/decode_model.py) records every kernel of a step.

The recording runs on the meta device (no GPU, no Triton tools); the predicted table needs
Triton's NVIDIA backend tools to compile the quantized linears, and skips without them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
NVIDIA_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
sys.path.insert(0, str(BENCHMARKS))

import bench_decode  # noqa: E402
import bench_moe_decode  # noqa: E402
import decode_model  # noqa: E402


def test_llama_step_records_every_linear_once_with_its_shape():
    shape = bench_decode.Shape(layers=2)
    calls = decode_model.llama_step(shape, batch=1, context=64)
    linears = [c.linear for c in calls if c.linear is not None]
    h, kv, mlp = shape.hidden, shape.kv_heads * shape.hidden // shape.heads, shape.mlp
    attention = [(1, h, h), (1, kv, h), (1, kv, h), (1, h, h)]
    per_layer = attention + [(1, mlp, h), (1, mlp, h), (1, h, mlp)]
    assert linears == per_layer * shape.layers + [(1, shape.vocab, h)]
    assert sum(c.launch.kernel == "attention" for c in calls) == shape.layers


def test_sibling_projections_run_as_one_linear_at_one_row_only():
    shape = bench_decode.Shape(layers=2)
    sets = decode_model.sibling_sets(decode_model.llama_model(shape, 1, 1))
    h, kv, mlp = shape.hidden, shape.kv_heads * shape.hidden // shape.heads, shape.mlp
    for batch, per_layer in (
        (1, [(1, h + 2 * kv, h), (1, h, h), (1, 2 * mlp, h), (1, h, mlp)]),
        (16, [(16, h, h), (16, kv, h), (16, kv, h), (16, h, h), (16, mlp, h), (16, mlp, h)]),
    ):
        recorded = decode_model.llama_step(shape, batch, context=64)
        calls = decode_model.fuse_siblings(recorded, sets)
        linears = [c.linear for c in calls if c.linear is not None]
        if batch == 16:
            per_layer = per_layer + [(16, h, mlp)]
        assert linears == per_layer * shape.layers + [(batch, shape.vocab, h)]
        assert len(recorded) - len(calls) == (3 if batch == 1 else 0) * shape.layers


def test_slice_writes_and_embedding_count_what_they_touch():
    shape = bench_decode.Shape(layers=1)
    calls = decode_model.llama_step(shape, batch=1, context=4096)
    by_kernel = {c.launch.kernel: c.launch.nbytes for c in calls}
    row = shape.kv_heads * shape.hidden // shape.heads * 2  # one bf16 K (or V) row
    assert by_kernel["aten.index_copy_"] == 3 * row
    assert by_kernel["aten.embedding"] == 2 * shape.hidden * 2  # not the 1 GB table
    cache = shape.kv_heads * 4096 * shape.hidden // shape.heads * 2
    assert by_kernel["attention"] > 2 * cache  # attention reads the whole K and V caches


def test_fused_norms_are_recorded_as_one_call_each_with_their_tensors():
    shape = bench_decode.Shape(layers=2)
    plain = decode_model.llama_step(shape, batch=1, context=64)
    fused = decode_model.llama_step(shape, batch=1, context=64, fused_norms=True)
    norms = [c for c in fused if c.norm is not None]
    assert len(norms) == 2 * shape.layers + 1  # -- two a layer and the final norm
    assert not any(c.norm is not None for c in plain)
    assert len(plain) - len(fused) == 7 * len(norms)  # -- 8 aten ops a norm become one
    for call in norms:
        x, weight, eps, offset, after_cast = call.norm
        assert x.shape == (1, shape.hidden) and weight.shape == (shape.hidden,)
        assert (offset, after_cast) == (0.0, False)  # -- torch.nn.RMSNorm's form
        assert eps == torch.finfo(torch.float32).eps
        assert call.launch.nbytes == 3 * shape.hidden * 2  # -- read x and weight, write out
    assert [c.linear for c in plain if c.linear] == [c.linear for c in fused if c.linear]


def test_mixtral_step_separates_each_layers_experts():
    shape = bench_moe_decode.SMOKE_SHAPE
    rest, experts = decode_model.mixtral_step(shape, batch=1)
    assert len(experts) == shape.layers
    for calls in experts:
        assert [c.launch.kernel for c in calls].count("aten._grouped_mm") == 2
    assert not any(c.launch.kernel == "aten._grouped_mm" for c in rest)


def test_fusing_merges_only_runs_of_element_wise_kernels():
    parts = [("other_us", 1.0), ("other_us", 2.0), ("linear_us", 5.0), ("other_us", 1.0)]
    eager, fused = decode_model.step_us(parts, "eager"), decode_model.step_us(parts, "fused")
    gap = decode_model.LAUNCH_GAP_US
    assert eager["kernels"] == 4 and eager["us"] == pytest.approx(9.0 + 3 * gap)
    assert fused["kernels"] == 3 and fused["us"] == pytest.approx(9.0 + 2 * gap)
    assert fused["other_us"] == eager["other_us"] == 4.0


@pytest.mark.skipif(
    not all(os.access(NVIDIA_BIN / tool, os.X_OK) for tool in ("ptxas", "nvdisasm", "cuobjdump")),
    reason="compiling the quantized linears needs Triton's NVIDIA backend tools",
)
def test_predicted_table_has_a_row_per_model_mode_scheme_and_batch():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "decode_model.py"), "--smoke", "--quick", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    rows = json.loads(done.stdout)
    keys = {(r["model"], r["mode"], r["scheme"], r["batch"]) for r in rows}
    for model, schemes in (("llama", decode_model.LLAMA_SCHEMES), ("mixtral", ("w4a16",))):
        for mode in decode_model.MODES:
            for scheme in ("bf16", decode_model.BF16_FUSED, *schemes):
                for batch in decode_model.BATCHES:
                    assert (model, mode, scheme, batch) in keys
    for r in rows:
        assert r["us"] >= r["gaps_us"] + r.get("linear_us", 0) - 0.2  # rounded to 0.1 us
        assert r["tokens_per_s"] == pytest.approx(r["batch"] * 1e6 / r["us"], rel=1e-2)
        if r["scheme"] == "bf16":
            assert r["predicted_speedup"] == 1.0
        if r["scheme"] == decode_model.BF16_FUSED:
            assert r["speedup_vs_fused_norms"] == 1.0
    eager = {(r["model"], r["scheme"], r["batch"]): r for r in rows if r["mode"] == "eager"}
    for (model, scheme, batch), r in eager.items():
        if scheme != "bf16":  # -- every other row runs the fused norms: fewer kernels
            assert r["kernels"] < eager[(model, "bf16", batch)]["kernels"]
            assert r["norm_us"] > 0 and "norm_us" not in eager[(model, "bf16", batch)]
    for r in rows:
        if r["mode"] == "fused":
            twin = eager[(r["model"], r["scheme"], r["batch"])]
            assert r["kernels"] < twin["kernels"] and r["us"] < twin["us"]
