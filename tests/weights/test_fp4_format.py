"""NVFP4 and MXFP4 weight formats: buffers, stored codes against the numerics, the op's paths.

The CPU path (row blocks dequantized to bf16) is held to the exact reference op; the
layer's dequantized weight is the numerics' own, bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from torchquant import QuantizationError, QuantLinear, QuantScheme
from torchquant.config import scheme_from_name
from torchquant.numerics.fp4 import (
    dequantize_mxfp4_weight,
    dequantize_nvfp4_weight,
    pack_e2m1,
    quantize_mxfp4_weight,
    quantize_nvfp4_weight,
)
from torchquant.ops import cpu_kernels
from torchquant.ops.weight_fp4 import linear_fp4_weight, linear_fp4_weight_reference
from torchquant.weights import Mxfp4Format, Nvfp4Format, weight_format

N, K = 40, 100  # K a multiple of neither block: a short last block in both


@pytest.mark.parametrize(
    ("name", "kind", "scale_dtype", "blocks"),
    [
        ("nvfp4a16", Nvfp4Format, torch.float8_e4m3fn, 7),
        ("mxfp4a16", Mxfp4Format, torch.uint8, 4),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp4_buffers(name, kind, scale_dtype, blocks, dtype):
    scheme = scheme_from_name(name)
    fmt = weight_format(scheme)
    assert isinstance(fmt, kind) and not fmt.is_int and fmt.args_type == "float"
    buffers = fmt.allocate(N, K, scheme, dtype, "meta")
    got = {k: None if t is None else (tuple(t.shape), t.dtype) for k, t in buffers.items()}
    expected = {
        "qweight": ((N, K // 2), torch.uint8),
        "scales": ((N, blocks), scale_dtype),
        "zeros": None,
        "g_idx": None,
    }
    if kind is Nvfp4Format:
        expected["global_scale"] = ((1,), torch.float32)
    assert got == expected
    with pytest.raises(QuantizationError, match="g_idx needs grouped packed INT"):
        fmt.allocate(N, K, scheme, dtype, "meta", g_idx=True)


def test_an_odd_k_pads_the_last_byte():
    layer = QuantLinear(33, 4, scheme_from_name("mxfp4a16"), bias=False, device="meta")
    assert tuple(layer.qweight.shape) == (4, 17) and tuple(layer.scales.shape) == (4, 2)


CASES = [
    ("nvfp4a16", quantize_nvfp4_weight, lambda q, dt: dequantize_nvfp4_weight(*_nv(q), dt)),
    ("mxfp4a16", quantize_mxfp4_weight, lambda q, dt: dequantize_mxfp4_weight(*_mx(q), dt)),
]


def _nv(q):
    return q.codes, q.scales, q.global_scale


def _mx(q):
    return q.codes, q.scales


@pytest.mark.parametrize(("name", "quantize", "dequantize"), CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_stores_the_numerics_bit_for_bit(name, quantize, dequantize, dtype):
    torch.manual_seed(0)
    w = torch.randn(N, K).to(dtype)
    layer = QuantLinear.from_weight(w, None, scheme_from_name(name))
    ref = quantize(w)
    assert torch.equal(layer.qweight, pack_e2m1(ref.codes))
    assert torch.equal(layer.scales.view(torch.uint8), ref.scales.view(torch.uint8))
    assert torch.equal(layer.weight_format.fp4_codes(layer), ref.codes)
    if ref.global_scale is not None:
        assert torch.equal(layer.global_scale, ref.global_scale)
    assert torch.equal(layer.dequantized_weight(), dequantize(ref, dtype))
    # -- the reference op multiplies by exactly that weight
    x = torch.randn(3, K).to(dtype)
    expected = torch.nn.functional.linear(x, dequantize(ref, dtype))
    assert torch.equal(layer.reference_forward(x), expected)
    with pytest.raises(QuantizationError, match="hold no INT codes"):
        layer.weight_format.int_codes(layer)


@pytest.mark.parametrize("name", ["nvfp4a16", "mxfp4a16"])
@pytest.mark.parametrize("m", [1, 7, 64])
def test_the_cpu_path_matches_the_reference_in_row_blocks(name, m, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "DEQUANT_BLOCK_ELEMENTS", 16 * K)  # several row blocks
    torch.manual_seed(m)
    w = torch.randn(N, K, dtype=torch.bfloat16)
    bias = torch.randn(N, dtype=torch.bfloat16)
    layer = QuantLinear.from_weight(w, bias, scheme_from_name(name))
    x = torch.randn(2, m, K, dtype=torch.bfloat16)
    out = layer(x)
    ref = layer.reference_forward(x)
    assert out.shape == (2, m, N) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, rtol=1.6e-2, atol=8e-3 * ref.abs().max().item())


def test_the_op_dispatches_like_the_cpu_path_and_has_a_fake():
    torch.manual_seed(0)
    layer = QuantLinear.from_weight(torch.randn(N, K), None, scheme_from_name("nvfp4a16"))
    args = (layer.qweight, layer.scales, layer.global_scale, None, 16)
    x = torch.randn(5, K)
    assert torch.equal(linear_fp4_weight(x, *args), linear_fp4_weight_reference(x, *args))
    meta = [a.to("meta") for a in args[:3]]
    fake = linear_fp4_weight(torch.empty(5, K, device="meta"), *meta, None, 16)
    assert fake.shape == (5, N)


def test_scheme_description_names_the_format():
    layer = QuantLinear(K, N, QuantScheme.from_dict(scheme_from_name("mxfp4a16").to_dict()))
    assert "w-mxfp4 g32 a16" in repr(layer)


@pytest.mark.parametrize("name", ["nvfp4a16", "mxfp4a16"])
def test_qat_refuses_the_fp4_scale_search_by_name(name):
    from torchquant import ConfigError, QuantConfig, prepare_qat

    model = torch.nn.Sequential(torch.nn.Linear(K, N))
    with pytest.raises(ConfigError, match=f"QAT of w-{name[:5]}.*weight.observer='mse'"):
        prepare_qat(model, QuantConfig(default=f"{name}-mse"))
