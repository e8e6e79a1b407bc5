"""Catalogue of damaged and hostile checkpoints: each is refused with a message naming the culprit.

Every case starts from a freshly saved small checkpoint (single file, sharded, or a
tiny Hugging Face model with ``config.json``), damages it in one way, and expects
``CheckpointError`` whose message contains the file, tensor or field at fault.
Cases marked "resealed" recompute the digests after the edit, as a deliberate
tamperer would, so the structural check behind the digests is what refuses them.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from checkpoint_tools import (
    edit_metadata,
    metadata_of,
    read_safetensors,
    reseal,
    reseal_config_json,
    write_safetensors,
)
from safetensors.torch import load_file

from torchquant import CheckpointError
from torchquant.checkpoint.files import check_total_size
from torchquant.checkpoint.safetensors_check import check_safetensors
from torchquant.serialization import (
    INDEX_FILE,
    KEY_ALIASES,
    KEY_CONFIG,
    KEY_DIGESTS,
    KEY_LAYERS,
    KEY_MODEL_CLASS,
    KEY_VERSION,
    SINGLE_FILE,
)

SHARD1 = "model-00001-of-00003.safetensors"
SHARD2 = "model-00002-of-00003.safetensors"


# -- edits of one safetensors file's raw header and data


def edit_header(path: Path, change) -> None:
    header, data = read_safetensors(path)
    out = change(header, data)
    write_safetensors(path, header, out if isinstance(out, bytes) else data)


def set_entry(name: str, **fields):
    def change(header, data):
        header[name].update(fields)

    return change


def raw_bytes(content: bytes):
    def mutate(d):
        (d / SINGLE_FILE).write_bytes(content)

    return mutate


def append_bytes(d):
    with open(d / SINGLE_FILE, "ab") as f:
        f.write(bytes(8))


def single(change):
    return lambda d: edit_header(d / SINGLE_FILE, change)


def prefix_len(value: int):
    def mutate(d):
        header, data = read_safetensors(d / SINGLE_FILE)
        write_safetensors(d / SINGLE_FILE, header, data, header_len=value)

    return mutate


def raw_header(text: bytes):
    def mutate(d):
        text_padded = text + b" " * (-len(text) % 8)
        data = read_safetensors(d / SINGLE_FILE)[1]
        (d / SINGLE_FILE).write_bytes(len(text_padded).to_bytes(8, "little") + text_padded + data)

    return mutate


def duplicate_key(d):
    header, data = read_safetensors(d / SINGLE_FILE)
    text = json.dumps(header)
    entry = json.dumps(header["0.bias"])
    text = text[:-1] + f', "0.bias": {entry}}}'
    raw_header(text.encode())(d)


def overlapping(header, data):
    header["2.bias"]["data_offsets"] = [0, 384]


def gap(header, data):
    """Move the last tensor 8 bytes later, with 8 padding bytes in front of it."""
    entries = [e for k, e in header.items() if k != "__metadata__"]
    last = max(entries, key=lambda e: e["data_offsets"][1])
    start, end = last["data_offsets"]
    last["data_offsets"] = [start + 8, end + 8]
    return data[:start] + bytes(8) + data[start:]


def past_the_end(header, data):
    end = len(data)
    header["zz.extra"] = {"dtype": "F32", "shape": [1], "data_offsets": [end, end + 4]}


def huge_declared(header, data):
    end = len(data)
    header["zz.huge"] = {
        "dtype": "F32",
        "shape": [2**20, 2**20],
        "data_offsets": [end, end + 2**42],
    }


def tensors_edit(change):
    """Edit tensors of the single file with ``change(tensors)`` and reseal the digests."""

    def mutate(d):
        tensors = load_file(d / SINGLE_FILE)
        change(tensors)
        reseal(d / SINGLE_FILE, tensors, metadata_of(d / SINGLE_FILE))

    return mutate


def put(name, value):
    return tensors_edit(lambda t: t.__setitem__(name, value))


def poke(name, index, value):
    def change(t):
        t[name] = t[name].clone()
        t[name].view(-1)[index] = value

    return tensors_edit(change)


def layers_edit(change):
    def mutate(d):
        layers = json.loads(metadata_of(d / SINGLE_FILE)[KEY_LAYERS])
        change(layers)
        edit_metadata(d / SINGLE_FILE, **{KEY_LAYERS: json.dumps(layers)})

    return mutate


def weight_field(field, value):
    return layers_edit(lambda layers: layers["0"]["scheme"]["weight"].__setitem__(field, value))


def layer_field(field, value):
    return layers_edit(lambda layers: layers["0"].__setitem__(field, value))


def meta(**changes):
    return lambda d: edit_metadata(d / SINGLE_FILE, **changes)


def flip_payload_byte(d):
    raw = bytearray((d / SINGLE_FILE).read_bytes())
    raw[-100] ^= 0x10
    (d / SINGLE_FILE).write_bytes(bytes(raw))


def edit_metadata_without_digest(d):
    edit_header(d / SINGLE_FILE, lambda h, _: h["__metadata__"].__setitem__("format", "np"))


def digests_edit(change):
    def mutate(d):
        header, data = read_safetensors(d / SINGLE_FILE)
        header["__metadata__"][KEY_DIGESTS] = change(header["__metadata__"][KEY_DIGESTS])
        write_safetensors(d / SINGLE_FILE, header, data)

    return mutate


def drop_digests(d):
    edit_header(d / SINGLE_FILE, lambda h, _: h["__metadata__"].pop(KEY_DIGESTS))


def fake_digest_list(d):
    header, data = read_safetensors(d / SINGLE_FILE)
    record = json.loads(header["__metadata__"][KEY_DIGESTS])
    record["tensors"]["ghost"] = record["tensors"].pop("0.bias")
    header["__metadata__"][KEY_DIGESTS] = json.dumps(record)
    write_safetensors(d / SINGLE_FILE, header, data)


def symlink_out(name, target_name):
    def mutate(d):
        outside = d.parent / target_name
        shutil.copy(d / name, outside)
        (d / name).unlink()
        os.symlink(outside, d / name)

    return mutate


def remove(name):
    return lambda d: (d / name).unlink()


# -- edits of a sharded checkpoint's index


def index_edit(change):
    def mutate(d):
        index = json.loads((d / INDEX_FILE).read_text())
        change(index)
        (d / INDEX_FILE).write_text(json.dumps(index))

    return mutate


def route(tensor, shard):
    return index_edit(lambda i: i["weight_map"].__setitem__(tensor, shard))


def write_index(text: str):
    return lambda d: (d / INDEX_FILE).write_text(text)


def huge_index(d):
    os.truncate(d / INDEX_FILE, 65 * 2**20)


def fifo_index(d):
    (d / INDEX_FILE).unlink()
    os.mkfifo(d / INDEX_FILE)


def stray_shard(d):
    shutil.copy(d / SHARD1, d / "model-00009-of-00009.safetensors")


def both_layouts(d):
    shutil.copy(d / SHARD1, d / SINGLE_FILE)


def shard_contradicts(d):
    config = json.loads(metadata_of(d / SHARD2)[KEY_CONFIG])
    config["ignore"] = ["lm_head"]
    edit_metadata(d / SHARD2, **{KEY_CONFIG: json.dumps(config)})


def shard_is_a_directory(d):
    (d / SHARD2).unlink()
    (d / SHARD2).mkdir()


# -- edits of a Hugging Face checkpoint's config.json


def config_json_edit(change, sealed=True):
    def mutate(d):
        data = json.loads((d / "config.json").read_text())
        change(data)
        (d / "config.json").write_text(json.dumps(data))
        if sealed:
            reseal_config_json(d)

    return mutate


def qc_field(field, value):
    return config_json_edit(lambda c: c["quantization_config"].__setitem__(field, value))


def config_field(field, value):
    return config_json_edit(lambda c: c.__setitem__(field, value))


def config_json_text(text):
    def mutate(d):
        (d / "config.json").write_text(text)
        reseal_config_json(d)

    return mutate


def hf_meta(**changes):
    return lambda d: edit_metadata(d / SINGLE_FILE, **changes)


SINGLE, SHARDED, HF = "single", "sharded", "hf"
CASES = [
    # -- safetensors structure
    (SINGLE, "file-shorter-than-prefix", raw_bytes(b"\x01\x02"), "model.safetensors: 2 bytes"),
    (SINGLE, "header-length-past-eof", prefix_len(10**6), "runs past the end"),
    (SINGLE, "header-length-over-limit", prefix_len(2**40), "exceeds the 104857600-byte limit"),
    (SINGLE, "data-truncated", lambda d: os.truncate(d / SINGLE_FILE, 20_000), "(truncated?)"),
    (SINGLE, "trailing-bytes", append_bytes, "8 trailing byte(s)"),
    (SINGLE, "header-not-json", raw_header(b"{not json"), "header is not valid JSON"),
    (SINGLE, "header-not-utf8", raw_header(b'{"\xff\xfe": 1}'), "header is not valid JSON"),
    (SINGLE, "header-is-a-list", raw_header(b"[]"), "header must be a JSON object"),
    (SINGLE, "header-duplicate-key", duplicate_key, "duplicate key '0.bias'"),
    (SINGLE, "unknown-dtype", single(set_entry("0.bias", dtype="F12")), "'0.bias': dtype 'F12'"),
    (SINGLE, "shape-not-a-list", single(set_entry("0.bias", shape="160")), "'0.bias': shape"),
    (SINGLE, "negative-dimension", single(set_entry("0.bias", shape=[-160])), "'0.bias': shape"),
    (SINGLE, "nine-dimensions", single(set_entry("0.bias", shape=[1] * 9)), "'0.bias': shape"),
    (
        SINGLE,
        "shape-disagrees-with-bytes",
        single(set_entry("0.bias", shape=[80])),
        "'0.bias': F32",
    ),
    (
        SINGLE,
        "offsets-reversed",
        single(set_entry("0.bias", data_offsets=[640, 0])),
        "data_offsets",
    ),
    (
        SINGLE,
        "offsets-not-ints",
        single(set_entry("0.bias", data_offsets=["0", 640])),
        "'0.bias': data_offsets",
    ),
    (SINGLE, "offsets-overlap", single(overlapping), "overlaps the previous tensor"),
    (SINGLE, "offsets-leave-gap", single(gap), "leaves a gap"),
    (SINGLE, "offsets-past-end", single(past_the_end), "(truncated?)"),
    (SINGLE, "absurd-declared-size", single(huge_declared), "tensors declare"),
    (SINGLE, "entry-extra-field", single(set_entry("0.bias", crc=1)), "unknown ['crc']"),
    (
        SINGLE,
        "entry-missing-field",
        single(lambda h, _: h["0.bias"].pop("shape")),
        "missing ['shape']",
    ),
    (
        SINGLE,
        "entry-not-object",
        single(lambda h, _: h.__setitem__("0.bias", 5)),
        "'0.bias': entry",
    ),
    (
        SINGLE,
        "metadata-not-strings",
        single(lambda h, _: h.__setitem__("__metadata__", {"a": 1})),
        "__metadata__ must map strings",
    ),
    # -- torchquant metadata (resealed, so the field's own check refuses it)
    (
        SINGLE,
        "format-version-newer",
        meta(**{KEY_VERSION: "2"}),
        "format version '2' is not supported",
    ),
    (SINGLE, "format-version-missing", meta(**{KEY_VERSION: None}), "torchquant_format_version"),
    (SINGLE, "layers-not-json", meta(**{KEY_LAYERS: "{"}), "'torchquant_layers' is not valid JSON"),
    (SINGLE, "layers-empty", meta(**{KEY_LAYERS: "{}"}), "'torchquant_layers' must be a non-empty"),
    (SINGLE, "bits-disagree-with-qweight", weight_field("bits", 3), "tensor '0.qweight'"),
    (
        SINGLE,
        "group-size-disagrees-with-scales",
        weight_field("group_size", 32),
        "tensor '0.scales'",
    ),
    (SINGLE, "bits-out-of-range", weight_field("bits", 42), "layer '0'"),
    (SINGLE, "symmetric-disagrees-with-zeros", weight_field("symmetric", True), "'0.zeros'"),
    (
        SINGLE,
        "scheme-unknown-field",
        weight_field("sparsity", 0.5),
        "unknown field(s) ['sparsity']",
    ),
    (
        SINGLE,
        "layer-missing-in-features",
        layers_edit(lambda layers: layers["0"].pop("in_features")),
        "layer '0'",
    ),
    (SINGLE, "layer-in-features-a-string", layer_field("in_features", "96"), "in_features='96'"),
    (SINGLE, "layer-in-features-a-float", layer_field("in_features", 96.0), "in_features=96.0"),
    (SINGLE, "layer-bias-a-string", layer_field("bias", "false"), "bias='false' must be bool"),
    (SINGLE, "layer-unknown-field", layer_field("sparse", True), "unknown field(s) ['sparse']"),
    (
        SINGLE,
        "layer-not-a-mapping",
        layers_edit(lambda layers: layers.__setitem__("0", [96])),
        "layer '0': layer description must be a mapping",
    ),
    (SINGLE, "layer-implausible-shape", layer_field("in_features", 2**40), "implausible shape"),
    (SINGLE, "layer-unknown-dtype", layer_field("dtype", "torch.int8"), "dtype 'torch.int8'"),
    (SINGLE, "layer-shape-disagrees-with-model", layer_field("in_features", 95), "layer '0'"),
    (
        SINGLE,
        "layer-not-in-model",
        layers_edit(lambda layers: layers.__setitem__("9", layers.pop("0"))),
        "layer '9' from the checkpoint is not in the model",
    ),
    (
        SINGLE,
        "layer-is-not-linear",
        layers_edit(lambda layers: layers.__setitem__("1", layers.pop("0"))),
        "layer '1': the model has a GELU",
    ),
    (SINGLE, "config-metadata-not-json", meta(**{KEY_CONFIG: "{"}), "'torchquant_config'"),
    (
        SINGLE,
        "config-metadata-invalid",
        meta(**{KEY_CONFIG: json.dumps({"default": "w9a16"})}),
        "'torchquant_config'",
    ),
    (
        SINGLE,
        "aliases-malformed",
        meta(**{KEY_ALIASES: json.dumps({"a": 1})}),
        "torchquant_aliases",
    ),
    (
        SINGLE,
        "alias-leads-nowhere",
        meta(**{KEY_ALIASES: json.dumps({"9.weight": "0.bias"})}),
        "alias '9.weight'",
    ),
    # -- tensors against the layers' schemes (resealed)
    (
        SINGLE,
        "packed-length-short",
        put("0.qweight", torch.zeros(160, 11, dtype=torch.int32)),
        "tensor '0.qweight': checkpoint declares torch.int32 (160, 11)",
    ),
    (
        SINGLE,
        "scales-wrong-dtype",
        put("0.scales", torch.ones(160, 1, dtype=torch.float16)),
        "tensor '0.scales'",
    ),
    (
        SINGLE,
        "qweight-wrong-dtype",
        put("2.qweight", torch.zeros(96, 160, dtype=torch.uint8)),
        "tensor '2.qweight'",
    ),
    (SINGLE, "tensor-missing", tensors_edit(lambda t: t.pop("2.scales")), "['2.scales']"),
    (SINGLE, "tensor-extra", put("2.extra", torch.ones(1)), "['2.extra']"),
    (SINGLE, "nan-in-scales", poke("0.scales", 3, float("nan")), "'0.scales' holds NaN/Inf"),
    (SINGLE, "inf-in-bias", poke("2.bias", 0, float("inf")), "'2.bias' holds NaN/Inf"),
    (
        SINGLE,
        "nan-in-fp8-weight",
        tensors_edit(lambda t: t["3.qweight"].view(torch.uint8).fill_(0x7F)),
        "'3.qweight' holds NaN/Inf",
    ),
    (SINGLE, "zero-scale", poke("2.scales", 5, 0.0), "'2.scales': holds a scale <= 0"),
    (SINGLE, "negative-scale", poke("3.scales", 0, -1.0), "'3.scales': holds a scale <= 0"),
    (
        SINGLE,
        "zero-point-beyond-bits",
        poke("0.zeros", 0, 255),
        "0.zeros: zero point 255 exceeds 15",
    ),
    # -- digests (not resealed)
    (SINGLE, "payload-bit-flip", flip_payload_byte, "does not match its digest (corrupted data)"),
    (SINGLE, "metadata-edited", edit_metadata_without_digest, "metadata does not match its digest"),
    (SINGLE, "digests-missing", drop_digests, "no 'torchquant_digests'"),
    (
        SINGLE,
        "digests-not-json",
        digests_edit(lambda _: "{"),
        "'torchquant_digests' is not valid JSON",
    ),
    (SINGLE, "digests-malformed", digests_edit(lambda _: '{"tensors": 1}'), "is malformed"),
    (SINGLE, "digests-list-other-tensors", fake_digest_list, "digests list other tensors"),
    # -- the directory and its files
    (SINGLE, "directory-missing", lambda d: shutil.rmtree(d), "does not exist"),
    (SINGLE, "no-weights-file", remove(SINGLE_FILE), "holds neither"),
    (
        SINGLE,
        "weights-file-symlink-out",
        symlink_out(SINGLE_FILE, "elsewhere.safetensors"),
        "'model.safetensors' lies outside",
    ),
    (SHARDED, "both-single-and-index", both_layouts, "ambiguous"),
    (
        SHARDED,
        "index-dotdot",
        route("0.bias", "../evil.safetensors"),
        "'../evil.safetensors' lies outside",
    ),
    (SHARDED, "index-absolute-path", route("0.bias", "/etc/passwd"), "'/etc/passwd' lies outside"),
    (SHARDED, "index-backslash", route("0.bias", "..\\evil.safetensors"), "lies outside"),
    (SHARDED, "index-dot", route("0.bias", "."), "'.' lies outside"),
    (SHARDED, "index-symlink-out", symlink_out(SHARD2, "elsewhere.safetensors"), "(symlink?)"),
    (
        SHARDED,
        "index-names-missing-shard",
        route("0.bias", "model-00007.safetensors"),
        "'model-00007.safetensors' is missing",
    ),
    (SHARDED, "index-shard-is-directory", shard_is_a_directory, f"{SHARD2!r} is missing"),
    (SHARDED, "index-not-json", write_index("{"), "model.safetensors.index.json: not valid JSON"),
    (
        SHARDED,
        "index-duplicate-key",
        write_index('{"weight_map": {}, "weight_map": {}}'),
        "duplicate key",
    ),
    (
        SHARDED,
        "index-without-weight-map",
        write_index('{"metadata": {}}'),
        "no 'weight_map' object",
    ),
    (SHARDED, "index-empty-weight-map", write_index('{"weight_map": {}}'), "'weight_map' is empty"),
    (SHARDED, "index-shard-not-a-string", route("0.bias", 7), "'0.bias' maps to 7"),
    (
        SHARDED,
        "index-total-size-negative",
        index_edit(lambda i: i["metadata"].update(total_size=-1)),
        "metadata.total_size=-1",
    ),
    (
        SHARDED,
        "index-total-size-wrong",
        index_edit(lambda i: i["metadata"].update(total_size=10)),
        "total_size=10 but the shards hold 29408",
    ),
    (SHARDED, "index-points-to-wrong-shard", route("0.bias", SHARD2), "tensor '0.bias' is in"),
    (SHARDED, "index-names-absent-tensor", route("ghost.weight", SHARD1), "'ghost.weight'"),
    (SHARDED, "index-oversized", huge_index, "exceeds the 67108864-byte limit"),
    (SHARDED, "index-is-a-fifo", fifo_index, "not a regular file"),
    (SHARDED, "stray-shard", stray_shard, "['model-00009-of-00009.safetensors'] are not named"),
    (SHARDED, "shards-contradict", shard_contradicts, f"{SHARD2}: metadata 'torchquant_config'"),
    # -- Hugging Face config.json and quantization_config
    (
        HF,
        "config-json-edited",
        config_json_edit(lambda c: c.update(rms_norm_eps=0.1), False),
        "config.json: does not match its digest",
    ),
    (HF, "config-json-not-json", config_json_text("{"), "config.json: not valid JSON"),
    (HF, "config-json-a-list", config_json_text("[]"), "config.json: expected a JSON object"),
    (
        HF,
        "config-json-symlink-out",
        symlink_out("config.json", "elsewhere.json"),
        "config.json: is a symlink leading outside",
    ),
    (
        HF,
        "qc-not-an-object",
        config_field("quantization_config", "torchquant"),
        "quantization_config must be an object",
    ),
    (HF, "qc-unknown-field", qc_field("bits", 4), "quantization_config: unknown field(s) ['bits']"),
    (HF, "qc-wrong-method", qc_field("quant_method", "gptq"), "quant_method='gptq'"),
    (HF, "qc-format-version-newer", qc_field("format_version", 3), "format_version=3 is newer"),
    (HF, "qc-format-version-not-int", qc_field("format_version", "1"), "format_version='1'"),
    (
        HF,
        "qc-config-contradicts",
        qc_field("config", {"default": "w8a16", "ignore": []}),
        "'config' contradicts",
    ),
    (
        HF,
        "model-type-unknown",
        config_field("model_type", "no-such-model"),
        "config.json: unknown or bad model_type 'no-such-model'",
    ),
    (
        HF,
        "layer-count-absurd",
        config_field("num_hidden_layers", 10**9),
        "num_hidden_layers=1000000000",
    ),
    (HF, "hidden-size-negative", config_field("hidden_size", -32), "config.json: cannot build"),
    (HF, "buffers-absurd", config_field("head_dim", 2**42), "config.json: the model's buffers"),
    (
        HF,
        "model-class-not-transformers",
        hf_meta(**{KEY_MODEL_CLASS: "os.system"}),
        "model class 'os.system'",
    ),
    (
        HF,
        "model-class-not-a-model",
        hf_meta(**{KEY_MODEL_CLASS: "AutoConfig"}),
        "model class 'AutoConfig'",
    ),
]


@pytest.mark.parametrize(
    "kind,mutate,fragment", [pytest.param(k, m, f, id=i) for k, i, m, f in CASES]
)
def test_damaged_checkpoint_is_refused_naming_the_culprit(
    request, pristine, tmp_path, kind, mutate, fragment
):
    source = request.getfixturevalue("pristine_hf") if kind == HF else pristine[kind]
    directory = source.copy(tmp_path)
    mutate(directory)
    with pytest.raises(CheckpointError) as info:
        source.load(directory)
    assert fragment in str(info.value)


def test_declared_sizes_beyond_the_memory_budget_are_refused(pristine):
    path = pristine[SINGLE].directory / SINGLE_FILE
    with pytest.raises(CheckpointError, match="model.safetensors: tensors declare 29408 bytes"):
        check_safetensors(path, memory_budget=10_000)


def test_shards_together_beyond_the_memory_budget_are_refused(pristine):
    directory = pristine[SHARDED].directory
    headers = [check_safetensors(p) for p in sorted(directory.glob("*.safetensors"))]
    check_total_size(headers, 29408)
    with pytest.raises(CheckpointError, match="shards declare 29408 bytes in all"):
        check_total_size(headers, 29407)


def test_catalogue_is_large_and_distinct():
    ids = [case[1] for case in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 60
