"""Launch helpers shared by the kernel families: interpreter detection, M buckets, configs.

Autotuned kernels are keyed on ``M_BUCKET`` (a power of two >= M) rather than on
``M`` itself, so that each decode size 1, 2, 4, 8, 16 and each prefill size class
gets its own tuned config without re-tuning for every distinct token count.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
import triton


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def m_bucket(m: int) -> int:
    """Autotune key for the token count: the next power of two, capped at 8192."""
    return min(triton.next_power_of_2(max(int(m), 1)), 8192)


def check_device(*tensors: torch.Tensor) -> None:
    """Kernels run on CUDA tensors, or on CPU tensors under the interpreter."""
    for t in tensors:
        if t is None:
            continue
        if t.device.type != "cuda" and not interpreting():
            raise ValueError(
                f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 on CPU); got {t.device}"
            )


def run_kernel(
    kernel: Any,
    grid: Callable[[dict], tuple[int, ...]],
    config: triton.Config | None,
    **args: Any,
) -> None:
    """Launch an autotuned ``kernel``, or one explicit ``config`` of it.

    Under the interpreter nothing can be timed, so the first config of the
    autotuner's list runs unless ``config`` names another (tests use this to cover
    several block shapes and split-K factors).
    """
    if config is None and not interpreting():
        kernel[grid](**args)
        return
    config = config or kernel.configs[0]
    meta = config.all_kwargs()
    if interpreting():
        meta = dict(config.kwargs)
    if config.pre_hook is not None:
        config.pre_hook({**args, **meta})
    kernel.fn[grid({**args, **meta})](**args, **meta)
