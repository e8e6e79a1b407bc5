"""Data-parallel calibration on ``torch.distributed``: who holds which samples, who solves
which layer, and how results travel between ranks.

Every rank runs the same calibration over its own contiguous slice of the calibration
shards (:mod:`torchquant.calibration.shards`).  Every exchange between ranks goes through
:meth:`RankContext.exchange`, one ``all_gather_object`` carrying each rank's status beside
its payload: a rank that fails announces its error in the exchange the others are
waiting in, so all of them stop with its message instead of hanging, and a rank that
never answers ends the run with the process group's timeout.  Hessians, which only the
ranks solving with them need, follow an exchange through :meth:`RankContext.deliver`
(one ``gather_object`` per destination rank).  With one process (or no
process group) nothing is exchanged.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from torchquant.errors import CalibrationError, ConfigError

T = TypeVar("T")
REPORTED = "(reported to the other ranks)"


class RankFailure(CalibrationError):
    """Another rank failed (its message is this one's), or the exchange with it broke."""


@dataclass(frozen=True)
class _Status:
    """What a rank sends in every exchange: its error (``None`` when well) and payload."""

    error: str | None
    payload: Any


@dataclass(frozen=True)
class RankContext:
    """This process's place in the run: ``rank`` of ``world`` processes, ``shards`` shards."""

    rank: int = 0
    world: int = 1
    shards: int = 1

    @classmethod
    def current(cls, shards: int | None = None) -> RankContext:
        """The context of the initialised default process group (one process without one).

        ``shards`` defaults to the number of ranks; a single process given the same
        count sums the same partial statistics in the same order.
        """
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        rank = dist.get_rank() if world > 1 else 0
        count = world if shards is None else shards
        if not isinstance(count, int) or count < world:
            raise ConfigError(
                f"calibration_shards={shards!r}: expected an int of at least the number of "
                f"ranks ({world})"
            )
        return cls(rank, world, count)

    @property
    def parallel(self) -> bool:
        return self.world > 1

    def shard_bounds(self, n: int) -> list[tuple[int, int]]:
        """Sample ranges ``[start, stop)`` of every shard: ``shards`` contiguous slices of
        ``n`` samples, the same on every rank."""
        if n < self.shards:
            raise CalibrationError(
                f"{n} calibration sample(s) cannot be split into {self.shards} shard(s); give "
                f"at least {self.shards} samples"
            )
        return [(s * n // self.shards, (s + 1) * n // self.shards) for s in range(self.shards)]

    def local_shards(self) -> range:
        """The shards this rank calibrates on: a contiguous run, in shard order."""
        return range(
            self.rank * self.shards // self.world, (self.rank + 1) * self.shards // self.world
        )

    def exchange(self, payload: Any, what: str, device: torch.device | None = None) -> list[Any]:
        """Every rank's ``payload``, in rank order; raises if any rank reported an error.

        Payloads travel as ``torch.save`` bytes, their tensors loaded onto ``device``
        (each NCCL rank's own GPU) or, without one, where they were on the sender.
        """
        if not self.parallel:
            return [payload]
        every = self._gather(_Status(None, _to_bytes(payload)), what)
        return [_from_bytes(data, device) for data in every]

    def deliver(
        self, payloads: Sequence[Any], what: str, device: torch.device | None = None
    ) -> list[Any]:
        """``payloads[r]`` to rank ``r`` alone; returns what every rank sent this one, in
        rank order.  One gather per destination rank: called right after an
        :meth:`exchange` (every rank was well there), so a rank that fails in between
        leaves the others to the process group's timeout."""
        if not self.parallel:
            return [payloads[0]]
        received: list[Any] = []
        for dst in range(self.world):
            gathered: list[Any] | None = [None] * self.world if dst == self.rank else None
            try:
                dist.gather_object(_to_bytes(payloads[dst]), gathered, dst=dst)
            except (RuntimeError, dist.DistBackendError) as exc:
                raise RankFailure(
                    f"rank {self.rank}: sending {what} to rank {dst} failed (a rank exited or "
                    f"timed out): {exc}"
                ) from exc
            if gathered is not None:
                received = [_from_bytes(data, device) for data in gathered]
        return received

    def announce_failure(self, exc: BaseException) -> None:
        """Tell the other ranks, waiting in their next exchange, that this rank failed
        (once per error: the exception keeps a note that it was reported)."""
        notes = getattr(exc, "__notes__", [])
        if not self.parallel or isinstance(exc, RankFailure) or REPORTED in notes:
            return
        exc.add_note(REPORTED)
        try:
            self._gather(_Status(f"{type(exc).__name__}: {exc}", None), "the failure report")
        except CalibrationError:
            pass  # -- the others failed as well, or left: this rank's own error is raised

    def _gather(self, status: _Status, what: str) -> list[Any]:
        statuses: list[_Status | None] = [None] * self.world
        try:
            dist.all_gather_object(statuses, status)
        except (RuntimeError, dist.DistBackendError) as exc:
            raise RankFailure(
                f"rank {self.rank}: exchanging {what} with the other ranks failed (a rank "
                f"exited or timed out): {exc}"
            ) from exc
        failed = [(r, s.error) for r, s in enumerate(statuses) if s.error is not None]
        if failed and status.error is None:
            rank, error = failed[0]
            raise RankFailure(f"calibration failed on rank {rank}: {error}")
        return [s.payload for s in statuses]

    def owners(
        self, costs: Sequence[float], shared: Sequence[tuple[str, float]] | None = None
    ) -> list[int]:
        """A rank for each task of ``costs``: greedy bin-packing, largest task first onto the
        rank it leaves least loaded (ties: the earlier task, the lower rank), the same on
        every rank.

        ``shared`` gives each task a ``(key, cost)`` of work that tasks with the same key
        need once per rank (GPTQ's factor of a Hessian that q/k/v share): a rank that
        already does it for another task takes the task for its own cost alone.
        """
        shared = shared if shared is not None else [("", 0.0)] * len(costs)
        load = [0.0] * self.world
        held: list[set[str]] = [set() for _ in range(self.world)]
        owner = [0] * len(costs)

        def added(task: int, rank: int) -> float:
            key, once = shared[task]
            return costs[task] + (0.0 if key in held[rank] else once)

        for task in sorted(range(len(costs)), key=lambda t: (-costs[t] - shared[t][1], t)):
            rank = min(range(self.world), key=lambda r: (load[r] + added(task, r), r))
            owner[task] = rank
            load[rank] += added(task, rank)
            held[rank].add(shared[task][0])
        return owner

    def solve_spread(
        self,
        tasks: Sequence[T],
        costs: Sequence[float],
        solve: Callable[[T], Any],
        what: str,
        device: torch.device,
        shared: Sequence[tuple[str, float]] | None = None,
        owner: Sequence[int] | None = None,
    ) -> list[Any]:
        """``solve(task)`` for every task, each on its ``owner`` rank (default:
        ``owners(costs, shared)``), the results on every rank (on ``device``)."""
        if not self.parallel:
            return [solve(t) for t in tasks]
        owner = self.owners(costs, shared) if owner is None else owner
        mine = {i: solve(t) for i, t in enumerate(tasks) if owner[i] == self.rank}
        results: dict[int, Any] = {}
        for solved in self.exchange(mine, what, device):
            results.update(solved)
        return [results[i] for i in range(len(tasks))]

    def check_same(self, model: nn.Module, config: Any, tokens: torch.Tensor) -> None:
        """Refuse ranks that disagree on the config, the model's structure or the samples."""
        if not self.parallel:
            return
        mine = {
            "config": _digest(repr(config)),
            "model structure": _digest("\n".join(structure(model))),
            "calibration samples": _digest_tensor(tokens),
            "calibration shards": str(self.shards),
        }
        views = self.exchange(mine, "the config and model digests")
        for field in mine:
            values = [v[field] for v in views]
            if len(set(values)) > 1:
                others = [r for r, v in enumerate(values) if v != values[0]]
                raise ConfigError(
                    f"ranks disagree on the {field}: rank {others[0]} does not match rank 0 "
                    f"({field} digest {values[others[0]][:12]} vs {values[0][:12]}); every rank "
                    "must load the same model and pass the same config and calibration data"
                )

    def barrier_after(self, write: Callable[[], None], what: str) -> None:
        """Run ``write`` on rank 0 only, after every rank reached this point well; the other
        ranks wait for it and raise if it failed, so no rank reports success alone."""
        self.exchange(None, f"readiness before {what}")
        if self.rank == 0:
            try:
                write()
            except Exception as exc:
                self.announce_failure(exc)
                raise
        self.exchange(None, f"the end of {what}")


def structure(model: nn.Module) -> list[str]:
    """One line per parameter and buffer: name, shape, dtype (what ranks must agree on)."""
    named = [*model.named_parameters(), *model.named_buffers()]
    return [f"{name} {tuple(t.shape)} {t.dtype}" for name, t in named]


# -- whether init_from_environment started a process group in this process
_RAN_A_GROUP = False


def exit_code_after_run(code: int) -> int:
    """``code``, or, when this process has run a process group (a failed run even leaves it
    up: destroying it may wait on a silent rank), the end of this process with ``code`` at
    once: at the interpreter's normal exit gloo's threads may call ``std::terminate``,
    which would turn the run's exit code into SIGABRT."""
    if dist.is_available() and (dist.is_initialized() or _RAN_A_GROUP):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def init_from_environment(timeout_s: float) -> RankContext | None:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1 in the environment):
    NCCL when CUDA is available, else gloo.  ``None`` when not launched by torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return None
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    global _RAN_A_GROUP
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    _RAN_A_GROUP = True
    return RankContext.current()


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _digest_tensor(t: torch.Tensor) -> str:
    data = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{tuple(data.shape)} {data.dtype} ".encode())
    h.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return h.hexdigest()


def _to_bytes(value: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _from_bytes(data: bytes, device: torch.device | None) -> Any:
    return torch.load(io.BytesIO(data), map_location=device, weights_only=False)
