"""Fused mixture-of-experts weights (transformers 5.x ``*Experts`` modules) quantized per expert.

Tiny Mixtral and Qwen3-MoE models with random weights are built offline from configs.
"""

import json
import warnings

import pytest
import torch
from format_definitions import library_compress
from tiny_models import MOE_ARCHITECTURES as ARCHITECTURES
from tiny_models import MOE_EXPERTS as EXPERTS
from tiny_models import tiny_hf_model as tiny
from torch import nn

from torchquant import QuantConfig, QuantizationError, convert_model, scheme_from_name
from torchquant.errors import ConfigError
from torchquant.formats.dispatch import load_checkpoint, save_checkpoint
from torchquant.modules import QuantExperts, QuantLinear
from torchquant.modules.quant_experts import fused_experts_layout

transformers = pytest.importorskip("transformers")

# -- scheme, bound on the logits' relative error, bound on the experts' own relative error
# (three quantized projections in a row on random weights: 2-4x a single linear's error)
SCHEMES = {
    "w8a16": (scheme_from_name("w8a16"), 0.01, 0.02),
    "w4a16": (scheme_from_name("w4a16", group_size=16), 0.1, 0.2),
    "w8a8": (scheme_from_name("w8a8"), 0.015, 0.03),
    "fp8": (scheme_from_name("fp8"), 0.05, 0.1),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).norm() / ref.norm())


def expert_linears(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if n.startswith(f"{EXPERTS}.") and "proj" in n}


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_split_experts_compute_what_the_fused_module_computes(arch):
    model = tiny(arch)
    # -- transformers' grouped_mm experts leave a slot routed to no expert uninitialised
    # (times a weight of 0 that is NaN when the memory held Inf/NaN); its eager loop is exact
    model.set_experts_implementation("eager")
    fused = model.get_submodule(EXPERTS)
    split = QuantExperts.from_fused(fused, fused_experts_layout(fused))
    hidden = torch.randn(9, 32)
    index = torch.randint(0, 4, (9, 2))
    weights = torch.rand(9, 2)
    index[0, 1], weights[0, 1] = 4, 0.0  # a slot routed to no expert (expert parallelism)
    with torch.no_grad():
        torch.testing.assert_close(split(hidden, index, weights), fused(hidden, index, weights))
    assert split.expert(3).down_proj.weight.data_ptr() == fused.down_proj[3].data_ptr()  # a view


@pytest.mark.parametrize("scheme_name", list(SCHEMES))
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_convert_quantizes_every_expert(arch, scheme_name):
    scheme, logits_bound, experts_bound = SCHEMES[scheme_name]
    reference, model = tiny(arch), tiny(arch)
    model, summary = convert_model(model, QuantConfig(default=scheme), progress=False)
    experts = model.get_submodule(EXPERTS)
    assert isinstance(experts, QuantExperts)
    linears = expert_linears(model)
    assert len(linears) == 12 and all(isinstance(m, QuantLinear) for m in linears.values())
    assert set(linears) <= set(summary.converted)
    assert summary.split_experts == {EXPERTS: 4}
    assert "split 1 fused experts module(s) into 12 per-expert linears" in summary.table()
    assert not any(p.dim() == 3 for p in model.parameters())  # no fused float weight is left
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        err = rel_err(model(ids).logits, reference(ids).logits)
        # -- the experts alone, on routing that sends tokens to every expert
        hidden = torch.randn(16, 32)
        index = torch.arange(32).reshape(16, 2) % 4
        weights = torch.rand(16, 2)
        want = reference.get_submodule(EXPERTS)(hidden, index, weights)
        expert_err = rel_err(experts(hidden, index, weights), want)
    assert 0 < err < logits_bound, err
    assert 0 < expert_err < experts_bound, expert_err


@pytest.mark.parametrize("scheme_name", ["w4a16", "w8a16-fp8"])
def test_quantized_experts_equal_the_fused_module_on_their_dequantized_weights(scheme_name):
    """All the error is the weights' rounding: the routing math itself is the original's."""
    scheme = scheme_from_name(scheme_name, group_size=16 if scheme_name == "w4a16" else None)
    reference, model = tiny("qwen3-moe"), tiny("qwen3-moe")
    model, _ = convert_model(model, QuantConfig(scheme), progress=False)
    experts, fused = model.get_submodule(EXPERTS), reference.get_submodule(EXPERTS)
    with torch.no_grad():
        for e in range(4):
            expert = experts.expert(e)
            gate_up = [expert.gate_proj.dequantized_weight(), expert.up_proj.dequantized_weight()]
            fused.gate_up_proj[e] = torch.cat(gate_up)
            fused.down_proj[e] = expert.down_proj.dequantized_weight()
        hidden = torch.randn(16, 32)
        index, weights = torch.randint(0, 4, (16, 2)), torch.rand(16, 2)
        want = fused(hidden, index, weights)
        torch.testing.assert_close(experts(hidden, index, weights), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
@pytest.mark.parametrize("fmt", ["native", "compressed-tensors", "gptq", "awq"])
def test_generate_save_load_identical(tmp_path, arch, fmt):
    config = QuantConfig(
        default=scheme_from_name("w4a16", group_size=16),
        overrides={f"{EXPERTS}.1.down_proj": None},  # one projection kept in float
    )
    model, _ = convert_model(tiny(arch), config, progress=False)
    assert type(model.get_submodule(f"{EXPERTS}.1.down_proj")) is nn.Linear
    ids = torch.randint(0, 64, (2, 7))
    kw = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        want = model(ids).logits
        generated = model.generate(ids, **kw)
    assert generated.shape == (2, 10)
    save_checkpoint(model, tmp_path / fmt, fmt)
    loaded = load_checkpoint(tmp_path / fmt)
    assert isinstance(loaded.get_submodule(EXPERTS), QuantExperts)
    assert {n: type(m) for n, m in expert_linears(loaded).items()} == {
        n: type(m) for n, m in expert_linears(model).items()
    }
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, want)
        assert torch.equal(loaded.generate(ids, **kw), generated)


def test_loading_splits_experts_on_the_meta_device(tmp_path, monkeypatch):
    model, _ = convert_model(tiny("mixtral"), QuantConfig("w8a16"), progress=False)
    save_checkpoint(model, tmp_path / "q", "native")
    devices = []
    real_split = QuantExperts.from_fused.__func__

    def watching_split(cls, module, layout):
        devices.append(getattr(module, layout.gate_up).device.type)
        return real_split(cls, module, layout)

    monkeypatch.setattr(QuantExperts, "from_fused", classmethod(watching_split))
    loaded = load_checkpoint(tmp_path / "q")
    assert devices == ["meta"]  # the fused float weights are never allocated
    assert isinstance(loaded.get_submodule(EXPERTS), QuantExperts)
    assert not any(t.device.type == "meta" for t in loaded.state_dict().values())


def test_config_names_experts_like_linears():
    w4, w8 = scheme_from_name("w4a16", group_size=16), scheme_from_name("w8a16")
    config = QuantConfig(
        default=w4,
        overrides={f"{EXPERTS}.down_proj": w8, "re:.*experts\\.3\\.up_proj": None},
    )
    model, summary = convert_model(tiny("mixtral"), config, progress=False)
    experts = model.get_submodule(EXPERTS)
    for e in range(4):
        assert experts.expert(e).down_proj.scheme == w8  # the fused attribute's name
        assert experts.expert(e).gate_proj.scheme == w4
    assert type(experts.expert(3).up_proj) is nn.Linear
    assert summary.skipped[f"{EXPERTS}.3.up_proj"] == "skipped by 're:.*experts\\\\.3\\\\.up_proj'"
    # -- the experts module's own name reaches all of its projections
    model, summary = convert_model(
        tiny("mixtral"), QuantConfig(w4, ignore=["experts"]), progress=False
    )
    fused = model.get_submodule(EXPERTS)
    assert type(fused).__name__ == "MixtralExperts"
    assert summary.skipped[EXPERTS] == "ignored by 'experts'"
    with pytest.raises(ConfigError, match="matches no linear layer"):
        convert_model(tiny("mixtral"), QuantConfig(w4, overrides={f"{EXPERTS}.9.up_proj": w8}))


def test_nan_in_an_expert_is_refused_naming_it():
    model = tiny("qwen3-moe")
    with torch.no_grad():
        model.get_submodule(EXPERTS).gate_up_proj[2, 40, 5] = float("nan")  # an up_proj row
    with pytest.raises(QuantizationError, match=f"{EXPERTS}.2.up_proj.weight contains 1 NaN"):
        convert_model(model, QuantConfig("w8a16"), progress=False)


def test_bad_routing_index_is_refused():
    model, _ = convert_model(tiny("mixtral"), QuantConfig("w8a16"), progress=False)
    index = torch.tensor([[0, 7]])
    with pytest.raises(QuantizationError, match="top_k_index spans 0..7"):
        model.get_submodule(EXPERTS)(torch.randn(1, 32), index, torch.rand(1, 2))


class StrangeExperts(nn.Module):
    """Fused experts in a layout no table entry describes (transposed, with biases)."""

    def __init__(self):
        super().__init__()
        self.num_experts = 2
        self.gate_up_proj = nn.Parameter(torch.randn(2, 8, 16))
        self.gate_up_proj_bias = nn.Parameter(torch.zeros(2, 16))
        self.down_proj = nn.Parameter(torch.randn(2, 8, 8))
        self.is_transposed = True


class WithStrangeExperts(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.experts = StrangeExperts()


def test_unknown_fused_experts_stay_float_with_a_warning():
    model = WithStrangeExperts()
    with pytest.warns(UserWarning, match="experts: StrangeExperts holds fused expert weights"):
        model, summary = convert_model(model, QuantConfig("w8a16"), progress=False)
    assert isinstance(model.proj, QuantLinear)
    assert isinstance(model.experts, StrangeExperts)
    assert "not supported" in summary.skipped["experts"]


def test_compressed_tensors_ignore_lists_float_expert_projections(tmp_path):
    config = QuantConfig("w8a16", overrides={f"{EXPERTS}.0.gate_proj": None})
    model, _ = convert_model(tiny("mixtral"), config, progress=False)
    save_checkpoint(model, tmp_path / "ct", "compressed-tensors")
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    stored = "model.layers.0.block_sparse_moe.experts"  # Mixtral checkpoints' name for it
    assert f"{stored}.0.w1" in qc["ignore"]
    assert not any(name.startswith(f"{stored}.1") for name in qc["ignore"])


def test_compressed_tensors_library_decompresses_expert_weights_exactly(tmp_path):
    pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed")
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    model, _ = convert_model(
        tiny("qwen3-moe"), QuantConfig(scheme_from_name("w4a16", group_size=16)), progress=False
    )
    save_checkpoint(model, tmp_path / "ct", "compressed-tensors")
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    (group,) = QuantizationConfig.model_validate(qc).config_groups.values()
    compressor = BaseCompressor.get_value_from_registry(group.format)
    state = load_file(tmp_path / "ct" / "model.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, layer in expert_linears(model).items():
            local = {k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(f"{name}.")}
            assert set(local) == {
                "weight_packed",
                "weight_scale",
                "weight_zero_point",
                "weight_shape",
            }
            theirs = compressor.decompress(local, group)["weight"]
            assert torch.equal(theirs.to(layer.dtype), layer.dequantized_weight()), name


def test_qat_trains_and_converts_split_experts():
    from torchquant.qat import QatLinear, convert_qat, prepare_qat

    config = QuantConfig(scheme_from_name("w4a16", group_size=16))
    model, summary = prepare_qat(tiny("mixtral"), config, progress=False)
    assert all(isinstance(m, QatLinear) for m in expert_linears(model).values())
    assert f"{EXPERTS}.2.down_proj" in summary.converted
    ids = torch.randint(0, 64, (2, 7))
    model(ids, labels=ids).loss.backward()
    grads = [m.weight.grad for m in expert_linears(model).values()]
    assert any(g is not None and bool(g.abs().sum() > 0) for g in grads)
    with torch.no_grad():
        trained = model(ids).logits
    model, _ = convert_qat(model, config, progress=False)
    assert all(isinstance(m, QuantLinear) for m in expert_linears(model).values())
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, trained, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", ["per-expert", "fused"])
def test_streamed_conversion_reads_experts_per_expert_or_fused(tmp_path, layout):
    from accelerate import init_empty_weights
    from safetensors.torch import save_file

    from torchquant.streaming import convert_from_safetensors

    config = QuantConfig(
        scheme_from_name("w4a16", group_size=16), overrides={f"{EXPERTS}.2.up_proj": None}
    )
    if layout == "per-expert":  # what transformers' save_pretrained writes
        tiny("qwen3-moe").save_pretrained(tmp_path)
    else:
        save_file(tiny("qwen3-moe").state_dict(), str(tmp_path / "model.safetensors"))
    want, _ = convert_model(tiny("qwen3-moe"), config, progress=False)
    with init_empty_weights(include_buffers=False):
        skeleton = transformers.Qwen3MoeForCausalLM(tiny("qwen3-moe").config)
    got, summary = convert_from_safetensors(
        skeleton, [tmp_path / "model.safetensors"], config, progress=False
    )
    got.tie_weights()
    assert summary.split_experts == {EXPERTS: 4}
    assert want.state_dict().keys() == got.state_dict().keys()
    for key, value in want.state_dict().items():
        assert torch.equal(value, got.state_dict()[key]), key


def test_per_expert_checkpoint_compressed_by_the_library_loads(tmp_path):
    """What llm-compressor writes for a Qwen-style MoE: every expert's linears packed."""
    pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed")
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
    )
    from safetensors.torch import load_file, save_file

    from torchquant.formats.compressed_tensors import load_compressed_tensors

    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=16)
    scheme = QuantizationScheme(targets=["Linear"], weights=args, format="pack-quantized")
    tiny("qwen3-moe").save_pretrained(tmp_path)  # per-expert tensor names
    state = load_file(tmp_path / "model.safetensors")
    reference = tiny("qwen3-moe")
    fused = reference.get_submodule(EXPERTS)
    names = [k.removesuffix(".weight") for k in state if k.endswith("_proj.weight")]
    assert f"{EXPERTS}.3.up_proj" in names
    with torch.no_grad():
        for name in names:
            weight = state.pop(f"{name}.weight")
            compressed, decompressed = library_compress(weight, scheme, 4, True, 16)
            state.update({f"{name}.{k}": v for k, v in compressed.items()})
            if not name.startswith(f"{EXPERTS}."):
                reference.get_submodule(name).weight.copy_(decompressed)
                continue
            e, proj = name.split(".")[-2:]
            rows = {"gate_proj": slice(0, 32), "up_proj": slice(32, 64)}.get(proj)
            target = fused.down_proj[int(e)] if rows is None else fused.gate_up_proj[int(e), rows]
            target.copy_(decompressed)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    qconfig = QuantizationConfig(
        config_groups={"group_0": scheme},
        format="pack-quantized",
        quantization_status="compressed",
        ignore=["lm_head", "re:.*mlp.gate$"],
    )
    ModelCompressor(quantization_config=qconfig).update_config(str(tmp_path))

    loaded = load_compressed_tensors(tmp_path)
    assert isinstance(loaded.get_submodule(f"{EXPERTS}.3.up_proj"), QuantLinear)
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, reference(ids).logits)


def test_loading_into_a_given_float_model(tmp_path):
    from torchquant.serialization import load_quantized, save_quantized

    model, _ = convert_model(tiny("qwen3-moe"), QuantConfig("w8a16"), progress=False)
    save_quantized(model, tmp_path / "q")
    loaded = load_quantized(tmp_path / "q", model=tiny("qwen3-moe"))
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_checkpoint_naming_an_expert_the_model_lacks_is_refused(tmp_path):
    from checkpoint_tools import metadata_of, reseal
    from safetensors.torch import load_file

    from torchquant.errors import CheckpointError
    from torchquant.serialization import KEY_LAYERS

    model, _ = convert_model(tiny("mixtral"), QuantConfig("w8a16"), progress=False)
    save_checkpoint(model, tmp_path / "q", "native")
    shard = tmp_path / "q" / "model.safetensors"
    meta = metadata_of(shard)
    meta[KEY_LAYERS] = meta[KEY_LAYERS].replace(f"{EXPERTS}.3.", f"{EXPERTS}.7.")
    tensors = {k.replace(f"{EXPERTS}.3.", f"{EXPERTS}.7."): v for k, v in load_file(shard).items()}
    reseal(shard, tensors, meta)
    with pytest.raises(CheckpointError, match=f"layer '{EXPERTS}.7.gate_proj' from the checkpoint"):
        load_checkpoint(tmp_path / "q")


@pytest.mark.parametrize("scheme_name", ["w4a16", "w8a16", "w8a16-fp8"])
def test_grouped_op_computes_what_the_per_expert_loop_computes(scheme_name):
    """The grouped path (stacked weights, one op per projection) on CPU, where the op runs its
    per-expert loop on the CPU kernels; slots routed to no expert add nothing."""
    scheme = scheme_from_name(scheme_name, group_size=16 if scheme_name == "w4a16" else None)
    model, _ = convert_model(tiny("mixtral"), QuantConfig(scheme), progress=False)
    experts = model.get_submodule(EXPERTS)
    stacked = experts.stacked_experts()
    assert stacked is not None and stacked.gate_up[0].shape[:2] == (4, 128)
    hidden = torch.randn(16, 32)
    index, weights = torch.randint(0, 4, (16, 2)), torch.rand(16, 2)
    index[0, 1] = 4  # routed to no expert
    index[index == 3] = 2  # expert 3 gets no tokens
    with torch.no_grad():
        want = experts(hidden, index, weights)
        got = experts.grouped_forward(stacked, hidden, index, weights)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_stacked_weights_are_a_cache_never_saved_and_rederived_when_a_weight_changes():
    model, _ = convert_model(
        tiny("mixtral"), QuantConfig(scheme_from_name("w4a16", group_size=16)), progress=False
    )
    experts = model.get_submodule(EXPERTS)
    keys = set(experts.state_dict())
    first = experts.stacked_experts()
    assert experts.stacked_experts() is first  # derived once
    assert set(experts.state_dict()) == keys
    with torch.no_grad():
        experts.expert(2).down_proj.scales.mul_(2)
    again = experts.stacked_experts()
    assert again is not first
    assert torch.equal(again.down[1][2], first.down[1][2] * 2)


def test_mixed_experts_keep_the_per_expert_loop():
    config = QuantConfig(
        default=scheme_from_name("w4a16", group_size=16),
        overrides={f"{EXPERTS}.1.down_proj": None},
    )
    model, _ = convert_model(tiny("mixtral"), config, progress=False)
    assert model.get_submodule(EXPERTS).stacked_experts() is None


def test_fp4_experts_keep_the_per_expert_loop():
    """The grouped op reads packed INT, INT8 and FP8 weights; FP4 experts run their own op."""
    model, _ = convert_model(
        tiny("mixtral"), QuantConfig(scheme_from_name("nvfp4a16")), progress=False
    )
    experts = model.get_submodule(EXPERTS)
    assert isinstance(experts.expert(0).gate_proj, QuantLinear)
    assert experts.stacked_experts() is None
