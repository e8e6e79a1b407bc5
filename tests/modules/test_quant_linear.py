import pytest
import torch
from torch import nn

from torchquant import QuantizationError, QuantLinear, QuantScheme, WeightQuant, scheme_from_name
from torchquant.numerics import dequantize_int_weight, quantize_activation, quantize_int_weight

SCHEMES = ["w8a16", "w4a16", "w3a16", "w2a16", "w8a16-fp8", "w8a8", "fp8"]


def rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.mark.parametrize("name", SCHEMES)
def test_every_scheme_tracks_the_float_layer(name, device):
    lin = nn.Linear(200, 48).to(device)
    x = torch.randn(2, 5, 200, device=device)
    q = QuantLinear.from_linear(lin, scheme_from_name(name))
    assert q.qweight.device.type == device.type
    out = q(x)
    assert out.shape == (2, 5, 48) and out.dtype == torch.float32
    limit = {"w2a16": 0.6, "w3a16": 0.25, "w4a16": 0.12}.get(name, 0.05)
    assert rel_err(out, lin(x)) < limit


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("group_size", [-1, 32, 128])
@pytest.mark.parametrize("symmetric", [False, True])
def test_weight_only_equals_dequantized_reference(bits, group_size, symmetric):
    w = torch.randn(24, 160)
    scheme = QuantScheme(WeightQuant("int", bits, group_size, symmetric))
    q = QuantLinear.from_weight(w, None, scheme)
    ref = quantize_int_weight(w, bits, group_size, symmetric, q.scales.dtype)
    w_ref = dequantize_int_weight(ref.codes, ref.scales, ref.zeros, bits, group_size)
    x = torch.randn(3, 160)
    torch.testing.assert_close(q(x), x @ w_ref.t(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q.dequantized_weight(), w_ref, rtol=1e-5, atol=1e-5)


def test_w8a8_equals_integer_reference():
    lin = nn.Linear(64, 16)
    q = QuantLinear.from_linear(lin, scheme_from_name("w8a8"))
    x = torch.randn(7, 64)
    xq, xs = quantize_activation(x, "int8", True)
    acc = xq.to(torch.int64) @ q.qweight.to(torch.int64).t()  # exact int accumulation
    ref = acc.double() * xs.double() * q.scales.double().reshape(1, -1) + lin.bias.double()
    torch.testing.assert_close(q(x).double(), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["w4a16", "w8a16", "w8a8", "fp8"])
def test_half_precision_layers(dtype, name):
    lin = nn.Linear(128, 32).to(dtype)
    q = QuantLinear.from_linear(lin, scheme_from_name(name))
    x = torch.randn(4, 128, dtype=dtype)
    out = q(x)
    assert out.dtype == dtype and q.bias.dtype == dtype
    assert rel_err(out, lin(x)) < 0.12


def test_gpt2_conv1d_is_transposed():
    transformers = pytest.importorskip("transformers")
    conv = transformers.pytorch_utils.Conv1D(48, 64)  # nf=48 outputs, nx=64 inputs
    nn.init.normal_(conv.weight)
    q = QuantLinear.from_linear(conv, scheme_from_name("w8a16"))
    x = torch.randn(3, 64)
    assert q.in_features == 64 and q.out_features == 48
    assert rel_err(q(x), conv(x)) < 0.02


def test_torch_compile_fullgraph_traces_the_ops():
    lin = nn.Linear(64, 32)
    for name in ("w4a16", "w8a8"):
        q = QuantLinear.from_linear(lin, scheme_from_name(name))
        x = torch.randn(2, 64)
        compiled = torch.compile(q, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x), q(x))


def test_repr_and_errors():
    q = QuantLinear.from_linear(nn.Linear(64, 32), scheme_from_name("w4a16", group_size=32))
    assert "int4 g32 asym" in repr(q)
    with pytest.raises(QuantizationError, match="expects 64"):
        q(torch.randn(2, 63))
    with pytest.raises(QuantizationError, match="layers.3.up_proj.weight"):
        bad = nn.Linear(8, 8)
        bad.weight.data[0, 0] = float("nan")
        QuantLinear.from_linear(bad, scheme_from_name("w8a16"), name="layers.3.up_proj")
