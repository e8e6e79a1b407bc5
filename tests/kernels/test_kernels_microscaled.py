"""Microscaled kernels against the numerics and the op's reference: activation quantization
(NVFP4, MXFP4, MXFP8: the same bytes), and the GEMM with quantized activations.

Ragged K (a short last block, an odd K), zero and non-finite blocks, a static and a
dynamic NVFP4 global scale; bf16 tensor-core paths run on the GPU only (the
interpreter's bf16 dot multiplies raw storage).
"""

from __future__ import annotations

import pytest
import torch
from kernel_utils import KERNEL_DEVICE, ON_GPU, assert_matches, cfg, requires_kernels
from torchquant.triton_kernels.microscaled_gemm import microscaled_gemm
from torchquant.triton_kernels.microscaled_quant import quantize_microscaled as quantize_kernel
from torchquant.triton_kernels.microscaled_quant import quantize_to_scaled_values

from torchquant import QuantLinear, scheme_from_name
from torchquant.numerics.fp4 import choose_nvfp4_global_scale, decode_e2m1, expand_blocks, pack_e2m1
from torchquant.numerics.microscaling import (
    MICROSCALED_BLOCKS,
    dequantize_microscaled,
    quantize_microscaled,
)
from torchquant.ops.microscaled import linear_microscaled_reference

pytestmark = requires_kernels

FORMATS = ("nvfp4", "mxfp4", "mxfp8")


def _activation(m: int, k: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 4
    x[0, : min(k, 40)] = 0.0  # -- all-zero blocks
    if m > 2:
        x[2, 1] = 1e-30  # -- a subnormal-scale block max (float32 only)
        x[2, 5] = -6.25  # -- near a tie on the FP4 grid after scaling
    return x.to(dtype)


def _assert_same_bytes(x: torch.Tensor, fmt: str, global_scale: torch.Tensor | None) -> None:
    """The kernel writes the numerics' values (packed as the layer stores them) and scales."""
    q = quantize_microscaled(x, fmt, global_scale)
    values = q.values if fmt == "mxfp8" else pack_e2m1(q.values)
    gs = None if global_scale is None else global_scale.to(KERNEL_DEVICE)
    got_values, got_scales = quantize_kernel(x.to(KERNEL_DEVICE), fmt, gs)
    assert torch.equal(got_scales.view(torch.uint8).cpu(), q.scales.view(torch.uint8))
    assert torch.equal(got_values.view(torch.uint8).cpu(), values.view(torch.uint8))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("m", "k"), [(1, 32), (3, 97), (5, 300)])
def test_activation_quantization_writes_the_numerics_bytes(fmt, dtype, m, k):
    x = _activation(m, k, dtype, seed=k)
    gs = choose_nvfp4_global_scale(x) if fmt == "nvfp4" else None
    _assert_same_bytes(x, fmt, gs)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("m", "k"), [(1, 32), (5, 300)])
def test_scaled_values_are_the_numerics_values_times_their_block_scale(fmt, dtype, m, k):
    x = _activation(m, k, dtype, seed=k + 1)
    gs = choose_nvfp4_global_scale(x) if fmt == "nvfp4" else None
    q = quantize_microscaled(x, fmt, gs)
    if fmt == "nvfp4":  # -- the E4M3 block scale without the global one
        want = decode_e2m1(q.values) * expand_blocks(q.scales.float(), MICROSCALED_BLOCKS[fmt], k)
    else:
        want = dequantize_microscaled(q)
    got = quantize_to_scaled_values(
        x.to(KERNEL_DEVICE), fmt, None if gs is None else gs.to(KERNEL_DEVICE)
    )
    assert got.dtype == torch.bfloat16 and torch.equal(want.bfloat16().float(), want)  # exact
    assert torch.equal(got.float().cpu(), want)


def test_scaled_values_are_nan_where_the_input_is_not_finite():
    x = _activation(4, 64, torch.bfloat16)
    x[1, 3], x[3, 60] = float("nan"), float("-inf")
    got = quantize_to_scaled_values(x.to(KERNEL_DEVICE), "mxfp4").float().cpu()
    bad = ~torch.isfinite(x)
    assert torch.equal(torch.isnan(got), bad)
    want = dequantize_microscaled(quantize_microscaled(x, "mxfp4"))
    assert torch.equal(got[~bad], want[~bad])


@pytest.mark.parametrize("fmt", FORMATS)
def test_gemm_rows_of_non_finite_inputs_come_out_nan(fmt):
    """What the op's reference makes of them, with no pass of the op's own (static NVFP4)."""
    m, n, k = 5, 24, 96
    layer, (qweight, scales, gs, bias) = _layer_tensors(fmt, n, k, torch.float32, seed=2)
    x = _activation(m, k, torch.float32, seed=3)
    x[1, 7], x[4, 90] = float("inf"), float("nan")
    xg = torch.tensor([448.0 * 6.0 / 8.0], device=KERNEL_DEVICE) if fmt == "nvfp4" else None
    scaled = quantize_to_scaled_values(x.to(KERNEL_DEVICE), fmt, xg)
    got = microscaled_gemm(
        scaled, None, xg, qweight, scales, gs, fmt, k, bias, x.dtype, _tiles(16, 16, 32, 2)
    ).cpu()
    want = linear_microscaled_reference(
        x, layer.qweight, layer.scales, getattr(layer, "global_scale", None), layer.bias,
        None if xg is None else xg.cpu(), fmt,
    )  # fmt: skip
    rows = torch.tensor([0, 2, 3])
    assert bool(torch.isnan(got[[1, 4]]).all()) and bool(torch.isnan(want[[1, 4]]).all())
    assert_matches(got[rows], want[rows])


def test_a_static_global_scale_and_non_finite_inputs():
    x = _activation(4, 64, torch.float32)
    x[1, 3], x[3, 60] = float("nan"), float("-inf")
    static = torch.tensor([448.0 * 6.0 / 2.0])  # -- calibrated on max |x| = 2: saturates
    for fmt, gs in (("nvfp4", static), ("mxfp4", None), ("mxfp8", None)):
        _assert_same_bytes(x, fmt, gs)


def test_bad_arguments_are_refused_by_name():
    x = torch.randn(2, 32, device=KERNEL_DEVICE)
    with pytest.raises(ValueError, match="global_scale must be given exactly for nvfp4"):
        quantize_kernel(x, "nvfp4")
    with pytest.raises(ValueError, match="fmt must be one of"):
        quantize_kernel(x, "fp6")
    with pytest.raises(ValueError, match="x must be a 2-D"):
        quantize_kernel(x.reshape(-1), "mxfp8")


# -- the GEMM


def _tiles(bm: int, bn: int, bk: int, split_k: int, group_m: int = 8):
    return cfg(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split_k, GROUP_M=group_m)


def _layer_tensors(fmt: str, n: int, k: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g)
    layer = QuantLinear.from_weight(
        w.to(dtype), torch.randn(n, generator=g).to(dtype), scheme_from_name(fmt)
    )
    gs = getattr(layer, "global_scale", None)
    return layer, [
        t if t is None else t.to(KERNEL_DEVICE)
        for t in (layer.qweight, layer.scales, gs, layer.bias)
    ]


def _run_gemm(fmt, x, weight, k, config, dot_scaled=False):
    qweight, scales, gs, bias = weight
    xg = choose_nvfp4_global_scale(x).to(KERNEL_DEVICE) if fmt == "nvfp4" else None
    if dot_scaled:
        xv, xs = quantize_kernel(x.to(KERNEL_DEVICE), fmt, xg)
    else:
        xv, xs = quantize_to_scaled_values(x.to(KERNEL_DEVICE), fmt, xg), None
    return microscaled_gemm(
        xv, xs, xg, qweight, scales, gs, fmt, k, bias, x.dtype, config, dot_scaled
    )


# (fmt, dtype, M, N, K, config): split-K (M <= 64) and tiled, ragged everywhere
GEMM_CASES = [
    ("nvfp4", torch.float32, 1, 33, 100, _tiles(16, 32, 64, 2)),
    ("mxfp4", torch.float32, 3, 20, 97, _tiles(16, 16, 32, 1)),
    ("mxfp8", torch.float32, 5, 40, 160, _tiles(16, 32, 128, 3)),
    ("nvfp4", torch.float16, 70, 36, 80, _tiles(32, 16, 32, 1, 2)),
    ("mxfp4", torch.float16, 66, 20, 64, _tiles(32, 32, 64, 1, 1)),
    ("mxfp8", torch.float32, 67, 24, 72, _tiles(32, 16, 64, 1)),
]


@pytest.mark.parametrize("fmt,dtype,m,n,k,config", GEMM_CASES)
def test_gemm_matches_the_op_reference(fmt, dtype, m, n, k, config):
    layer, weight = _layer_tensors(fmt, n, k, dtype, seed=m)
    x = _activation(m, k, dtype, seed=n)
    got = _run_gemm(fmt, x, weight, k, config)
    assert_matches(got.cpu(), layer.reference_forward(x))


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp8"])
def test_dot_scaled_route_matches_the_op_reference(fmt):
    """The Blackwell route, run by the interpreter's ``dot_scaled`` (no sm_100 GPU here)."""
    m, n, k = 4, 32, 96
    layer, weight = _layer_tensors(fmt, n, k, torch.float32, seed=3)
    x = _activation(m, k, torch.float32, seed=4)
    got = _run_gemm(fmt, x, weight, k, _tiles(16, 32, 64, 1), dot_scaled=True)
    assert_matches(got.cpu(), layer.reference_forward(x))


def test_gemm_refuses_mismatched_operands():
    _, (qweight, scales, gs, _) = _layer_tensors("nvfp4", 16, 64, torch.float32, seed=0)
    _, (mx_weight, mx_scales, _, _) = _layer_tensors("mxfp4", 16, 64, torch.float32, seed=0)
    xv, xs = quantize_kernel(torch.randn(2, 64, device=KERNEL_DEVICE), "mxfp4")
    with pytest.raises(ValueError, match="x scales must be a row-major torch.uint8"):
        microscaled_gemm(xv, xs[:, :1], None, mx_weight, mx_scales, None, "mxfp4", 64, None,
                         torch.float32, dot_scaled=True)  # fmt: skip
    with pytest.raises(ValueError, match="dequantizing route takes the activation's scaled"):
        microscaled_gemm(xv, xs, gs, qweight, scales, gs, "nvfp4", 64, None, torch.float32)
    with pytest.raises(ValueError, match=r"x scaled values must be bf16 \(2, 64\)"):
        microscaled_gemm(xv, None, gs, qweight, scales, gs, "nvfp4", 64, None, torch.float32)
    with pytest.raises(ValueError, match="dot_scaled serves MX formats"):
        xg = torch.ones(1, device=KERNEL_DEVICE)
        xv, xs = quantize_kernel(torch.randn(2, 64, device=KERNEL_DEVICE), "nvfp4", xg)
        microscaled_gemm(xv, xs, xg, qweight, scales, gs, "nvfp4", 64, None, torch.float32,
                         dot_scaled=True)  # fmt: skip


@pytest.mark.skipif(not ON_GPU, reason="the op's CUDA path needs a GPU")
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m", [1, 16, 200])
def test_the_layer_runs_the_kernels_on_cuda(fmt, m):
    layer, _ = _layer_tensors(fmt, 256, 512, torch.bfloat16, seed=m)
    x = _activation(m, 512, torch.bfloat16, seed=1)
    want = layer.reference_forward(x)
    got = layer.to("cuda")(x.to("cuda"))
    assert_matches(got.cpu(), want)
