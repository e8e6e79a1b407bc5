"""The FP4 weight-only GEMM (NVFP4, MXFP4) against the op's exact reference.

Ragged M, N and K (odd K: a padded last byte; K past a partial last block), both
scale kinds, split-K and tiled configs, bias; bf16 tensor-core paths run on the GPU
only (the interpreter's bf16 dot multiplies raw storage).
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
from torchquant.triton_kernels.block_scaled_weight import BlockScaledWeight
from torchquant.triton_kernels.fp4_gemm import fp4_gemm

from torchquant.numerics.fp4 import pack_e2m1, quantize_mxfp4_weight, quantize_nvfp4_weight
from torchquant.ops.weight_fp4 import linear_fp4_weight_reference

pytestmark = requires_kernels

KINDS = {"nvfp4": (quantize_nvfp4_weight, 16), "mxfp4": (quantize_mxfp4_weight, 32)}


def _weight(kind: str, n: int, k: int, seed: int = 0):
    quantize, block = KINDS[kind]
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g)
    q = quantize(w)
    gs = None if q.global_scale is None else q.global_scale.to(KERNEL_DEVICE)
    return pack_e2m1(q.codes).to(KERNEL_DEVICE), q.scales.to(KERNEL_DEVICE), gs, block


def _reference(x, qweight, scales, gs, bias, block):
    cpu = [t.cpu() if t is not None else None for t in (x, qweight, scales, gs, bias)]
    return linear_fp4_weight_reference(*cpu, block)


def _tiles(bm: int, bn: int, bk: int, split_k: int, group_m: int = 8):
    return cfg(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split_k, GROUP_M=group_m)


# (kind, dtype, M, N, K, config, bias): split-K (M <= 64) and tiled, ragged everywhere
CASES = [
    ("nvfp4", torch.float32, 1, 33, 100, _tiles(16, 32, 64, 2), True),
    ("mxfp4", torch.float32, 3, 20, 97, _tiles(16, 16, 32, 1), False),
    ("nvfp4", torch.float16, 5, 40, 160, _tiles(16, 32, 128, 1), True),
    ("mxfp4", torch.float16, 17, 24, 224, _tiles(16, 16, 64, 3), True),
    ("nvfp4", torch.float16, 70, 36, 80, _tiles(32, 16, 32, 1, 2), False),
    ("mxfp4", torch.float32, 66, 20, 64, _tiles(32, 32, 64, 1, 1), True),
]


@pytest.mark.parametrize("kind,dtype,m,n,k,config,has_bias", CASES)
def test_fp4_gemm_matches_the_reference(kind, dtype, m, n, k, config, has_bias):
    qweight, scales, gs, block = _weight(kind, n, k, seed=m)
    g = torch.Generator().manual_seed(k)
    x = torch.randn(m, k, generator=g).to(dtype).to(KERNEL_DEVICE)
    bias = torch.randn(n, generator=g).to(dtype).to(KERNEL_DEVICE) if has_bias else None
    out = poisoned((m, n), dtype)
    got = fp4_gemm(x, BlockScaledWeight(qweight, scales, gs, block), bias, config=config, out=out)
    assert got is out
    assert_matches(got.cpu(), _reference(x, qweight, scales, gs, bias, block))


@BF16_DOT_SKIP
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("m", [1, 16, 200])
def test_fp4_gemm_bf16_autotuned(kind, m):
    qweight, scales, gs, block = _weight(kind, 256, 512)
    x = torch.randn(m, 512).bfloat16().to(KERNEL_DEVICE)
    got = fp4_gemm(x, BlockScaledWeight(qweight, scales, gs, block), None)
    assert_matches(got.cpu(), _reference(x, qweight, scales, gs, None, block))


def test_a_zero_e8m0_block_and_the_largest_values_decode_exactly():
    n, k = 16, 64
    w = torch.zeros(n, k)
    w[:, 32:] = torch.linspace(-6.0, 6.0, 32)  # scale 2**0 after the -2: codes up to 6
    q = quantize_mxfp4_weight(w)
    assert int(q.scales[0, 0]) == 0  # the all-zero block
    qweight, scales = pack_e2m1(q.codes).to(KERNEL_DEVICE), q.scales.to(KERNEL_DEVICE)
    eye = torch.eye(k, dtype=torch.float32, device=KERNEL_DEVICE)
    got = fp4_gemm(
        eye, BlockScaledWeight(qweight, scales, None, 32), None, config=_tiles(16, 16, 64, 1)
    )
    assert torch.equal(got.cpu(), _reference(eye, qweight, scales, None, None, 32))


def test_bad_weights_are_refused_by_name():
    qweight, scales, gs, _ = _weight("nvfp4", 16, 64)
    x = torch.randn(2, 64, device=KERNEL_DEVICE)
    with pytest.raises(ValueError, match="scales must be torch.uint8"):
        fp4_gemm(x, BlockScaledWeight(qweight, scales, None, 32), None)
    with pytest.raises(ValueError, match="block must be 16"):
        fp4_gemm(x, BlockScaledWeight(qweight, scales, gs, 64), None)
    with pytest.raises(ValueError, match=r"qweight must be torch.uint8 \(16, 32\)"):
        fp4_gemm(x, BlockScaledWeight(qweight[:, :-1], scales, gs, 16), None)


@pytest.mark.skipif(not ON_GPU, reason="the op's CUDA path needs a GPU")
def test_the_op_runs_the_kernel_on_cuda():
    from torchquant.ops.weight_fp4 import linear_fp4_weight

    qweight, scales, gs, block = _weight("nvfp4", 64, 128)
    x = torch.randn(4, 128, dtype=torch.bfloat16, device="cuda")
    got = linear_fp4_weight(x, qweight, scales, gs, None, block)
    assert_matches(got.cpu(), _reference(x, qweight, scales, gs, None, block))
