"""FP8 block-wise weights through the seam: buffers, rounding, the ops, convert, save/load."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torchquant import QuantConfig, QuantizationError, QuantLinear, QuantScheme, convert_model
from torchquant.config import scheme_from_name
from torchquant.numerics import dequantize_fp8_block_weight, quantize_fp8_block_weight
from torchquant.ops import (
    linear_fp8_block,
    linear_fp8_block_reference,
    linear_fp8_block_weight,
    linear_fp8_block_weight_reference,
)
from torchquant.ops.cpu_kernels import BF16_RELATIVE_ERROR
from torchquant.ops.fp8_block import linear_fp8_block_cpu, linear_fp8_block_weight_cpu
from torchquant.serialization import load_quantized, save_quantized
from torchquant.weights import Fp8BlockFormat, weight_format

NAMES = ["fp8-block", "w8a16-fp8-block"]
N, K = 200, 300  # partial blocks along both dimensions


def _layer(name: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    w, b = torch.randn(N, K, generator=g), torch.randn(N, generator=g)
    return QuantLinear.from_weight(w.to(dtype), b.to(dtype), scheme_from_name(name))


@pytest.mark.parametrize("name", NAMES)
def test_block_schemes_are_stored_by_the_block_format(name):
    scheme = scheme_from_name(name)
    assert isinstance(weight_format(scheme), Fp8BlockFormat)
    buffers = weight_format(scheme).allocate(N, K, scheme, torch.bfloat16, "meta")
    shapes = {k: None if v is None else (tuple(v.shape), v.dtype) for k, v in buffers.items()}
    assert shapes == {
        "qweight": ((N, K), torch.float8_e4m3fn),
        "scales": ((2, 3), torch.float32),
        "zeros": None,
        "g_idx": None,
    }
    with pytest.raises(QuantizationError, match="g_idx needs grouped packed INT"):
        weight_format(scheme).allocate(N, K, scheme, torch.float32, "meta", g_idx=True)


def test_quantize_matches_the_numerics_and_holds_no_int_codes():
    layer = _layer("w8a16-fp8-block")
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(0))
    q, s = quantize_fp8_block_weight(w, (128, 128))
    assert torch.equal(layer.qweight.view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(layer.scales, s)
    expected = dequantize_fp8_block_weight(q, s, (128, 128))
    torch.testing.assert_close(layer.dequantized_weight(), expected, rtol=0, atol=0)
    with pytest.raises(QuantizationError, match="FP8 block-wise weights hold no INT codes"):
        layer.weight_format.int_codes(layer)


@pytest.mark.parametrize("name", NAMES)
def test_float32_forward_is_the_reference_and_close_to_float(name):
    layer = _layer(name)
    x = torch.randn(3, 5, K)
    torch.testing.assert_close(layer(x), layer.reference_forward(x), rtol=1e-5, atol=1e-5)
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(0))
    exact = x @ w.t() + layer.bias
    rel = (layer(x) - exact).norm() / exact.norm()
    assert rel < 0.06  # E4M3 keeps 3 mantissa bits: a few percent


@pytest.mark.parametrize(
    ("op", "cpu", "reference"),
    [
        (linear_fp8_block_weight, linear_fp8_block_weight_cpu, linear_fp8_block_weight_reference),
        (linear_fp8_block, linear_fp8_block_cpu, linear_fp8_block_reference),
    ],
)
@pytest.mark.parametrize("block", [(128, 128), (64, 32)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cpu_path_matches_the_reference(op, cpu, reference, block, dtype):
    torch.manual_seed(0)
    w = torch.randn(N, K)
    q, s = quantize_fp8_block_weight(w, block)
    x, bias = torch.randn(2, 7, K).to(dtype), torch.randn(N).to(dtype)
    want = reference(x, q, s, bias, *block)
    got = cpu(x, q, s, bias, *block)
    assert got.dtype == dtype and got.shape == (2, 7, N)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:  # -- the bf16 paths' bound: the bf16 GEMM rounds both operands
        error = (got.float() - want.float()).norm() / want.float().norm()
        assert error < BF16_RELATIVE_ERROR
    torch.testing.assert_close(op(x, q, s, bias, *block), got, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_nonfinite_input_row_gives_a_nan_output_row(dtype):
    layer = _layer("fp8-block", dtype)
    x = torch.randn(4, K, dtype=dtype)
    x[1, 200] = float("inf")
    for out in (layer(x), layer.reference_forward(x)):
        assert bool(out[1].isnan().all()) and bool(out[[0, 2, 3]].isfinite().all())


@pytest.mark.parametrize("k", [128, 300, 100])  # -- whole groups, a partial last one, one only
def test_cpu_activation_groups_are_the_dequantized_reference_codes(k):
    from torchquant.numerics import dequantize_activation_groups, quantize_activation_groups
    from torchquant.ops.fp8_block import fake_quantized_groups

    g = torch.Generator().manual_seed(k)
    x = torch.randn(6, k, generator=g) * torch.logspace(-4, 4, 6)[:, None]
    x[2] = 0.0
    x[3, k // 2], x[4, 7] = float("nan"), float("-inf")
    got = fake_quantized_groups(x, 128)
    want = dequantize_activation_groups(*quantize_activation_groups(x, 128), 128)
    finite = torch.isfinite(x).all(dim=1)
    assert torch.equal(got[finite], want[finite])
    assert got[~finite].isnan().any(dim=1).all()  # -- the NaN each bad row's products carry


def test_the_block_ops_trace_with_fake_tensors():
    """The fake implementations state the output shape (``torch.compile`` relies on it)."""
    q, s = quantize_fp8_block_weight(torch.randn(N, K), (128, 128))
    for op in (linear_fp8_block_weight, linear_fp8_block):
        args = (torch.randn(2, 3, K).bfloat16(), q, s, None, 128, 128)
        torch.library.opcheck(op, args, test_utils=("test_faketensor",))


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(K, N), nn.GELU(), nn.Linear(N, 96))


@pytest.mark.parametrize("name", NAMES)
def test_convert_and_native_save_load_are_bit_exact(tmp_path, name):
    config = QuantConfig(name, ignore=())
    model, _ = convert_model(_model(), config, progress=False)
    assert all(isinstance(m, QuantLinear) for m in (model[0], model[2]))
    assert model[0].scheme == scheme_from_name(name)
    save_quantized(model, tmp_path / "ck", config=config)
    loaded = load_quantized(tmp_path / "ck", _model(1).to("meta"))
    for a, b in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert a[0] == b[0] and a[1].dtype == b[1].dtype
        assert torch.equal(a[1].view(torch.uint8), b[1].view(torch.uint8))
    x = torch.randn(4, K)
    assert torch.equal(loaded(x), model(x))
    assert loaded[0].scheme == QuantScheme.from_dict(model[0].scheme.to_dict())


@pytest.mark.parametrize("name", NAMES)
def test_experts_run_one_block_op_each(name):
    """The grouped MoE op reads per-row scale stacks, so block-wise experts never take it:
    each token's output is its experts' block layers, weighted by the routing."""
    from tiny_models import MOE_EXPERTS as EXPERTS
    from tiny_models import tiny_hf_model as tiny

    model, _ = convert_model(tiny("qwen3-moe"), QuantConfig(name), progress=False)
    experts = model.get_submodule(EXPERTS)
    assert experts.stacked_experts() is None
    hidden = torch.randn(6, 32)
    index, weights = torch.randint(0, 4, (6, 2)), torch.rand(6, 2)
    with torch.no_grad():
        got = experts(hidden, index, weights)
        for t in range(6):
            want = sum(
                weights[t, j] * _expert_mlp(experts.expert(int(index[t, j])), hidden[t])
                for j in range(2)
            )
            torch.testing.assert_close(got[t], want, rtol=1e-5, atol=1e-6)


def _expert_mlp(expert: nn.Module, h: torch.Tensor) -> torch.Tensor:
    gate, up = expert.gate_proj(h[None]), expert.up_proj(h[None])
    return expert.down_proj(torch.nn.functional.silu(gate) * up)[0]
