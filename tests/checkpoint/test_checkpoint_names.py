"""Exported checkpoints name tensors as each model type's original checkpoints (and vLLM) do.

Tiny random Mixtral-style models are built offline from configs; the renaming table is
checked against the names transformers' own ``save_pretrained`` writes.
"""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import TINY_DECODER

from torchquant import QuantConfig, convert_model, scheme_from_name
from torchquant.checkpoint.names import CHECKPOINT_NAMES, names_for_type
from torchquant.errors import CheckpointError
from torchquant.formats.dispatch import load_checkpoint, save_checkpoint
from torchquant.modules import QuantLinear
from torchquant.plan import split_fused_experts

transformers = pytest.importorskip("transformers")

DECODER = {**TINY_DECODER, "num_hidden_layers": 2, "num_experts_per_tok": 2}
# model_type -> (config class, model class, extra config)
TINY = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4}),
    "minimax": ("MiniMaxConfig", "MiniMaxForCausalLM", {"num_local_experts": 4}),
    "minimax_m2": ("MiniMaxM2Config", "MiniMaxM2ForCausalLM", {"num_local_experts": 4}),
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM", {"num_local_experts": 4}),
    "lfm2_moe": (
        "Lfm2MoeConfig",
        "Lfm2MoeForCausalLM",
        {
            "num_experts": 4,
            "moe_intermediate_size": 32,
            "num_dense_layers": 1,
            "layer_types": ["full_attention", "full_attention"],
        },
    ),
}
STORED = "model.layers.1.block_sparse_moe"  # Mixtral's MoE block in its checkpoints
MODULE = "model.layers.1.mlp"  # ... and in transformers 5's module tree


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(model_type: str, **overrides):
    config_cls, model_cls, kw = TINY[model_type]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = getattr(transformers, config_cls)(**{**DECODER, **kw, **overrides})
    return getattr(transformers, model_cls)(config).eval()


def stored_names(directory) -> set[str]:
    return set(load_file(directory / "model.safetensors"))


def test_every_table_entry_is_checked_here():
    assert set(CHECKPOINT_NAMES) == set(TINY)


@pytest.mark.parametrize("model_type", list(TINY))
def test_table_gives_the_names_transformers_saves(tmp_path, model_type):
    tiny(model_type).save_pretrained(tmp_path / "float")  # reverses the load-time renaming
    theirs = stored_names(tmp_path / "float")
    model = tiny(model_type)
    split_fused_experts(model, lambda linears: None)  # per-expert linears, our names
    names = names_for_type(model.config.model_type)
    ours = set(model.state_dict())
    assert {names.to_checkpoint(k) for k in ours} - {"lm_head.weight"} == theirs - {
        "lm_head.weight"
    }
    assert {names.to_model(k) for k in theirs} <= ours
    assert all(names.to_model(k) == k for k in ours)  # our own names are read as they are
    # -- a quantized export names the same modules (Phi-MoE's router is no nn.Linear there)
    config = QuantConfig(scheme_from_name("w4a16", group_size=16), ignore=["lm_head", "router"])
    quantized, _ = convert_model(model, config, progress=False)
    save_checkpoint(quantized, tmp_path / "ct", "compressed-tensors")
    modules = {k.rpartition(".")[0] for k in stored_names(tmp_path / "ct")}
    assert modules == {k.rpartition(".")[0] for k in theirs}
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        want = quantized(ids).logits
        assert torch.equal(load_checkpoint(tmp_path / "ct")(ids).logits, want)


def test_mixtral_names_example():
    names = names_for_type("mixtral")
    pairs = {
        "model.layers.3.mlp.experts.7.gate_proj.weight_packed": (
            "model.layers.3.block_sparse_moe.experts.7.w1.weight_packed"
        ),
        "model.layers.3.mlp.experts.7.up_proj": "model.layers.3.block_sparse_moe.experts.7.w3",
        "model.layers.3.mlp.experts.7.down_proj.qweight": (
            "model.layers.3.block_sparse_moe.experts.7.w2.qweight"
        ),
        "model.layers.3.mlp.gate.weight": "model.layers.3.block_sparse_moe.gate.weight",
        "model.layers.3.mlp.experts.gate_up_proj": (
            "model.layers.3.block_sparse_moe.experts.gate_up_proj"
        ),
        "model.layers.3.self_attn.q_proj.weight": "model.layers.3.self_attn.q_proj.weight",
        "lm_head": "lm_head",
    }
    for ours, theirs in pairs.items():
        assert names.to_checkpoint(ours) == theirs
        assert names.to_model(theirs) == ours
    assert names_for_type("qwen3_moe").to_checkpoint("model.layers.0.mlp.experts.1.up_proj") == (
        "model.layers.0.mlp.experts.1.up_proj"
    )
    assert names_for_type(None).to_model("a.b") == "a.b"


def _quantized_mixtral(scheme):
    config = QuantConfig(scheme, overrides={f"{MODULE}.experts.2.down_proj": None})
    model, _ = convert_model(tiny("mixtral"), config, progress=False)
    return model


@pytest.mark.parametrize(
    ("scheme", "fields"),
    [
        (
            scheme_from_name("w4a16", group_size=16),
            {"weight_packed", "weight_scale", "weight_shape", "weight_zero_point"},
        ),
        (scheme_from_name("w8a8"), {"weight", "weight_scale"}),
    ],
    ids=["w4a16", "w8a8"],
)
def test_mixtral_compressed_tensors_export_uses_checkpoint_names(tmp_path, scheme, fields):
    model = _quantized_mixtral(scheme)
    save_checkpoint(model, tmp_path / "ct", "compressed-tensors")
    names = stored_names(tmp_path / "ct")
    for field in fields:
        assert f"{STORED}.experts.0.w1.{field}" in names
        assert f"{STORED}.experts.3.w3.{field}" in names
        assert f"{STORED}.experts.1.w2.{field}" in names
    assert f"{STORED}.experts.2.w2.weight" in names  # the projection kept in float
    assert f"{STORED}.gate.weight" in names
    assert not any(".mlp." in n or (".experts." in n and "_proj" in n) for n in names)
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qc["ignore"] == ["lm_head", f"{STORED}.experts.2.w2"]
    ids = torch.randint(0, 64, (2, 7))
    loaded = load_checkpoint(tmp_path / "ct")
    assert isinstance(loaded.get_submodule(f"{MODULE}.experts.3.up_proj"), QuantLinear)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("scheme_name", ["w4a16", "w8a8"])
def test_library_decompressor_reads_the_renamed_tensors(tmp_path, scheme_name):
    pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed")
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    model = _quantized_mixtral(scheme_from_name(scheme_name, group_size=16))
    save_checkpoint(model, tmp_path / "ct", "compressed-tensors")
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    (group,) = QuantizationConfig.model_validate(qc).config_groups.values()
    compressor = BaseCompressor.get_value_from_registry(group.format)
    state = load_file(tmp_path / "ct" / "model.safetensors")
    names = names_for_type("mixtral")
    checked = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, layer in model.named_modules():
            if not isinstance(layer, QuantLinear) or ".experts." not in name:
                continue
            prefix = f"{names.to_checkpoint(name)}."
            local = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            local.pop("input_scale", None)
            theirs = compressor.decompress(local, group)["weight"]
            assert torch.equal(theirs.to(layer.dtype), layer.dequantized_weight()), name
            checked += 1
    assert checked == 2 * 4 * 3 - 1


@pytest.mark.parametrize("fmt", ["gptq", "awq"])
def test_mixtral_gptq_and_awq_exports_use_checkpoint_names(tmp_path, fmt):
    model = _quantized_mixtral(scheme_from_name("w4a16", group_size=16))
    save_checkpoint(model, tmp_path / fmt, fmt)
    names = stored_names(tmp_path / fmt)
    for field in ("qweight", "qzeros", "scales"):
        assert f"{STORED}.experts.0.w1.{field}" in names
        assert f"{STORED}.experts.3.w2.{field}" in names
    assert not any(".mlp." in n for n in names)
    if fmt == "awq":
        qc = json.loads((tmp_path / fmt / "config.json").read_text())["quantization_config"]
        assert qc["modules_to_not_convert"] == ["lm_head", f"{STORED}.experts.2.w2"]
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        assert torch.equal(load_checkpoint(tmp_path / fmt)(ids).logits, model(ids).logits)


def _rename_folder(directory, rename) -> None:
    """Rename every tensor of a single-file folder (and the ignore list) with ``rename``."""
    path = directory / "model.safetensors"
    save_file({rename(k): v for k, v in load_file(path).items()}, str(path), {"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    qc = config["quantization_config"]
    qc["ignore"] = [rename(n) for n in qc["ignore"]]
    (directory / "config.json").write_text(json.dumps(config))


def test_folders_written_with_module_names_still_load(tmp_path):
    model = _quantized_mixtral(scheme_from_name("w4a16", group_size=16))
    save_checkpoint(model, tmp_path / "ct", "compressed-tensors")
    _rename_folder(tmp_path / "ct", names_for_type("mixtral").to_model)
    assert f"{MODULE}.experts.0.gate_proj.weight_packed" in stored_names(tmp_path / "ct")
    ids = torch.randint(0, 64, (2, 7))
    loaded = load_checkpoint(tmp_path / "ct")
    assert type(loaded.get_submodule(f"{MODULE}.experts.2.down_proj")) is torch.nn.Linear
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_ignore_regex_on_checkpoint_names_is_honoured(tmp_path):
    """llm-compressor writes Mixtral ignores such as ``re:.*block_sparse_moe.gate``."""
    model = _quantized_mixtral(scheme_from_name("w8a16"))
    save_checkpoint(model, tmp_path / "ct", "compressed-tensors")
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    # -- the layer the export ignores, by a pattern only its stored name matches
    pattern = r"re:.*layers\.1\.block_sparse_moe\.experts\.2\.w2$"
    config["quantization_config"]["ignore"] = ["lm_head", pattern]
    (tmp_path / "ct" / "config.json").write_text(json.dumps(config))
    loaded = load_checkpoint(tmp_path / "ct")
    assert type(loaded.get_submodule(f"{MODULE}.experts.2.down_proj")) is torch.nn.Linear
    assert isinstance(loaded.get_submodule(f"{MODULE}.experts.2.up_proj"), QuantLinear)


def test_a_tensor_under_both_names_is_refused(tmp_path):
    model = _quantized_mixtral(scheme_from_name("w8a16"))
    save_checkpoint(model, tmp_path / "ct", "compressed-tensors")
    path = tmp_path / "ct" / "model.safetensors"
    state = load_file(path)
    state[f"{MODULE}.gate.weight"] = state[f"{STORED}.gate.weight"].clone()
    save_file(state, str(path), {"format": "pt"})
    with pytest.raises(CheckpointError, match=f"names tensor '{MODULE}.gate.weight' twice"):
        load_checkpoint(tmp_path / "ct")


def test_transformers_loads_the_export(tmp_path):
    """transformers' compressed-tensors loader maps the names onto its fused experts."""
    pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed")
    scheme = scheme_from_name("w4a16", group_size=16, symmetric=True)
    model, _ = convert_model(tiny("mixtral"), QuantConfig(scheme), progress=False)
    save_checkpoint(model, tmp_path / "ct", "compressed-tensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / "ct", dtype=torch.float32
        )
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        want = model(ids).logits
        torch.testing.assert_close(theirs(ids).logits, want, rtol=1e-5, atol=1e-5)


def test_streaming_reads_a_mixtral_checkpoint_transformers_saved(tmp_path):
    from accelerate import init_empty_weights

    from torchquant.streaming import convert_from_safetensors

    tiny("mixtral").save_pretrained(tmp_path)
    assert f"{STORED}.experts.0.w1.weight" in stored_names(tmp_path)
    config = QuantConfig(scheme_from_name("w4a16", group_size=16))
    want, _ = convert_model(tiny("mixtral"), config, progress=False)
    with init_empty_weights(include_buffers=False):
        skeleton = transformers.MixtralForCausalLM(tiny("mixtral").config)
    got, summary = convert_from_safetensors(
        skeleton, [tmp_path / "model.safetensors"], config, progress=False
    )
    assert summary.split_experts == {"model.layers.0.mlp.experts": 4, f"{MODULE}.experts": 4}
    assert want.state_dict().keys() == got.state_dict().keys()
    for key, value in want.state_dict().items():
        assert torch.equal(value, got.state_dict()[key]), key


def test_streaming_refuses_a_tensor_under_both_names(tmp_path):
    from accelerate import init_empty_weights

    from torchquant.streaming import convert_from_safetensors

    tiny("mixtral").save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    state = load_file(path)
    state[f"{MODULE}.gate.weight"] = state[f"{STORED}.gate.weight"].clone()
    save_file(state, str(path), {"format": "pt"})
    with init_empty_weights(include_buffers=False):
        skeleton = transformers.MixtralForCausalLM(tiny("mixtral").config)
    with pytest.raises(CheckpointError, match=f"'{MODULE}.gate.weight' appears twice"):
        convert_from_safetensors(skeleton, [path], QuantConfig("w8a16"), progress=False)
