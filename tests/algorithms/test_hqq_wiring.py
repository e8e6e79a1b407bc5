"""HQQ through the common paths: ``quantize_weight``, ``convert_model`` without data, streaming,
the config, and every checkpoint format (its result is an ordinary scale/zero layout)."""

import dataclasses

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import tiny_llama

from torchquant import ConfigError, QuantConfig, convert_model
from torchquant.algorithms.hqq import hqq_quantize
from torchquant.algorithms.quantize import quantize_weight
from torchquant.config import HQQConfig, QuantScheme, WeightQuant
from torchquant.formats.dispatch import load_checkpoint, save_checkpoint
from torchquant.modules import QuantLinear
from torchquant.numerics import dequantize_int_weight
from torchquant.plan import quantized_layers
from torchquant.streaming import convert_from_safetensors

pytestmark = pytest.mark.usefixtures("one_thread")

W4 = WeightQuant(bits=4, group_size=32, symmetric=False)
FAST = HQQConfig(iterations=4)
SCHEME = QuantScheme(W4, algorithm="hqq", hqq=FAST)


def hqq_weight(w: torch.Tensor) -> torch.Tensor:
    """What ``SCHEME`` should store for ``w``, dequantized."""
    q = hqq_quantize(w, W4.bits, W4.group_size, W4.symmetric, iterations=FAST.iterations)
    return dequantize_int_weight(q.codes, q.scales, q.zeros, W4.bits, W4.group_size, w.dtype)


@pytest.mark.parametrize(
    "params,solver",
    [
        (HQQConfig(), {}),  # -- the config's defaults are the solver's
        (
            HQQConfig(iterations=3, lp_norm=1.0, beta=2.0, kappa=1.1, early_stop=False),
            dict(iterations=3, lp_norm=1.0, beta=2.0, kappa=1.1, early_stop=False),
        ),
    ],
)
@pytest.mark.parametrize("wq", [W4, WeightQuant(bits=3, group_size=-1, symmetric=True)])
def test_quantize_weight_passes_the_scheme_to_the_solver(wq, params, solver):
    w = torch.randn(16, 80, generator=torch.Generator().manual_seed(3))
    q = quantize_weight(QuantScheme(wq, algorithm="hqq", hqq=params), w)
    want = hqq_quantize(w, wq.bits, wq.group_size, wq.symmetric, **solver)
    assert torch.equal(q.codes, want.codes) and torch.equal(q.scales, want.scales)
    assert (q.zeros is None) == wq.symmetric == (want.zeros is None)
    assert q.zeros is None or torch.equal(q.zeros, want.zeros)


def test_convert_model_needs_no_calibration_data_and_stores_hqq_weights():
    model = tiny_llama(hidden=96, inter=128)  # -- 96 = 3 groups of 32
    floats = {n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith("proj")}
    model, summary = convert_model(model, QuantConfig(SCHEME), progress=False)
    assert set(summary.converted) == set(floats) and len(floats) == 7
    assert all(desc.endswith(" hqq") for desc in summary.converted.values())
    for name, w in floats.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, QuantLinear) and layer.scheme.algorithm == "hqq"
        assert torch.equal(layer.dequantized_weight(), hqq_weight(w))


def test_hqq_layers_beside_calibrated_ones_ignore_the_statistics():
    model = tiny_llama(hidden=96, inter=128)
    floats = {
        n: m.weight.detach().clone()
        for n, m in model.named_modules()
        if n.endswith("proj") and ".mlp." in n
    }
    gptq = QuantScheme(W4, algorithm="gptq")
    config = QuantConfig(gptq, overrides={"*.mlp.*": SCHEME})
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    model, summary = convert_model(model, config, calibration_data=ids, progress=False)
    assert sum(desc.endswith(" gptq") for desc in summary.converted.values()) == 4
    assert len(floats) == 3  # -- gate, up and down are HQQ's
    for name, w in floats.items():
        assert torch.equal(model.get_submodule(name).dequantized_weight(), hqq_weight(w))


def test_hqq_beats_round_to_nearest_in_the_weights_it_fits():
    """What HQQ minimizes, per layer: the lp error (p = 0.7) of the dequantized weight."""
    model = tiny_llama(hidden=96, inter=128)
    floats = {n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith("proj")}
    hqq, _ = convert_model(model, QuantConfig(SCHEME), progress=False)
    rtn, _ = convert_model(tiny_llama(hidden=96, inter=128), QuantConfig(QuantScheme(W4)))

    def lp(model, name):
        err = model.get_submodule(name).dequantized_weight() - floats[name]
        return float(err.abs().pow(0.7).sum())

    assert all(lp(hqq, n) < lp(rtn, n) for n in floats)


def test_streaming_converts_with_hqq_as_convert_model_does(tmp_path):
    model = tiny_llama(hidden=96, inter=128)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "f.st")
    want, _ = convert_model(tiny_llama(hidden=96, inter=128), QuantConfig(SCHEME), progress=False)
    with torch.device("meta"):
        skeleton = tiny_llama(hidden=96, inter=128)
    got, summary = convert_from_safetensors(
        skeleton, [tmp_path / "f.st"], QuantConfig(SCHEME), progress=False
    )
    assert len(summary.converted) == 7
    for name, layer in quantized_layers(want).items():
        assert torch.equal(got.get_submodule(name).qweight, layer.qweight)
        assert torch.equal(got.get_submodule(name).scales, layer.scales)


@pytest.mark.parametrize("fmt", ["native", "gptq", "awq", "compressed-tensors"])
def test_hqq_checkpoints_round_trip_in_every_format(tmp_path, fmt):
    model, _ = convert_model(tiny_llama(hidden=96, inter=128), QuantConfig(SCHEME), progress=False)
    save_checkpoint(model, tmp_path / fmt, fmt)
    loaded = load_checkpoint(tmp_path / fmt)
    layers = quantized_layers(model)
    assert len(layers) == 7
    for name, layer in layers.items():
        torch.testing.assert_close(
            loaded.get_submodule(name).dequantized_weight(torch.float32),
            layer.dequantized_weight(torch.float32),
            rtol=0,
            atol=0,
        )


@pytest.mark.parametrize(
    "field,value",
    [("iterations", 0), ("iterations", 2.5), ("lp_norm", 0.0), ("lp_norm", 1.5)]
    + [("beta", 0.0), ("beta", float("inf")), ("kappa", 0.99), ("early_stop", "yes")],
)
def test_bad_hqq_parameters_name_the_field(field, value):
    with pytest.raises(ConfigError, match=rf"hqq\.{field}="):
        HQQConfig(**{field: value})
    with pytest.raises(ConfigError, match=rf"hqq\.{field}="):
        QuantScheme.from_dict({"weight": {"bits": 4}, "algorithm": "hqq", "hqq": {field: value}})


def test_hqq_needs_int_weights():
    with pytest.raises(ConfigError, match="'int' weights for algorithm 'hqq'"):
        QuantScheme(WeightQuant(type="fp8"), algorithm="hqq")


def test_hqq_parameters_are_saved_only_where_they_matter():
    """Schemes that leave HQQ alone serialize as they always did (checkpoint bytes unchanged)."""
    assert "hqq" not in QuantScheme(W4).to_dict()
    for scheme in (SCHEME, dataclasses.replace(QuantScheme(W4), hqq=FAST)):
        data = scheme.to_dict()
        assert data["hqq"] == dataclasses.asdict(FAST)
        assert QuantScheme.from_dict(data) == scheme
    assert QuantScheme.from_dict(QuantScheme(W4).to_dict()) == QuantScheme(W4)
    assert not SCHEME.needs_calibration and not SCHEME.rescales_weights
