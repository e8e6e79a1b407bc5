"""Microscaled linears (schemes nvfp4, mxfp4, mxfp8): the CPU path against the reference op,
the reference against a float64 oracle built from the numerics, NaN rows, save and load.

The oracle: each input row quantized and dequantized per block, times the layer's
dequantized weight, in float64, rounded once to float32 before the bias.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_llama

from torchquant import (
    ActivationQuant,
    ConfigError,
    QuantConfig,
    QuantLinear,
    QuantScheme,
    WeightQuant,
    convert_model,
    scheme_from_name,
)
from torchquant.formats.native import load_quantized, save_quantized
from torchquant.numerics.microscaling import fake_quantize_microscaled
from torchquant.ops.microscaled import (
    linear_microscaled,
    linear_mxfp8_weight,
    linear_mxfp8_weight_reference,
)
from torchquant.weights import Mxfp8Format, weight_format

NAMES = ("nvfp4", "mxfp4", "mxfp8")
N, K = 24, 72  # 72 = 4.5 x 16 = 2.25 x 32: a short last block in every format
# -- microscaled: float32 products either way (bf16 outputs round once, to the same value);
# -- weight-only bf16: the reference adds the bias inside F.linear, the blocked path after
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=0, atol=0)}
WEIGHT_ONLY_BF16 = dict(rtol=1.6e-2, atol=1e-2)


def _layer(name: str, dtype: torch.dtype = torch.float32, scheme: QuantScheme | None = None):
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(N, K, generator=g), torch.randn(N, generator=g)
    return QuantLinear.from_weight(w.to(dtype), b.to(dtype), scheme or scheme_from_name(name))


def _input(dtype=torch.float32, rows=5):
    return torch.randn(rows, K, generator=torch.Generator().manual_seed(1)).to(dtype)


@pytest.mark.parametrize("name", NAMES)
def test_reference_is_the_float64_oracle(name):
    layer, x = _layer(name), _input()
    xd = fake_quantize_microscaled(x, name).double()
    want = (xd @ layer.dequantized_weight(torch.float64).t()).float() + layer.bias
    torch.testing.assert_close(layer.reference_forward(x), want, rtol=0, atol=0)
    rel = (want - (x @ layer.dequantized_weight().t() + layer.bias)).norm() / want.norm()
    assert 0 < float(rel) < (0.05 if name == "mxfp8" else 0.2)  # -- the activation error


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_path_matches_the_reference(name, dtype):
    layer, x = _layer(name, dtype), _input(dtype).reshape(1, 5, K)
    got = layer(x)
    assert got.shape == (1, 5, N) and got.dtype == dtype
    torch.testing.assert_close(got, layer.reference_forward(x), **TOLERANCE[dtype])
    op_args = (layer.qweight, layer.scales, getattr(layer, "global_scale", None), layer.bias)
    via_dispatcher = linear_microscaled(x, *op_args, None, name)
    torch.testing.assert_close(via_dispatcher, got, rtol=0, atol=0)


def test_mxfp8_weights_are_a_format_of_their_own():
    scheme = scheme_from_name("mxfp8")
    fmt = weight_format(scheme)
    assert isinstance(fmt, Mxfp8Format) and fmt.args_type == "float"
    buffers = fmt.allocate(N, K, scheme, torch.bfloat16, "meta")
    got = {k: None if t is None else (tuple(t.shape), t.dtype) for k, t in buffers.items()}
    assert got == {
        "qweight": ((N, K), torch.float8_e4m3fn),
        "scales": ((N, 3), torch.uint8),
        "zeros": None,
        "g_idx": None,
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_only_mxfp8_matches_its_reference(dtype):
    layer = _layer("", dtype, QuantScheme(WeightQuant(type="mxfp8")))
    x = _input(dtype)
    args = (layer.qweight, layer.scales, layer.bias)
    want = linear_mxfp8_weight_reference(x, *args)
    tol = WEIGHT_ONLY_BF16 if dtype == torch.bfloat16 else TOLERANCE[dtype]
    torch.testing.assert_close(layer(x), want, **tol)
    torch.testing.assert_close(linear_mxfp8_weight(x, *args), want, **tol)


def test_static_nvfp4_global_scale_comes_from_input_scale():
    scheme = QuantScheme(WeightQuant(type="nvfp4"), ActivationQuant(type="nvfp4", dynamic=False))
    layer, x = _layer("", scheme=scheme), _input()
    assert scheme.needs_calibration and layer.input_scale.shape == (1,)
    layer.input_scale.fill_(448.0 * 6.0 / 2.0)  # -- calibrated on max |x| = 2
    xd = fake_quantize_microscaled(x, "nvfp4", layer.input_scale).double()
    want = (xd @ layer.dequantized_weight(torch.float64).t()).float() + layer.bias
    torch.testing.assert_close(layer.reference_forward(x), want, rtol=0, atol=0)
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "static", "poisoned"),
    [("nvfp4", False, [True] * 3), ("nvfp4", True, [False, True, False]),
     ("mxfp4", False, [False, True, False]), ("mxfp8", False, [False, True, False])],
)  # fmt: skip
def test_a_non_finite_input_row_gives_nan_as_the_other_schemes(name, static, poisoned):
    act = ActivationQuant(type=name, dynamic=not static)
    layer = _layer("", scheme=QuantScheme(WeightQuant(type=name), act))
    if static:
        layer.input_scale.fill_(100.0)
    x = _input(rows=3)
    x[1, 7] = float("inf")
    for y in (layer(x), layer.reference_forward(x)):
        assert y.isnan().all(dim=1).tolist() == poisoned
        assert torch.isfinite(y[~torch.tensor(poisoned)]).all()


def test_config_refuses_what_the_formats_cannot_do():
    with pytest.raises(ConfigError, match="'nvfp4' weights when activations are nvfp4"):
        QuantScheme(WeightQuant(type="mxfp4"), ActivationQuant(type="nvfp4"))
    with pytest.raises(ConfigError, match="activation.dynamic.*no global scale"):
        ActivationQuant(type="mxfp4", dynamic=False)
    with pytest.raises(ConfigError, match="activation.group_size.*16"):
        ActivationQuant(type="nvfp4", granularity="group", group_size=32)
    with pytest.raises(ConfigError, match="activation.percentile"):
        ActivationQuant(type="mxfp8", percentile=99.0)
    with pytest.raises(ConfigError, match="weight.bits.*8 for mxfp8"):
        WeightQuant(type="mxfp8", bits=4)
    with pytest.raises(ConfigError, match="'rtn' for nvfp4"):
        QuantScheme(WeightQuant(type="nvfp4"), ActivationQuant(type="nvfp4"), algorithm="awq")


@pytest.mark.parametrize("name", NAMES)
def test_schemes_round_trip_and_describe(name):
    scheme = scheme_from_name(name)
    assert QuantScheme.from_dict(scheme.to_dict()) == scheme
    bits = 8 if name == "mxfp8" else 4
    assert scheme.describe().startswith(f"w-{name} g{16 if name == 'nvfp4' else 32}")
    assert f"a{bits} {name} dyn group" in scheme.describe()


@pytest.mark.parametrize("name", NAMES)
def test_a_converted_model_saves_and_loads_bit_exact(name, tmp_path):
    model = tiny_llama(hidden=48, inter=80, heads=2, kv_heads=1, layers=1, seed=3)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want_float = model(ids).logits
    convert_model(model, QuantConfig(default=scheme_from_name(name)), progress=False)
    with torch.no_grad():
        want = model(ids).logits
    rel = (want - want_float).norm() / want_float.norm()
    assert float(rel) < 0.5
    save_quantized(model, tmp_path / "ckpt")
    skeleton = tiny_llama(hidden=48, inter=80, heads=2, kv_heads=1, layers=1, seed=5)
    loaded = load_quantized(tmp_path / "ckpt", skeleton)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, want)
