"""Act-order weights (a permuted ``g_idx``) in the exchange formats, both ways, exactly.

GPTQ with act-order and no static groups forms its groups in the order it visits the
columns; compressed-tensors stores that as ``weight_g_idx`` with ``actorder: group``,
GPTQ checkpoints as ``g_idx`` with ``desc_act: true``.  AWQ has no ``g_idx``.
"""

import copy
import json

import pytest
import torch
from format_definitions import layer_tensors, ref_gptq_dequant, ref_pack_dim1
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from tiny_models import act_order_llama
from tiny_models import tiny_llama as shared_tiny_llama

from torchquant import CheckpointError, QuantConfig, convert_model, scheme_from_name
from torchquant.formats.awq import save_awq
from torchquant.formats.dispatch import load_checkpoint, save_checkpoint
from torchquant.formats.gptq import save_gptq
from torchquant.formats.int_layers import IntLayerWeights, checked_g_idx, regroup_evenly
from torchquant.modules import QuantLinear

transformers = pytest.importorskip("transformers")

VOCAB = 96


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_llama(**kw):
    return shared_tiny_llama(vocab=VOCAB, **kw)


def quant_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def is_plain(g_idx, group):
    return torch.equal(g_idx.long(), torch.arange(g_idx.numel()) // group)


@pytest.fixture(scope="module")
def models():
    """Act-order GPTQ models, asymmetric and symmetric; every layer holds a permuted g_idx."""
    out = {"asym": act_order_llama(), "sym": act_order_llama(symmetric=True)}
    for model in out.values():
        layers = quant_layers(model)
        assert len(layers) == 7
        assert all(m.g_idx is not None and not is_plain(m.g_idx, 32) for m in layers.values())
    return out


def ids(seed=1, length=9):
    return torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))


def save(model, folder, fmt):
    if fmt.startswith("gptq"):
        return save_gptq(model, folder, version=fmt)
    return save_checkpoint(model, folder, fmt)


def quantization_config(folder):
    return json.loads((folder / "config.json").read_text())["quantization_config"]


# -- export and import


@pytest.mark.parametrize(
    ("fmt", "kind"),
    [("compressed-tensors", "asym"), ("compressed-tensors", "sym"), ("gptq", "sym")]
    + [("gptq_v2", "asym")],
)
def test_act_order_model_round_trips_exactly(tmp_path, models, fmt, kind):
    model = models[kind]  # GPTQ v1 stores zero - 1: its test uses symmetric weights
    save(model, tmp_path / "q", fmt)
    qc = quantization_config(tmp_path / "q")
    if fmt == "compressed-tensors":
        assert [g["weights"]["actorder"] for g in qc["config_groups"].values()] == ["group"]
        assert qc["config_groups"]["group_0"]["weights"]["symmetric"] == (kind == "sym")
    else:
        assert qc["desc_act"] is True and qc["static_groups"] is False
    loaded = load_checkpoint(tmp_path / "q")
    for name, layer in quant_layers(model).items():
        twin = loaded.get_submodule(name)
        assert torch.equal(twin.g_idx, layer.g_idx), name
        assert torch.equal(twin.dequantized_weight(), layer.dequantized_weight()), name
    x = ids()
    assert torch.equal(loaded(x).logits, model(x).logits)


def test_gptq_act_order_export_matches_the_format_definition(tmp_path, models):
    model = models["asym"]
    save_gptq(model, tmp_path / "q", version="gptq_v2")
    for name, layer in quant_layers(model).items():
        tensors = layer_tensors(tmp_path / "q", name)
        assert torch.equal(tensors["g_idx"], layer.g_idx), name
        want = ref_gptq_dequant(tensors, 4, "gptq_v2")
        assert torch.equal(want.to(layer.dtype), layer.dequantized_weight()), name


def test_partial_last_act_order_group_is_regrouped_exactly(tmp_path):
    # K = 96 and 160 with group 64: the last act-order group is 32 wide; exported as 32
    model = act_order_llama(group=64, hidden=96, inter=160)
    layers = quant_layers(model)
    assert torch.equal(
        torch.bincount(layers["model.layers.0.mlp.up_proj"].g_idx), torch.tensor([64, 32])
    )
    x = ids()
    for fmt in ("compressed-tensors", "gptq_v2"):
        save(model, tmp_path / fmt, fmt)
        qc = quantization_config(tmp_path / fmt)
        group = (
            qc["group_size"]
            if fmt == "gptq_v2"
            else qc["config_groups"]["group_0"]["weights"]["group_size"]
        )
        assert group == 32
        loaded = load_checkpoint(tmp_path / fmt)
        for name, layer in layers.items():
            g_idx = loaded.get_submodule(name).g_idx
            counts = torch.bincount(g_idx.long())
            assert torch.equal(counts, torch.full((layer.in_features // 32,), 32)), name
            if fmt == "gptq_v2":
                want = ref_gptq_dequant(layer_tensors(tmp_path / fmt, name), 4, fmt)
                assert torch.equal(want, layer.dequantized_weight()), name
        assert torch.equal(loaded(x).logits, model(x).logits)


def _dequant(w: IntLayerWeights) -> torch.Tensor:
    k = w.shape[1]
    group = torch.arange(k) // w.group_size if w.g_idx is None else w.g_idx.long()
    return (w.codes.float() - w.zeros[:, group].float()) * w.scales[:, group]


@settings(max_examples=60, deadline=None)
@given(k=st.integers(1, 96), group=st.integers(1, 48), seed=st.integers(0, 2**16))
def test_regrouping_act_order_groups_keeps_every_weight(k, group, seed):
    """Act-order groups (consecutive in a visiting order, the last one short) regroup exactly."""
    gen = torch.Generator().manual_seed(seed)
    g_idx = (torch.argsort(torch.randperm(k, generator=gen)) // group).to(torch.int32)
    groups = -(-k // group)
    w = IntLayerWeights(
        torch.randint(0, 16, (3, k), generator=gen, dtype=torch.uint8),
        torch.rand(3, groups, generator=gen) + 0.1,
        torch.randint(0, 16, (3, groups), generator=gen, dtype=torch.uint8),
        4,
        group,
        None,
        torch.float32,
        g_idx=g_idx,
    )
    regrouped = regroup_evenly(w)
    assert k % regrouped.group_size == 0
    assert regrouped.scales.shape[1] == k // regrouped.group_size
    checked_g_idx(regrouped.g_idx, k, regrouped.group_size, "x")  # every group full: no raise
    assert torch.equal(_dequant(regrouped), _dequant(w))


def test_awq_refuses_act_order_weights(tmp_path, models):
    with pytest.raises(CheckpointError, match="act-order weights .* cannot be stored in AWQ"):
        save_awq(models["asym"], tmp_path / "a")
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize(("bits", "symmetric"), [(4, False), (8, True)])
def test_gptq_desc_act_checkpoint_written_by_the_definition_loads_exactly(
    tmp_path, bits, symmetric
):
    """A v1 desc_act folder packed bit by bit here (not by torchquant) loads to its weights.

    Symmetric 8-bit weights with a g_idx load as asymmetric ones with zero point 128.
    """
    model = tiny_llama()
    gen = torch.Generator().manual_seed(1)
    state = dict(model.state_dict())
    expected, g = {}, 32
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name != "lm_head":
            n, k = m.weight.shape
            codes = torch.randint(0, 1 << bits, (k, n), generator=gen)
            if symmetric:
                zeros = torch.full((k // g, n), 1 << (bits - 1))
            else:
                zeros = torch.randint(1, 1 << bits, (k // g, n), generator=gen)
            scales = (torch.rand(k // g, n, generator=gen) * 0.02 + 0.001).half()
            g_idx = torch.randperm(k, generator=gen) // g  # g columns in every group
            del state[f"{name}.weight"]
            tensors = {
                "qweight": ref_pack_dim1(codes.t().contiguous(), bits).t().contiguous(),
                "qzeros": ref_pack_dim1(zeros - 1, bits),
                "scales": scales,
                "g_idx": g_idx.to(torch.int32),
            }
            state.update({f"{name}.{key}": v for key, v in tensors.items()})
            # float16 scales in a float32 model: the layers compute in float32, exactly
            float_scales = {**tensors, "scales": scales.float()}
            expected[name] = (ref_gptq_dequant(float_scales, bits, "gptq"), g_idx)
    model.save_pretrained(tmp_path / "q")
    save_file(state, str(tmp_path / "q" / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": g,
        "desc_act": True,
        "sym": symmetric,
        "checkpoint_format": "gptq",
    }
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    loaded = load_checkpoint(tmp_path / "q")
    for name, (want, g_idx) in expected.items():
        layer = loaded.get_submodule(name)
        assert torch.equal(layer.g_idx.long(), g_idx), name
        assert torch.equal(layer.dequantized_weight(), want.float()), name


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq"])
def test_plain_g_idx_loads_without_one(tmp_path, fmt):
    model, _ = convert_model(
        tiny_llama(), QuantConfig(scheme_from_name("w4a16", group_size=32)), progress=False
    )
    save(model, tmp_path / "q", fmt)
    if fmt == "gptq":  # GPTQ always stores g_idx: here the plain k // 32
        assert not quantization_config(tmp_path / "q")["desc_act"]
        assert is_plain(layer_tensors(tmp_path / "q", "model.layers.0.mlp.up_proj")["g_idx"], 32)
    else:  # the library's "not computed yet" fill of -1 means column order too
        state = load_file(tmp_path / "q" / "model.safetensors")
        state["model.layers.0.mlp.up_proj.weight_g_idx"] = torch.full((64,), -1, dtype=torch.int32)
        save_file(state, str(tmp_path / "q" / "model.safetensors"), metadata={"format": "pt"})
    loaded = load_checkpoint(tmp_path / "q")
    assert all(m.g_idx is None for m in quant_layers(loaded).values())
    x = ids()
    assert torch.equal(loaded(x).logits, model(x).logits)


# -- malformed g_idx


def _plain_33():
    g_idx = torch.arange(64, dtype=torch.int32) // 32
    g_idx[40] = 0  # group 0 gets 33 columns, group 1 only 31
    return g_idx


BAD_G_IDX = {  # edit of a good g_idx, what the refusal says after "layer '...': g_idx "
    "shape": (lambda g: g[:-1], r"has shape \(63,\), need \(64,\)"),
    "range": (lambda g: torch.where(g == 1, 2, g), r"holds groups 0\.\.2, outside \[0, 2\)"),
    "negative": (lambda g: torch.where(torch.arange(64) == 5, -1, g), r"holds groups -1\.\.1"),
    "counts": (lambda g: _plain_33(), "puts 33 columns in group 0, .* groups of 32 columns"),
    "float": (lambda g: g.float(), "must hold integers"),
}


@pytest.mark.parametrize("case", list(BAD_G_IDX))
@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq_v2"])
def test_malformed_g_idx_is_refused_naming_the_layer(tmp_path, models, fmt, case):
    save(models["asym"], tmp_path / "q", fmt)
    key = "model.layers.0.self_attn.q_proj." + ("g_idx" if fmt == "gptq_v2" else "weight_g_idx")
    state = load_file(tmp_path / "q" / "model.safetensors")
    edit, match = BAD_G_IDX[case]
    state[key] = edit(state[key]).contiguous()
    save_file(state, str(tmp_path / "q" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(
        CheckpointError, match=f"layer 'model.layers.0.self_attn.q_proj': g_idx {match}"
    ):
        load_checkpoint(tmp_path / "q")


def test_export_refuses_a_g_idx_readers_would_misread(tmp_path, models):
    model = copy.deepcopy(models["asym"])
    model.model.layers[0].mlp.up_proj.g_idx.copy_(_plain_33())
    for fmt in ("compressed-tensors", "gptq"):
        with pytest.raises(CheckpointError, match="up_proj.*puts 33 columns in group 0"):
            save(model, tmp_path / fmt, fmt)
