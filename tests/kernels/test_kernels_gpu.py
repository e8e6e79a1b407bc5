"""Compiled kernels on a CUDA device: autotuned paths on model-sized shapes, QuantLinear
dispatch, ``torch.compile(fullgraph=True)`` and CUDA-graph capture of decode."""

from __future__ import annotations

import pytest
import torch
from act_order_weights import act_order_weight
from kernel_utils import (
    ON_GPU,
    DispatchedOps,
    assert_matches,
    int_weight,
    relative_error,
    w8a8_case,
    weight_only_reference,
)
from torchquant.triton_kernels import dequant_gemm as dequant_gemm_module
from torchquant.triton_kernels.act_quant import quantize_activation_rows
from torchquant.triton_kernels.dequant import dequantize_weight
from torchquant.triton_kernels.dequant_gemm import dequant_gemm
from torchquant.triton_kernels.dequant_gemv import dequant_gemv
from torchquant.triton_kernels.dequant_matmul import select_path
from torchquant.triton_kernels.fp8_gemm import fp8_supported
from torchquant.triton_kernels.w8a8_gemm import int8_gemm
from torchquant.triton_kernels.weight import QuantWeight

from torchquant import QuantConfig, QuantLinear, convert_model, scheme_from_name
from torchquant.numerics import quantize_activation as reference_quantize

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not ON_GPU, reason="compiled kernels need CUDA (and no TRITON_INTERPRET)"),
]
needs_fp8 = pytest.mark.skipif(
    not (ON_GPU and fp8_supported()), reason="FP8 needs compute capability >= 8.9"
)


def _layer(scheme: str, n: int, k: int, dtype=torch.bfloat16, group_size=None) -> QuantLinear:
    linear = torch.nn.Linear(k, n, device="cuda", dtype=dtype)
    return QuantLinear.from_linear(linear, scheme_from_name(scheme, group_size))


@pytest.mark.parametrize("m", [1, 16, 64, 300, 2048])
@pytest.mark.parametrize("scheme,group", [("w4a16", 128), ("w3a16", 64), ("w8a16", None)])
def test_autotuned_weight_only_paths(scheme, group, m):
    layer = _layer(scheme, 1000, 1536, group_size=group)
    x = torch.randn(m, 1536, device="cuda", dtype=torch.bfloat16)
    out = layer(x)
    w = layer.scheme.weight
    args = (layer.qweight, layer.scales, layer.zeros, layer.bias, w.bits, w.group_size)
    ref = weight_only_reference(x, *args, compute_dtype=torch.float32)
    assert relative_error(out, ref) < 1e-2, select_path(m)
    ref = layer.cpu()(x.cpu())  # the CPU op
    assert relative_error(out, ref) < 1e-2


# -- W8A8 and FP8 weights, and the families added after them: INT4 x 8-bit activations, FP8
# -- blocks, FP4 weights, microscaled weights with activations (FP8 or FP4 scales: sm_89+)
ACTIVATION_AND_LATER_SCHEMES = [
    "w8a8",
    "w4a8",
    "w8a4",
    "w4a4",
    "w8a8-asym",
    *(
        pytest.param(name, marks=needs_fp8)
        for name in ("fp8", "w8a16-fp8", "w4a8-fp8", "fp8-block", "w8a16-fp8-block")
    ),
    *(
        pytest.param(name, marks=needs_fp8)
        for name in ("nvfp4a16", "mxfp4a16", "nvfp4", "mxfp4", "mxfp8")
    ),
]


@pytest.mark.parametrize("m", [1, 16, 256, 1000])
@pytest.mark.parametrize("scheme", ACTIVATION_AND_LATER_SCHEMES)
def test_autotuned_activation_quantized_and_later_paths(scheme, m):
    layer = _layer(scheme, 1000, 1536)
    x = torch.randn(m, 1536, device="cuda", dtype=torch.bfloat16)
    out = layer(x)
    ref = layer.cpu()(x.cpu())
    assert relative_error(out, ref) < 2e-2


@pytest.mark.parametrize("m", [1, 16, 300])
def test_act_order_layer_runs_the_sorted_weight_and_matches_the_g_idx_reference(m):
    scheme = scheme_from_name("w4a16", 128)
    layer = QuantLinear(1536, 1000, scheme, bias=False, dtype=torch.bfloat16, g_idx=True)
    qweight, scales, zeros, g_idx = act_order_weight(1000, 1536, 4, 128, False, seed=m)
    for name, value in (("qweight", qweight), ("scales", scales), ("zeros", zeros)):
        getattr(layer, name).copy_(value)
    layer.g_idx.copy_(g_idx)
    x = torch.randn(m, 1536, dtype=torch.bfloat16)
    ref = layer(x)  # the CPU op (its layout also sorts the columns by group)
    layer = layer.cuda()
    with DispatchedOps() as dispatched:
        out = layer(x.cuda())
    assert "linear_intn_act_order" in dispatched.names, dispatched.names
    assert relative_error(out, ref) < 1e-2
    exact = layer.reference_forward(x.cuda())
    assert relative_error(out, exact) < 1e-2


@pytest.mark.parametrize("act_dtype", ["int8", pytest.param("fp8", marks=needs_fp8)])
@pytest.mark.parametrize("per_token", [True, False])
def test_activation_quantization_is_bit_exact(act_dtype, per_token):
    x = torch.randn(513, 4096, device="cuda", dtype=torch.bfloat16) * 4
    x[7] = 0
    q, s = quantize_activation_rows(x, act_dtype, per_token)
    q_ref, s_ref = reference_quantize(x.cpu(), act_dtype, per_token)
    assert torch.equal(q.cpu().view(torch.int8), q_ref.view(torch.int8))
    assert torch.equal(s.cpu(), s_ref)


class _Mlp(torch.nn.Module):
    def __init__(self, dim: int = 512, hidden: int = 1408) -> None:
        super().__init__()
        self.up = torch.nn.Linear(dim, hidden)
        self.down = torch.nn.Linear(hidden, dim)

    def forward(self, x):
        return self.down(torch.nn.functional.silu(self.up(x)))


@pytest.mark.parametrize("scheme", ["w4a16", "w8a16", "w8a8", pytest.param("fp8", marks=needs_fp8)])
def test_torch_compile_fullgraph(scheme):
    model, _ = convert_model(_Mlp().to("cuda", torch.bfloat16), QuantConfig(scheme), progress=False)
    x = torch.randn(4, 7, 512, device="cuda", dtype=torch.bfloat16)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True)
    assert_matches(compiled(x), eager)


@pytest.mark.parametrize("scheme", ["w4a16", "w8a16", "w8a8", pytest.param("fp8", marks=needs_fp8)])
@pytest.mark.parametrize("batch", [1, 16])
def test_cuda_graph_capture_of_decode(scheme, batch):
    model, _ = convert_model(_Mlp().to("cuda", torch.bfloat16), QuantConfig(scheme), progress=False)
    static_x = torch.randn(batch, 512, device="cuda", dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up runs the autotuner outside the capture
        for _ in range(3):
            model(static_x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = model(static_x)
    for _ in range(2):
        static_x.copy_(torch.randn_like(static_x))
        graph.replay()
        assert_matches(static_out, model(static_x))


def test_capture_without_warm_up_says_what_to_do(monkeypatch):
    tuned = dequant_gemm_module._split_k_tuned  # the path of M = 3
    monkeypatch.setattr(tuned, "cache", {})  # nothing tuned yet, in memory ...
    monkeypatch.setattr(tuned, "cache_results", False)  # ... or on disk from an earlier run
    layer = _layer("w4a16", 1234, 640, group_size=64)
    x = torch.randn(3, 640, device="cuda", dtype=torch.bfloat16)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="run the model once with the same shapes"):
        with torch.cuda.graph(graph):
            layer(x)
    torch.cuda.synchronize()
    assert relative_error(layer(x), layer.cpu()(x.cpu())) < 1e-2  # fine after the warm-up


@pytest.mark.skipif(not ON_GPU or fp8_supported(), reason="needs a GPU without FP8 support")
def test_fp8_falls_back_on_older_gpus():
    layer = _layer("fp8", 64, 128)
    with pytest.warns(UserWarning, match="compute capability"):
        layer(torch.randn(3, 128, device="cuda", dtype=torch.bfloat16))


# -- operands past 2**31 elements: row offsets times strides must not wrap in int32

BIG_ROWS = 2**31 // 4096 + 3  # rows of K = 4096: just past 2**31 elements
needs_memory = pytest.mark.skipif(
    not ON_GPU or torch.cuda.get_device_properties(0).total_memory < 32 * 2**30,
    reason="needs a GPU with 32 GiB",
)


def _last_rows_match(out: torch.Tensor, ref_rows: torch.Tensor) -> None:
    assert relative_error(out[-ref_rows.shape[0] :], ref_rows) < 1e-2


@needs_memory
def test_activation_quantization_past_2_31_elements():
    x = torch.randn(BIG_ROWS, 4096, device="cuda", dtype=torch.bfloat16)
    q, s = quantize_activation_rows(x, "int8", True)
    q_ref, s_ref = reference_quantize(x[-64:].cpu(), "int8", True)
    assert torch.equal(q[-64:].cpu(), q_ref) and torch.equal(s[-64:].cpu(), s_ref)


@needs_memory
def test_dequantize_and_gemv_past_2_31_weight_elements():
    qweight = torch.randint(-127, 128, (BIG_ROWS, 4096), dtype=torch.int8, device="cuda")
    scales = torch.rand(BIG_ROWS, 1, device="cuda") * 0.01
    weight = QuantWeight(qweight, scales, None, 8, -1)
    w = dequantize_weight(weight, 4096, torch.bfloat16)
    assert torch.equal(w[-64:], (qweight[-64:].float() * scales[-64:]).to(torch.bfloat16))
    del w
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    out = dequant_gemv(x, weight, None)
    _last_rows_match(out.t(), (x.float() @ (qweight[-64:].float() * scales[-64:]).t()).t())


@needs_memory
def test_tiled_gemm_past_2_31_activation_elements():
    qweight, scales, zeros, _ = int_weight(64, 4096, 4, 128, False, torch.bfloat16)
    x = torch.randn(BIG_ROWS, 4096, device="cuda", dtype=torch.bfloat16)
    out = dequant_gemm(x, QuantWeight(qweight, scales, zeros, 4, 128), None, split_k=False)
    _last_rows_match(out, weight_only_reference(x[-64:], qweight, scales, zeros, None, 4, 128))


@needs_memory
def test_int8_gemm_past_2_31_elements_in_either_operand():
    # -- the last 64 rows of the big operand are reference-quantized: the reference op checks them
    x = torch.randn(64, 4096, device="cuda", dtype=torch.float32)
    small = torch.randint(-127, 128, (48, 4096), dtype=torch.int8, device="cuda")
    small_scale = torch.rand(48, 1, device="cuda") * 0.01
    big = torch.randint(-127, 128, (BIG_ROWS, 4096), dtype=torch.int8, device="cuda")
    big_scale = torch.rand(BIG_ROWS, 1, device="cuda")
    xq, xs, ref = w8a8_case(x, (small, small_scale, None), "int8", per_token=True)
    big[-64:], big_scale[-64:] = xq, xs
    out = int8_gemm(big, small, big_scale, small_scale, None, torch.float32)  # M is huge
    _last_rows_match(out, ref)
    big_scale[-64:] = torch.rand(64, 1, device="cuda") * 0.01
    xq, xs, ref = w8a8_case(x[:2], (big[-64:], big_scale[-64:], None), "int8", per_token=True)
    out = int8_gemm(xq, big, xs, big_scale, None, torch.float32)  # N is
    _last_rows_match(out.t(), ref.t())
