"""Shared helpers for the kernel tests: where kernels run, poisoned outputs, tolerances,
and the ops' exact references (the one oracle every kernel is held to) on kernel inputs.

Kernels run compiled on CUDA, or through Triton's interpreter on CPU tensors when
``TRITON_INTERPRET=1`` was set before the kernels were imported.
"""

from __future__ import annotations

import pytest
import torch
import triton
from torch.utils._python_dispatch import TorchDispatchMode
from torchquant.triton_kernels._launch import interpreting

from torchquant import ops
from torchquant.numerics import pack_codes, quantize_activation, quantize_int_weight

ON_GPU = torch.cuda.is_available() and not interpreting()
KERNEL_DEVICE = torch.device("cuda" if ON_GPU else "cpu")

requires_kernels = pytest.mark.skipif(
    not (ON_GPU or interpreting()),
    reason="Triton kernels need a CUDA device, or TRITON_INTERPRET=1 set before torchquant "
    "is imported (the CI command sets it)",
)

# Triton 3.9's interpreter implements tl.dot on bfloat16 as np.matmul over the raw
# uint16 storage (runtime/interpreter.py, create_dot), which yields garbage, so the
# bf16 tensor-core paths are checked compiled on the GPU; fp16 and fp32 run the same
# dequantization code under the interpreter.
BF16_DOT_SKIP = pytest.mark.skipif(
    interpreting(),
    reason="Triton 3.9 interpreter: tl.dot on bfloat16 multiplies the raw uint16 storage "
    "(np.matmul in interpreter.create_dot); bf16 tensor-core paths run in the gpu tests",
)

# Tolerances per output dtype.  Under the interpreter a float32 -> bfloat16 cast
# truncates instead of rounding to nearest (interpreter._convert_float), so bf16
# outputs may sit one bf16 ulp (2**-8 relative) from a correctly rounded value.
TOLERANCES = {
    torch.float32: (2e-5, 1e-5),
    torch.float16: (2e-3, 1e-3),
    torch.bfloat16: (1.6e-2, 8e-3),
}


def poisoned(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An output buffer every element of which a kernel must overwrite: NaN or random ints."""
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), device=KERNEL_DEVICE).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, device=KERNEL_DEVICE).to(dtype)


def assert_matches(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """Per-dtype ``assert_close``; the absolute part scales with the reference's magnitude."""
    dtype = dtype or out.dtype
    rtol, atol = TOLERANCES[dtype]
    assert torch.isfinite(out.float()).all(), "output has NaN/Inf (an element was not written?)"
    scale = ref.float().abs().max().clamp(min=1.0).item()
    torch.testing.assert_close(out.float().cpu(), ref.float().cpu(), rtol=rtol, atol=atol * scale)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double().cpu()
    return ((out.double().cpu() - ref).norm() / ref.norm()).item()


def int_weight(
    n: int, k: int, bits: int, group_size: int, symmetric: bool, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Random weight quantized by the reference: ``(qweight, scales, zeros, codes)``.

    8-bit symmetric weights are stored as int8 ``(N, K)``; everything else packed.
    """
    w = torch.randn(n, k) * torch.rand(n, 1) + 0.1 * torch.randn(1, k)
    iw = quantize_int_weight(w, bits, group_size, symmetric, scale_dtype)
    if bits == 8 and symmetric:
        qweight = (iw.codes.to(torch.int16) - 128).to(torch.int8)
    else:
        qweight = pack_codes(iw.codes, bits)
    to = KERNEL_DEVICE
    zeros = iw.zeros.to(to) if iw.zeros is not None else None
    return qweight.to(to), iw.scales.to(to), zeros, iw.codes.to(to)


def cfg(**meta) -> triton.Config:
    """A launch config; ``num_warps`` and ``num_stages`` keys become launch options."""
    warps = meta.pop("num_warps", 4)
    stages = meta.pop("num_stages", 2)
    return triton.Config(meta, num_warps=warps, num_stages=stages)


# -- small configs the interpreter runs quickly: a split-K one (3 splits, partial tiles) and
# -- a tiled one, for every GEMM's tests
SPLIT = cfg(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, SPLIT_K=3, GROUP_M=4)
TILED = cfg(BLOCK_M=32, BLOCK_N=16, BLOCK_K=32, SPLIT_K=1, GROUP_M=2)


def _on_cpu(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [t.cpu() if t is not None else None for t in tensors]


def weight_only_reference(
    x: torch.Tensor, *linear: torch.Tensor | int | None, compute_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """The reference op of the stored weight format, on CPU, as ``x.dtype``.

    ``linear`` is what the weight-only kernels take after ``x``: ``qweight, scales, zeros,
    bias, bits, group_size``.

    ``compute_dtype=torch.float32`` runs it on float32 copies of ``x`` and ``bias``, so the
    dequantized weight is never rounded to ``x.dtype``: what kernels that accumulate in
    float32 on CUDA cores (the GEMV) compute.  By default it runs in ``x.dtype``, as the
    tensor-core kernels do (they round each dequantized weight to ``x.dtype`` for the MMA).
    """
    qweight, scales, zeros, bias, bits, group_size = linear
    x, qweight, scales, zeros, bias = _on_cpu(x, qweight, scales, zeros, bias)
    out_dtype = x.dtype
    if compute_dtype is not None:
        x, bias = x.to(compute_dtype), bias.to(compute_dtype) if bias is not None else None
    if qweight.dtype == torch.int8:
        out = ops.linear_int8_weight_reference(x, qweight, scales, bias, group_size)
    elif qweight.dtype == torch.float8_e4m3fn:
        out = ops.linear_fp8_weight_reference(x, qweight, scales, bias)
    else:
        out = ops.linear_intn_reference(x, qweight, scales, zeros, bias, bits, group_size)
    return out.to(out_dtype)


def w8a8_case(
    x: torch.Tensor, layer: tuple, act_type: str, per_token: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(xq, xs, ref)``: ``x`` quantized by the reference numerics (on the kernel device)
    and the reference W8A8 op's output for ``layer = (qweight, scales, bias)``, which a
    scaled GEMM of ``xq`` must reproduce."""
    x_cpu, qweight, scales, bias = _on_cpu(x, *layer)
    xq, xs = quantize_activation(x_cpu, act_type, per_token)
    ref = ops.linear_w8a8_reference(
        x_cpu, qweight, scales, bias, act_type, per_token, 100.0, None, None
    )
    return xq.to(x.device), xs.to(x.device), ref


class DispatchedOps(TorchDispatchMode):
    """Records the aten ops a launcher dispatches around its kernel (``names``)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def compiled_logits_and_graph(model: torch.nn.Module, ids: torch.Tensor) -> tuple:
    """``model(ids)``'s logits under ``torch.compile(fullgraph=True)`` and the one FX graph
    dynamo traced for it, so a test can count the ops the compiled model runs."""
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    compiled = torch.compile(model, fullgraph=True, backend=backend)
    with torch.no_grad():
        out = compiled(ids, use_cache=False).logits
    (graph,) = graphs
    return out, graph
