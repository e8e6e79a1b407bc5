"""Argument types for the command line: a bad value is a usage error (exit 2), said in one line.

Each function is an argparse ``type=``: it returns the parsed value or raises
``argparse.ArgumentTypeError``, which argparse prints after the option's name.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable

from torchquant.checkpoint.folder import parse_size
from torchquant.errors import CheckpointError


def int_at_least(low: int) -> Callable[[str], int]:
    """A checker for integers ``>= low`` (``low=1``: a positive count)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            wanted = "a positive integer" if low == 1 else f"an integer >= {low}"
            raise argparse.ArgumentTypeError(f"{value} is not allowed; expected {wanted}")
        return value

    parse.__name__ = "int"  # argparse names the type in its "invalid int value" fallback
    return parse


positive_int = int_at_least(1)


def group_size(text: str) -> int:
    """Weights per quantization group: a positive integer, or -1 for one group per channel."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value != -1 and value < 1:
        raise argparse.ArgumentTypeError(
            f"{value} is not allowed; expected a positive integer, or -1 for per channel"
        )
    return value


def fraction(text: str) -> float:
    """A number in [0, 1] (a strength such as SmoothQuant's alpha)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} is not allowed; expected a number in [0, 1]")
    return value


def device_name(text: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N``; whether that CUDA device exists is checked at run time."""
    if re.fullmatch(r"cpu|cuda(:\d+)?", text):
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is not allowed; expected cpu, cuda or cuda:N")


def shard_size(text: str) -> int:
    """Shard size limit in bytes: plain bytes (``20000``) or with a unit (``2GB``, ``500MiB``)."""
    stripped = text.strip()
    try:
        value = int(stripped) if stripped.isdigit() else parse_size(stripped)
    except CheckpointError:
        value = None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not allowed; expected a positive size in bytes (e.g. 20000) or "
            "with a unit (e.g. 2GB, 500MiB)"
        )
    return value
