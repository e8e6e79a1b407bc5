"""What every quantized-linear op shares: row flattening, fake outputs, CUDA registration.

The ops take ``x (..., K)`` and compute on its rows ``(M, K)``; the fake (meta)
implementation only states the output shape, so ``torch.compile`` traces every op.
The Triton kernels are registered as an op's CUDA implementation only where Triton
is installed; elsewhere the reference runs on every device but the CPU.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable

import torch

HAS_TRITON_KERNELS = importlib.util.find_spec("triton") is not None


def rows(x: torch.Tensor) -> torch.Tensor:
    """``x (..., K)`` as ``(M, K)``."""
    return x.reshape(-1, x.shape[-1])


def unflatten(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``out (M, N)`` back to ``(..., N)`` with ``x``'s leading dimensions."""
    return out.reshape(*x.shape[:-1], out.shape[-1])


def fake_linear(x: torch.Tensor, qweight: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return x.new_empty([*x.shape[:-1], qweight.shape[0]])


def add_bias(out: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return out if bias is None else out + bias.to(out.dtype)


def register_cuda(op: str, impl: Callable) -> None:
    """Make ``impl`` (which runs the Triton kernels) the CUDA implementation of ``op``."""
    if HAS_TRITON_KERNELS:
        torch.library.register_kernel(op, "cuda", impl)


def warn_fallback(what: str, why: str) -> None:
    warnings.warn(f"{what}: {why}; using the reference PyTorch implementation", stacklevel=3)
