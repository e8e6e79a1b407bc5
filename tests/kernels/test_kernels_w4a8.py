"""W4A8 GEMM (INT8 and FP8 activations x packed 4-bit codes) vs the reference op, directly
and through the registered CUDA implementation; compiled runs on a GPU."""

from __future__ import annotations

import pytest
import torch
from kernel_utils import (
    KERNEL_DEVICE,
    ON_GPU,
    assert_matches,
    cfg,
    int_weight,
    poisoned,
    requires_kernels,
)
from torchquant.triton_kernels.fp8_gemm import fp8_supported
from torchquant.triton_kernels.w4a8_gemm import (
    SPLIT_K_CONFIGS,
    SPLIT_WORKSPACE_BYTES,
    TUNED,
    k_steps,
    k_tiling,
    prune_splits,
    split_limit,
    w4a8_gemm,
)

from torchquant import ops
from torchquant.numerics import quantize_activation
from torchquant.ops import cuda as cuda_ops

pytestmark = requires_kernels

SMALL = cfg(BLOCK_M=16, BLOCK_N=32, SPLIT_K=1, GROUP_M=2)
WIDE = cfg(BLOCK_M=32, BLOCK_N=16, SPLIT_K=1, GROUP_M=4)
GLUE = {"int8": cuda_ops.linear_w4a8_int8_cuda, "fp8": cuda_ops.linear_w4a8_fp8_cuda}
OPS = {"int8": ops.linear_w4a8_int8, "fp8": ops.linear_w4a8_fp8}


def _layer(n: int, k: int, group_size: int, dtype: torch.dtype, has_bias: bool):
    qweight, scales, _, _ = int_weight(n, k, 4, group_size, True, dtype)
    bias = torch.randn(n, device=KERNEL_DEVICE).to(dtype) if has_bias else None
    return qweight, scales, bias


def _reference(x, qweight, scales, bias, group_size, act_type, per_token=True, static=None,
               smooth=None):  # fmt: skip
    cpu = [t.cpu() if isinstance(t, torch.Tensor) else t for t in (x, qweight, scales, bias)]
    static = static.cpu() if static is not None else None
    smooth = smooth.cpu() if smooth is not None else None
    return ops.linear_w4a8_reference(*cpu, group_size, act_type, per_token, 100.0, static, smooth)


# -- split-K: 3 splits of the groups (the last one short or empty), partial tiles; 4 and 8
# -- splits, the counts the SM-filling limit picks up to 64 rows
SPLIT3 = cfg(BLOCK_M=16, BLOCK_N=32, SPLIT_K=3, GROUP_M=2)
SPLIT4 = cfg(BLOCK_M=32, BLOCK_N=16, SPLIT_K=4, GROUP_M=2)
SPLIT8 = cfg(BLOCK_M=16, BLOCK_N=16, SPLIT_K=8, GROUP_M=2)

# (M, N, K, group_size, config, dtype, bias): partial last groups (K = 200, 100, 600),
# per channel, rows and columns past one tile, groups of two K tiles (256), full tiles
# (no K masks: K = 256), groups split over programs
CASES = [
    (5, 40, 200, 64, SMALL, torch.float32, True),
    (19, 33, 100, 32, WIDE, torch.float16, False),
    (37, 24, 256, 128, SMALL, torch.float32, True),
    (3, 20, 96, -1, WIDE, torch.float32, False),
    (7, 36, 600, 256, SMALL, torch.bfloat16, True),
    (4, 40, 600, 64, SPLIT3, torch.float32, True),
    (18, 20, 256, 256, SPLIT3, torch.float16, False),
    (2, 24, 200, -1, SPLIT3, torch.float32, True),
    (40, 20, 224, 32, SPLIT4, torch.float32, True),  # -- 7 groups: runs of 2, 2, 2, 1
    (64, 24, 600, -1, SPLIT4, torch.bfloat16, False),  # -- 5 K tiles of one row scale
    (33, 18, 512, 64, SPLIT8, torch.float16, True),  # -- one group a split
    (9, 32, 320, 64, SPLIT8, torch.float32, False),  # -- 5 groups: splits 5-7 empty
]


@pytest.mark.parametrize("act_type", ["int8", "fp8"])
@pytest.mark.parametrize("m,n,k,group_size,config,dtype,has_bias", CASES)
def test_gemm_matches_reference(act_type, m, n, k, group_size, config, dtype, has_bias):
    qweight, scales, bias = _layer(n, k, group_size, dtype, has_bias)
    x = (torch.randn(m, k) * 3).to(dtype)
    xq, xs = quantize_activation(x, act_type, per_token=True)
    out = poisoned((m, n), dtype)
    got = w4a8_gemm(xq.to(KERNEL_DEVICE), xs.to(KERNEL_DEVICE), qweight, scales, group_size,
                    bias, dtype, config, out)  # fmt: skip
    assert got is out
    assert_matches(got, _reference(x, qweight, scales, bias, group_size, act_type))


@pytest.mark.parametrize("act_type", ["int8", "fp8"])
@pytest.mark.parametrize("group_size", [64, -1])
def test_tiled_tuning_matches_reference(act_type, group_size):
    """Rows past 64 run whole-K tiles (``split_k=False``), here forced on a small shape."""
    m, n, k = 70, 36, 200
    qweight, scales, bias = _layer(n, k, group_size, torch.float32, True)
    x = torch.randn(m, k) * 2
    xq, xs = quantize_activation(x, act_type, per_token=True)
    got = w4a8_gemm(xq.to(KERNEL_DEVICE), xs.to(KERNEL_DEVICE), qweight, scales, group_size,
                    bias, torch.float32, WIDE, split_k=False)  # fmt: skip
    assert_matches(got, _reference(x, qweight, scales, bias, group_size, act_type))


@pytest.mark.parametrize("act_type", ["int8", "fp8"])
def test_split_k_keeps_nan_rows_and_matches_reference(act_type):
    """Each split's partial tile goes through the workspace; a NaN activation scale (a
    non-finite input row) still makes its output row NaN and only that row."""
    m, n, k = 6, 40, 384
    qweight, scales, bias = _layer(n, k, 64, torch.float32, True)
    x = torch.randn(m, k)
    xq, xs = quantize_activation(x, act_type, per_token=True)
    xs[2] = float("nan")
    args = (qweight, scales, 64, bias, torch.float32, SPLIT3)
    got = w4a8_gemm(xq.to(KERNEL_DEVICE), xs.to(KERNEL_DEVICE), *args, split_k=True).cpu()
    ref = _reference(x, qweight, scales, bias, 64, act_type).cpu()
    assert got[2].isnan().all()
    rows = [0, 1, 3, 4, 5]
    assert_matches(got[rows], ref[rows])


def test_split_limit_fills_the_sms_within_the_groups_and_the_workspace():
    """Up to 64 rows a config splits no further than its programs need to cover the SMs:
    4096 x 4096 at M = 64 in 64 x 128 tiles (32 tiles) up to 8 splits, 64 x 64 tiles
    (64) up to 4; never more splits than K steps, nor partial tiles past the workspace."""
    wide, narrow = SPLIT_K_CONFIGS[0], cfg(BLOCK_M=64, BLOCK_N=64, SPLIT_K=1, GROUP_M=8)
    assert (wide.kwargs["BLOCK_M"], wide.kwargs["BLOCK_N"]) == (64, 128)
    groups = k_steps(4096, 128, 1)
    assert groups == 32 and k_steps(600, 128, 0) == 5 and k_steps(600, 64, 2) == 5
    assert split_limit(64, 4096, groups, wide, 132) == 8
    assert split_limit(64, 4096, groups, narrow, 132) == 4
    assert split_limit(64, 8192, groups, wide, 132) == 4
    assert split_limit(64, 14336, groups, wide, 132) == 2
    assert split_limit(64, 28672, groups, wide, 132) == 1  # -- 224 tiles fill 132 SMs
    assert split_limit(1, 4096, 3, wide, 132) == 3  # -- three groups to share
    # -- no SM count (CPU tensors): the groups and the workspace bound alone
    assert split_limit(16, 4096, groups, wide, None) == groups
    rows, n = 64, SPLIT_WORKSPACE_BYTES // (4 * 64 * 3)
    assert split_limit(rows, n, groups, wide, None) == 3
    assert split_limit(rows, 4 * n, groups, wide, None) == 1


@pytest.mark.parametrize("act_type", ["int8", "fp8"])
def test_untuned_split_launch_runs_a_config_the_limit_keeps(act_type):
    """One group over 64 rows: no config splitting it in two is kept, so the untuned launch
    runs unsplit (its workspace holds one plane) and matches the reference."""
    m, n, k = 64, 24, 64
    qweight, scales, bias = _layer(n, k, 64, torch.float32, True)
    x = torch.randn(m, k)
    xq, xs = quantize_activation(x, act_type, per_token=True)
    args = dict(M=m, N=n, K=k, a_ptr=xq, **k_tiling(k, 64))
    assert {c.kwargs["SPLIT_K"] for c in prune_splits(TUNED[xq.dtype][0].configs, args)} == {1}
    got = w4a8_gemm(xq.to(KERNEL_DEVICE), xs.to(KERNEL_DEVICE), qweight, scales, 64, bias,
                    torch.float32, split_k=True)  # fmt: skip
    assert_matches(got, _reference(x, qweight, scales, bias, 64, act_type))


def test_tiled_tuning_refuses_split_configs():
    qweight, scales, _ = _layer(8, 64, 32, torch.float32, False)
    a = torch.zeros(4, 64, dtype=torch.int8, device=KERNEL_DEVICE)
    s4 = torch.ones(4, 1, device=KERNEL_DEVICE)
    with pytest.raises(ValueError, match="SPLIT_K=1 configs only"):
        w4a8_gemm(a, s4, qweight, scales, 32, None, torch.float32, SPLIT3, split_k=False)


def test_int8_group_sums_are_exact():
    # -- extreme codes: every group sum is an integer a float accumulation would round
    m, n, k = 17, 16, 512
    xq = torch.full((m, k), -128, dtype=torch.int8)
    xq[:, ::3] = 127
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    from torchquant.numerics import pack_codes

    qweight = pack_codes(codes, 4).to(KERNEL_DEVICE)
    ones = torch.ones(n, k // 128, device=KERNEL_DEVICE)
    out = w4a8_gemm(xq.to(KERNEL_DEVICE), torch.ones(m, 1, device=KERNEL_DEVICE), qweight, ones,
                    128, None, torch.float32, SMALL)  # fmt: skip
    exact = xq.long() @ (codes.long() - 8).t()
    assert torch.equal(out.cpu().long(), exact)


@pytest.mark.parametrize("act_type", ["int8", "fp8"])
@pytest.mark.parametrize("per_token", [True, False])
def test_cuda_op_glue_matches_reference_op(act_type, per_token):
    """The registered CUDA implementation (run here on CPU tensors) vs the reference op."""
    k, n = 160, 40  # -- group 64: a partial last group of 32
    qweight, scales, bias = _layer(n, k, 64, torch.float16, True)
    x = torch.randn(2, 3, k, device=KERNEL_DEVICE).to(torch.float16)
    smooth = (torch.rand(k) + 0.5).to(KERNEL_DEVICE)
    out = GLUE[act_type](x, qweight, scales, bias, 64, per_token, 100.0, None, smooth)
    assert out.shape == (2, 3, n)
    ref = _reference(x, qweight, scales, bias, 64, act_type, per_token, None, smooth)
    assert_matches(out, ref)
    static = torch.tensor([0.03], device=KERNEL_DEVICE)
    out = GLUE[act_type](x, qweight, scales, None, 64, True, 100.0, static, None)
    assert_matches(out, _reference(x, qweight, scales, None, 64, act_type, True, static))


@pytest.mark.parametrize("act_type", ["int8", "fp8"])
def test_nonfinite_rows_give_nan_rows(act_type):
    qweight, scales, _ = _layer(16, 128, 64, torch.float32, False)
    x = torch.randn(4, 128, device=KERNEL_DEVICE)
    x[1, 7] = float("nan")
    out = GLUE[act_type](x, qweight, scales, None, 64, True, 100.0, None, None)
    assert out[1].isnan().all() and out[[0, 2, 3]].isfinite().all()


def test_rejects_bad_operands():
    qweight, scales, _ = _layer(8, 64, 32, torch.float32, False)
    a = torch.zeros(4, 64, dtype=torch.int8, device=KERNEL_DEVICE)
    s4 = torch.ones(4, 1, device=KERNEL_DEVICE)
    with pytest.raises(ValueError, match="a must be"):
        w4a8_gemm(a.float(), s4, qweight, scales, 32, None, torch.float32)
    with pytest.raises(ValueError, match="qweight must be int32"):
        w4a8_gemm(a[:, :32], s4, qweight, scales, 32, None, torch.float32)
    with pytest.raises(ValueError, match=r"scales must be \(8, 2\)"):
        w4a8_gemm(a, s4, qweight, scales[:, :1], 32, None, torch.float32)
    with pytest.raises(ValueError, match="group_size"):
        w4a8_gemm(a, s4, qweight, scales, 24, None, torch.float32)
    with pytest.raises(ValueError, match="a_scale"):
        w4a8_gemm(a, s4[:2], qweight, scales, 32, None, torch.float32)
    # -- one scale per row over a K whose int32 sums could overflow
    k = 131104
    wide = torch.zeros(1, k // 8, dtype=torch.int32, device=KERNEL_DEVICE)
    a_wide = torch.zeros(1, k, dtype=torch.int8, device=KERNEL_DEVICE)
    one = torch.ones(1, 1, device=KERNEL_DEVICE)
    with pytest.raises(ValueError, match="int32 sums hold at most 131071 columns"):
        w4a8_gemm(a_wide, one[:1], wide, one, -1, None, torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="compiled kernels need CUDA (and no TRITON_INTERPRET)")
@pytest.mark.parametrize("act_type", ["int8", "fp8"])
@pytest.mark.parametrize("m", [1, 16, 256, 1024])
def test_compiled_layer_matches_reference_at_model_shapes(act_type, m):
    if act_type == "fp8" and not fp8_supported():
        pytest.skip("FP8 needs compute capability >= 8.9")
    from torchquant import QuantLinear, scheme_from_name

    name = "w4a8" if act_type == "int8" else "w4a8-fp8"
    linear = torch.nn.Linear(576, 1536, device="cuda", dtype=torch.bfloat16)
    layer = QuantLinear.from_linear(linear, scheme_from_name(name))  # -- g128: partial group
    x = torch.randn(m, 576, device="cuda", dtype=torch.bfloat16)
    assert_matches(layer(x), layer.reference_forward(x.cpu()).to(torch.bfloat16))
