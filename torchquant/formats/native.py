"""The native format: quantized checkpoints as safetensors, saved and loaded without pickle.

A checkpoint directory holds ``model.safetensors`` (or ``model-0000i-of-0000n.safetensors``
shards plus ``model.safetensors.index.json``).  Every shard's metadata carries the
format version, the per-layer schemes (the authoritative description of which
module is a ``QuantLinear`` and how), the ``QuantConfig`` when known, aliases
for tied tensors, and digests of its tensors, its metadata and ``config.json``
(see ``checkpoint.digests``).  Hugging Face models also get ``config.json`` (with a
``quantization_config``) and their tokenizer files.

Loading treats the directory as untrusted: headers, index, metadata and digests
are checked before any tensor is read (``torchquant.checkpoint``),
and any damage is reported as a ``CheckpointError`` naming the file, tensor or field.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchquant.checkpoint import digests, validate
from torchquant.checkpoint.atomic import staged_directory
from torchquant.checkpoint.files import check_same_metadata, declared_entries
from torchquant.checkpoint.folder import (
    DEFAULT_MAX_SHARD_BYTES,
    dedupe,
    parse_size,
    read_headers,
    read_tensors,
    shard_paths,
    split_shards,
    write_shards,
)
from torchquant.checkpoint.safetensors_check import (
    SafetensorsHeader,
    check_safetensors,
    physical_memory_bytes,
)
from torchquant.checkpoint.save_guard import (
    NATIVE_KEY,
    check_tensors_to_save,
    model_sources,
    resolve_save_target,
)
from torchquant.checkpoint.skeleton import build_hf_skeleton
from torchquant.config import QuantConfig
from torchquant.errors import CheckpointError, ConfigError
from torchquant.formats.layer_spec import LayerSpec
from torchquant.modules import fuse_rms_norms, fuse_sibling_linears
from torchquant.offload import materialized_state_dict
from torchquant.plan import quantized_layers, set_submodule, split_experts_for_names

FORMAT_VERSION = 1
KEY_VERSION = NATIVE_KEY  # also how the save guard recognises a native checkpoint
KEY_LAYERS = "torchquant_layers"
KEY_CONFIG = "torchquant_config"
KEY_ALIASES = "torchquant_aliases"
KEY_MODEL_CLASS = "torchquant_model_class"
KEY_DIGESTS = "torchquant_digests"


def _hf_config_dict(model: nn.Module, metadata: dict[str, str]) -> dict[str, Any] | None:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return None
    data = config.to_dict()
    data.pop("quantization_config", None)
    data["architectures"] = [type(model).__name__]
    data["quantization_config"] = {
        "quant_method": "torchquant",
        "format_version": FORMAT_VERSION,
        "config": json.loads(metadata.get(KEY_CONFIG, "null")),
    }
    return data


def save_quantized(
    model: nn.Module,
    directory: str | Path,
    *,
    config: QuantConfig | None = None,
    tokenizer: Any = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (with its ``QuantLinear`` layers) as safetensors into ``directory``.

    The directory is built beside the target and swapped in atomically, so a crash
    mid-save leaves any previous checkpoint there intact.  Which folders a save may
    replace, and what ``overwrite`` allows, is :mod:`torchquant.checkpoint.save_guard`'s rule.
    """
    layers = quantized_layers(model)
    if not layers:
        raise CheckpointError("model has no QuantLinear layers; run convert_model first")
    target = resolve_save_target(directory, overwrite=overwrite, sources=model_sources(model))
    max_bytes = parse_size(max_shard_size)
    full_state = materialized_state_dict(model)
    check_tensors_to_save(full_state)
    state, aliases = dedupe(full_state)
    metadata = {
        "format": "pt",
        KEY_VERSION: str(FORMAT_VERSION),
        KEY_LAYERS: json.dumps({n: LayerSpec.of(m).to_dict() for n, m in layers.items()}),
        KEY_ALIASES: json.dumps(aliases),
        KEY_MODEL_CLASS: type(model).__name__,
    }
    if config is not None:
        metadata[KEY_CONFIG] = json.dumps(config.to_dict())
    shards = split_shards(state, max_bytes)
    hf_config = _hf_config_dict(model, metadata)
    config_json = "" if hf_config is None else json.dumps(hf_config, indent=2, default=str)

    def shard_metadata(shard: dict[str, torch.Tensor]) -> dict[str, str]:
        record = digests.shard_digests(shard, metadata, KEY_DIGESTS, config_json)
        return {**metadata, KEY_DIGESTS: record}

    with staged_directory(target.path, merge=target.merge) as staging:
        write_shards(staging, shards, shard_metadata)
        if config_json:
            (staging / "config.json").write_text(config_json)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
    return Path(directory)


def checkpoint_files(directory: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint, validated to stay inside ``directory``."""
    return shard_paths(Path(directory))


def read_metadata(directory: str | Path) -> dict[str, str]:
    """The torchquant metadata of a checkpoint (from its first shard), version-checked."""
    return _checked_metadata(check_safetensors(checkpoint_files(directory)[0]))


def _checked_metadata(header: SafetensorsHeader) -> dict[str, str]:
    path, metadata = header.path, header.metadata
    version = metadata.get(KEY_VERSION)
    if version is None:
        raise CheckpointError(
            f"{path.name}: no {KEY_VERSION} in metadata; not a torchquant checkpoint"
        )
    if version != str(FORMAT_VERSION):
        raise CheckpointError(
            f"{path.name}: format version {version!r} is not supported (this torchquant reads "
            f"version {FORMAT_VERSION})"
        )
    return metadata


def _verified_digests(header: SafetensorsHeader) -> dict:
    """The shard's digest record, after its version and metadata digest are checked."""
    metadata = _checked_metadata(header)
    record = digests.parse_digests(header.path.name, metadata, KEY_DIGESTS)
    digests.check_metadata_digest(header.path.name, metadata, record, KEY_DIGESTS)
    if set(record["tensors"]) != set(header.entries):
        raise CheckpointError(f"{header.path.name}: digests list other tensors than the header")
    return record


def _check_config_field(metadata: dict[str, str]) -> None:
    """The recorded ``QuantConfig``, when there is one, must be a valid config."""
    if KEY_CONFIG not in metadata:
        return
    data = _json_field(metadata, KEY_CONFIG)
    try:
        QuantConfig.from_dict(data)
    except ConfigError as exc:
        raise CheckpointError(
            f"metadata field {KEY_CONFIG!r} is not a valid QuantConfig: {exc}"
        ) from None


def _json_field(metadata: dict[str, str], key: str) -> Any:
    try:
        return json.loads(metadata.get(key, "{}"))
    except ValueError as exc:
        raise CheckpointError(f"metadata field {key!r} is not valid JSON ({exc})") from None


def layer_specs(metadata: dict[str, str]) -> dict[str, LayerSpec]:
    raw = _json_field(metadata, KEY_LAYERS)
    if not isinstance(raw, dict) or not raw:
        raise CheckpointError(f"metadata field {KEY_LAYERS!r} must be a non-empty mapping")
    return {name: LayerSpec.from_dict(name, spec) for name, spec in raw.items()}


@torch.no_grad()
def load_quantized(
    directory: str | Path,
    model: nn.Module | None = None,
    *,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """Load a checkpoint written by :func:`save_quantized`.

    Without ``model`` the directory must hold a Hugging Face ``config.json``: the model
    is built on the meta device from it (no code from the checkpoint runs).  With
    ``model`` (a float skeleton, on any device including meta), its linear layers
    named in the checkpoint are replaced by ``QuantLinear`` shells (fused experts modules
    whose per-expert linears the checkpoint holds are split first, see ``QuantExperts``).
    Tensors are then assigned straight from the files, so no full-precision copy is
    materialised.  On CUDA, sibling projections then share one concatenated weight
    (``fuse_sibling_linears``; derived, never saved), and known RMSNorm modules run as one
    kernel each (``fuse_rms_norms``).
    """
    directory = Path(directory)
    files, headers = read_headers(directory, memory_budget=physical_memory_bytes())
    records = [_verified_digests(header) for header in headers]
    check_same_metadata(headers, (KEY_VERSION, KEY_LAYERS, KEY_CONFIG, KEY_ALIASES))
    metadata = headers[0].metadata
    for record in records:
        digests.check_config_json_digest(directory, record)
    _check_config_field(metadata)
    validate.check_quantization_config(directory, metadata, FORMAT_VERSION, KEY_CONFIG)
    specs = layer_specs(metadata)
    aliases = validate.check_aliases(_json_field(metadata, KEY_ALIASES))
    declared = declared_entries(headers)
    if model is None:
        if not os.path.lexists(directory / "config.json"):  # a FIFO is refused by name later
            raise CheckpointError(f"{directory}: no config.json; pass the float model as `model=`")
        model = build_hf_skeleton(directory, metadata.get(KEY_MODEL_CLASS, ""), declared)
    split_experts_for_names(model, [*specs, *(k.rpartition(".")[0] for k in declared)])
    for name, spec in specs.items():
        try:
            target = model.get_submodule(name) if name else None
        except AttributeError:
            target = None
        if target is None:
            raise CheckpointError(f"layer {name!r} from the checkpoint is not in the model")
        validate.check_layer_fits(name, target, spec)
        set_submodule(model, name, spec.build())
    full = model.state_dict()
    expected = {k: v for k, v in full.items() if k not in aliases}
    validate.check_declared(expected, declared)
    shard_records = dict(zip(files, records, strict=True))
    state = read_tensors(
        files,
        lambda path, shard: digests.check_tensor_digests(path.name, shard, shard_records[path]),
    )
    validate.check_declared(expected, state, "has")
    validate.check_loaded_values(state, model)
    model.load_state_dict(state, strict=False, assign=True)
    for alias, source in aliases.items():
        if alias not in full or alias in expected or source not in state:
            raise CheckpointError(f"alias {alias!r} -> {source!r} does not fit the model")
        module_name, _, attr = alias.rpartition(".")
        src_module, _, src_attr = source.rpartition(".")
        target = model.get_submodule(module_name)
        value = getattr(model.get_submodule(src_module), src_attr)
        if isinstance(value, nn.Parameter):
            setattr(target, attr, value)
        else:
            target.register_buffer(attr, value)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.device.type == "meta":
            raise CheckpointError(f"tensor {name!r} was not restored from the checkpoint")
    model = model.to(device).eval()
    fuse_sibling_linears(model)  # -- derived from the loaded tensors, never saved
    fuse_rms_norms(model)  # -- an instance ``forward``: nothing saved or loaded changes
    return model
