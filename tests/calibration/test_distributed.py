"""Data-parallel calibration on 2 gloo ranks (spawned here) against one process.

Two ranks, each on half the samples, write the checkpoint one process writes when given
the same shard count (bit for bit); one process with a single shard (the default) sums
its Hessians in another order and agrees within float32 rounding (checked on logits).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from distributed_cases import CASES, calibrate, model, tokens
from safetensors import safe_open
from tiny_models import tiny_llama

from torchquant import CalibrationError, ConfigError, QuantConfig, QuantScheme, convert_model
from torchquant.calibration.distributed import RankContext
from torchquant.calibration.mappings import find_layout
from torchquant.calibration.shards import (
    attach_hessians,
    hessian_groups,
    merge_shards,
    split_hessians,
)
from torchquant.calibration.stats import LayerStats
from torchquant.calibration.steps.awq import independent_waves
from torchquant.cli import main
from torchquant.serialization import save_quantized

pytestmark = pytest.mark.usefixtures("one_thread")
TESTS = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("rank_worker.py")
RUN_LIMIT_S = 240  # -- a run that hangs fails the test instead of blocking the suite


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], timeout_s: float = 30.0) -> list[subprocess.Popen]:
    """Two rank processes running ``python ARGS`` with torchrun's environment variables."""
    port = free_port()
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "TIMEOUT_S": str(timeout_s),
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
        )
    return procs


def finish(procs: list[subprocess.Popen], limit_s: float = RUN_LIMIT_S) -> list[tuple[int, str]]:
    """Each rank's exit code and stderr; ranks still running after ``limit_s`` are killed."""
    deadline = time.monotonic() + limit_s
    results = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
        results.append((p.returncode, err.decode()))
    return results


def run_worker(scenario: str, out: Path, timeout_s: float = 30.0) -> list[tuple[int, str]]:
    return finish(launch([str(WORKER), scenario, str(out)], timeout_s))


def files(folder: Path) -> dict[str, object]:
    """A checkpoint folder's content: each safetensors file's metadata and tensors (dtype,
    shape, bytes), other files parsed as JSON (the metadata's key order may differ)."""
    content: dict[str, object] = {}
    for f in sorted(folder.iterdir()):
        if f.suffix != ".safetensors":
            content[f.name] = json.loads(f.read_text()) if f.suffix == ".json" else f.read_bytes()
            continue
        with safe_open(str(f), framework="pt") as st:
            tensors = {k: st.get_tensor(k) for k in st.keys()}  # noqa: SIM118
            content[f.name] = (
                st.metadata(),
                {
                    k: (t.dtype, tuple(t.shape), t.contiguous().view(torch.uint8).numpy().tobytes())
                    for k, t in tensors.items()
                },
            )
    return content


@pytest.fixture(scope="module")
def two_rank_checkpoints(tmp_path_factory):
    out = tmp_path_factory.mktemp("two-ranks")
    results = run_worker("cases", out)
    assert all(code == 0 for code, _ in results), results
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_write_the_checkpoint_of_one_process(case, two_rank_checkpoints, tmp_path):
    save_quantized(calibrate(case, shards=2), tmp_path / case)
    assert files(two_rank_checkpoints / case) == files(tmp_path / case)
    assert (two_rank_checkpoints / f"{case}.writer").read_text() == "0"  # -- rank 0 wrote it


@pytest.mark.parametrize("case", ["gptq", "awq", "static"])
def test_one_shard_agrees_with_two_within_float32_rounding(case):
    ids = tokens()[:2]
    with torch.no_grad():
        one = calibrate(case, shards=1)(ids).logits
        two = calibrate(case, shards=2)(ids).logits
    assert float((one - two).norm() / one.norm()) < 2e-2


def test_mismatched_configs_are_refused_on_every_rank(tmp_path):
    results = run_worker("mismatch", tmp_path)
    for code, err in results:
        assert code == 3, err
        assert "FAILED ConfigError: ranks disagree on the config: rank 1 does not match" in err


def test_a_failing_rank_ends_every_rank_with_its_message(tmp_path):
    results = run_worker("fail", tmp_path)
    for code, err in results:
        assert code == 3, err
        assert "ValueError: rank 1 cannot solve its block" in err
    assert "calibration failed on rank 1" in results[0][1]
    assert list(tmp_path.iterdir()) == []  # -- no checkpoint, no partial folder


def test_a_silent_rank_times_out_the_others(tmp_path):
    procs = launch([str(WORKER), "silent", str(tmp_path)], timeout_s=3.0)
    code, err = finish(procs[:1], limit_s=180)[0]
    procs[1].kill()
    procs[1].communicate()
    assert code == 3, err
    assert "exchanging the config and model digests with the other ranks failed" in err


def test_cli_under_torchrun_writes_on_rank_zero_what_one_process_writes(model_dir, tmp_path):
    common = ["quantize", str(model_dir), "--algorithm", "gptq", "--group-size", "16"]
    calib = ["--calib", str(model_dir / "text.txt"), "--calib-samples", "6"]
    calib += ["--calib-seq-len", "16"]
    procs = launch(["-m", "torchquant", *common, *calib, "--out", str(tmp_path / "ranks")])
    results = finish(procs)
    assert all(code == 0 for code, _ in results), results
    assert main([*common, *calib, "--calib-shards", "2", "--out", str(tmp_path / "one")]) == 0
    assert files(tmp_path / "ranks") == files(tmp_path / "one")


def test_owners_pack_the_largest_solves_first_onto_the_least_loaded_rank():
    ranks = RankContext(rank=0, world=2, shards=2)
    assert ranks.owners([1.0, 1.0, 4.0, 1.0, 1.0, 2.0]) == [1, 1, 0, 0, 1, 1]  # -- 5 and 5
    assert RankContext().owners([3.0, 1.0]) == [0, 0]


def test_shards_are_contiguous_and_ranks_take_contiguous_runs():
    assert RankContext(0, 1, 3).shard_bounds(8) == [(0, 2), (2, 5), (5, 8)]
    assert list(RankContext(0, 2, 3).local_shards()) == [0]
    assert list(RankContext(1, 2, 3).local_shards()) == [1, 2]
    with pytest.raises(CalibrationError, match="cannot be split into 3 shard"):
        RankContext(0, 1, 3).shard_bounds(2)


def test_fewer_shards_than_ranks_are_refused():
    with pytest.raises(ConfigError, match="calibration_shards=0"):
        RankContext.current(0)


def test_llama_awq_searches_form_one_wave():
    layout = find_layout(tiny_llama())
    mappings = [m for m in layout.balance]
    assert [len(w) for w in independent_waves(mappings)] == [len(mappings)]


def test_kl_observer_is_refused_with_several_shards():
    static = CASES["static"]
    kl = QuantScheme(
        static.weight,
        static.activation.__class__(granularity="tensor", dynamic=False, observer="kl"),
        "rtn",
    )
    with pytest.raises(CalibrationError, match="'kl' observer's histograms cannot be merged"):
        convert_model(
            model(),
            QuantConfig(kl),
            calibration_data=tokens(),
            progress=False,
            calibration_shards=2,
        )


def test_owners_count_a_shared_factor_once_per_rank():
    """Three linears of one Hessian (its factor costs 4) and one large solve: the rank that
    factors the Hessian takes all three (loads 7 and 5.5); counting the factor for each
    would send the third to the other rank (10.5 vs 7)."""
    ranks = RankContext(rank=0, world=2, shards=2)
    shared = [("qkv", 4.0)] * 3 + [("down", 0.0)]
    assert ranks.owners([1.0, 1.0, 1.0, 5.5], shared) == [1, 1, 1, 0]


def shard_stats(seed: int) -> dict[str, LayerStats]:
    """q and k fed one input (one Hessian), o another, as a shard's statistics pass keeps them."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    stats = {rel: LayerStats(rel, want_hessian=True) for rel in ("q", "k", "o")}
    stats["q"].update(x)
    stats["k"].update(x, same_input=stats["q"])
    stats["o"].update(y)
    return stats


def test_hessians_reach_only_the_linears_asked_for_and_merge_as_in_one_process():
    shards = [shard_stats(0), shard_stats(1)]
    whole = {rel: LayerStats(rel, want_hessian=True) for rel in ("q", "k", "o")}
    merge_shards(whole, shards)
    split = [split_hessians(shard) for shard in shards]
    assert all(st.hessian is None for light, _, _ in split for st in light.values())
    assert [sorted(tensors) for _, _, tensors in split] == [["o", "q"], ["o", "q"]]
    groups = hessian_groups([names for _, names, _ in split])
    assert groups == {"q": "q", "k": "q", "o": "o"}
    for light, names, tensors in split:
        attach_hessians(light, names, tensors, {"q", "k"})
    merged = {rel: LayerStats(rel, want_hessian=True) for rel in ("q", "k", "o")}
    merge_shards(merged, [light for light, _, _ in split], hessians_of={"q", "k"})
    assert torch.equal(merged["q"].hessian, whole["q"].hessian)
    assert merged["k"].hessian is merged["q"].hessian and merged["o"].hessian is None
    assert merged["o"].tokens == whole["o"].tokens == 12
