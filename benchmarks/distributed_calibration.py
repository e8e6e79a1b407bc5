"""GPTQ calibration on 2 gloo ranks x 1 thread against 1 process x 1 thread.

    nice python benchmarks/distributed_calibration.py \\
        --calib ../shared/data/text/wikipedia_excerpt.txt \\
        --text ../shared/data/text/austen/prideprejudice.txt

Each row runs in fresh processes: the model is loaded, ``convert_model`` calibrates it
(timed: the calibration seconds), rank 0 saves the checkpoint and scores perplexity on
the first ``--max-tokens`` tokens of ``--text``.  The single process is given the
2-rank run's shard count, so its checkpoint must equal the 2-rank one bit for bit;
``--one-shard`` adds a row for the single process's default (one shard), whose Hessians
are summed in another order.  Prints one table and the load averages.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from calibration_setup import add_run_args, load_average, load_run
from safetensors import safe_open

from torchquant import QuantConfig, convert_model
from torchquant.calibration.distributed import RankContext
from torchquant.config import QuantScheme, WeightQuant
from torchquant.evaluation import perplexity
from torchquant.serialization import save_quantized

RANKS = 2


def run_rank(args: argparse.Namespace) -> None:
    """One rank (or the single process): calibrate, save on rank 0, score, report JSON."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo", timeout=timedelta(seconds=args.timeout))
    model, _, ids, calib = load_run(args)
    weight = WeightQuant(bits=args.bits, group_size=args.group_size, symmetric=False)
    config = QuantConfig(default=QuantScheme(weight, None, "gptq"))
    ranks = RankContext.current(args.shards)
    ranks.exchange(None, "the start")  # -- every rank loaded: time calibration alone
    start = time.perf_counter()
    model, _ = convert_model(
        model, config, calibration_data=calib, progress=False, calibration_shards=args.shards
    )
    seconds = time.perf_counter() - start
    ranks.barrier_after(lambda: save_quantized(model, args.save), f"writing {args.save}")
    if ranks.rank == 0:
        result = perplexity(model, ids, args.seq_len, progress=False)
        report = {"seconds": seconds, "perplexity": result.perplexity, "load": load_average()}
        Path(args.report).write_text(json.dumps(report))
    if ranks.parallel:
        dist.destroy_process_group()


def launch(args: argparse.Namespace, ranks: int, shards: int, name: str) -> dict:
    """Run ``ranks`` processes of this script (torchrun's environment variables)."""
    out = Path(args.out)
    report = out / f"{name}.json"
    command = [sys.executable, __file__, "--rank-process", *sys.argv[1:]]
    command += ["--shards", str(shards), "--save", str(out / name), "--report", str(report)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(ranks):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        if ranks > 1:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(ranks))
            env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen(command, env=env))
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"{name}: rank exit codes {codes}")
    return json.loads(report.read_text())


def checkpoint_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    return tensors


def same_tensors(a: Path, b: Path) -> bool:
    ta, tb = checkpoint_tensors(a), checkpoint_tensors(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_args(parser, calib_samples=16, group_size=64)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--out", default="distributed-calibration")
    parser.add_argument("--one-shard", action="store_true", help="add the 1-shard single row")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per exchange")
    parser.add_argument("--rank-process", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shards", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--save", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--report", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.threads = 1
    if args.rank_process:
        run_rank(args)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [
        ("1 rank x 1 thread", 1, RANKS, "one-rank"),
        (f"{RANKS} ranks x 1 thread", RANKS, RANKS, "two-ranks"),
    ]
    if args.one_shard:
        rows.append(("1 rank x 1 thread, 1 shard", 1, 1, "one-shard"))
    print(
        f"GPTQ w{args.bits} g{args.group_size}, {args.calib_samples} x {args.calib_seq_len} "
        f"calibration tokens, perplexity on {args.max_tokens} tokens in {args.seq_len}-token "
        f"windows; 'same tensors' compares with the first row's checkpoint"
    )
    print(
        f"{'run':<30}{'shards':>7}{'calib s':>9}{'speed-up':>10}{'perplexity':>12}  "
        f"{'same tensors':<14}load average (1/5/15 min)"
    )
    base = None
    for title, ranks, shards, name in rows:
        r = launch(args, ranks, shards, name)
        base = base or r["seconds"]
        same = str(same_tensors(out / "one-rank", out / name)) if name != "one-rank" else "-"
        print(
            f"{title:<30}{shards:>7}{r['seconds']:>9.1f}{base / r['seconds']:>9.2f}x"
            f"{r['perplexity']:>12.3f}  {same:<14}{r['load']}",
            flush=True,
        )
    print(f"load average after the runs: {load_average()}")


if __name__ == "__main__":
    main()
