"""The block-scaled weight-only kernels (NVFP4, MXFP4, MXFP8): GEMV, GEMM, dequantize, dispatch.

Each against the op's exact reference: ragged M, N and K (odd K, a partial last block),
fp16/bf16/fp32 inputs, bias, split-K, NaN rows; every code decoded bit for bit (identity
inputs).  bf16 tensor-core tiles run on the GPU only (the interpreter's bf16 dot
multiplies raw storage); the GEMV has no dot and runs bf16 here.
"""

from __future__ import annotations

import pytest
import torch
from kernel_utils import (
    BF16_DOT_SKIP,
    KERNEL_DEVICE,
    ON_GPU,
    assert_matches,
    cfg,
    poisoned,
    requires_kernels,
)
from torchquant.triton_kernels.block_scaled_dispatch import block_scaled_matmul
from torchquant.triton_kernels.block_scaled_gemv import block_scaled_gemv, gemv_eligible
from torchquant.triton_kernels.block_scaled_weight import BlockScaledWeight
from torchquant.triton_kernels.fp4_gemm import dequantize_block_scaled, fp4_gemm

from torchquant.numerics.fp4 import pack_e2m1, quantize_mxfp4_weight, quantize_nvfp4_weight
from torchquant.numerics.microscaling import quantize_mxfp8_weight
from torchquant.ops.microscaled import dequantize_microscaled_rows, linear_mxfp8_weight_reference
from torchquant.ops.weight_fp4 import linear_fp4_weight_reference

pytestmark = requires_kernels

KINDS = ("nvfp4", "mxfp4", "mxfp8")


def _weight(kind: str, n: int, k: int, seed: int = 0) -> BlockScaledWeight:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g)
    if kind == "mxfp8":
        q = quantize_mxfp8_weight(w)
        return BlockScaledWeight(q.values.to(KERNEL_DEVICE), q.scales.to(KERNEL_DEVICE), None, 32)
    q = (quantize_nvfp4_weight if kind == "nvfp4" else quantize_mxfp4_weight)(w)
    gs = None if q.global_scale is None else q.global_scale.to(KERNEL_DEVICE)
    packed = pack_e2m1(q.codes).to(KERNEL_DEVICE)
    return BlockScaledWeight(packed, q.scales.to(KERNEL_DEVICE), gs, q.block)


def _all_codes_weight(kind: str, n: int, k: int) -> BlockScaledWeight:
    """Every code in every column, random block scales; NVFP4 under a power-of-two global
    scale, so that each decoded weight is exact in float32."""
    g = torch.Generator().manual_seed(n + k)
    if kind == "mxfp8":
        values = torch.randint(0, 256, (n, k), generator=g, dtype=torch.uint8)
        values[(values & 0x7F) == 0x7F] = 0x7E  # no NaN byte
        codes = values.view(torch.float8_e4m3fn)
    else:
        codes = (torch.arange(n * k) % 16).reshape(n, k).to(torch.uint8)
        codes = pack_e2m1(codes[torch.randperm(n, generator=g)])
    blocks = -(-k // (16 if kind == "nvfp4" else 32))
    if kind == "nvfp4":
        scales = (torch.rand(n, blocks, generator=g) * 400 + 2**-9).to(torch.float8_e4m3fn)
        gs = torch.tensor([0.5])
    else:
        scales = torch.randint(100, 150, (n, blocks), generator=g, dtype=torch.uint8)
        scales[0, 0], gs = 0, None  # the smallest exponent byte too
    gs = gs.to(KERNEL_DEVICE) if gs is not None else None
    block = 16 if kind == "nvfp4" else 32
    return BlockScaledWeight(codes.to(KERNEL_DEVICE), scales.to(KERNEL_DEVICE), gs, block)


def _cpu(t):
    return t.cpu() if t is not None else None


def _reference(x, weight: BlockScaledWeight, bias):
    x, bias = _cpu(x), _cpu(bias)
    q, s, gs = _cpu(weight.qweight), _cpu(weight.scales), _cpu(weight.global_scale)
    if weight.value_bits == 8:
        return linear_mxfp8_weight_reference(x, q, s, bias)
    return linear_fp4_weight_reference(x, q, s, gs, bias, weight.block)


def _dequantized(weight: BlockScaledWeight, k: int, dtype: torch.dtype) -> torch.Tensor:
    q, s, gs = _cpu(weight.qweight), _cpu(weight.scales), _cpu(weight.global_scale)
    fmt = "mxfp8" if weight.value_bits == 8 else "nvfp4" if gs is not None else "mxfp4"
    return dequantize_microscaled_rows(q, s, gs, fmt, k, dtype)


def _gemv(bn: int, bk: int, split_k: int, warps: int = 1):
    return cfg(BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split_k, num_warps=warps, num_stages=1)


def _tiles(bm: int, bn: int, bk: int, split_k: int, group_m: int = 8):
    return cfg(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split_k, GROUP_M=group_m)


# -- GEMV: (kind, dtype, N, K, config, bias)
GEMV_CASES = [
    ("nvfp4", torch.bfloat16, 40, 256, _gemv(32, 64, 2), True),
    ("nvfp4", torch.float32, 33, 96, _gemv(32, 32, 1), False),
    ("nvfp4", torch.float16, 64, 512, _gemv(64, 128, 4, 2), True),
    ("mxfp4", torch.bfloat16, 20, 128, _gemv(32, 128, 1), False),
    ("mxfp4", torch.float16, 70, 320, _gemv(32, 32, 5), True),
    ("mxfp4", torch.float32, 32, 256, _gemv(32, 64, 2), True),
    ("mxfp8", torch.bfloat16, 24, 192, _gemv(32, 64, 3), True),
    ("mxfp8", torch.float16, 40, 64, _gemv(32, 32, 1), False),
    ("mxfp8", torch.float32, 33, 256, _gemv(32, 128, 2), True),
]


@pytest.mark.parametrize("kind,dtype,n,k,config,has_bias", GEMV_CASES)
def test_gemv_matches_the_reference(kind, dtype, n, k, config, has_bias):
    weight = _weight(kind, n, k, seed=n)
    g = torch.Generator().manual_seed(k)
    x = torch.randn(1, k, generator=g).to(dtype).to(KERNEL_DEVICE)
    bias = torch.randn(n, generator=g).to(dtype).to(KERNEL_DEVICE) if has_bias else None
    out = poisoned((1, n), dtype)
    got = block_scaled_gemv(x, weight, bias, config=config, out=out)
    assert got is out
    assert_matches(got.cpu(), _reference(x, weight, bias))


@pytest.mark.parametrize("kind", KINDS)
def test_gemv_decodes_every_code_exactly(kind):
    n, k = 32, 64
    weight = _all_codes_weight(kind, n, k)
    eye = torch.eye(k, dtype=torch.float32, device=KERNEL_DEVICE)  # -- one row per column
    got = block_scaled_gemv(eye, weight, None, config=_gemv(32, 32, 2))
    assert torch.equal(got.cpu(), _dequantized(weight, k, torch.float32).t())


@pytest.mark.parametrize("kind", KINDS)
def test_gemv_makes_nan_rows_nan(kind):
    n, k = 32, 128
    weight = _weight(kind, n, k)
    x = torch.randn(2, k, dtype=torch.bfloat16)
    x[1, 5] = float("nan")
    got = block_scaled_gemv(x.to(KERNEL_DEVICE), weight, None, config=_gemv(32, 64, 2)).cpu()
    ref = _reference(x, weight, None)
    assert torch.isnan(got[1]).all() and torch.isnan(ref[1]).all()
    assert_matches(got[:1], ref[:1])


def test_gemv_refuses_what_it_cannot_run():
    weight = _weight("mxfp4", 16, 96)
    x = torch.randn(1, 96, device=KERNEL_DEVICE)
    with pytest.raises(ValueError, match="does not fit K=96"):
        block_scaled_gemv(x, weight, None, config=_gemv(32, 64, 1))
    odd = _weight("mxfp8", 16, 100)
    x100 = torch.randn(1, 100, device=KERNEL_DEVICE)
    assert not gemv_eligible(x100, odd)
    with pytest.raises(ValueError, match="K a multiple of 32"):
        block_scaled_gemv(x100, odd, None)


# -- the MXFP8 GEMM (the FP4 ones are in test_kernels_fp4.py) and the word-read FP4 tiles:
# -- (kind, dtype, M, N, K, config, bias); K = 97/100 read bytes, the others words
GEMM_CASES = [
    ("mxfp8", torch.float32, 1, 33, 100, _tiles(16, 32, 64, 2), True),
    ("mxfp8", torch.float16, 5, 40, 97, _tiles(16, 16, 32, 1), False),
    ("mxfp8", torch.float16, 17, 24, 224, _tiles(16, 16, 64, 3), True),
    ("mxfp8", torch.float32, 70, 36, 160, _tiles(32, 16, 32, 1, 2), True),
    ("nvfp4", torch.float16, 3, 48, 256, _tiles(16, 32, 64, 2), True),
    ("mxfp4", torch.float32, 66, 20, 128, _tiles(32, 32, 64, 1, 1), False),
]


@pytest.mark.parametrize("kind,dtype,m,n,k,config,has_bias", GEMM_CASES)
def test_gemm_matches_the_reference(kind, dtype, m, n, k, config, has_bias):
    weight = _weight(kind, n, k, seed=m)
    g = torch.Generator().manual_seed(k)
    x = torch.randn(m, k, generator=g).to(dtype).to(KERNEL_DEVICE)
    bias = torch.randn(n, generator=g).to(dtype).to(KERNEL_DEVICE) if has_bias else None
    out = poisoned((m, n), dtype)
    got = fp4_gemm(x, weight, bias, config=config, out=out, split_k=m <= 64)
    assert got is out
    assert_matches(got.cpu(), _reference(x, weight, bias))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m,split_k", [(5, True), (70, False)])
def test_gemm_makes_nan_rows_nan(kind, m, split_k):
    n, k = 32, 128
    weight = _weight(kind, n, k)
    x = torch.randn(m, k, dtype=torch.float16)
    x[2, 7] = float("nan")
    config = _tiles(16, 16, 64, 2 if split_k else 1)
    got = fp4_gemm(x.to(KERNEL_DEVICE), weight, None, config=config, split_k=split_k).cpu()
    ref = _reference(x, weight, None)
    assert torch.isnan(got[2]).all() and torch.isnan(ref[2]).all()
    rows = [r for r in range(m) if r != 2]
    assert_matches(got[rows], ref[rows])


@pytest.mark.parametrize("kind", KINDS)
def test_gemm_decodes_every_code_exactly(kind):
    n, k = 32, 64
    weight = _all_codes_weight(kind, n, k)
    eye = torch.eye(k, dtype=torch.float32, device=KERNEL_DEVICE)
    got = fp4_gemm(eye, weight, None, config=_tiles(16, 16, 64, 1), split_k=False)
    assert torch.equal(got.cpu(), _dequantized(weight, k, torch.float32).t())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_is_the_reference_weight(kind, dtype):
    n, k = 24, 100  # -- a partial last block
    weight = _weight(kind, n, k)
    got = dequantize_block_scaled(weight, k, dtype, config=cfg(BLOCK_N=16, BLOCK_K=64)).cpu()
    ref = _dequantized(weight, k, dtype)
    if dtype == torch.bfloat16 and not ON_GPU:
        # -- the interpreter's float32 -> bf16 cast truncates (kernel_utils.TOLERANCES): the
        # -- float32 values are checked bit for bit, their bf16 casts to one ulp
        exact = dequantize_block_scaled(
            weight, k, torch.float32, config=cfg(BLOCK_N=16, BLOCK_K=64)
        )
        assert torch.equal(exact.cpu(), _dequantized(weight, k, torch.float32))
        torch.testing.assert_close(got.float(), ref.float(), rtol=2**-7, atol=0)
    else:
        assert torch.equal(got, ref)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m,k", [(1, 128), (1, 100), (4, 64)])
def test_dispatch_matches_the_reference(kind, m, k):
    weight = _weight(kind, 48, k, seed=k)
    x = torch.randn(m, k, dtype=torch.float16, device=KERNEL_DEVICE)
    assert_matches(block_scaled_matmul(x, weight, None).cpu(), _reference(x, weight, None))


@BF16_DOT_SKIP
@pytest.mark.parametrize("m", [16, 200, 1024])
def test_mxfp8_bf16_autotuned(m):
    weight = _weight("mxfp8", 256, 512)
    x = torch.randn(m, 512).bfloat16().to(KERNEL_DEVICE)
    assert_matches(block_scaled_matmul(x, weight, None).cpu(), _reference(x, weight, None))


def test_bad_mxfp8_weights_are_refused_by_name():
    weight = _weight("mxfp8", 16, 64)
    x = torch.randn(2, 64, device=KERNEL_DEVICE)
    with pytest.raises(ValueError, match="block must be 16"):
        fp4_gemm(x, BlockScaledWeight(weight.qweight, weight.scales, None, 16), None)
    gs = torch.ones(1, device=KERNEL_DEVICE)
    with pytest.raises(ValueError, match="MXFP8 weights take no global_scale"):
        fp4_gemm(x, BlockScaledWeight(weight.qweight, weight.scales, gs, 32), None)
    with pytest.raises(ValueError, match=r"qweight must be torch.float8_e4m3fn \(16, 64\)"):
        fp4_gemm(x, BlockScaledWeight(weight.qweight[:, :-1], weight.scales, None, 32), None)
