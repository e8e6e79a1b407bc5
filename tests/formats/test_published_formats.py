"""Checkpoints as GPTQModel and AutoAWQ publish them, config type checks, and vLLM warnings.

The folders are built here from the libraries' documented layouts (GPTQ: codes packed
down the input dimension, ``qzeros`` holding ``zero - 1``; AWQ GEMM: eight nibbles per
word in the order 0 2 4 6 1 3 5 7), so neither library needs to be installed.
"""

import json
import warnings

import pytest
import torch
from checkpoint_tools import edit_config_json, edit_quantization_config
from format_definitions import ref_gptq_dequant, ref_pack_dim1, replace_weight
from safetensors.torch import save_file
from tiny_models import tiny_llama

from torchquant import CheckpointError, QuantConfig, convert_model, scheme_from_name
from torchquant.cli import main
from torchquant.formats.awq import load_awq, parse_awq_config, save_awq
from torchquant.formats.dispatch import load_checkpoint, save_checkpoint
from torchquant.formats.gptq import load_gptq, parse_gptq_config, save_gptq
from torchquant.formats.serving import IntLayout, ServingWarning, vllm_rule

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")

GROUP = 32
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
GPTQMODEL_META = {
    "quantizer": ["gptqmodel:4.2.5"],
    "uri": "https://github.com/modelcloud/gptqmodel",
    "damp_percent": 0.05,
    "damp_auto_increment": 0.01,
    "static_groups": False,
    "true_sequential": True,
    "mse": 0.0,
    "act_group_aware": False,
}


def gptqmodel_config(sym: bool, desc_act: bool) -> dict:
    """The ``quantization_config`` GPTQModel writes for a GPTQ checkpoint."""
    return {
        "bits": 4,
        "group_size": GROUP,
        "desc_act": desc_act,
        "sym": sym,
        "lm_head": False,
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "format": "gptq",
        "method": "gptq",
        "pack_dtype": "int32",
        "meta": GPTQMODEL_META,
    }


def ref_awq_pack(values: torch.Tensor) -> torch.Tensor:
    """AWQ GEMM: nibble i of each word holds column AWQ_ORDER[i] of its block of eight."""
    v = values.to(torch.int64)
    words = torch.zeros(v.shape[0], v.shape[1] // 8, dtype=torch.int64)
    for i, col in enumerate(AWQ_ORDER):
        words |= v[:, col::8] << (4 * i)
    return words.to(torch.uint32).view(torch.int32)


def write_folder(folder, model, state, qc, extra=None):
    """``model``'s config (dtype float32) with ``qc``, and ``state`` as its one shard."""
    model.save_pretrained(folder)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    edit_config_json(folder, lambda config: config.update(dtype="float32", quantization_config=qc))
    for name, data in (extra or {}).items():
        (folder / name).write_text(json.dumps(data))
    return folder


def linears(model):
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name != "lm_head"
    ]


def random_groups(gen, n, k, *, lowest_zero=None, scales_dtype=torch.float16, scale=None):
    """Random 4-bit codes ``(K, N)`` with per-group zeros (all 8 unless drawn from
    ``[lowest_zero, 16)``) and small positive scales, the first one replaced by ``scale``."""
    codes = torch.randint(0, 16, (k, n), generator=gen)
    shape = (k // GROUP, n)
    if lowest_zero is None:
        zeros = torch.full(shape, 8)
    else:
        zeros = torch.randint(lowest_zero, 16, shape, generator=gen)
    scales = (torch.rand(shape, generator=gen) * 0.02 + 0.001).to(scales_dtype)
    if scale is not None:
        scales[0, 0] = scale
    return codes, zeros, scales


def gptq_folder(tmp_path, *, sym=True, desc_act=False, scales_dtype=torch.float16, scale=None):
    """A GPTQModel v1 folder; returns it, the float model and the weights packed, ``(N, K)``."""
    model = tiny_llama()
    gen = torch.Generator().manual_seed(3)
    state, expected = dict(model.state_dict()), {}
    for name, m in linears(model):
        n, k = m.weight.shape
        codes, zeros, scales = random_groups(
            gen, n, k, lowest_zero=None if sym else 1, scales_dtype=scales_dtype, scale=scale
        )
        plain = torch.arange(k) // GROUP
        g_idx = plain[torch.randperm(k, generator=gen)] if desc_act else plain
        tensors = {
            "qweight": ref_pack_dim1(codes.t().contiguous(), 4).t().contiguous(),
            "qzeros": ref_pack_dim1(zeros - 1, 4),
            "scales": scales,
            "g_idx": g_idx.to(torch.int32),
        }
        replace_weight(state, name, tensors)
        if scales.is_floating_point():
            expected[name] = ref_gptq_dequant({**tensors, "scales": scales.float()}, 4, "gptq")
    qc = gptqmodel_config(sym, desc_act)
    folder = write_folder(tmp_path / "gptqmodel", model, state, qc, {"quantize_config.json": qc})
    return folder, model, expected


def awq_folder(tmp_path, qc, *, zero_point=True, with_qzeros=True, scale=None):
    """An AutoAWQ GEMM folder; returns it, the float model and the weights packed, ``(N, K)``."""
    model = tiny_llama()
    gen = torch.Generator().manual_seed(4)
    state, expected = dict(model.state_dict()), {}
    for name, m in linears(model):
        n, k = m.weight.shape
        lowest_zero = 0 if zero_point else None
        codes, zeros, scales = random_groups(gen, n, k, lowest_zero=lowest_zero, scale=scale)
        tensors = {"qweight": ref_awq_pack(codes), "scales": scales}
        if with_qzeros:
            tensors["qzeros"] = ref_awq_pack(zeros)
        replace_weight(state, name, tensors)
        g = torch.arange(k) // GROUP
        expected[name] = ((codes - zeros[g]).float() * scales.float()[g]).t()
    return write_folder(tmp_path / "awq", model, state, qc), model, expected


def assert_loads_the_packed_weights(loaded, model, expected):
    """Each layer dequantizes exactly to what was packed; the forward matches float layers."""
    for name, want in expected.items():
        layer = loaded.get_submodule(name)
        assert layer.dtype == torch.float32, name
        assert torch.equal(layer.dequantized_weight(), want), name
        model.get_submodule(name).weight.data = want.clone()
    ids = torch.randint(0, 96, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


# -- GPTQModel and AutoAWQ folders


@pytest.mark.parametrize(("sym", "desc_act"), [(True, False), (True, True), (False, False)])
def test_gptqmodel_folder_loads_to_the_packed_weights(tmp_path, sym, desc_act):
    folder, model, expected = gptq_folder(tmp_path, sym=sym, desc_act=desc_act)
    assert_loads_the_packed_weights(load_checkpoint(folder), model, expected)


def test_gptqmodel_folder_without_a_dtype_in_config_still_runs(tmp_path):
    folder, model, expected = gptq_folder(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    del config["dtype"]
    (folder / "config.json").write_text(json.dumps(config))
    assert_loads_the_packed_weights(load_gptq(folder), model, expected)


AUTOAWQ = {
    "quant_method": "awq",
    "zero_point": True,
    "group_size": GROUP,
    "bits": 4,
    "version": "gemm",
    "modules_to_not_convert": None,
}
AUTOAWQ_LEGACY_NAMES = {"quant_method": "awq", "zero_point": True, "q_group_size": GROUP,
                        "w_bit": 4, "version": "GEMM"}  # fmt: skip
GPTQMODEL_AWQ = {
    "bits": 4,
    "group_size": GROUP,
    "desc_act": False,
    "sym": True,
    "lm_head": False,
    "quant_method": "awq",
    "checkpoint_format": "gemm",
    "format": "gemm",
    "method": "awq",
    "pack_dtype": "int32",
    "meta": GPTQMODEL_META,
    "zero_point": False,
}


@pytest.mark.parametrize("qc", [AUTOAWQ, AUTOAWQ_LEGACY_NAMES], ids=["autoawq", "legacy-names"])
def test_autoawq_folder_loads_to_the_packed_weights(tmp_path, qc):
    folder, model, expected = awq_folder(tmp_path, qc)
    assert_loads_the_packed_weights(load_checkpoint(folder), model, expected)


@pytest.mark.parametrize("with_qzeros", [True, False])
def test_gptqmodel_symmetric_awq_loads_with_implied_zero_points(tmp_path, with_qzeros):
    folder, model, expected = awq_folder(
        tmp_path, GPTQMODEL_AWQ, zero_point=False, with_qzeros=with_qzeros
    )
    loaded = load_awq(folder)
    assert loaded.get_submodule("model.layers.0.mlp.down_proj").zeros is None
    assert_loads_the_packed_weights(loaded, model, expected)


def test_symmetric_awq_refuses_qzeros_that_are_not_the_midpoint(tmp_path):
    folder, _, _ = awq_folder(tmp_path, {**GPTQMODEL_AWQ, "zero_point": True}, zero_point=True)
    edit_quantization_config(folder, lambda qc: qc.update(zero_point=False))
    with pytest.raises(CheckpointError, match="zero_point is false"):
        load_awq(folder)


# -- every field type-checked, every error a CheckpointError naming the field


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"bits": 4.0}, "bits=4.0: expected an int"),
        ({"bits": True}, "bits=True: expected an int"),
        ({"group_size": "32"}, "group_size='32'"),
        ({"group_size": 0}, "group_size=0"),
        ({"group_size": 2**63}, "group_size=9223372036854775808: expected an int within 32"),
        ({"sym": 1}, "sym=1: expected true or false"),
        ({"desc_act": "no"}, "desc_act='no'"),
        ({"pack_dtype": "int16"}, "pack_dtype='int16'"),
        ({"method": "awq"}, "method='awq'"),
        ({"format": "gptq_v2"}, "name the same setting with different values"),
        ({"lm_head": True}, "lm_head=True: a quantized lm_head"),
        ({"adapter": {"name": "lora", "rank": 8}}, "adapter="),
        ({"meta": []}, "meta: expected an object"),
        ({"modules_to_not_convert": "lm_head"}, "modules_to_not_convert='lm_head'"),
        ({"rotation_basis": "hadamard"}, "unknown field.*rotation_basis"),
    ],
)
def test_gptq_config_fields_are_type_checked(change, match):
    with pytest.raises(CheckpointError, match=match):
        parse_gptq_config({**gptqmodel_config(True, False), **change})


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"bits": 4.0}, "bits=4.0: expected an int"),
        ({"w_bit": 8}, "name the same setting with different values"),
        ({"bits": 3}, "bits=3: the GEMM layout holds 4-bit"),
        ({"group_size": None}, "group_size=None"),
        ({"zero_point": 0}, "zero_point=0: expected true or false"),
        (
            {"version": "gemv", "format": "gemv", "checkpoint_format": "gemv"},
            "AWQ version 'gemv' is not supported",
        ),
        ({"format": "gemv_fast"}, "name the same setting with different values"),
        ({"desc_act": True}, "desc_act=True: act-order groups"),
        ({"backend": "llm-awq"}, "GEMV_FAST"),
        ({"quant_method": "gptq"}, "quant_method='gptq'"),
    ],
)
def test_awq_config_fields_are_type_checked(change, match):
    with pytest.raises(CheckpointError, match=match):
        parse_awq_config({**GPTQMODEL_AWQ, **change})


def test_loader_config_errors_are_checkpoint_errors(tmp_path):
    folder, _, _ = gptq_folder(tmp_path)
    edit_quantization_config(folder, lambda qc: qc.update(bits=5))
    with pytest.raises(CheckpointError, match="bits=5"):
        load_gptq(folder)


NOT_POSITIVE = r"scales.*holds a scale <= 0.*every scale must be positive"


@pytest.mark.parametrize("scale", [0.0, -0.01])
def test_gptq_and_awq_refuse_scales_that_are_not_positive(tmp_path, scale):
    folder, _, _ = gptq_folder(tmp_path, scale=scale)
    with pytest.raises(CheckpointError, match=NOT_POSITIVE):
        load_gptq(folder)
    folder, _, _ = awq_folder(tmp_path, AUTOAWQ, scale=scale)
    with pytest.raises(CheckpointError, match=NOT_POSITIVE):
        load_awq(folder)


def test_gptq_refuses_integer_scales(tmp_path):
    folder, _, _ = gptq_folder(tmp_path, scales_dtype=torch.int32, scale=1)
    with pytest.raises(CheckpointError, match="scales are torch.int32; they must be floating"):
        load_gptq(folder)


# -- vLLM servability warnings


def quantized(scheme):
    model, _ = convert_model(tiny_llama(), QuantConfig(default=scheme), progress=False)
    return model


def test_serving_table_follows_vllm_rules():
    def kernel(fmt, bits, group, sym):
        rule = vllm_rule(fmt, IntLayout(bits, group, sym))
        return rule.kernel if rule and rule.fast else None

    assert kernel("gptq", 4, 128, True) == "gptq_marlin"
    assert kernel("gptq", 8, -1, True) == "gptq_marlin"
    assert kernel("gptq", 4, 128, False) is None  # legacy fallback only
    assert kernel("gptq", 3, 128, True) is None
    assert kernel("awq", 4, 64, False) == "awq_marlin"
    assert kernel("compressed-tensors", 4, 128, False) == "wNa16"
    assert vllm_rule("compressed-tensors", IntLayout(3, 128, True)).kernel is None


def test_asymmetric_gptq_export_warns_and_symmetric_does_not(tmp_path):
    with pytest.warns(ServingWarning, match="asymmetric.*gptq_marlin' refuses it"):
        save_gptq(quantized(scheme_from_name("w4a16", group_size=32)), tmp_path / "a")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ServingWarning)
        save_gptq(quantized(scheme_from_name("w4a16", 32, symmetric=True)), tmp_path / "s")


def test_low_bit_compressed_tensors_export_warns(tmp_path):
    with pytest.warns(ServingWarning, match="no CUDA kernel for 2/3/5/6/7-bit"):
        save_checkpoint(
            quantized(scheme_from_name("w3a16", 32)), tmp_path / "c3", "compressed-tensors"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error", ServingWarning)
        save_checkpoint(
            quantized(scheme_from_name("w4a16", 32)), tmp_path / "c4", "compressed-tensors"
        )


def test_awq_export_with_a_group_size_marlin_lacks_warns(tmp_path):
    with pytest.warns(ServingWarning, match="awq \\(legacy\\)"):
        save_awq(quantized(scheme_from_name("w4a16", group_size=16)), tmp_path / "a")


def test_cli_gptq_defaults_to_symmetric_and_warns_when_asked_for_zero_points(model_dir, tmp_path):  # noqa: F811
    args = ["quantize", str(model_dir), "--group-size", "32", "--format", "gptq"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", ServingWarning)
        assert main([*args, "--out", str(tmp_path / "sym")]) == 0
    qc = json.loads((tmp_path / "sym" / "config.json").read_text())["quantization_config"]
    assert qc["sym"] is True
    with pytest.warns(ServingWarning, match="asymmetric"):
        assert main([*args, "--no-symmetric", "--out", str(tmp_path / "asym")]) == 0


# -- transformers with compressed-tensors reads our symmetric pack-quantized folders


def test_transformers_loads_symmetric_compressed_tensors(tmp_path):
    pytest.importorskip("compressed_tensors")
    model = quantized(scheme_from_name("w4a16", 32, symmetric=True))
    save_checkpoint(model, tmp_path / "ct", "compressed-tensors")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ct").eval()
    ids = torch.randint(0, 96, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, model(ids).logits, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("fmt", ["gptq", "awq"])
def test_weight_only_formats_refuse_quantized_activations(tmp_path, fmt):
    model, _ = convert_model(tiny_llama(), QuantConfig("w8a8"), progress=False)
    with pytest.raises(CheckpointError, match="quantizes its activations"):
        save_checkpoint(model, tmp_path / fmt, fmt)
    assert not (tmp_path / fmt).exists()
