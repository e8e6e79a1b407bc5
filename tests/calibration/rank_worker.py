"""One rank of a distributed calibration test: ``python rank_worker.py SCENARIO OUT``.

The rank and the rendezvous come from torchrun's environment variables (``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``); ``TIMEOUT_S`` bounds every exchange.
A failure prints ``FAILED <type>: <message>`` on stderr and exits with 3.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from distributed_cases import CASES, calibrate

from torchquant.calibration.distributed import RankContext
from torchquant.calibration.steps import GptqStep
from torchquant.serialization import save_quantized


def write_cases(out: Path, rank: int) -> None:
    """Every case; rank 0 writes each checkpoint and names itself beside it."""
    ranks = RankContext.current()
    for case in CASES:
        model = calibrate(case)

        def write(case=case, model=model):
            save_quantized(model, out / case)
            (out / f"{case}.writer").write_text(str(rank))

        ranks.barrier_after(write, f"writing {case}")


def mismatched_config(out: Path, rank: int) -> None:
    scheme = CASES["gptq"]
    if rank == 1:
        scheme = dataclasses.replace(scheme, weight=dataclasses.replace(scheme.weight, bits=3))
    calibrate("gptq", scheme=scheme)


def failing_rank(out: Path, rank: int) -> None:
    """Rank 1 raises in the GPTQ step of the second block; rank 0 would write after it."""
    if rank == 1:
        apply = GptqStep.apply

        def fail_in_second_block(self):
            if self.block.prefix.endswith(".1"):
                raise ValueError("rank 1 cannot solve its block")
            apply(self)

        GptqStep.apply = fail_in_second_block
    model = calibrate("gptq")
    RankContext.current().barrier_after(lambda: save_quantized(model, out / "gptq"), "writing")


def silent_rank(out: Path, rank: int) -> None:
    """Rank 1 never joins the first exchange (it sleeps); rank 0 times out."""
    if rank == 1:
        time.sleep(600)  # -- the test kills it once rank 0 has given up
    calibrate("gptq")


SCENARIOS = {
    "cases": write_cases,
    "mismatch": mismatched_config,
    "fail": failing_rank,
    "silent": silent_rank,
}


def main() -> int:
    scenario, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    timeout = timedelta(seconds=float(os.environ.get("TIMEOUT_S", "60")))
    dist.init_process_group("gloo", timeout=timeout)
    try:
        SCENARIOS[scenario](out, dist.get_rank())
    except Exception as exc:
        # -- no destroy_process_group: it may wait on a rank that stopped answering
        print(f"FAILED {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 3
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    # -- leave at once: once gloo has run, its threads may call std::terminate at the
    # -- interpreter's normal exit and turn the exit code into SIGABRT
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
