"""compressed-tensors export/import, checked against the compressed-tensors library itself."""

import json

import pytest
import torch
from checkpoint_tools import edit_config_json
from format_definitions import assert_same_outputs, library_compress, save_library_checkpoint
from safetensors.torch import load_file, save_file
from tiny_models import tiny_llama as shared_tiny_llama

from torchquant import CheckpointError, ConfigError, QuantConfig, convert_model, scheme_from_name
from torchquant.formats.compressed_tensors import load_compressed_tensors, save_compressed_tensors
from torchquant.modules import QuantLinear

transformers = pytest.importorskip("transformers")


pytestmark = pytest.mark.usefixtures("one_thread")


SCHEMES = {
    "w4a16-g32-asym": scheme_from_name("w4a16", group_size=32),
    "w4a16-g32-sym": scheme_from_name("w4a16", group_size=32, symmetric=True),
    "w4a16-channel-asym": scheme_from_name("w4a16", group_size=-1),
    "w3a16-g32-asym": scheme_from_name("w3a16", group_size=32),
    "w2a16-g16-sym": scheme_from_name("w2a16", group_size=16, symmetric=True),
    "w8a16-channel-sym": scheme_from_name("w8a16"),
    "w8a8-int8": scheme_from_name("w8a8"),
    "fp8": scheme_from_name("fp8"),
    "w8a16-fp8": scheme_from_name("w8a16-fp8"),
}


def tiny_llama(dtype=torch.float32, **kw):
    shape = {"vocab": 128, "inter": 96, "layers": 2, "heads": 4, "kv_heads": 2, **kw}
    return shared_tiny_llama(dtype=dtype, tie_word_embeddings=True, **shape)


def quantized_llama(scheme, dtype=torch.float32, **kw):
    model, _ = convert_model(tiny_llama(dtype, **kw), QuantConfig(default=scheme), progress=False)
    return model


@pytest.mark.parametrize("name", list(SCHEMES))
def test_export_import_roundtrip_is_exact(tmp_path, name):
    model = quantized_llama(SCHEMES[name])
    save_compressed_tensors(model, tmp_path / "ct")
    loaded = load_compressed_tensors(tmp_path / "ct")
    ids = torch.randint(0, 128, (2, 9))
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert not isinstance(loaded.lm_head, QuantLinear)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qc["ignore"] == ["lm_head"] and qc["config_groups"]["group_0"]["targets"] == ["Linear"]


def test_partial_last_group_is_regrouped_exactly(tmp_path):
    # K = 96 with group 64: the last group is 32 wide; exported as group gcd(64, 96) = 32
    model = quantized_llama(scheme_from_name("w4a16", group_size=64), hidden=96, inter=128)
    save_compressed_tensors(model, tmp_path / "ct")
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    sizes = sorted(g["weights"]["group_size"] for g in qc["config_groups"].values())
    assert sizes == [32, 64]  # the 96-wide inputs regrouped, the 128-wide down_proj kept
    loaded = load_compressed_tensors(tmp_path / "ct")
    ids = torch.randint(0, 128, (1, 7))
    assert torch.equal(loaded(ids).logits, model(ids).logits)


# -- the compressed-tensors library as the judge

ct = pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed")


def _library_scheme(qc, layer_name):
    from compressed_tensors.quantization import QuantizationConfig

    config = QuantizationConfig.model_validate(qc)
    for group in config.config_groups.values():
        if "Linear" in group.targets or layer_name in group.targets:
            return group
    raise AssertionError(f"no group for {layer_name}")


def _local(state, prefix):
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


@pytest.mark.parametrize("name", list(SCHEMES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_library_decompresses_our_export_exactly(tmp_path, name, dtype):
    from compressed_tensors.compressors import BaseCompressor

    model = quantized_llama(SCHEMES[name], dtype)
    save_compressed_tensors(model, tmp_path / "ct")
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    state = load_file(tmp_path / "ct" / "model.safetensors")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(layers) == 14
    for layer_name, layer in layers.items():
        scheme = _library_scheme(qc, layer_name)
        compressor = BaseCompressor.get_value_from_registry(scheme.format)
        theirs = compressor.decompress(_local(state, f"{layer_name}."), scheme)["weight"]
        # the library decompresses in the scales' dtype; a layer computes in its own
        assert torch.equal(theirs.to(dtype), layer.dequantized_weight()), layer_name


@pytest.mark.parametrize(
    ("bits", "symmetric", "group_size"),
    [(4, False, 32), (4, True, 32), (4, False, -1), (8, True, -1), (3, False, 32), (2, True, 16)],
)
def test_checkpoint_compressed_by_the_library_loads_with_identical_outputs(
    tmp_path, bits, symmetric, group_size
):
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationScheme,
    )

    strategy = "channel" if group_size == -1 else "group"
    args = QuantizationArgs(
        num_bits=bits,
        type="int",
        symmetric=symmetric,
        strategy=strategy,
        group_size=None if group_size == -1 else group_size,
    )
    scheme = QuantizationScheme(targets=["Linear"], weights=args, format="pack-quantized")

    def compress(name, weight):
        return library_compress(weight, scheme, bits, symmetric, group_size)

    reference = save_library_checkpoint(tmp_path / "ct", tiny_llama, scheme, compress)
    loaded = load_compressed_tensors(tmp_path / "ct")
    assert isinstance(loaded.model.layers[1].mlp.down_proj, QuantLinear)
    assert_same_outputs(loaded, reference)


@pytest.mark.parametrize("fmt", ["int-quantized", "float-quantized"])
def test_library_w8a8_checkpoint_loads_with_identical_weights(tmp_path, fmt):
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    kind = "int" if fmt == "int-quantized" else "float"
    weights = QuantizationArgs(num_bits=8, type=kind, symmetric=True, strategy="channel")
    acts = QuantizationArgs(num_bits=8, type=kind, symmetric=True, strategy="token", dynamic=True)
    scheme = QuantizationScheme(
        targets=["Linear"], weights=weights, input_activations=acts, format=fmt
    )
    model = quantized_llama(scheme_from_name("w8a8" if kind == "int" else "fp8"))
    save_compressed_tensors(model, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["quantization_config"]["format"] == fmt
    weight = torch.randn(64, 64)  # q_proj: (hidden, hidden)
    absmax = weight.abs().amax(dim=1, keepdim=True)
    scale = absmax / (127.0 if kind == "int" else 448.0)
    compressor = BaseCompressor.get_value_from_registry(fmt)
    compressed = compressor.compress({"weight": weight, "weight_scale": scale}, scheme)
    decompressed = compressor.decompress(compressed, scheme)["weight"]
    # put the library's tensors in place of one of our layers and load the folder
    state = load_file(tmp_path / "ours" / "model.safetensors")
    prefix = "model.layers.0.self_attn.q_proj."
    for key in ("weight", "weight_scale"):
        assert state[prefix + key].shape == compressed[key].shape, key
        assert state[prefix + key].dtype == compressed[key].dtype, key
        state[prefix + key] = compressed[key]
    save_file(state, str(tmp_path / "ours" / "model.safetensors"), metadata={"format": "pt"})
    loaded = load_compressed_tensors(tmp_path / "ours")
    layer = loaded.model.layers[0].self_attn.q_proj
    assert layer.scheme.activation is not None
    assert torch.equal(layer.dequantized_weight(torch.float32), decompressed)


# -- refusals


def _export(tmp_path):
    save_compressed_tensors(quantized_llama(SCHEMES["w4a16-g32-asym"]), tmp_path / "ct")
    return tmp_path / "ct"


def _weights_args(config: dict) -> dict:
    return config["quantization_config"]["config_groups"]["group_0"]["weights"]


def _set_version(version: str):
    return lambda c: c["quantization_config"].update(version=version)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        pytest.param(
            lambda c: c["quantization_config"].update(secret_sauce=True),
            ConfigError,
            "unknown field.*secret_sauce",
            id="unknown-quantization-config-field",
        ),
        pytest.param(
            lambda c: _weights_args(c).update(hadamard=True),
            ConfigError,
            "group_0.weights: unknown field.*hadamard",
            id="unknown-quantization-args-field",
        ),
        *(
            pytest.param(_set_version(v), CheckpointError, "version", id=f"library-version-{v}")
            for v in ("1.0.0", "0.3.1", "banana")
        ),
        pytest.param(
            lambda c: c.update(architectures=["TotallyNewForCausalLM"]),
            CheckpointError,
            "TotallyNewForCausalLM",
            id="unknown-architecture",
        ),
        pytest.param(
            lambda c: c["quantization_config"].update(sparsity_config={"x": 1}),
            CheckpointError,
            "sparsity_config",
            id="sparse-checkpoint",
        ),
    ],
)
def test_edited_config_json_is_refused(tmp_path, change, error, match):
    folder = _export(tmp_path)
    edit_config_json(folder, change)
    with pytest.raises(error, match=match):
        load_compressed_tensors(folder)


def test_mismatched_shard_index_is_refused(tmp_path):
    model = quantized_llama(SCHEMES["w4a16-g32-asym"])
    save_compressed_tensors(model, tmp_path / "ct", max_shard_size=20_000)
    index_path = tmp_path / "ct" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    assert len(set(index["weight_map"].values())) > 1
    weight_map = index["weight_map"]
    shards = list(weight_map.values())
    key = next(k for k, f in weight_map.items() if shards.count(f) > 1)
    home = weight_map[key]
    weight_map[key] = next(f for f in set(shards) if f != home)
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"{key}.*the index says"):
        load_compressed_tensors(tmp_path / "ct")
    weight_map[key] = home
    weight_map["model.ghost.weight"] = home
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="tensor.*that no shard holds.*model.ghost.weight"):
        load_compressed_tensors(tmp_path / "ct")


def test_plain_g_idx_is_accepted(tmp_path):
    folder = _export(tmp_path)
    state = load_file(folder / "model.safetensors")
    g_idx = torch.arange(64, dtype=torch.int32) // 32
    state["model.layers.0.self_attn.q_proj.weight_g_idx"] = g_idx
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    q_proj = load_compressed_tensors(folder).model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, QuantLinear) and q_proj.g_idx is None  # the contiguous fast path


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("k", [7, 32, 45, 96])
def test_dense_rows_become_our_packing_without_unpacking(bits, k):
    from torchquant.formats.packing_variants import dense_to_canonical, pack_dense
    from torchquant.numerics import pack_codes

    codes = torch.randint(0, 1 << bits, (5, k), dtype=torch.uint8)
    dense = pack_dense(codes, bits)
    assert torch.equal(dense_to_canonical(dense, bits, k), pack_codes(codes, bits))
    if k * bits % 32:  # stray bits after the last code are cleared, not taken as codes
        dense[:, -1] |= torch.tensor(-(1 << 31), dtype=torch.int32)
        assert torch.equal(dense_to_canonical(dense, bits, k), pack_codes(codes, bits))
