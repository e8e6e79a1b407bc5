"""FP4 algorithms: the per-block scale search (``observer="mse"``) and AWQ on the FP4 grids."""

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import tiny_llama

from torchquant import AWQConfig, ConfigError, QuantConfig, QuantScheme, WeightQuant, convert_model
from torchquant.algorithms.awq import (
    fake_quantize_fp4,
    search_clip_ranges,
    search_scales,
    weight_fake_quantize,
)
from torchquant.config import scheme_from_name
from torchquant.formats.compressed_tensors import quantization_config_for
from torchquant.modules import QuantLinear
from torchquant.numerics.fp4 import (
    E8M0_BIAS,
    FP4_ROUNDING,
    FP4_SCALE_SEARCH,
    block_absmax,
    block_squared_error,
    dequantize_fp4_weight,
    encode_on_scales,
    nvfp4_scales_for_amax,
)
from torchquant.serialization import load_quantized, save_quantized

pytestmark = pytest.mark.usefixtures("one_thread")

KINDS = ("nvfp4", "mxfp4")
VOCAB = 128
FAST_AWQ = AWQConfig(grid=8, clip_grid=8, max_tokens=256)


def _weights(draw_seed: int, n: int, k: int, dtype: torch.dtype, outliers: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(draw_seed)
    w = torch.randn(n, k, generator=g)
    if outliers:  # -- heavy tails: a few large values per row, as real weights have
        w = w * torch.exp(2 * torch.rand(n, k, generator=g))
    return w.to(dtype)


@settings(max_examples=40, deadline=None)
@given(
    kind=st.sampled_from(KINDS),
    n=st.integers(1, 6),
    k=st.integers(1, 100),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    outliers=st.booleans(),
)
def test_scale_search_is_never_worse_than_rtn_in_any_block(kind, n, k, seed, dtype, outliers):
    w = _weights(seed, n, k, dtype, outliers)
    rtn, mse = FP4_ROUNDING[kind](w), FP4_SCALE_SEARCH[kind](w)
    assert mse.scales.dtype == rtn.scales.dtype and mse.scales.shape == rtn.scales.shape
    assert mse.global_scale is None or torch.equal(mse.global_scale, rtn.global_scale)
    rtn_error = block_squared_error(w, rtn.scales, rtn.global_scale, rtn.block)
    mse_error = block_squared_error(w, mse.scales, mse.global_scale, mse.block)
    assert bool((mse_error <= rtn_error).all())
    # -- where the search gains nothing it keeps the spec's scale (ties go to RTN)
    same = mse_error == rtn_error
    assert torch.equal(mse.scales.view(torch.uint8)[same], rtn.scales.view(torch.uint8)[same])
    # -- an ordinary layout: the codes are the rounding on the chosen scales
    assert torch.equal(mse.codes, encode_on_scales(w, mse.scales, mse.global_scale, mse.block))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 5), k=st.integers(1, 80), seed=st.integers(0, 2**16))
def test_searched_scales_are_representable(n, k, seed):
    w = _weights(seed, n, k, torch.float32, True)
    # -- MXFP4: an E8M0 exponent within one power of two of the spec's, never 255 (NaN)
    mx_rtn, mx = FP4_ROUNDING["mxfp4"](w), FP4_SCALE_SEARCH["mxfp4"](w)
    step = mx.scales.to(torch.int16) - mx_rtn.scales.to(torch.int16)
    assert bool((step.abs() <= 1).all()) and int(mx.scales.max()) <= 2 * E8M0_BIAS
    # -- NVFP4: finite positive E4M3 scales between those of 0.2 and 1 times the block max
    nv_rtn, nv = FP4_ROUNDING["nvfp4"](w), FP4_SCALE_SEARCH["nvfp4"](w)
    scales = nv.scales.float()
    assert bool(torch.isfinite(scales).all()) and bool((scales > 0).all())
    assert torch.equal(nv.scales.float().to(torch.float8_e4m3fn).float(), scales)
    lowest = nvfp4_scales_for_amax(block_absmax(w, 16) * 0.2, nv.global_scale).float()
    assert bool((scales <= nv_rtn.scales.float()).all()) and bool((scales >= lowest).all())


@pytest.mark.parametrize("kind", KINDS)
def test_scale_search_lowers_the_error_of_heavy_tailed_weights(kind):
    w = _weights(0, 64, 256, torch.float32, True)
    rtn, mse = FP4_ROUNDING[kind](w), FP4_SCALE_SEARCH[kind](w)
    rtn_error = float(block_squared_error(w, rtn.scales, rtn.global_scale, rtn.block).sum())
    mse_error = float(block_squared_error(w, mse.scales, mse.global_scale, mse.block).sum())
    assert mse_error < 0.95 * rtn_error, (mse_error, rtn_error)


def _weight_error(model: torch.nn.Module, floats: dict[str, torch.Tensor]) -> float:
    num = den = 0.0
    for name, layer in model.named_modules():
        if isinstance(layer, QuantLinear):
            w = floats[name]
            num += float((layer.dequantized_weight(torch.float32) - w).square().sum())
            den += float(w.square().sum())
    return (num / den) ** 0.5


@pytest.mark.parametrize("name", ["nvfp4a16", "mxfp4a16"])
def test_mse_schemes_convert_save_load_and_export_as_plain_fp4(tmp_path, name):
    floats = {n: m.weight.detach().clone() for n, m in tiny_llama().named_modules()
              if isinstance(m, torch.nn.Linear)}  # fmt: skip
    scheme = scheme_from_name(f"{name}-mse")
    assert scheme.weight == WeightQuant(type=name[:5], observer="mse")
    rtn, _ = convert_model(tiny_llama(), QuantConfig(scheme_from_name(name)), progress=False)
    mse, _ = convert_model(tiny_llama(), QuantConfig(scheme), progress=False)
    assert _weight_error(mse, floats) < _weight_error(rtn, floats)
    # -- the native checkpoint keeps the scheme and loads bit-exact
    save_quantized(mse, tmp_path / "ckpt", config=QuantConfig(scheme))
    loaded = load_quantized(tmp_path / "ckpt", tiny_llama())
    want, got = mse.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    for key, tensor in want.items():  # -- float8 scales compared by their bytes
        assert torch.equal(tensor.view(torch.uint8), got[key].view(torch.uint8)), key
    layer = loaded.model.layers[0].mlp.down_proj
    assert layer.scheme.weight.observer == "mse"
    # -- compressed-tensors sees an ordinary FP4 layout: the same config as plain RTN's
    assert quantization_config_for(mse)[0] == quantization_config_for(rtn)[0]


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: WeightQuant(type="nvfp4", observer="percentile"), "weight.observer='percentile'"),
        (lambda: WeightQuant(type="mxfp4", observer=None), "weight.observer=None"),
        (lambda: WeightQuant(bits=4, group_size=128, observer="mse"), "weight.observer='mse'.*int"),
        (lambda: WeightQuant(type="fp8", observer="mse"), "weight.observer='mse'.*fp8"),
        (
            lambda: QuantScheme(WeightQuant(type="nvfp4", observer="mse"), algorithm="awq"),
            "weight.observer='mse'.*algorithm 'awq'",
        ),
        (
            lambda: QuantScheme(
                WeightQuant(type="mxfp4"), algorithm="awq", awq=AWQConfig(rounding="gptq")
            ),
            "awq.rounding='gptq'.*'rtn' for mxfp4",
        ),
        (lambda: QuantScheme(WeightQuant(type="nvfp4"), algorithm="hqq"), "weight.type='nvfp4'"),
    ],
)
def test_fp4_algorithm_settings_are_refused_with_the_field_named(build, match):
    with pytest.raises(ConfigError, match=match):
        build()


def test_observer_is_written_only_when_it_searches():
    plain = scheme_from_name("nvfp4a16")
    assert "observer" not in plain.to_dict()["weight"]
    searched = scheme_from_name("mxfp4a16-mse")
    assert searched.to_dict()["weight"]["observer"] == "mse"
    assert QuantScheme.from_dict(searched.to_dict()) == searched
    assert searched.describe() == "w-mxfp4 g32 a16 mse"
    awq = QuantScheme(WeightQuant(type="nvfp4"), algorithm="awq")
    assert awq.describe() == "w-nvfp4 g16 a16 awq"


# -- AWQ on the FP4 grids


@pytest.mark.parametrize("kind", KINDS)
def test_fp4_clip_search_is_never_worse_than_the_block_max(kind):
    torch.manual_seed(0)
    k = 96
    x = torch.randn(256, k)
    x[:, :4] *= 30.0
    w = _weights(1, 32, k, torch.float32, True)
    block = {"nvfp4": 16, "mxfp4": 32}[kind]
    quantize = weight_fake_quantize(WeightQuant(type=kind))
    lo, hi = search_clip_ranges(w, x, block, quantize, grid=10, max_shrink=0.5)

    def block_output_error(q):
        diff = (x.unsqueeze(1) * (q - w).unsqueeze(0)).reshape(256, 32, -1, block)
        return diff.sum(dim=3).square().mean(dim=0)  # (N, G)

    clipped = block_output_error(fake_quantize_fp4(w, kind, (lo, hi)))
    plain = block_output_error(fake_quantize_fp4(w, kind))
    assert bool((clipped <= plain * (1 + 1e-5) + 1e-6).all())
    assert float(clipped.sum()) < float(plain.sum())


def test_fp4_fake_quantize_matches_the_stored_weight():
    w = _weights(2, 8, 40, torch.bfloat16, False)
    for kind in KINDS:
        q = FP4_ROUNDING[kind](w)
        want = dequantize_fp4_weight(q.codes, q.scales, q.global_scale, q.block, w.dtype)
        assert torch.equal(weight_fake_quantize(WeightQuant(type=kind))(w), want)


# -- on a floating-point grid a scaled-up weight keeps about the same relative error, so
# -- AWQ gains less than on INT: NVFP4's fine blocks still gain much, MXFP4's a little
SCALE_SEARCH_BOUND = {"nvfp4": 0.8, "mxfp4": 1.0}


@pytest.mark.parametrize("kind", KINDS)
def test_awq_scales_on_fp4_lower_the_output_error_of_outlier_inputs(kind):
    torch.manual_seed(0)
    k, n = 128, 64
    x = torch.randn(1024, k)
    x[:, :4] *= 30.0  # -- a few salient input channels, as real LLM activations have
    w = torch.randn(n, k) * 0.05
    ref = x @ w.t()
    quantize = weight_fake_quantize(WeightQuant(type=kind))

    def loss_with(ws):
        return float((x @ ws[0].t() - ref).pow(2).mean())

    act_mean = x.abs().mean(dim=0)
    s, alpha, loss = search_scales(act_mean, [w], quantize, loss_with, grid=20)
    rtn_loss = loss_with([quantize(w)])
    assert alpha > 0 and loss < SCALE_SEARCH_BOUND[kind] * rtn_loss, (loss, rtn_loss)


def _outlier_llama() -> torch.nn.Module:
    """Two Llama blocks with a few norm channels scaled up (real LLMs' activation outliers)."""
    model = tiny_llama(vocab=VOCAB, hidden=64, inter=128, layers=2, heads=4, kv_heads=2)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[:3] *= 20.0
            layer.post_attention_layernorm.weight[5:8] *= 20.0
    return model


def _tokens(n: int, seq_len: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, seq_len), generator=torch.Generator().manual_seed(seed))


def _logits_error(model, ref, ids) -> float:
    with torch.no_grad():
        out = model(ids).logits
    return float((out - ref).norm() / ref.norm())


# -- held-out logits error over RTN's, measured: NVFP4 0.93 (clip) / 0.79 (no clip);
# -- MXFP4 1.22 / 1.31 (1.29 with the clip search shrinking ranges instead of choosing
# -- among three exponents): on power-of-two scales the chosen input scales do not carry
# -- over to the whole model here (duo scaling brings it back to 1.0)
AWQ_BOUND = {"nvfp4": 0.97, "mxfp4": 1.4}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("clip", [True, False])
def test_awq_on_fp4_calibrates_a_tiny_model(kind, clip):
    held_out = _tokens(2, 32, seed=1)
    with torch.no_grad():
        ref = _outlier_llama()(held_out).logits
    rtn, _ = convert_model(_outlier_llama(), QuantConfig(scheme_from_name(f"{kind}a16")),
                           progress=False)  # fmt: skip
    awq = QuantScheme(WeightQuant(type=kind), algorithm="awq",
                      awq=dataclasses.replace(FAST_AWQ, clip=clip))  # fmt: skip
    model, summary = convert_model(
        _outlier_llama(), QuantConfig(awq), calibration_data=_tokens(8, 32, 0), progress=False
    )
    assert len(summary.converted) == 14
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.weight_format.weight_type == kind and layer.scheme.algorithm == "awq"
    rtn_layers = dict(rtn.named_modules())
    changed = [
        name
        for name, m in model.named_modules()
        if isinstance(m, QuantLinear) and not torch.equal(m.qweight, rtn_layers[name].qweight)
    ]
    assert changed  # -- AWQ chose other weights than round-to-nearest somewhere
    rtn_err, err = _logits_error(rtn, ref, held_out), _logits_error(model, ref, held_out)
    assert err < AWQ_BOUND[kind] * rtn_err, (err, rtn_err)
