"""The sequential calibration engine on tiny random models of each mapped architecture."""

import dataclasses
import warnings

import pytest
import torch
from tiny_models import tiny_hf_model
from tiny_models import tiny_llama as shared_tiny_llama
from torch import nn

from torchquant import (
    ActivationQuant,
    AWQConfig,
    CalibrationError,
    ConfigError,
    GPTQConfig,
    QuantConfig,
    QuantLinear,
    QuantScheme,
    SmoothQuantConfig,
    WeightQuant,
    convert_model,
    scheme_from_name,
)
from torchquant.algorithms import gptq
from torchquant.calibration import find_layout
from torchquant.calibration.steps import GptqStep
from torchquant.serialization import load_quantized, save_quantized

VOCAB = 128
FAST_AWQ = AWQConfig(grid=8, clip_grid=8, max_tokens=256)


def tiny_llama(outliers: bool = True) -> nn.Module:
    """Two Llama blocks; a few norm channels scaled up, as the activation outliers of real LLMs."""
    model = shared_tiny_llama(
        vocab=VOCAB, hidden=64, inter=128, layers=2, heads=4, kv_heads=2, max_position_embeddings=64
    )
    if outliers:
        with torch.no_grad():
            for layer in model.model.layers:
                layer.input_layernorm.weight[:3] *= 20.0
                layer.post_attention_layernorm.weight[5:8] *= 20.0
    return model


def tokens(n: int = 8, seq_len: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, seq_len), generator=torch.Generator().manual_seed(seed))


def logits_error(model: nn.Module, reference: torch.Tensor, ids: torch.Tensor) -> float:
    with torch.no_grad():
        out = model(ids).logits
    return float((out - reference).norm() / reference.norm())


def reference_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def wna16(bits: int, algorithm: str = "rtn", **params) -> QuantScheme:
    return QuantScheme(WeightQuant(bits=bits, group_size=32), None, algorithm, **params)


def w8a8(algorithm: str = "rtn", activation: ActivationQuant | None = None, **params):
    weight = WeightQuant(bits=8, group_size=-1, symmetric=True)
    return QuantScheme(weight, activation or ActivationQuant(), algorithm, **params)


def quantize(model: nn.Module, scheme_or_config, calib: torch.Tensor | None = None, **kw):
    config = scheme_or_config
    if isinstance(scheme_or_config, QuantScheme):
        config = QuantConfig(scheme_or_config)
    return convert_model(model, config, calibration_data=calib, progress=False, **kw)


@pytest.mark.parametrize(
    "scheme",
    [
        wna16(3, "gptq"),
        wna16(3, "gptq", gptq=GPTQConfig(act_order=False, static_groups=False)),
        wna16(3, "gptq", gptq=GPTQConfig(act_order=True, static_groups=False)),
        wna16(3, "gptq", gptq=GPTQConfig(observer="hessian_mse")),
        wna16(3, "awq", awq=FAST_AWQ),
        wna16(3, "awq", awq=dataclasses.replace(FAST_AWQ, duo_scaling="both")),
        wna16(3, "awq", awq=dataclasses.replace(FAST_AWQ, rounding="gptq")),
    ],
    ids=[
        "gptq-act-order-static",
        "gptq-natural-order",
        "gptq-act-order-g-idx",
        "gptq-hessian-mse",
        "awq",
        "awq-duo-both",
        "awq-gptq-rounding",
    ],
)
def test_calibrated_w3_beats_round_to_nearest_on_held_out_tokens(scheme):
    held_out = tokens(2, 32, seed=1)
    ref = reference_logits(tiny_llama(), held_out)
    rtn_err = logits_error(quantize(tiny_llama(), wna16(3))[0], ref, held_out)
    model, summary = quantize(tiny_llama(), scheme, tokens())
    assert len(summary.converted) == 14
    assert all("3" in d for d in summary.converted.values())
    err = logits_error(model, ref, held_out)
    assert err < 0.8 * rtn_err, (err, rtn_err)


def test_smoothquant_folds_into_norms_and_beats_plain_w8a8():
    held_out = tokens(2, 32, seed=1)
    float_model = tiny_llama()
    ref = reference_logits(float_model, held_out)
    norm_before = float_model.model.layers[0].input_layernorm.weight.clone()
    plain_err = logits_error(quantize(tiny_llama(), w8a8())[0], ref, held_out)
    smooth = w8a8("smoothquant", smoothquant=SmoothQuantConfig(alpha=0.8))
    model, _ = quantize(float_model, smooth, tokens())
    layer = model.model.layers[0]
    # -- q/k/v share the norm's output: the factors went into the norm, no run-time divide
    assert not torch.equal(layer.input_layernorm.weight, norm_before)
    assert layer.self_attn.q_proj.smooth_scale is None
    # -- inputs produced by a linear (o_proj's, down_proj's) are not smoothed by default
    assert layer.self_attn.o_proj.smooth_scale is None
    assert layer.mlp.down_proj.smooth_scale is None
    err = logits_error(model, ref, held_out)
    assert err < 0.85 * plain_err, (err, plain_err)


def test_smoothquant_can_smooth_inputs_that_linears_produce():
    float_model = tiny_llama()
    up_before = float_model.model.layers[0].mlp.up_proj.weight.clone()
    config = SmoothQuantConfig(alpha=0.8, smooth_linear_inputs=True)
    model, _ = quantize(float_model, w8a8("smoothquant", smoothquant=config), tokens())
    layer = model.model.layers[0]
    # -- v_proj (grouped-query, 32 outputs) cannot feed o_proj's 64 inputs: a run-time divisor
    assert layer.self_attn.o_proj.smooth_scale is not None
    # -- down_proj's factors are folded into up_proj's output rows: no run-time divide
    assert layer.mlp.down_proj.smooth_scale is None
    assert layer.mlp.up_proj.smooth_scale is None
    moved = layer.mlp.up_proj.dequantized_weight().float() - up_before
    assert moved.norm() / up_before.norm() > 0.05  # far beyond INT8 rounding (~0.005)


def test_smoothquant_also_helps_fp8_activations():
    held_out = tokens(2, 32, seed=1)
    ref = reference_logits(tiny_llama(), held_out)
    fp8 = scheme_from_name("fp8")
    plain_err = logits_error(quantize(tiny_llama(), fp8)[0], ref, held_out)
    smooth = dataclasses.replace(fp8, algorithm="smoothquant")
    err = logits_error(quantize(tiny_llama(), smooth, tokens())[0], ref, held_out)
    assert err < 0.95 * plain_err, (err, plain_err)


@pytest.mark.parametrize("observer", ["minmax", "moving_minmax", "percentile", "kl", "mse"])
def test_static_per_tensor_activation_scales(observer):
    held_out = tokens(2, 32, seed=1)
    ref = reference_logits(tiny_llama(outliers=False), held_out)
    static = ActivationQuant(
        granularity="tensor", dynamic=False, observer=observer, percentile=99.9
    )
    model, _ = quantize(tiny_llama(outliers=False), w8a8(activation=static), tokens(4, 16))
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 14
    for layer in layers:
        assert layer.input_scale is not None
        assert bool(torch.isfinite(layer.input_scale).all()) and float(layer.input_scale) > 0
    assert logits_error(model, ref, held_out) < 0.1


def test_clipping_observers_give_smaller_static_scales_than_minmax():
    def scales(observer):
        act = ActivationQuant(
            granularity="tensor", dynamic=False, observer=observer, percentile=99.0
        )
        model, _ = quantize(tiny_llama(), w8a8(activation=act), tokens(4, 16))
        # -- block 0 only: later blocks see the outputs of differently quantized blocks
        block = model.model.layers[0]
        return torch.cat([m.input_scale for m in block.modules() if isinstance(m, QuantLinear)])

    minmax = scales("minmax")
    for observer in ("percentile", "kl"):
        clipped = scales(observer)
        assert bool((clipped <= minmax * (1 + 1e-6)).all())
        assert bool((clipped < minmax).any())


def test_act_order_g_idx_survives_save_and_load(tmp_path):
    scheme = wna16(4, "gptq", gptq=GPTQConfig(act_order=True, static_groups=False))
    model, _ = quantize(tiny_llama(), scheme, tokens())
    q_proj = model.model.layers[0].self_attn.q_proj
    assert q_proj.g_idx is not None and q_proj.g_idx.dtype == torch.int32
    # -- act-order visits columns out of order: the groups are not k // 32
    assert not torch.equal(q_proj.g_idx, torch.arange(64, dtype=torch.int32) // 32)
    assert torch.equal(torch.bincount(q_proj.g_idx.long()), torch.tensor([32, 32]))
    ids = tokens(1, 16, seed=3)
    expected = reference_logits(model, ids)
    save_quantized(model, tmp_path / "ckpt", config=QuantConfig(scheme))
    loaded = load_quantized(tmp_path / "ckpt", tiny_llama())
    assert torch.equal(loaded.model.layers[0].self_attn.q_proj.g_idx, q_proj.g_idx)
    torch.testing.assert_close(reference_logits(loaded, ids), expected)


def test_static_groups_need_no_g_idx():
    scheme = wna16(4, "gptq", gptq=GPTQConfig(act_order=True, static_groups=True))
    model, _ = quantize(tiny_llama(), scheme, tokens())
    assert all(m.g_idx is None for m in model.modules() if isinstance(m, QuantLinear))


def test_algorithm_is_overridable_per_layer():
    config = QuantConfig(wna16(4), overrides={"re:.*mlp\\..*": wna16(4, "gptq")})
    mixed, summary = quantize(tiny_llama(), config, tokens())
    rtn, _ = quantize(tiny_llama(), wna16(4))
    assert summary.converted["model.layers.0.mlp.up_proj"].endswith("gptq")
    assert not summary.converted["model.layers.0.self_attn.q_proj"].endswith("gptq")
    a, b = mixed.model.layers[1], rtn.model.layers[1]
    assert torch.equal(a.self_attn.q_proj.qweight, b.self_attn.q_proj.qweight)
    assert not torch.equal(a.mlp.up_proj.qweight, b.mlp.up_proj.qweight)


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: AWQConfig(duo_scaling="yes"), "awq.duo_scaling"),
        (lambda: AWQConfig(duo_scaling=1), "awq.duo_scaling"),
        (lambda: GPTQConfig(observer="kl"), "gptq.observer"),
        (lambda: AWQConfig(rounding="nearest"), "awq.rounding"),
    ],
)
def test_bad_algorithm_parameters_name_the_field(make, field):
    with pytest.raises(ConfigError, match=field):
        make()


def test_calibration_data_is_required_and_checked():
    with pytest.raises(ConfigError, match="calibration_data is required"):
        quantize(tiny_llama(), wna16(4, "gptq"))
    with pytest.raises(CalibrationError, match="non-empty"):
        quantize(tiny_llama(), wna16(4, "gptq"), torch.zeros(0, 16, dtype=torch.long))
    with pytest.raises(CalibrationError, match="non-empty"):
        quantize(tiny_llama(), wna16(4, "gptq"), torch.zeros(16, dtype=torch.long))


def test_nan_activations_name_the_layer():
    model = tiny_llama()
    calib = tokens()
    with torch.no_grad():
        model.model.embed_tokens.weight[calib[0, 5]] = float("nan")
    with pytest.raises(CalibrationError, match=r"model\.layers\.0\..*NaN"):
        quantize(model, wna16(4, "gptq"), calib)


def test_static_scale_for_a_layer_outside_the_blocks_is_refused():
    static = ActivationQuant(granularity="tensor", dynamic=False)
    config = QuantConfig(w8a8(activation=static), ignore=())
    with pytest.raises(CalibrationError, match="lm_head.*outside the calibrated blocks"):
        quantize(tiny_llama(), config, tokens())


class TinyMoEBlock(nn.Module):
    """A block whose router sends every token to expert 0: expert 1 never sees a token."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.experts = nn.ModuleList([nn.Linear(dim, dim) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        picked = torch.zeros(h.shape[:-1], dtype=torch.long)
        out = torch.zeros_like(h)
        for i, expert in enumerate(self.experts):
            mask = picked == i
            out[mask] = expert(h[mask])
        return x + out


class TinyMoEModel(nn.Module):
    """No entry in the mapping table: calibrated through the generic fallback."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.blocks = nn.ModuleList([TinyMoEBlock(dim) for _ in range(2)])
        self.head = nn.Linear(dim, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def test_unmapped_model_falls_back_and_unused_expert_gets_round_to_nearest():
    model = TinyMoEModel()
    with pytest.warns(UserWarning) as record:
        model, summary = quantize(model, QuantConfig(wna16(4, "gptq"), ignore=("head",)), tokens())
    messages = [str(r.message) for r in record]
    assert any("no architecture mapping for TinyMoEModel" in m for m in messages)
    unused = [m for m in messages if "received no calibration tokens" in m]
    assert len(unused) == 2 and all("experts.1" in m for m in unused)
    assert isinstance(model.blocks[0].experts[1], QuantLinear)
    assert set(summary.converted) == {f"blocks.{b}.experts.{e}" for b in (0, 1) for e in (0, 1)}


# -- the shared tiny models of the mapped families, widened to two blocks of four heads
BLOCKS = {"vocab_size": VOCAB, "num_hidden_layers": 2, "num_attention_heads": 4}


def tiny_gpt2():
    fields = {"n_embd": 64, "n_layer": 2, "n_head": 4, "bos_token_id": 0, "eos_token_id": 0}
    return tiny_hf_model("gpt2", vocab_size=VOCAB, **fields)


def tiny_opt():
    return tiny_hf_model("opt", **BLOCKS, hidden_size=64, ffn_dim=128, word_embed_proj_dim=64)


def tiny_bert():
    pooler = {"add_pooling_layer": False}
    return tiny_hf_model(
        "bert", model_kwargs=pooler, **BLOCKS, hidden_size=64, intermediate_size=128
    )


@pytest.mark.parametrize(
    "build, arch, linears",
    [(tiny_gpt2, "gpt2", 8), (tiny_opt, "opt", 12), (tiny_bert, "bert", 12)],
)
@pytest.mark.parametrize("algorithm", ["gptq", "awq", "smoothquant"])
def test_mapped_architectures_calibrate(build, arch, linears, algorithm):
    torch.manual_seed(0)
    model = build()
    assert find_layout(model).arch == arch
    ids = tokens(2, 16, seed=1)
    with torch.no_grad():
        ref = model(ids)[0]
    if algorithm == "smoothquant":
        scheme = w8a8("smoothquant")
    else:
        scheme = wna16(4, algorithm, awq=AWQConfig(grid=4, clip_grid=4, max_tokens=64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a mapped model calibrates without fallback warnings
        model, summary = quantize(model, scheme, tokens(4, 16))
    assert len(summary.converted) == linears
    with torch.no_grad():
        out = model(ids)[0]
    assert float((out - ref).norm() / ref.norm()) < 0.2


@pytest.mark.gpu
def test_block_by_block_on_cuda_keeps_the_model_on_the_cpu():
    model = tiny_llama()
    model, _ = quantize(model, wna16(4, "gptq"), tokens(), device="cuda")
    assert all(b.device.type == "cpu" for b in model.buffers())
    assert isinstance(model.model.layers[1].mlp.down_proj, QuantLinear)


def test_gptq_quantizes_stage_by_stage_in_execution_order(monkeypatch):
    """q/k/v share an input, then o, then gate/up, then down; later stages see earlier ones."""
    seen: list[list[str]] = []
    hessian_inputs: dict[str, list[type]] = {}  # first linear of a stage -> module kinds
    original_stages = GptqStep.stages
    original_regather = GptqStep.regather

    def stages(self, sample):
        found = original_stages(self, sample)
        seen.append(found)
        return found

    def regather(self, stage):
        # -- when a stage's Hessian is collected, every earlier stage is already quantized
        block = self.block
        hessian_inputs[stage[0]] = [type(block.module.get_submodule(r)) for r in block.schemes]
        return original_regather(self, stage)

    monkeypatch.setattr(GptqStep, "stages", stages)
    monkeypatch.setattr(GptqStep, "regather", regather)
    quantize(tiny_llama(), wna16(4, "gptq", gptq=GPTQConfig(sequential=True)), tokens(4, 16))
    assert seen[0] == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]
    # -- down_proj's Hessian comes from a block whose other six linears are already quantized
    quantized = [kind is QuantLinear for kind in hessian_inputs["mlp.down_proj"]]
    assert sum(quantized) == 6
    assert sum(kind is QuantLinear for kind in hessian_inputs["self_attn.o_proj"]) == 3


def test_awq_with_gptq_rounding_takes_hessians_after_scaling(monkeypatch):
    """AWQ folds its scales first; GPTQ must then see the scaled inputs, not the originals."""
    hessians: dict[str, torch.Tensor] = {}
    original = gptq.gptq_quantize

    def record(weight, hessian, *args, name, **kw):
        hessians[name.removesuffix(".weight")] = hessian.clone()
        return original(weight, hessian, *args, name=name, **kw)

    monkeypatch.setattr(gptq, "gptq_quantize", record)
    awq_gptq = dataclasses.replace(FAST_AWQ, rounding="gptq")
    model, summary = quantize(tiny_llama(), wna16(4, "awq", awq=awq_gptq), tokens(4, 16))
    assert len(hessians) == len(summary.converted) == 14  # every linear rounded by GPTQ
    # -- q_proj's input is the folded norm's output: its Hessian is the one GPTQ used
    norm_out: list[torch.Tensor] = []
    model.model.layers[0].input_layernorm.register_forward_hook(
        lambda m, a, out: norm_out.append(out.reshape(-1, out.shape[-1]))
    )
    with torch.no_grad():
        model(tokens(4, 16))
    x = torch.cat(norm_out)
    torch.testing.assert_close(
        hessians["model.layers.0.self_attn.q_proj"],
        2 * x.t() @ x / x.shape[0],
        rtol=1e-4,
        atol=1e-5,
    )
