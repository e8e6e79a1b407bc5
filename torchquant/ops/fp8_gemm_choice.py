"""Which GEMM serves an FP8 W8A8 call on CUDA: our Triton kernel or ``torch._scaled_mm``.

``torch._scaled_mm`` (cuBLASLt, row-wise scales) can only be timed on a GPU, and the cost
model cannot see inside it, so the choice is data: :data:`SCALED_MM_FASTER` lists the
``(device name, N, K, M bucket)`` where ``benchmarks/bench_fp8.py`` -- run by
``benchmarks/gpu_check.sh``, which writes them to ``$OUT/scaled_mm_faster.txt`` -- measured
``_scaled_mm``'s GEMM faster than ours.  Every other call, and every device or shape no
measurement covers, runs our kernel: until a GPU run fills the table, ours serves all.
``_scaled_mm`` is only chosen where it takes the call as it is: bf16 output, ``K`` and
``N`` multiples of 16, ``M`` a multiple of 16 (no padding copy).
"""

from __future__ import annotations

import functools

import torch

from torchquant.ops import common

# -- (torch.cuda.get_device_name(), N, K, M bucket) measured faster with _scaled_mm; paste
# -- the lines of $OUT/scaled_mm_faster.txt here (no GPU has measured any yet)
SCALED_MM_FASTER: frozenset[tuple[str, int, int, int]] = frozenset()

SCALED_MM_MAX_BUCKET = 8192


def m_bucket(m: int) -> int:
    """The table's key for the token count: the next power of two, capped at 8192."""
    return min(1 << max(m - 1, 0).bit_length(), SCALED_MM_MAX_BUCKET)


@functools.cache
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def takes_scaled_mm(m: int, n: int, k: int, dtype: torch.dtype) -> bool:
    """Whether ``_scaled_mm`` with row-wise scales takes this call without a copy."""
    return dtype == torch.bfloat16 and m % 16 == 0 and n % 16 == 0 and k % 16 == 0 and m > 0


def prefers_scaled_mm(device: torch.device, m: int, n: int, k: int, dtype: torch.dtype) -> bool:
    """True where the table says ``_scaled_mm`` is faster for this call and it takes it."""
    if not SCALED_MM_FASTER or device.type != "cuda" or not takes_scaled_mm(m, n, k, dtype):
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return (_device_name(index), n, k, m_bucket(m)) in SCALED_MM_FASTER


def scaled_mm_linear(
    xq: torch.Tensor, xs: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
    bias: torch.Tensor | None, dtype: torch.dtype,
) -> torch.Tensor:  # fmt: skip
    """``(xq @ qweight^T) * xs * scales`` in ``dtype`` by ``torch._scaled_mm``, then the bias
    in ``dtype`` (the reference's order): ``xs (M, 1)``, ``scales (N, 1)`` or ``(1, 1)``."""
    n = qweight.shape[0]
    scale_b = scales.float().reshape(1, -1).expand(1, n).contiguous()
    out = torch._scaled_mm(xq, qweight.t(), scale_a=xs, scale_b=scale_b, out_dtype=dtype)
    return common.add_bias(out, bias)
