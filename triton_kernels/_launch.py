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

# Triton decides at decoration time whether a kernel is compiled or interpreted, so
# the mode is read once, when this package (and with it every kernel) is imported.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


# -- what the kernels were built for, never overridden (the compile-only cost model sets
# -- ``_INTERPRET`` so that launchers accept CPU tensors while kernels compile for a GPU)
BUILT_FOR_INTERPRETER = _INTERPRET


def interpreting() -> bool:
    """True when the kernels were built for Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return _INTERPRET


def output(
    out: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """``out`` checked against ``shape``/``dtype`` (callers may pass a preallocated buffer)."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous {dtype} tensor of shape {tuple(shape)}, "
            f"got {out.dtype} {tuple(out.shape)}"
        )
    return out


FP8_MIN_CAPABILITY = (8, 9)


class FP8Unsupported(RuntimeError):
    """The GPU has no FP8 E4M3 support in Triton (compute capability below 8.9)."""


def fp8_supported(device: torch.device | str | None = None) -> bool:
    """True where FP8 kernels can run: sm_89+ GPUs (Ada, Hopper, ...) or the CPU interpreter."""
    if interpreting():
        return True
    if not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= FP8_MIN_CAPABILITY


def check_fp8_support(device: torch.device | str | None = None) -> None:
    """Raise :class:`FP8Unsupported` naming the capability found, before Triton fails to compile."""
    if not fp8_supported(device):
        cap = torch.cuda.get_device_capability(device) if torch.cuda.is_available() else None
        raise FP8Unsupported(
            f"FP8 E4M3 kernels need a GPU with compute capability >= 8.9 (Ada/Hopper), got {cap}; "
            "use an INT8 or weight-only scheme, or the reference implementation"
        )


def m_bucket(m: int) -> int:
    """Autotune key for the token count: the next power of two, capped at 8192."""
    return min(triton.next_power_of_2(max(int(m), 1)), 8192)


def output_args(out: torch.Tensor, bias: torch.Tensor | None, m: int, n: int, k: int) -> dict:
    """Kernel arguments naming the ``(m, n)`` output, the bias and the problem size.

    Without a bias ``b_ptr`` points at the output (never read); ``M_BUCKET`` keys the
    autotuners' caches.
    """
    return dict(
        b_ptr=bias if bias is not None else out,
        out_ptr=out,
        M=m,
        N=n,
        K=k,
        stride_om=out.stride(0),
        M_BUCKET=m_bucket(m),
        HAS_BIAS=bias is not None,
    )


def autotune_benchmark(fn: Callable[[], object], quantiles=None, **kwargs: Any):
    """The autotuners' timer: ``triton.testing.do_bench``, refused during CUDA-graph capture.

    Timing synchronises the device, which would invalidate a capture with an opaque CUDA
    error; a layer seen for the first time inside a capture gets this message instead.
    """
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "a Triton kernel met a new shape while a CUDA graph was being captured, and "
            "autotuning cannot run inside a capture: run the model once with the same "
            "shapes before capturing (warm-up tunes and caches every kernel)"
        )
    import triton.testing

    return triton.testing.do_bench(fn, quantiles=quantiles, **kwargs)


def autotuned(
    kernel: Any,
    configs: list[triton.Config],
    key: list[str],
    prune: Callable[..., list[triton.Config]] | None = None,
    reset_to_zero: list[str] | None = None,
) -> Any:
    """``kernel`` autotuned over ``configs`` as every launcher here tunes: keyed on ``key``,
    ``prune`` dropping configs before timing, choices cached on disk, timed by
    :func:`autotune_benchmark`."""
    return triton.autotune(
        configs,
        key=key,
        prune_configs_by={"early_config_prune": prune} if prune is not None else None,
        reset_to_zero=reset_to_zero,
        cache_results=True,
        do_bench=autotune_benchmark,
    )(kernel)


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
