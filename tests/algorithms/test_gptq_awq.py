"""GPTQ (v1, v2) and AWQ-GEMM export/import against the formats' own definitions."""

import json

import pytest
import torch
from checkpoint_tools import edit_quantization_config
from format_definitions import layer_tensors, ref_gptq_dequant, ref_pack_dim1
from safetensors.torch import save_file
from tiny_models import tiny_llama as shared_tiny_llama

from torchquant import CheckpointError, QuantConfig, convert_model, scheme_from_name
from torchquant.formats.awq import load_awq, save_awq
from torchquant.formats.gptq import load_gptq, save_gptq
from torchquant.modules import QuantLinear

transformers = pytest.importorskip("transformers")


pytestmark = pytest.mark.usefixtures("one_thread")


AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def tiny_llama(**kw):
    return shared_tiny_llama(vocab=96, **kw)


def quantized(scheme, **kw):
    model, _ = convert_model(tiny_llama(**kw), QuantConfig(default=scheme), progress=False)
    return model


def ref_awq_unpack(words):
    """AWQ GEMM: nibble i of each word holds column AWQ_ORDER[i] of its block of eight."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    rows, blocks = w.shape
    out = torch.zeros(rows, blocks * 8, dtype=torch.int64)
    for i, col in enumerate(AWQ_ORDER):
        out[:, col::8] = (w >> (4 * i)) & 0xF
    return out


def ref_awq_dequant(tensors, group):
    q = ref_awq_unpack(tensors["qweight"])  # (K, N)
    z = ref_awq_unpack(tensors["qzeros"])  # (G, N)
    g = torch.arange(q.shape[0]) // group
    return ((q - z[g]).to(tensors["scales"].dtype) * tensors["scales"][g]).t()


# -- GPTQ


GPTQ_CASES = [
    ("gptq", 4, 32, False),
    ("gptq", 4, 32, True),
    ("gptq_v2", 4, 64, False),
    ("gptq_v2", 3, 32, False),
    ("gptq", 2, 16, True),
    ("gptq", 8, -1, True),
]


@pytest.mark.parametrize(("version", "bits", "group", "sym"), GPTQ_CASES)
def test_gptq_export_matches_format_definition_and_round_trips(tmp_path, version, bits, group, sym):
    model = quantized(scheme_from_name(f"w{bits}a16", group_size=group, symmetric=sym))
    if version == "gptq":  # v1 cannot hold a zero point of 0: keep this test about layout
        for m in model.modules():
            if isinstance(m, QuantLinear) and m.zeros is not None:
                m.zeros.clamp_(min=1)
    save_gptq(model, tmp_path / "q", version=version)
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert (qc["bits"], qc["group_size"], qc["sym"], qc["checkpoint_format"]) == (
        bits, group, sym, version,
    )  # fmt: skip
    k = 64
    for name, layer in model.named_modules():
        if isinstance(layer, QuantLinear):
            tensors = layer_tensors(tmp_path / "q", name)
            group_k = layer.in_features if group == -1 else group
            plain = torch.arange(layer.in_features) // group_k
            assert torch.equal(tensors["g_idx"].long(), plain) and not qc["desc_act"]
            want = ref_gptq_dequant(tensors, bits, version)
            assert torch.equal(want.to(layer.dtype), layer.dequantized_weight()), name
    loaded = load_gptq(tmp_path / "q")
    ids = torch.randint(0, 96, (1, k // 8))
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert isinstance(loaded.model.layers[0].mlp.down_proj, QuantLinear)


def test_gptq_checkpoint_written_by_the_format_definition_loads_exactly(tmp_path):
    """A v1 folder packed bit by bit here (not by torchquant) loads to the defined weights."""
    model = tiny_llama()
    torch.manual_seed(1)
    state = dict(model.state_dict())
    expected = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name != "lm_head":
            n, k = m.weight.shape
            g = 32
            codes = torch.randint(0, 16, (k, n))
            zeros = torch.randint(1, 16, (k // g, n))
            scales = (torch.rand(k // g, n) * 0.02 + 0.001).half()
            del state[f"{name}.weight"]
            tensors = {
                "qweight": ref_pack_dim1(codes.t().contiguous(), 4).t().contiguous(),
                "qzeros": ref_pack_dim1(zeros - 1, 4),
                "scales": scales,
                "g_idx": (torch.arange(k) // g).to(torch.int32),
            }
            state.update({f"{name}.{key}": v for key, v in tensors.items()})
            # float16 scales in a float32 model: the layers compute in float32, exactly
            expected[name] = ref_gptq_dequant({**tensors, "scales": scales.float()}, 4, "gptq")
    model.save_pretrained(tmp_path / "q")
    save_file(state, str(tmp_path / "q" / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "gptq",
        "bits": 4,
        "group_size": 32,
        "desc_act": False,
        "sym": False,
        "damp_percent": 0.01,
        "true_sequential": True,
        "checkpoint_format": "gptq",
    }
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    loaded = load_gptq(tmp_path / "q")
    for name, want in expected.items():
        assert loaded.get_submodule(name).dtype == torch.float32, name
        assert torch.equal(loaded.get_submodule(name).dequantized_weight(), want), name


def test_gptq_v1_refuses_a_zero_point_of_zero(tmp_path):
    model = quantized(scheme_from_name("w4a16", group_size=32))
    next(m for m in model.modules() if isinstance(m, QuantLinear)).zeros[0, 0] = 0
    with pytest.raises(CheckpointError, match="zero point of 0 cannot be stored in GPTQ v1"):
        save_gptq(model, tmp_path / "q")
    save_gptq(model, tmp_path / "q2", version="gptq_v2")  # v2 holds it


def _gptq_folder(tmp_path):
    model = quantized(scheme_from_name("w4a16", group_size=32))
    save_gptq(model, tmp_path / "q", version="gptq_v2")
    return tmp_path / "q"


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"checkpoint_format": "marlin"}, CheckpointError, "checkpoint_format 'marlin'"),
        ({"bits": 5}, CheckpointError, "bits=5"),
        ({"magic_rotation": True}, CheckpointError, "unknown field.*magic_rotation"),
        ({"dynamic": {"-:.*down_proj": {}}}, CheckpointError, "dynamic"),
    ],
)
def test_gptq_config_we_cannot_honour_is_refused(tmp_path, change, error, match):
    folder = _gptq_folder(tmp_path)
    edit_quantization_config(folder, lambda qc: qc.update(change))
    with pytest.raises(error, match=match):
        load_gptq(folder)


def test_gptq_mixed_group_sizes_are_refused(tmp_path):
    # K = 96 regroups to 32 while the 128-wide down_proj keeps 64: one global group size fails
    model = quantized(scheme_from_name("w4a16", group_size=64), hidden=96, inter=128)
    with pytest.raises(CheckpointError, match="one bit width, group size"):
        save_gptq(model, tmp_path / "q", version="gptq_v2")


# -- AWQ


@pytest.mark.parametrize(("group", "sym"), [(32, False), (64, True), (-1, False)])
def test_awq_export_matches_format_definition_and_round_trips(tmp_path, group, sym):
    model = quantized(scheme_from_name("w4a16", group_size=group, symmetric=sym))
    save_awq(model, tmp_path / "a")
    qc = json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"]
    assert qc["version"] == "gemm" and qc["modules_to_not_convert"] == ["lm_head"]
    for name, layer in model.named_modules():
        if isinstance(layer, QuantLinear):
            tensors = layer_tensors(tmp_path / "a", name)
            assert tensors["qweight"].shape == (layer.in_features, layer.out_features // 8)
            want = ref_awq_dequant(tensors, layer.in_features if group == -1 else group)
            assert torch.equal(want.to(layer.dtype), layer.dequantized_weight()), name
    loaded = load_awq(tmp_path / "a")
    ids = torch.randint(0, 96, (2, 5))
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_awq_refuses_other_versions_bits_and_fields(tmp_path):
    save_awq(quantized(scheme_from_name("w4a16", group_size=32)), tmp_path / "a")
    folder = tmp_path / "a"
    edit_quantization_config(folder, lambda qc: qc.update(version="gemv"))
    with pytest.raises(CheckpointError, match="AWQ version 'gemv' is not supported"):
        load_awq(folder)
    edit_quantization_config(folder, lambda qc: qc.update(version="gemm", quantum=1))
    with pytest.raises(CheckpointError, match="unknown field.*quantum"):
        load_awq(folder)


def test_awq_refuses_non_4_bit_models(tmp_path):
    with pytest.raises(CheckpointError, match="AWQ holds 4-bit only"):
        save_awq(quantized(scheme_from_name("w3a16", group_size=32)), tmp_path / "a")
