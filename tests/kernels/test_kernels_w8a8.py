"""W8A8 INT8 and FP8 GEMMs vs the reference op, directly and through the CUDA glue."""

from __future__ import annotations

import pytest
import torch
from kernel_utils import (
    KERNEL_DEVICE,
    SPLIT,
    TILED,
    DispatchedOps,
    assert_matches,
    cfg,
    poisoned,
    relative_error,
    requires_kernels,
    w8a8_case,
)
from torchquant.triton_kernels import scaled_gemm
from torchquant.triton_kernels._tiles import split_k_locks
from torchquant.triton_kernels.fp8_gemm import fp8_gemm
from torchquant.triton_kernels.w8a8_gemm import int8_gemm

from torchquant import ops
from torchquant.numerics import quantize_fp8_weight, quantize_int_weight
from torchquant.ops import cuda as cuda_ops

pytestmark = requires_kernels

GEMMS = {"int8": int8_gemm, "fp8": fp8_gemm}


def _weight(n: int, k: int, family: str, per_tensor: bool):
    w = torch.randn(n, k) * torch.rand(n, 1)
    if family == "fp8":
        q, s = quantize_fp8_weight(w, per_channel=not per_tensor)
        return q.to(KERNEL_DEVICE), s.reshape(-1, 1).to(KERNEL_DEVICE)
    iw = quantize_int_weight(w, 8, -1, True)
    q = (iw.codes.to(torch.int16) - 128).to(torch.int8)
    return q.to(KERNEL_DEVICE), iw.scales.to(KERNEL_DEVICE)


# (M, N, K, split_k, config, per_tensor, dtype, bias)
CASES = [
    (5, 40, 200, True, SPLIT, False, torch.bfloat16, True),
    (19, 33, 100, True, SPLIT, True, torch.float32, False),
    (37, 24, 100, False, TILED, False, torch.float16, True),
    (33, 20, 70, False, TILED, True, torch.bfloat16, False),
    (40, 17, 96, False, TILED, False, torch.float32, True),
]


@pytest.mark.parametrize("family", ["int8", "fp8"])
@pytest.mark.parametrize("m,n,k,split_k,config,per_tensor,dtype,has_bias", CASES)
def test_gemm_matches_reference(family, m, n, k, split_k, config, per_tensor, dtype, has_bias):
    x = (torch.randn(m, k, device=KERNEL_DEVICE) * 3).to(dtype)
    qweight, scales = _weight(n, k, family, per_tensor and family == "fp8")
    bias = torch.randn(n, device=KERNEL_DEVICE).to(dtype) if has_bias else None
    xq, xs, ref = w8a8_case(x, (qweight, scales, bias), family, per_token=not per_tensor)
    gemm = GEMMS[family]
    out = gemm(xq, qweight, xs, scales, bias, dtype, split_k, config, poisoned((m, n), dtype))
    assert out.dtype == dtype
    assert_matches(out, ref)


@pytest.mark.parametrize("family", ["int8", "fp8"])
@pytest.mark.parametrize("per_token", [True, False])
def test_cuda_op_glue_matches_reference_op(family, per_token):
    """The registered CUDA implementation (run here on CPU tensors) vs the reference op."""
    k, n = 96, 40
    x = torch.randn(2, 3, k, device=KERNEL_DEVICE).to(torch.float16)
    qweight, scales = _weight(n, k, family, per_tensor=False)
    bias = torch.randn(n, device=KERNEL_DEVICE).to(torch.float16)
    smooth = (torch.rand(k) + 0.5).to(KERNEL_DEVICE)
    glue = cuda_ops.linear_w8a8_int8_cuda if family == "int8" else cuda_ops.linear_w8a8_fp8_cuda
    ref_op = ops.linear_w8a8_int8 if family == "int8" else ops.linear_w8a8_fp8
    args = (qweight, scales, bias, per_token, 100.0, None, smooth)
    out = glue(x, *args)
    ref = ref_op(x.cpu(), *[a.cpu() if isinstance(a, torch.Tensor) else a for a in args])
    assert out.shape == (2, 3, n)
    assert_matches(out, ref)
    static = torch.tensor([0.03], device=KERNEL_DEVICE)
    out = glue(x, qweight, scales, None, True, 100.0, static, None)
    ref = ref_op(x.cpu(), qweight.cpu(), scales.cpu(), None, True, 100.0, static.cpu(), None)
    assert_matches(out, ref)


# more splits than K steps: idle splits still count themselves done
SPLIT_IDLE = cfg(BLOCK_M=16, BLOCK_N=16, BLOCK_K=128, SPLIT_K=12, GROUP_M=4)


@pytest.mark.parametrize("split_k,config", [(False, TILED), (True, SPLIT), (True, SPLIT_IDLE)])
def test_int32_accumulation_is_exact(split_k, config):
    # extreme codes over a long K: any float accumulation (or float sum of the splits'
    # partial tiles) would lose the low bits
    m, n, k = 17, 16, 1024
    a = torch.full((m, k), -128, dtype=torch.int8, device=KERNEL_DEVICE)
    a[:, ::3] = 127
    b = torch.randint(-128, 128, (n, k), dtype=torch.int8, device=KERNEL_DEVICE)
    one_m = torch.ones(m, 1, device=KERNEL_DEVICE)
    one_n = torch.ones(n, 1, device=KERNEL_DEVICE)
    out = int8_gemm(
        a, b, one_m, one_n, None, torch.float32, split_k, config, poisoned((m, n), torch.float32)
    )
    exact = a.cpu().to(torch.int64) @ b.cpu().to(torch.int64).t()
    assert torch.equal(out.cpu().to(torch.int64), exact)
    assert not split_k_locks(a.device).any()  # every counter reset


@pytest.mark.parametrize("family", ["int8", "fp8"])
def test_split_k_gemm_is_one_launch(family, monkeypatch):
    """The splits reduce in the last program of each tile: no zero-fill, no cast-copy."""
    x = torch.randn(6, 160, device=KERNEL_DEVICE).to(torch.bfloat16)
    qweight, scales = _weight(24, 160, family, per_tensor=False)
    xq, xs, _ = w8a8_case(x, (qweight, scales, None), family, per_token=True)
    gemm = GEMMS[family]
    gemm(xq, qweight, xs, scales, None, torch.bfloat16, True, SPLIT)  # creates the counters
    launches = []
    monkeypatch.setattr(scaled_gemm, "run_kernel", lambda *a, **k: launches.append(a[0]))
    with DispatchedOps() as ops_seen:
        gemm(xq, qweight, xs, scales, None, torch.bfloat16, True, SPLIT)
    assert set(ops_seen.names) <= {"empty", "empty_like", "empty_strided", "view", "reshape"}
    assert launches == [gemm.split_k_tuned]


def test_rejects_bad_operands():
    a = torch.zeros(4, 32, dtype=torch.int8, device=KERNEL_DEVICE)
    b = torch.zeros(8, 32, dtype=torch.int8, device=KERNEL_DEVICE)
    s4, s8 = torch.ones(4, 1, device=KERNEL_DEVICE), torch.ones(8, 1, device=KERNEL_DEVICE)
    with pytest.raises(ValueError, match="share K"):
        int8_gemm(a, b[:, :16], s4, s8, None, torch.float32)
    with pytest.raises(ValueError, match="must both be"):
        int8_gemm(a.float(), b, s4, s8, None, torch.float32)
    with pytest.raises(ValueError, match="b_scale"):
        int8_gemm(a, b, s4, s4, None, torch.float32)
    with pytest.raises(ValueError, match="bias"):
        int8_gemm(a, b, s4, s8, torch.ones(4, device=KERNEL_DEVICE), torch.float32)
    assert relative_error(torch.ones(3), torch.ones(3)) == 0.0


def test_int8_long_k_runs_in_chunks_the_int32_accumulator_holds(monkeypatch):
    # -- K past the limit (lowered from 131071 so the case stays small): codes of -128 on both
    # -- sides would overflow one int32 sum, so K runs in chunks summed in float32
    monkeypatch.setattr(scaled_gemm, "INT8_MAX_K", 100)
    m, n, k = 3, 8, 250
    a = torch.full((m, k), -128, dtype=torch.int8, device=KERNEL_DEVICE)
    b = torch.full((n, k), -128, dtype=torch.int8, device=KERNEL_DEVICE)
    scale_m = torch.full((m, 1), 0.5, device=KERNEL_DEVICE)
    scale_n = torch.full((n, 1), 0.25, device=KERNEL_DEVICE)
    bias = torch.ones(n, device=KERNEL_DEVICE)
    launched = []
    run = scaled_gemm.run_kernel
    monkeypatch.setattr(
        scaled_gemm, "run_kernel", lambda *a, **kw: launched.append(kw["K"]) or run(*a, **kw)
    )
    out = int8_gemm(a, b, scale_m, scale_n, bias, torch.float32, False, TILED)
    assert launched == [100, 100, 50]
    assert torch.equal(out.cpu(), torch.full((m, n), 128 * 128 * k * 0.125 + 1.0))
