"""Weight-only kernels (dequantize, GEMV, the 4-bit GEMV, split-K and tiled GEMM, path
selection) vs the reference ops and numerics, on ragged shapes."""

from __future__ import annotations

import pytest
import torch
from kernel_utils import (
    BF16_DOT_SKIP,
    KERNEL_DEVICE,
    SPLIT,
    TILED,
    DispatchedOps,
    assert_matches,
    cfg,
    int_weight,
    poisoned,
    relative_error,
    requires_kernels,
    weight_only_reference,
)
from torchquant.triton_kernels import dequant_gemm as dequant_gemm_module
from torchquant.triton_kernels import dequant_gemv as dequant_gemv_module
from torchquant.triton_kernels import dequant_matmul as dm
from torchquant.triton_kernels._tiles import split_k_locks
from torchquant.triton_kernels.dequant import dequantize_weight
from torchquant.triton_kernels.dequant_gemm import dequant_gemm
from torchquant.triton_kernels.dequant_gemv import dequant_gemv, w4_eligible
from torchquant.triton_kernels.weight import QuantWeight

from torchquant.numerics import dequantize_int_weight, quantize_fp8_weight, unpack_codes

pytestmark = requires_kernels

# (bits, group_size, symmetric): every width, grouped / per-channel / partial last group
FORMATS = [
    (2, 32, False),
    (3, 48, False),
    (4, 64, True),
    (5, -1, False),
    (6, 32, True),
    (7, 48, False),
    (8, -1, False),
    (8, 64, True),
]


@pytest.mark.parametrize("bits,group_size,symmetric", FORMATS)
def test_dequantize_is_exact(bits, group_size, symmetric):
    n, k = 19, 100  # K not a multiple of 32, of the group or of BLOCK_K
    qweight, scales, zeros, codes = int_weight(n, k, bits, group_size, symmetric, torch.float16)
    if qweight.dtype == torch.int32:
        assert torch.equal(unpack_codes(qweight.cpu(), bits, k), codes.cpu())
    ref = dequantize_int_weight(
        codes.cpu(), scales.cpu(), zeros.cpu() if zeros is not None else None, bits, group_size
    )
    for dtype in (torch.float32, torch.float16):
        out = poisoned((n, k), dtype)
        config = cfg(BLOCK_N=16, BLOCK_K=64)
        dequantize_weight(
            QuantWeight(qweight, scales, zeros, bits, group_size), k, dtype, config, out
        )
        assert torch.equal(out.cpu(), ref.to(dtype))


def test_dequantize_fp8_storage_is_exact():
    w = torch.randn(21, 70)
    q, s = quantize_fp8_weight(w, per_channel=True)
    q, s = q.to(KERNEL_DEVICE), s.to(KERNEL_DEVICE)
    out = poisoned((21, 70), torch.float32)
    config = cfg(BLOCK_N=16, BLOCK_K=32)
    dequantize_weight(QuantWeight(q, s, None, 8, -1), 70, torch.float32, config, out)
    assert torch.equal(out.cpu(), q.float().cpu() * s.cpu())


# (bits, group, symmetric, dtype, M, N, K, config): GEMV configs cover split-K > 1,
# K tiles inside one group (scales applied per tile) and spanning groups (per weight)
GEMV_CASES = [
    (4, 128, False, torch.bfloat16, 1, 33, 300, cfg(BLOCK_N=16, BLOCK_K=128, SPLIT_K=2)),
    (4, 32, False, torch.float16, 1, 20, 96, cfg(BLOCK_N=16, BLOCK_K=64, SPLIT_K=1)),
    (3, 64, False, torch.bfloat16, 1, 17, 200, cfg(BLOCK_N=16, BLOCK_K=64, SPLIT_K=3)),
    (3, -1, True, torch.float32, 2, 20, 130, cfg(BLOCK_N=32, BLOCK_K=128, SPLIT_K=2)),
    (2, 64, True, torch.bfloat16, 1, 24, 256, cfg(BLOCK_N=16, BLOCK_K=32, SPLIT_K=4)),
    (8, 128, False, torch.float32, 1, 18, 160, cfg(BLOCK_N=16, BLOCK_K=64, SPLIT_K=2)),
    (5, 32, False, torch.float16, 1, 9, 70, cfg(BLOCK_N=16, BLOCK_K=32, SPLIT_K=2)),
    (8, -1, True, torch.bfloat16, 1, 25, 150, cfg(BLOCK_N=16, BLOCK_K=64, SPLIT_K=2)),
    (8, 32, True, torch.float16, 3, 16, 100, cfg(BLOCK_N=16, BLOCK_K=64, SPLIT_K=1)),
]


@pytest.mark.parametrize("bits,group,sym,dtype,m,n,k,config", GEMV_CASES)
def test_gemv_matches_reference(bits, group, sym, dtype, m, n, k, config):
    sdt = dtype if group != -1 else torch.float32
    qweight, scales, zeros, _ = int_weight(n, k, bits, group, sym, sdt)
    x = torch.randn(m, k, device=KERNEL_DEVICE).to(dtype)
    bias = torch.randn(n, device=KERNEL_DEVICE).to(dtype) if bits != 5 else None
    weight = QuantWeight(qweight, scales, zeros, bits, group)
    out = dequant_gemv(x, weight, bias, config=config, out=poisoned((m, n), dtype))
    # -- float32 weights on CUDA cores: the float32 reference, within the output's rounding
    ref32 = weight_only_reference(
        x, qweight, scales, zeros, bias, bits, group, compute_dtype=torch.float32
    )
    assert_matches(out, ref32)
    ref = weight_only_reference(x, qweight, scales, zeros, bias, bits, group)
    assert relative_error(out, ref) < {torch.float32: 1e-5}.get(dtype, 1e-2)


def test_gemv_fp8_weight_storage():
    w = torch.randn(23, 90)
    q, s = quantize_fp8_weight(w, per_channel=False)
    q, s = q.to(KERNEL_DEVICE), s.reshape(1, 1).to(KERNEL_DEVICE)
    x = torch.randn(1, 90, device=KERNEL_DEVICE).to(torch.float16)
    config = cfg(BLOCK_N=16, BLOCK_K=32, SPLIT_K=2)
    out = dequant_gemv(
        x, QuantWeight(q, s, None, 8, -1), None, config, poisoned((1, 23), torch.float16)
    )
    assert_matches(
        out, weight_only_reference(x, q, s, None, None, 8, -1, compute_dtype=torch.float32)
    )
    assert relative_error(out, weight_only_reference(x, q, s, None, None, 8, -1)) < 1e-2


# 64-row tiles, more splits than K steps (idle splits still count themselves done)
SPLIT64 = cfg(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, SPLIT_K=8, GROUP_M=8)

# (bits, group, symmetric, M, N, K, split_k, config)
GEMM_CASES = [
    (4, 64, False, 5, 40, 200, True, SPLIT),
    (3, 32, False, 17, 33, 100, True, SPLIT),
    (2, -1, True, 3, 20, 150, True, SPLIT),
    (8, -1, True, 9, 30, 130, True, SPLIT),
    (4, 48, False, 37, 24, 100, False, TILED),
    (6, 64, True, 40, 17, 96, False, TILED),
    (8, 128, False, 33, 20, 140, False, TILED),
    # magic-number dequantization (4/8-bit packed, one group per K tile), partial last group
    (4, 32, True, 7, 24, 100, True, SPLIT64),
    (8, 64, False, 2, 20, 192, True, SPLIT64),
    (4, 64, False, 37, 24, 136, False, TILED),
]


def _gemm_case(bits, group, sym, m, n, k, split_k, config, dtype):
    sdt = dtype if group != -1 else torch.float32
    qweight, scales, zeros, _ = int_weight(n, k, bits, group, sym, sdt)
    x = torch.randn(m, k, device=KERNEL_DEVICE).to(dtype)
    bias = torch.randn(n, device=KERNEL_DEVICE).to(dtype)
    weight = QuantWeight(qweight, scales, zeros, bits, group)
    out = dequant_gemm(x, weight, bias, split_k, config, poisoned((m, n), dtype))
    # -- the GEMM rounds dequantized weights to x.dtype before the MMA, as the reference does
    ref = weight_only_reference(x, qweight, scales, zeros, bias, bits, group)
    assert_matches(out, ref)
    ref32 = weight_only_reference(
        x, qweight, scales, zeros, bias, bits, group, compute_dtype=torch.float32
    )
    assert relative_error(out, ref32) < {torch.float32: 1e-5}.get(dtype, 1e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("bits,group,sym,m,n,k,split_k,config", GEMM_CASES)
def test_gemm_matches_reference(bits, group, sym, m, n, k, split_k, config, dtype):
    _gemm_case(bits, group, sym, m, n, k, split_k, config, dtype)


@BF16_DOT_SKIP
@pytest.mark.parametrize("bits,group,sym,m,n,k,split_k,config", GEMM_CASES[:1] + GEMM_CASES[4:5])
def test_gemm_bf16(bits, group, sym, m, n, k, split_k, config):
    _gemm_case(bits, group, sym, m, n, k, split_k, config, torch.bfloat16)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("split_k,config", [(True, SPLIT64), (False, TILED)])
def test_gemm_tiles_dequantize_every_code_at_every_bit_position_exactly(bits, split_k, config):
    """One-hot rows of x read single weights back: codes 0..2**bits-1 in every position of a
    word against zero points 0..2**bits-1, bit for bit (the magic-number dequantization)."""
    n, k = 24, 64
    levels = 1 << bits
    codes = (torch.arange(n)[:, None] * 7 + torch.arange(k)[None, :]) % levels
    per_word = 32 // bits
    packed = torch.zeros(n, k // per_word, dtype=torch.int64)
    for j in range(per_word):
        packed |= codes[:, j::per_word].to(torch.int64) << (bits * j)
    qweight = (packed - (packed >> 31 << 32)).to(torch.int32).to(KERNEL_DEVICE)
    scales = (torch.rand(n, 2) + 0.5).to(KERNEL_DEVICE)
    zeros = (torch.arange(2 * n).reshape(n, 2) % levels).to(torch.uint8).to(KERNEL_DEVICE)
    weight = QuantWeight(qweight, scales, zeros, bits, 32)
    x = torch.eye(k, device=KERNEL_DEVICE)
    out = dequant_gemm(x, weight, None, split_k, config)
    ref = weight_only_reference(x, qweight, scales, zeros, None, bits, 32)
    assert torch.equal(out.cpu(), ref.cpu())


def test_split_k_gemm_is_one_launch_and_resets_its_counters(monkeypatch):
    """The splits reduce in the last program of each tile: no zero-fill, no cast-copy."""
    qweight, scales, zeros, _ = int_weight(40, 256, 4, 64, False, torch.float16)
    x = torch.randn(9, 256, device=KERNEL_DEVICE).to(torch.float16)
    weight = QuantWeight(qweight, scales, zeros, 4, 64)
    out = dequant_gemm(x, weight, None, True, SPLIT64)  # creates the counters once
    assert not split_k_locks(x.device).any()
    assert_matches(out, weight_only_reference(x, qweight, scales, zeros, None, 4, 64))
    launches = []
    monkeypatch.setattr(dequant_gemm_module, "run_kernel", lambda *a, **k: launches.append(a[0]))
    with DispatchedOps() as ops:
        dequant_gemm(x, weight, None, True, SPLIT64)
    assert set(ops.names) <= {"empty", "empty_like", "empty_strided"}, ops.names
    assert launches == [dequant_gemm_module._split_k_tuned]


def test_path_selection_by_batch_size():
    assert [dm.select_path(m) for m in (1, 2, 16, 64, 65, 1023, 1024, 8192)] == [
        "gemv", "split_k", "split_k", "split_k", "tiled", "tiled", "cublas", "cublas",
    ]  # fmt: skip


@pytest.mark.parametrize("m", [1, 6, 70, 1030])
def test_dequant_matmul_every_path(m):
    dtype = torch.float16 if m > 1 else torch.bfloat16
    n, k = 24, 96
    qweight, scales, zeros, _ = int_weight(n, k, 4, 32, False, dtype)
    x = torch.randn(m, k, device=KERNEL_DEVICE).to(dtype)
    bias = torch.randn(n, device=KERNEL_DEVICE).to(dtype)
    out = dm.dequant_matmul(x, QuantWeight(qweight, scales, zeros, 4, 32), bias)
    assert out.shape == (m, n) and out.dtype == dtype
    ref = weight_only_reference(x, qweight, scales, zeros, bias, 4, 32)
    assert relative_error(out, ref) < 1e-2


def test_rejects_mismatched_weight():
    qweight, scales, zeros, _ = int_weight(8, 64, 4, 32, False, torch.float32)
    x = torch.randn(1, 64, device=KERNEL_DEVICE)
    with pytest.raises(ValueError, match="qweight must be"):
        dequant_gemv(x, QuantWeight(qweight[:, :-1], scales, zeros, 4, 32), None)
    with pytest.raises(ValueError, match="scales must be"):
        dequant_gemv(x, QuantWeight(qweight, scales[:, :1], zeros, 4, 32), None)
    with pytest.raises(ValueError, match="out must be"):
        dequant_gemv(x, QuantWeight(qweight, scales, zeros, 4, 32), None, out=torch.empty(2, 8))


# -- the 4-bit GEMV (one thread per weight row, one launch per call): the magic-number
# -- dequantization at every bit position, groups of 32/64/128 and per channel, partial row
# -- tiles, several rows of x, split-K factors that do and do not divide the K steps, the
# -- split-K counters left at zero, and a call being a single launch

# (group, symmetric, x dtype, M, N, K, config or None for the default)
W4_GEMV_CASES = [
    (128, False, torch.bfloat16, 1, 300, 512, None),
    (128, False, torch.bfloat16, 1, 70, 1024, cfg(BLOCK_N=64, BLOCK_K=128, SPLIT_K=3)),
    (32, True, torch.float16, 2, 33, 256, cfg(BLOCK_N=32, BLOCK_K=32, SPLIT_K=4)),
    (64, False, torch.float32, 3, 40, 384, cfg(BLOCK_N=16, BLOCK_K=64, SPLIT_K=2)),
    (-1, True, torch.bfloat16, 1, 24, 320, cfg(BLOCK_N=32, BLOCK_K=32, SPLIT_K=5)),
    (-1, False, torch.float16, 1, 50, 256, None),
]


@pytest.mark.parametrize("group,sym,dtype,m,n,k,config", W4_GEMV_CASES)
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
    assert not split_k_locks(x.device).any()  # every counter reset


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


def test_a_call_is_one_launch(monkeypatch):
    """No zero-fill of an accumulator and no cast-copy of the result: one kernel launch."""
    qweight, scales, zeros, _ = int_weight(40, 512, 4, 128, False, torch.bfloat16)
    x = torch.randn(1, 512, device=KERNEL_DEVICE).to(torch.bfloat16)
    config = cfg(BLOCK_N=32, BLOCK_K=128, SPLIT_K=2)
    weight = QuantWeight(qweight, scales, zeros, 4, 128)
    dequant_gemv(x, weight, None, config)  # creates the counters once
    launches = []
    monkeypatch.setattr(dequant_gemv_module, "run_kernel", lambda *a, **k: launches.append(a[0]))
    with DispatchedOps() as ops:  # what the launcher itself dispatches around the kernel
        dequant_gemv(x, weight, None, config)
    assert set(ops.names) <= {"empty", "empty_like", "empty_strided"}, ops.names
    assert launches == [dequant_gemv_module._gemv_tuned]


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
