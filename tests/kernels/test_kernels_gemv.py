"""The 4-bit GEMV (one thread per weight row, one launch per call) against the reference op.

Covers the magic-number dequantization at every bit position, groups of 32/64/128 and
per channel, symmetric and asymmetric weights, bf16/fp16/fp32 activations, partial
row tiles, bias, several rows of ``x`` and split-K factors that do and do not divide
the K steps, the split-K counters left at zero, and a call being a single launch.
"""

from __future__ import annotations

import pytest
import torch
from kernel_utils import (
    KERNEL_DEVICE,
    assert_matches,
    cfg,
    int_weight,
    poisoned,
    relative_error,
    requires_kernels,
    weight_only_reference,
)
from torch.utils._python_dispatch import TorchDispatchMode
from torchquant.triton_kernels import dequant_gemv as gemv_module
from torchquant.triton_kernels.dequant_gemv import dequant_gemv, w4_eligible
from torchquant.triton_kernels.weight import QuantWeight

pytestmark = requires_kernels

# (group, symmetric, x dtype, M, N, K, config or None for the default)
CASES = [
    (128, False, torch.bfloat16, 1, 300, 512, None),
    (128, False, torch.bfloat16, 1, 70, 1024, cfg(BLOCK_N=64, BLOCK_K=128, SPLIT_K=3)),
    (32, True, torch.float16, 2, 33, 256, cfg(BLOCK_N=32, BLOCK_K=32, SPLIT_K=4)),
    (64, False, torch.float32, 3, 40, 384, cfg(BLOCK_N=16, BLOCK_K=64, SPLIT_K=2)),
    (-1, True, torch.bfloat16, 1, 24, 320, cfg(BLOCK_N=32, BLOCK_K=32, SPLIT_K=5)),
    (-1, False, torch.float16, 1, 50, 256, None),
]


@pytest.mark.parametrize("group,sym,dtype,m,n,k,config", CASES)
def test_w4_gemv_matches_reference(group, sym, dtype, m, n, k, config):
    sdt = dtype if group != -1 else torch.float32
    qweight, scales, zeros, _ = int_weight(n, k, 4, group, sym, sdt)
    x = torch.randn(m, k, device=KERNEL_DEVICE).to(dtype)
    bias = torch.randn(n, device=KERNEL_DEVICE).to(dtype) if m != 2 else None
    assert w4_eligible(x, qweight, 4, 0 if group == -1 else group)
    weight = QuantWeight(qweight, scales, zeros, 4, group)
    out = dequant_gemv(x, weight, bias, config, poisoned((m, n), dtype))
    ref = weight_only_reference(
        x, qweight, scales, zeros, bias, 4, group, compute_dtype=torch.float32
    )
    assert_matches(out, ref)
    assert relative_error(out, ref) < {torch.float32: 1e-6}.get(dtype, 1e-2)
    assert not gemv_module._split_k_locks(x.device).any()  # every counter reset


def test_every_code_at_every_bit_position():
    """Codes 0..15 in each nibble of a word, zero points 0..15: exact in float32."""
    n, k = 16, 128
    codes = (torch.arange(n)[:, None] + torch.arange(k)[None, :]) % 16  # every code per nibble
    packed = torch.zeros(n, k // 8, dtype=torch.int64)
    for j in range(8):
        packed |= codes[:, j::8].to(torch.int64) << (4 * j)
    qweight = (packed - (packed >> 31 << 32)).to(torch.int32).to(KERNEL_DEVICE)
    scales = torch.full((n, 1), 0.5, device=KERNEL_DEVICE)
    zeros = (torch.arange(n, dtype=torch.uint8)[:, None] % 16).to(KERNEL_DEVICE)
    for j in range(8):  # x selects nibble j of every word
        xr = torch.zeros(1, k, device=KERNEL_DEVICE)
        xr[0, j::8] = 1.0
        out = dequant_gemv(xr, QuantWeight(qweight, scales, zeros, 4, 128), None)
        ref = weight_only_reference(xr, qweight, scales, zeros, None, 4, 128)
        assert torch.equal(out.cpu(), ref), j


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_a_call_is_one_launch(monkeypatch):
    """No zero-fill of an accumulator and no cast-copy of the result: one kernel launch."""
    qweight, scales, zeros, _ = int_weight(40, 512, 4, 128, False, torch.bfloat16)
    x = torch.randn(1, 512, device=KERNEL_DEVICE).to(torch.bfloat16)
    config = cfg(BLOCK_N=32, BLOCK_K=128, SPLIT_K=2)
    weight = QuantWeight(qweight, scales, zeros, 4, 128)
    dequant_gemv(x, weight, None, config)  # creates the counters once
    launches = []
    monkeypatch.setattr(gemv_module, "run_kernel", lambda *a, **k: launches.append(a[0]))
    with _Ops() as ops:  # what the launcher itself dispatches around the kernel
        dequant_gemv(x, weight, None, config)
    assert set(ops.names) <= {"empty", "empty_like", "empty_strided"}, ops.names
    assert launches == [gemv_module._gemv_tuned]


def test_other_layouts_take_the_tiled_kernel():
    qweight, scales, zeros, _ = int_weight(20, 96, 4, 32, False, torch.float16)
    x = torch.randn(1, 96, device=KERNEL_DEVICE).to(torch.float16)
    assert w4_eligible(x, qweight, 4, 32)
    q3, _, _, _ = int_weight(20, 96, 3, 32, False, torch.float16)
    assert not w4_eligible(x, q3, 3, 32)
    unaligned = torch.randn(1, 97, device=KERNEL_DEVICE).to(torch.bfloat16)[:, 1:]
    assert not w4_eligible(unaligned, qweight, 4, 32)
    out = dequant_gemv(unaligned, QuantWeight(qweight, scales.bfloat16(), zeros, 4, 32), None)
    ref = weight_only_reference(
        unaligned, qweight, scales.bfloat16(), zeros, None, 4, 32, compute_dtype=torch.float32
    )
    assert_matches(out, ref)
