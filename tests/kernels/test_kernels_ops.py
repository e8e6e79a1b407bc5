"""QuantLinear through the registered CUDA kernels: every scheme, on CPU via the interpreter."""

from __future__ import annotations

import pytest
import torch
from kernel_utils import KERNEL_DEVICE, assert_matches, relative_error, requires_kernels

from torchquant import QuantLinear, scheme_from_name
from torchquant.ops import cuda as cuda_ops

pytestmark = requires_kernels


def _layer_and_input(scheme: str, group_size: int | None, m: int, dtype: torch.dtype):
    linear = torch.nn.Linear(100, 36).to(dtype)
    layer = QuantLinear.from_linear(linear, scheme_from_name(scheme, group_size)).to(KERNEL_DEVICE)
    x = torch.randn(1 if m == 1 else 2, m, 100, device=KERNEL_DEVICE).to(dtype)
    return layer, x


def _cuda_forward(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """What ``layer(x)`` runs on a GPU: the registered CUDA implementation of its op."""
    w, q = layer.scheme.weight, layer.qweight
    if w.type == "fp8":
        return cuda_ops.linear_fp8_weight_cuda(x, q, layer.scales, layer.bias)
    if q.dtype == torch.int8:
        return cuda_ops.linear_int8_weight_cuda(x, q, layer.scales, layer.bias, w.group_size)
    return cuda_ops.linear_intn_cuda(
        x, q, layer.scales, layer.zeros, layer.bias, w.bits, w.group_size
    )


@pytest.mark.parametrize(
    "scheme,group_size,m,dtype",
    [
        ("w4a16", 32, 1, torch.bfloat16),  # GEMV (input (1, 1, K))
        ("w3a16", 64, 3, torch.float16),  # split-K tensor cores, straddling codes
        ("w2a16", None, 40, torch.float32),  # tiled GEMM (2 x 40 = 80 rows)
        ("w8a16", None, 1, torch.bfloat16),  # int8 storage per channel
        ("w8a16", 32, 4, torch.float16),  # int8 storage per group
        ("w8a16-fp8", None, 1, torch.float16),  # fp8 storage per channel
    ],
)
def test_weight_only_layer_matches_reference(scheme, group_size, m, dtype):
    layer, x = _layer_and_input(scheme, group_size, m, dtype)
    out = _cuda_forward(layer, x)
    ref = layer.cpu()(x.cpu())
    assert out.shape == ref.shape == (x.shape[0], m, 36) and out.dtype == dtype
    if m == 1:  # the GEMV keeps dequantized weights in float32: closer than bf16 rounding
        assert relative_error(out, ref) < 1e-2
    else:
        assert_matches(out, ref)


@pytest.mark.parametrize("scheme", ["w8a8", "fp8"])
def test_w8a8_layer_matches_reference(scheme):
    layer, x = _layer_and_input(scheme, None, 3, torch.float16)
    act = layer.scheme.activation
    glue = cuda_ops.linear_w8a8_int8_cuda if act.type == "int8" else cuda_ops.linear_w8a8_fp8_cuda
    out = glue(x, layer.qweight, layer.scales, layer.bias, True, 100.0, None, None)
    assert_matches(out, layer.cpu()(x.cpu()))


def test_percentile_scales_fall_back_with_a_warning():
    layer, x = _layer_and_input("w8a8", None, 2, torch.float32)
    with pytest.warns(UserWarning, match="percentile"):
        out = cuda_ops.linear_w8a8_int8_cuda(
            x, layer.qweight, layer.scales, layer.bias, True, 99.0, None, None
        )
    assert out.shape == (2, 2, 36)


def test_every_op_has_a_cuda_kernel():
    assert set(cuda_ops.CUDA_KERNELS) == {
        "torchquant::linear_intn",
        "torchquant::linear_intn_act_order",
        "torchquant::linear_int8_weight",
        "torchquant::linear_fp8_weight",
        "torchquant::linear_fp4_weight",
        "torchquant::linear_w8a8_int8",
        "torchquant::linear_w8a8_fp8",
        "torchquant::linear_w8a8_int8_asym",
        "torchquant::linear_w8a8_int4",
        "torchquant::linear_w4a8_int8",
        "torchquant::linear_w4a8_fp8",
        "torchquant::linear_w4a8_int4",
        "torchquant::linear_fp8_block",
        "torchquant::quantize_activation",
        "torchquant::fake_quant_int_weight",
        "torchquant::fake_quant_int_weight_backward",
        "torchquant::rms_norm",
    }
