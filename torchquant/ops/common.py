"""What every quantized-linear op shares: row flattening, fake outputs, kernel registration.

The ops take ``x (..., K)`` and compute on its rows ``(M, K)``; the fake (meta)
implementation only states the output shape, so ``torch.compile`` traces every op.
The Triton kernels are registered as an op's CUDA implementation only where Triton
is installed; elsewhere the reference runs on every device but the CPU.

Layers call their op through :func:`run`, or :func:`bind` it to their buffers once: an
eager call on plain CPU tensors goes straight to the function registered as the op's
CPU kernel.  The dispatcher would give the same result but costs 10-25 us a call, more
than PyTorch's int4pack kernel takes for a decode step of a 576 x 1536 layer.
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from collections.abc import Callable

import torch

HAS_TRITON_KERNELS = importlib.util.find_spec("triton") is not None


def rows(x: torch.Tensor) -> torch.Tensor:
    """``x (..., K)`` as ``(M, K)``."""
    return x.reshape(-1, x.shape[-1])


def unflatten(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``out (M, N)`` back to ``(..., N)`` with ``x``'s leading dimensions."""
    return out if x.dim() == 2 else out.reshape(*x.shape[:-1], out.shape[-1])


def fake_linear(x: torch.Tensor, qweight: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return x.new_empty([*x.shape[:-1], qweight.shape[0]])


def add_bias(out: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if bias is None:
        return out
    return out + (bias if bias.dtype == out.dtype else bias.to(out.dtype))


def add_bias_(out: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``add_bias`` into ``out`` itself, which must be the op's own fresh result."""
    if bias is None or out.requires_grad:
        return add_bias(out, bias)
    return out.add_(bias.to(out.dtype))


# -- up to this many outputs one mixed-dtype addition widens and adds the bias fastest
MIXED_ADD_ELEMENTS = 1 << 16


def finish(out: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """The rows ``out (M, N)`` as the op's result: ``x``'s dtype and leading dimensions, plus
    ``bias`` (no-op conversions skipped: a decode step calls this ~200 times).  A narrower
    ``out`` (bf16 for float32 ``x``) of few rows is widened by the addition itself: the same
    values in one pass instead of two; a larger one is widened first (mixed-dtype addition
    took 1.8 ms for 1024 x 576 on CPU, widening and adding in place 0.09 ms).  One of
    ``x``'s dtype takes the bias in place (``out`` is always the op's own fresh result)."""
    if out.dtype != x.dtype:
        widens = bias is not None and bias.dtype == x.dtype and out.numel() <= MIXED_ADD_ELEMENTS
        if widens and torch.promote_types(out.dtype, x.dtype) == x.dtype:
            return unflatten(torch.add(out, bias), x)
        out = out.to(x.dtype)
    return unflatten(add_bias_(out, bias), x)


def recompute_overflowed_rows(
    out: torch.Tensor, x2: torch.Tensor, exact: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """``out (M, N)`` with each row that is not finite although its input row in ``x2`` is
    recomputed by ``exact`` (the op's reference on those rows): a fast path that applies a
    scale after its product can overflow where the exact maths does not."""
    # -- one pass: a finite sum means every element is finite
    if math.isfinite(out.sum().item()):
        return out
    redo = ~out.isfinite().all(dim=-1) & x2.isfinite().all(dim=-1)
    if bool(redo.any()):
        out[redo] = exact(x2[redo]).to(out.dtype)
    return out


_CPU_KERNELS: dict[object, Callable] = {}


def register_cpu(op: object, impl: Callable) -> None:
    """Make ``impl`` the CPU implementation of the custom op ``op`` (for :func:`run` too)."""
    op.register_kernel("cpu")(impl)
    _CPU_KERNELS[op] = impl


def _skips_dispatcher(x: torch.Tensor) -> bool:
    """A plain CPU tensor outside ``torch.compile`` can call the CPU kernel directly."""
    return type(x) is torch.Tensor and x.is_cpu and not torch.compiler.is_compiling()


def run(op: object, x: torch.Tensor, *args: object) -> torch.Tensor:
    """``op(x, *args)``; outside ``torch.compile``, a plain CPU ``x`` skips the dispatcher."""
    if _skips_dispatcher(x):
        return _CPU_KERNELS[op](x, *args)
    return op(x, *args)


def bind(
    op: object, *args: object, on_cpu: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> run(op, x, *args)`` with the CPU kernel looked up once; ``on_cpu(x)``, when
    given, replaces that kernel (a layer's cached layout the op's schema cannot carry)."""
    cpu_kernel = _CPU_KERNELS[op]
    if on_cpu is None:

        def on_cpu(x: torch.Tensor) -> torch.Tensor:
            return cpu_kernel(x, *args)

    def call(x: torch.Tensor) -> torch.Tensor:
        if _skips_dispatcher(x):
            return on_cpu(x)
        return op(x, *args)

    return call


def register_cuda(op: str, impl: Callable) -> None:
    """Make ``impl`` (which runs the Triton kernels) the CUDA implementation of ``op``."""
    if HAS_TRITON_KERNELS:
        torch.library.register_kernel(op, "cuda", impl)


# -- the fields of cpu_kernels.CpuLayout, as the last arguments of an op's schema
CPU_LAYOUT_ARGUMENTS = (
    "Tensor? packed=None, Tensor? packed_scales=None, Tensor? packed_columns=None"
)


def define_layout_op(
    name: str,
    arguments: str,
    reference: Callable,
    on_cpu: Callable,
    on_cuda: Callable | None,
    doc: str,
) -> object:
    """The op ``torchquant::{name}({arguments}, packed*) -> Tensor`` of a family with a CPU layout.

    ``packed*`` are the layer's cached ``cpu_kernels.CpuLayout`` (or None), which only
    ``on_cpu`` reads; each implementation takes the op's arguments, the layout last.  With
    no ``on_cuda`` the reference runs on CUDA tensors too.
    """
    schema = f"({arguments}, {CPU_LAYOUT_ARGUMENTS}) -> Tensor"
    op = torch.library.custom_op(f"torchquant::{name}", reference, mutates_args=(), schema=schema)
    op.__doc__ = doc
    register_cpu(op, on_cpu)
    op.register_fake(fake_linear)
    if on_cuda is not None:
        register_cuda(f"torchquant::{name}", on_cuda)
    return op


def warn_fallback(what: str, why: str) -> None:
    warnings.warn(f"{what}: {why}; using the reference PyTorch implementation", stacklevel=3)
