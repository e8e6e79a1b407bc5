"""The asymmetric INT8 GEMM epilogue and INT4 activation quantization vs the reference."""

from __future__ import annotations

import pytest
import torch
from kernel_utils import (
    KERNEL_DEVICE,
    SPLIT,
    TILED,
    assert_matches,
    cfg,
    poisoned,
    requires_kernels,
)
from torchquant.triton_kernels.act_quant import (
    quantize_activation_int4_packed,
    quantize_activation_rows,
)
from torchquant.triton_kernels.w8a8_gemm import int8_gemm_asym

from torchquant import ops
from torchquant.numerics import (
    pack_int4_activation,
    quantize_activation,
    quantize_activation_asymmetric,
    quantize_int_weight,
)
from torchquant.ops import cuda as cuda_ops

pytestmark = requires_kernels


def _weight(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    iw = quantize_int_weight(torch.randn(n, k) * torch.rand(n, 1), 8, -1, True)
    return (iw.codes.to(torch.int16) - 128).to(torch.int8), iw.scales.float()


def _on(device, *tensors):
    return [t.to(device) if isinstance(t, torch.Tensor) else t for t in tensors]


@pytest.mark.parametrize(
    "m,n,k,split_k,config,per_token,dtype,has_bias",
    [
        (5, 40, 200, True, SPLIT, True, torch.bfloat16, True),
        (19, 33, 100, True, SPLIT, False, torch.float32, False),
        (37, 24, 100, False, TILED, True, torch.float16, True),
        (33, 20, 70, False, TILED, False, torch.float32, True),
    ],
)
def test_asym_gemm_matches_reference(m, n, k, split_k, config, per_token, dtype, has_bias):
    x = (torch.rand(m, k) * 6 - 1).to(dtype)  # -- mostly positive: zero points far from 0
    qweight, scales = _weight(n, k)
    bias = torch.randn(n).to(dtype) if has_bias else None
    ref = ops.linear_w8a8_asym_reference(x, qweight, scales, bias, per_token, None, None, None)
    xq, xs, xz = quantize_activation_asymmetric(x, per_token)
    assert bool((xz != 0).any())
    sums = ops.weight_code_sums(qweight)
    args = _on(KERNEL_DEVICE, xq, qweight, xs, xz, scales, sums, bias)
    out = int8_gemm_asym(*args, dtype, split_k, config, poisoned((m, n), dtype))
    assert out.dtype == dtype
    assert_matches(out, ref)


def test_asym_gemm_refuses_bad_zero_points():
    xq, qweight = torch.zeros(2, 8, dtype=torch.int8), torch.zeros(4, 8, dtype=torch.int8)
    scale, sums = torch.ones(2, 1), torch.zeros(4, dtype=torch.int32)
    with pytest.raises(ValueError, match="a_zero"):
        int8_gemm_asym(xq, qweight, scale, torch.zeros(2, 1), torch.ones(4, 1), sums, None,
                       torch.float32)  # fmt: skip
    with pytest.raises(ValueError, match="b_sum"):
        zero = torch.zeros(2, 1, dtype=torch.int32)
        int8_gemm_asym(xq, qweight, scale, zero, torch.ones(4, 1), sums[:3], None, torch.float32)


@pytest.mark.parametrize("per_token", [True, False])
def test_asym_cuda_glue_matches_reference_op(per_token):
    x = torch.rand(2, 3, 96).to(torch.float16) * 4
    x[0, 1, 5] = float("nan")
    qweight, scales = _weight(40, 96)
    bias = torch.randn(40).to(torch.float16)
    static = (None, None) if per_token else (torch.tensor([0.02]), torch.tensor([-100]))
    args = (qweight, scales, bias, per_token, *static, None)
    ref = ops.linear_w8a8_int8_asym(x, *args)
    out = cuda_ops.linear_w8a8_asym_cuda(*_on(KERNEL_DEVICE, x, *args))
    bad = torch.isnan(ref)
    assert torch.equal(torch.isnan(out.cpu()), bad) and bool(bad.any())
    assert_matches(out.cpu()[~bad], ref[~bad])


@pytest.mark.parametrize("per_token", [True, False])
def test_int4_rows_match_reference_bit_for_bit(per_token):
    x = torch.randn(7, 300) * torch.rand(7, 1) * 8
    x[2] = 0.0
    q, s = quantize_activation_rows(x.to(KERNEL_DEVICE), "int4", per_token)
    q_ref, s_ref = quantize_activation(x, "int4", per_token)
    assert torch.equal(q.cpu(), q_ref) and torch.equal(s.cpu(), s_ref)


@pytest.mark.parametrize("per_token", [True, False])
@pytest.mark.parametrize("k", [1, 255, 300])
def test_int4_packed_matches_reference(per_token, k):
    x = (torch.randn(6, k) * torch.rand(6, 1) * 5).to(torch.bfloat16)
    x[1] = 0.0
    packed, s = quantize_activation_int4_packed(
        x.to(KERNEL_DEVICE), per_token, cfg(BLOCK_M=4, BLOCK_K=128)
    )
    q_ref, s_ref = quantize_activation(x, "int4", per_token)
    assert packed.shape == (6, (k + 1) // 2) and packed.dtype == torch.uint8
    assert torch.equal(packed.cpu(), pack_int4_activation(q_ref))
    assert torch.equal(s.cpu(), s_ref)


def test_int4_packed_nan_row_gets_nan_scale_and_zero_codes():
    x = torch.randn(3, 40)
    x[1, 7] = float("nan")
    packed, s = quantize_activation_int4_packed(
        x.to(KERNEL_DEVICE), True, cfg(BLOCK_M=2, BLOCK_K=32)
    )
    assert torch.isnan(s[1]).all() and not torch.isnan(s[[0, 2]]).any()
    assert torch.equal(packed.cpu()[1], torch.zeros(20, dtype=torch.uint8))


def test_int4_cuda_glue_matches_reference_op():
    x = torch.randn(2, 3, 64).to(torch.bfloat16)
    qweight, scales = _weight(24, 64)
    args = (qweight, scales, None, True, 100.0, None, None)
    ref = ops.linear_w8a8_reference(x, *args[:3], "int4", *args[3:])
    assert_matches(cuda_ops.linear_w8a8_int4_cuda(*_on(KERNEL_DEVICE, x, *args)), ref)
