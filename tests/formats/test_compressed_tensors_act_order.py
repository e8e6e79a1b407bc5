"""compressed-tensors act-order checkpoints (``actorder: group``), judged by the library itself.

compressed-tensors 0.18 and older read and write ``weight_g_idx``: with them the
library's own pack-quantized compressor compresses and decompresses.  Release 0.19
removed act-order groups (its config refuses ``actorder: group``); with it these
tests use the library's packing, quantization and dequantization on the columns
sorted by ``g_idx``, which is exactly what 0.18's compressor does with a ``g_idx``.
"""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from torchquant.formats.compressed_tensors import load_compressed_tensors, save_compressed_tensors
from torchquant.modules import QuantLinear

transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed")
from compressed_tensors.compressors import BaseCompressor  # noqa: E402
from compressed_tensors.compressors.pack_quantized.helpers import (  # noqa: E402
    pack_to_int32,
    unpack_from_int32,
)
from compressed_tensors.quantization import (  # noqa: E402
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
)
from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize  # noqa: E402
from format_definitions import (  # noqa: E402
    assert_same_outputs,
    ref_signed_qparams,
    save_library_checkpoint,
)
from tiny_models import act_order_llama  # noqa: E402
from tiny_models import tiny_llama as shared_tiny_llama  # noqa: E402

VOCAB = 96
FORMAT = "pack-quantized"


def _library_reads_g_idx() -> bool:
    try:
        QuantizationArgs(num_bits=4, strategy="group", group_size=32, actorder="group")
    except ValueError:  # 0.19+: "actorder='group' has been removed"
        return False
    return True


READS_G_IDX = _library_reads_g_idx()


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_llama(**kw):
    return shared_tiny_llama(vocab=VOCAB, tie_word_embeddings=True, **kw)


# -- the library's reading of a group with a g_idx


def library_config(qc: dict) -> QuantizationConfig:
    """Our ``quantization_config`` as the library parses it (minus ``actorder`` on 0.19+)."""
    if not READS_G_IDX:
        with pytest.raises(ValueError, match="actorder"):
            QuantizationConfig.model_validate(qc)
        qc = copy.deepcopy(qc)
        for group in qc["config_groups"].values():
            assert group["weights"].pop("actorder") == "group"
    return QuantizationConfig.model_validate(qc)


def library_decompress(local: dict, scheme: QuantizationScheme) -> torch.Tensor:
    """The dequantized weight ``(N, K)`` of one layer's compressed tensors."""
    if READS_G_IDX:
        return BaseCompressor.get_value_from_registry(FORMAT).decompress(local, scheme)["weight"]
    args = scheme.weights
    shape = torch.Size(local["weight_shape"].tolist())
    codes = unpack_from_int32(local["weight_packed"], args.num_bits, shape)
    zp = None
    if not args.symmetric:
        zp_shape = torch.Size([shape[0], local["weight_scale"].shape[1]])
        zp = unpack_from_int32(local["weight_zero_point"], args.num_bits, zp_shape, packed_dim=0)
    perm = torch.argsort(local["weight_g_idx"])
    weight = dequantize(codes[:, perm], local["weight_scale"], zp, args)
    return weight[:, torch.argsort(perm)]


def library_compress(state: dict, scheme: QuantizationScheme) -> dict:
    """Compress ``weight`` with act-order qparams and ``weight_g_idx`` (local tensor names)."""
    if READS_G_IDX:
        return BaseCompressor.get_value_from_registry(FORMAT).compress(state, scheme)
    args = scheme.weights
    weight, g_idx = state["weight"], state["weight_g_idx"]
    zp = None if args.symmetric else state["weight_zero_point"]
    perm = torch.argsort(g_idx)
    q = quantize(weight[:, perm], state["weight_scale"], zp, args, dtype=torch.int8)
    out = {
        "weight_packed": pack_to_int32(q[:, torch.argsort(perm)], args.num_bits),
        "weight_shape": torch.tensor(weight.shape),
        "weight_scale": state["weight_scale"],
        "weight_g_idx": g_idx,
    }
    if zp is not None:
        out["weight_zero_point"] = pack_to_int32(zp, args.num_bits, packed_dim=0)
    return out


# -- our export, their decompressor


@pytest.mark.parametrize(
    "kw",
    [{}, {"symmetric": True}, {"group": 64, "hidden": 96, "inter": 160}],
    ids=["g32-asym", "g32-sym", "g64-partial-last-group"],
)
def test_library_decompresses_our_act_order_export_exactly(tmp_path, kw):
    model = act_order_llama(tie_word_embeddings=True, **kw)
    save_compressed_tensors(model, tmp_path / "ct")
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    config = library_config(qc)
    state = load_file(tmp_path / "ct" / "model.safetensors")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(layers) == 7
    for name, layer in layers.items():
        scheme = next(g for g in config.config_groups.values() if {"Linear", name} & set(g.targets))
        local = {k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(name + ".")}
        g_idx = local["weight_g_idx"]
        assert not torch.equal(
            g_idx.long(), torch.arange(g_idx.numel()) // scheme.weights.group_size
        )
        assert torch.equal(library_decompress(local, scheme), layer.dequantized_weight()), name


# -- their compressor, our loader


def _act_order_qparams(weight, g_idx, bits, symmetric, group):
    """Per act-order group min/max qparams (signed codes, as the library stores them)."""
    n, k = weight.shape
    w = weight[:, torch.argsort(g_idx)].reshape(n, k // group, group)
    return ref_signed_qparams(w, bits, symmetric, weight.dtype)


@pytest.mark.parametrize(("bits", "symmetric"), [(4, False), (4, True), (3, False), (8, True)])
def test_act_order_checkpoint_compressed_by_the_library_loads_with_identical_outputs(
    tmp_path, bits, symmetric
):
    group = 32
    args = dict(num_bits=bits, type="int", symmetric=symmetric, strategy="group", group_size=group)
    if READS_G_IDX:
        args["actorder"] = "group"
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**args), format=FORMAT)
    gen = torch.Generator().manual_seed(2)
    written = {}

    def compress(name, weight):
        g_idx = (torch.randperm(weight.shape[1], generator=gen) // group).to(torch.int32)
        scale, zp = _act_order_qparams(weight, g_idx, bits, symmetric, group)
        full = {"weight": weight, "weight_scale": scale, "weight_g_idx": g_idx}
        compressed = library_compress({**full, "weight_zero_point": zp}, scheme)
        assert torch.equal(compressed["weight_g_idx"], g_idx)
        written[name] = g_idx
        return compressed, library_decompress(dict(compressed), scheme)

    reference = save_library_checkpoint(tmp_path / "ct", tiny_llama, scheme, compress)
    path = tmp_path / "ct" / "config.json"
    config = json.loads(path.read_text())
    weights = config["quantization_config"]["config_groups"]["group_0"]["weights"]
    if READS_G_IDX:
        assert weights["actorder"] == "group"
    else:  # the library can no longer write it: what its 0.18 release wrote
        weights["actorder"] = "group"
        path.write_text(json.dumps(config))
    loaded = load_compressed_tensors(tmp_path / "ct")
    for name, g_idx in written.items():
        assert torch.equal(loaded.get_submodule(name).g_idx, g_idx), name
    assert_same_outputs(loaded, reference)
