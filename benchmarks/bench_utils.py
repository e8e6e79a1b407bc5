"""Shared pieces of the benchmarks: arguments, rotation, timing, bandwidth, tables.

Timing is the median of ``triton.testing.do_bench`` (which also flushes the L2 before
every run); on top of that each call takes the next of several copies of its
inputs and weights, so that a quantized weight smaller than the 50 MB L2 of an H100
is never served from cache.  ``--smoke`` runs only the correctness checks on tiny
shapes (CPU with ``TRITON_INTERPRET=1``, or a GPU) and prints the tables with no times.

A method whose output is wrong is not timed: its row says so, the other rows are still
measured and printed, and the script exits non-zero at the end.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from collections.abc import Callable, Iterable, Sequence

import torch

SHAPES = [(4096, 4096), (8192, 8192), (14336, 4096), (4096, 14336)]  # (N, K)
BATCHES = [1, 16, 64, 256, 4096]
SMOKE_SHAPES = [(40, 96)]
SMOKE_BATCHES = [1, 5, 80, 1030]  # every path: gemv, split-K, tiled, cuBLAS
L2_BYTES = 50 * 2**20
ROTATE_BYTES = 4 * L2_BYTES  # rotate through at least this many bytes of operands
MAX_COPIES = 32


def parse_args(description: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, correctness only")
    parser.add_argument("--shapes", default=None, help="N x K list, e.g. 4096x4096,8192x8192")
    parser.add_argument("--batches", default=None, help="M list, e.g. 1,16,64")
    parser.add_argument("--rep", type=int, default=100, help="do_bench repetition time (ms)")
    args = parser.parse_args(argv)
    if args.shapes:
        args.shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    else:
        args.shapes = SMOKE_SHAPES if args.smoke else SHAPES
    if args.batches:
        args.batches = [int(v) for v in args.batches.split(",")]
    else:
        args.batches = SMOKE_BATCHES if args.smoke else BATCHES
    if not args.smoke and not torch.cuda.is_available():
        parser.error("timing needs a CUDA device; use --smoke for the correctness checks")
    args.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return args


def decode_parser(description: str, schemes: Sequence[str], rep: int) -> argparse.ArgumentParser:
    """The options of the decode benchmarks; each script adds its own, then calls
    :func:`parse_decode_args`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--schemes", default=",".join(schemes))
    parser.add_argument("--rep", type=int, default=rep)
    return parser


def parse_decode_args(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None
) -> argparse.Namespace:
    """Parsed options with ``batches`` and ``schemes`` as lists, and the ``device`` and
    ``dtype`` to run in (bf16 on CUDA; float32 on CPU, where only ``--smoke`` runs)."""
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not args.smoke and not cuda:
        parser.error("timing needs a CUDA device; use --smoke")
    args.device = torch.device("cuda" if cuda else "cpu")
    args.dtype = torch.bfloat16 if cuda else torch.float32
    args.batches = [int(b) for b in args.batches.split(",")]
    args.schemes = args.schemes.split(",")
    return args


def copies_for(bytes_per_set: int) -> int:
    """How many copies of an operand set make one rotation cover ``ROTATE_BYTES``."""
    return max(2, min(MAX_COPIES, math.ceil(ROTATE_BYTES / max(bytes_per_set, 1))))


def rotating(first: tuple, bytes_per_set: int, smoke: bool) -> list[tuple]:
    """``first`` plus enough clones of its tensors that one cycle covers ``ROTATE_BYTES``."""
    copies = [first]
    for _ in range(0 if smoke else copies_for(bytes_per_set) - 1):
        copies.append(tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in first))
    return copies


def time_us(fn: Callable[..., object], sets: list[tuple], smoke: bool, rep: int = 100) -> float:
    """Median microseconds of ``fn(*set)``, cycling through ``sets``; NaN when smoke."""
    if smoke:
        return float("nan")
    import triton.testing

    cycle = itertools.cycle(sets)
    return triton.testing.do_bench(lambda: fn(*next(cycle)), rep=rep, return_mode="median") * 1e3


@torch.inference_mode()
def graph_replay_ms(step: Callable[[], torch.Tensor], rep: int) -> tuple[float, torch.Tensor]:
    """Median time (ms) of one CUDA-graph replay of ``step()``, and a replay's output (float).

    Three warm-up calls on a side stream compile and autotune every kernel (and let
    modules build what they cache) outside the capture.
    """
    import triton.testing

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    graph.replay()
    torch.cuda.synchronize()
    replayed = out.float().clone()
    return triton.testing.do_bench(graph.replay, rep=rep, return_mode="median"), replayed


def copy_bandwidth_gbs(smoke: bool) -> float:
    """Measured device-to-device copy bandwidth, (read + write bytes) / time, in GB/s."""
    if smoke:
        return float("nan")
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = time_us(lambda: dst.copy_(src), [()], smoke=False)
    return 2 * src.numel() / (us * 1e-6) / 1e9


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return ((out.double() - ref).norm() / ref.norm().clamp(min=1e-30)).item()


def print_markdown_table(header: str, cell_formats: str, rows: Iterable[Sequence[object]]) -> None:
    """``rows`` under ``header`` (the titles, ``" | "`` between them); ``cell_formats``
    holds one ``str.format`` field per column, separated by spaces (``"{} {:.3f} {:.0f}%"``)."""
    formats = cell_formats.split()
    print(f"| {header} |")
    print("|" + "---|" * len(formats))
    for row in rows:
        cells = " | ".join(f.format(cell) for f, cell in zip(formats, row, strict=True))
        print(f"| {cells} |")


def finish_run(
    failures: Sequence[str], smoke_message: str, smoke: bool, heading: str = "WRONG RESULTS"
) -> None:
    """Exit non-zero listing ``failures`` if there are any; else print ``smoke_message``
    after a smoke run."""
    if failures:
        print(f"\n{heading}:\n" + "\n".join(failures))
        sys.exit(1)
    if smoke:
        print(smoke_message)


class Table:
    """Rows of (shape, M, method, time, speedup vs bf16, vs the named baseline, GB/s, % copy).

    ``baselines`` maps a method to the method it is compared with in the same run (same
    shape and M), e.g. ours end to end -> torch quantization + ``_int_mm``.  GB/s is the
    bytes a method must move (given per row) over its time; "% copy" compares it with
    the measured device copy bandwidth.
    """

    header = "N x K | M | method | us | vs bf16 | vs baseline | GB/s | % copy"

    def __init__(self, title: str, copy_gbs: float, baselines: dict[str, str] | None = None):
        self.title, self.copy_gbs, self.rows = title, copy_gbs, []
        self.baselines = baselines or {}
        self.failures: list[str] = []

    def add(self, shape: str, m: int, method: str, us: float, base_us: float, nbytes: int):
        gbs = nbytes / (us * 1e-6) / 1e9 if us == us else float("nan")
        pct = 100 * gbs / self.copy_gbs if self.copy_gbs == self.copy_gbs else float("nan")
        self.rows.append((shape, m, method, us, base_us / us if us else float("nan"), gbs, pct))

    def check(self, shape: str, m: int, method: str, out, ref, tol: float) -> bool:
        """True if ``out`` is within ``tol`` (relative) of ``ref``; else a failed row."""
        err = relative_error(out, ref)
        if math.isfinite(err) and err <= tol:
            return True
        self.failures.append(f"{shape} M={m} {method}: relative error {err:.3g} > {tol:g}")
        self.rows.append((shape, m, f"{method} WRONG (err {err:.3g}), not timed", *[math.nan] * 4))
        return False

    def unavailable(self, shape: str, m: int, method: str, error: Exception) -> None:
        """A baseline that refuses this shape (e.g. tinygemm needs K % 128 == 0): a note row."""
        reason = str(error).strip().splitlines()[0][:80] if str(error).strip() else ""
        note = f"{method} unavailable ({type(error).__name__}: {reason})"
        self.rows.append((shape, m, note, *[math.nan] * 4))

    def _baseline_ratio(self, shape: str, m: int, method: str, us: float) -> str:
        base = self.baselines.get(method)
        for row in self.rows if base else ():
            if row[:3] == (shape, m, base) and row[3] == row[3]:
                return f"{row[3] / us:.2f}x vs {base}"
        return "-"

    def print(self) -> None:
        print(f"\n## {self.title}")
        print(f"copy bandwidth (measured): {self.copy_gbs:.0f} GB/s; times are do_bench medians")
        rows = [
            (shape, m, method, us, speedup, self._baseline_ratio(shape, m, method, us), gbs, pct)
            for shape, m, method, us, speedup, gbs, pct in self.rows
        ]
        print_markdown_table(self.header, "{} {} {} {:.1f} {:.2f}x {} {:.0f} {:.0f}%", rows)

    def finish(self, smoke_message: str, smoke: bool) -> None:
        """Print the table, then exit non-zero if any method was wrong."""
        self.print()
        finish_run(self.failures, smoke_message, smoke, heading="WRONG RESULTS (not timed)")
