"""The FP8 GEMM choice: our kernel unless the measured table names ``_scaled_mm`` for the
device, shape and M bucket of a call it takes as it is; ``_scaled_mm``'s linear matches the
W8A8 reference."""

from __future__ import annotations

import pytest
import torch

from torchquant import ops
from torchquant.numerics import quantize_activation, quantize_fp8_weight
from torchquant.ops import fp8_gemm_choice

CUDA0 = torch.device("cuda", 0)


def test_buckets_are_the_next_power_of_two_capped():
    assert [fp8_gemm_choice.m_bucket(m) for m in (1, 16, 17, 4096, 5000, 20000)] == [
        1, 16, 32, 4096, 8192, 8192,
    ]  # fmt: skip


def test_an_empty_table_keeps_our_kernel_everywhere():
    assert fp8_gemm_choice.SCALED_MM_FASTER == frozenset()
    assert not fp8_gemm_choice.prefers_scaled_mm(CUDA0, 4096, 4096, 14336, torch.bfloat16)


def test_the_table_picks_scaled_mm_only_where_measured_and_taken(monkeypatch):
    entry = ("NVIDIA H200", 4096, 14336, 4096)
    monkeypatch.setattr(fp8_gemm_choice, "SCALED_MM_FASTER", frozenset({entry}))
    monkeypatch.setattr(fp8_gemm_choice, "_device_name", lambda index: "NVIDIA H200")
    prefers = fp8_gemm_choice.prefers_scaled_mm
    assert prefers(CUDA0, 4096, 4096, 14336, torch.bfloat16)
    assert prefers(CUDA0, 3008, 4096, 14336, torch.bfloat16)  # same bucket, 16 | M
    assert not prefers(CUDA0, 3000, 4096, 14336, torch.bfloat16)  # would need padding
    assert not prefers(CUDA0, 4096, 4096, 14336, torch.float16)  # row-wise: bf16 out only
    assert not prefers(CUDA0, 1024, 4096, 14336, torch.bfloat16)  # another bucket
    assert not prefers(CUDA0, 4096, 8192, 8192, torch.bfloat16)  # another shape
    assert not prefers(torch.device("cpu"), 4096, 4096, 14336, torch.bfloat16)
    monkeypatch.setattr(fp8_gemm_choice, "_device_name", lambda index: "NVIDIA H100")
    assert not prefers(CUDA0, 4096, 4096, 14336, torch.bfloat16)  # another device


@pytest.mark.parametrize("per_channel", [True, False])
def test_scaled_mm_linear_matches_the_w8a8_reference(per_channel):
    torch.manual_seed(0)
    w = torch.randn(48, 64) * 0.05
    qweight, scales = quantize_fp8_weight(w, per_channel=per_channel)
    scales = scales.reshape(-1, 1)
    x = torch.randn(32, 64).to(torch.bfloat16)
    bias = torch.randn(48).to(torch.bfloat16)
    xq, xs = quantize_activation(x, "fp8", True)
    out = fp8_gemm_choice.scaled_mm_linear(xq, xs, qweight, scales, bias, torch.bfloat16)
    ref = ops.linear_w8a8_reference(x, qweight, scales, bias, "fp8", True, 100.0, None, None)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1.6e-2, atol=1e-2)
