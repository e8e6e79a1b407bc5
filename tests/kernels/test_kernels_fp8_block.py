"""FP8 block GEMM and per-group activation quantization vs the references."""

from __future__ import annotations

import pytest
import torch
from kernel_utils import KERNEL_DEVICE, assert_matches, cfg, poisoned, requires_kernels
from torchquant.triton_kernels.fp8_block_gemm import fp8_block_gemm, quantize_activation_groups

from torchquant import numerics
from torchquant.ops.fp8_block import linear_fp8_block_cuda, linear_fp8_block_reference

pytestmark = requires_kernels

SMALL = cfg(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, SPLIT_K=1, GROUP_M=2)
WIDE = cfg(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, SPLIT_K=1, GROUP_M=4)


def _case(m: int, n: int, k: int, block: tuple[int, int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g)
    x = torch.randn(m, k, generator=g) * (1 + 20 * torch.rand(1, k, generator=g))
    q, s = numerics.quantize_fp8_block_weight(w, block)
    return x.to(KERNEL_DEVICE), q.to(KERNEL_DEVICE), s.to(KERNEL_DEVICE)


@pytest.mark.parametrize(("m", "k"), [(1, 128), (5, 300), (33, 256)])
def test_group_quantization_matches_the_numerics(m, k):
    x = torch.randn(m, k, device=KERNEL_DEVICE) * 5
    q, scales = quantize_activation_groups(x, 128)
    q_ref, s_ref = numerics.quantize_activation_groups(x.cpu(), 128)
    assert q.shape == (m, k) and scales.shape == s_ref.shape
    torch.testing.assert_close(scales.cpu(), s_ref, rtol=0, atol=0)
    assert torch.equal(q.cpu().view(torch.uint8), q_ref.view(torch.uint8))


@pytest.mark.parametrize("config", [SMALL, WIDE], ids=["small", "wide"])
@pytest.mark.parametrize(
    ("m", "n", "k", "block"),
    [(7, 96, 256, (128, 128)), (17, 200, 300, (128, 128)), (4, 80, 192, (32, 64))],
)
@pytest.mark.parametrize("bias", [False, True])
def test_block_gemm_matches_the_reference(config, m, n, k, block, bias):
    if block[1] % config.kwargs["BLOCK_K"]:
        pytest.skip("BLOCK_K must divide the scale group")
    x, q, s = _case(m, n, k, block)
    b = torch.randn(n, device=KERNEL_DEVICE) if bias else None
    xq, xs = numerics.quantize_activation_groups(x.cpu(), block[1])
    out = poisoned((m, n), torch.float32)
    got = fp8_block_gemm(xq.to(KERNEL_DEVICE), xs.to(KERNEL_DEVICE), q, s, *block, b,
                         torch.float32, config=config, out=out)  # fmt: skip
    assert got is out
    want = linear_fp8_block_reference(x.cpu(), q.cpu(), s.cpu(), None if b is None else b.cpu(),
                                      *block)  # fmt: skip
    assert_matches(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_op_matches_the_reference_and_poisons_nonfinite_rows(dtype):
    x, q, s = _case(6, 136, 384, (128, 128), seed=1)
    x = x.to(dtype)
    x[2, 300] = float("nan")
    got = linear_fp8_block_cuda(x.unsqueeze(0), q, s, None, 128, 128)[0]
    want = linear_fp8_block_reference(x.cpu(), q.cpu(), s.cpu(), None, 128, 128)
    assert bool(got[2].isnan().all())
    keep = [0, 1, 3, 4, 5]
    assert_matches(got[keep], want[keep])


def test_bad_operands_are_refused():
    x, q, s = _case(2, 64, 128, (128, 128))
    xq, xs = quantize_activation_groups(x, 128)
    with pytest.raises(ValueError, match="b_scale"):
        fp8_block_gemm(xq, xs, q, s[:, :0], 128, 128, None, torch.float32)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fp8_block_gemm(x, xs, q, s, 128, 128, None, torch.float32)
    with pytest.raises(ValueError, match="multiple of 64"):
        fp8_block_gemm(xq, xs, q, s, 128, 128 + 32, None, torch.float32)
