"""Shared pieces of the kernel benchmarks: arguments, rotation, timing, bandwidth, tables.

Timing is the median of ``triton.testing.do_bench`` (which also flushes the L2 before
every run); on top of that each call takes the next of several copies of its
inputs and weights, so that a quantized weight smaller than the 50 MB L2 of an H100
is never served from cache.  ``--smoke`` runs only the correctness checks on tiny
shapes (CPU with ``TRITON_INTERPRET=1``, or a GPU) and prints the tables with no times.
"""

from __future__ import annotations

import argparse
import itertools
import math
from collections.abc import Callable, Sequence

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


def check(what: str, out: torch.Tensor, ref: torch.Tensor, tol: float) -> float:
    """Refuse to time a kernel whose output is wrong."""
    err = relative_error(out, ref)
    if not math.isfinite(err) or err > tol:
        raise SystemExit(f"{what}: relative error {err:.3g} exceeds {tol:g}; not timing it")
    return err


class Table:
    """Rows of (shape, M, method, time, speedup vs bf16, GB/s, % of copy bandwidth)."""

    header = ("N x K", "M", "method", "us", "vs bf16", "GB/s", "% copy")

    def __init__(self, title: str, copy_gbs: float) -> None:
        self.title, self.copy_gbs, self.rows = title, copy_gbs, []

    def add(self, shape: str, m: int, method: str, us: float, base_us: float, nbytes: int):
        gbs = nbytes / (us * 1e-6) / 1e9 if us == us else float("nan")
        pct = 100 * gbs / self.copy_gbs if self.copy_gbs == self.copy_gbs else float("nan")
        self.rows.append((shape, m, method, us, base_us / us if us else float("nan"), gbs, pct))

    def print(self) -> None:
        print(f"\n## {self.title}")
        print(f"copy bandwidth (measured): {self.copy_gbs:.0f} GB/s; times are do_bench medians")
        print("| " + " | ".join(self.header) + " |")
        print("|" + "---|" * len(self.header))
        for shape, m, method, us, speedup, gbs, pct in self.rows:
            print(
                f"| {shape} | {m} | {method} | {us:.1f} | {speedup:.2f}x | {gbs:.0f} | {pct:.0f}% |"
            )
