"""Hugging Face style checkpoint folders shared by the exchange formats.

A folder holds ``config.json`` (the model config plus a ``quantization_config``),
``model.safetensors`` or shards with ``model.safetensors.index.json``, and the
tokenizer.  Formats decide the tensor names of quantized layers; this module writes
and reads the folder, checks the shard index, and rebuilds the model on the meta
device so that no full-precision weight is ever materialised.  Tensors are stored
under the names the model type's original checkpoints use (``checkpoint.names``) and
are keyed by the model's own module names everywhere else.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchquant.checkpoint.atomic import staged_directory
from torchquant.checkpoint.files import declared_entries, read_json_file
from torchquant.checkpoint.folder import (
    DEFAULT_MAX_SHARD_BYTES,
    dedupe,
    parse_size,
    read_headers,
    split_shards,
    write_shards,
)
from torchquant.checkpoint.folder import read_tensors as read_shards
from torchquant.checkpoint.names import names_for_model, names_for_type
from torchquant.checkpoint.safetensors_check import TensorEntry, check_safetensors
from torchquant.checkpoint.save_guard import (
    WRITER_KEY,
    check_tensors_to_save,
    model_sources,
    resolve_save_target,
)
from torchquant.checkpoint.skeleton import build_hf_skeleton
from torchquant.checkpoint.validate import check_layer_fits, check_loaded_values, check_scales
from torchquant.errors import CheckpointError
from torchquant.modules import QuantLinear
from torchquant.plan import (
    is_linear_like,
    quantized_layers,
    set_submodule,
    split_experts_for_names,
)


def float_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Tensors of everything but the ``QuantLinear`` layers, tied copies dropped."""
    prefixes = tuple(f"{name}." for name in quantized_layers(model))
    state, _aliases = dedupe(model.state_dict())
    return {k: v for k, v in state.items() if not k.startswith(prefixes)}


def model_config_dict(model: nn.Module) -> dict[str, Any]:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise CheckpointError(
            "this format needs a Hugging Face model (with .config); use the native format"
        )
    data = config.to_dict()
    data.pop("quantization_config", None)
    data["architectures"] = [type(model).__name__]
    return data


def write_checkpoint(
    model: nn.Module,
    directory: str | Path,
    quantization_config: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    tokenizer: Any = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    *,
    extra_json: dict[str, dict[str, Any]] | None = None,
    shard_metadata: dict[str, str] | None = None,
) -> Path:
    """Write ``config.json``, the (sharded) safetensors and the tokenizer atomically.

    ``config.json`` is ``model``'s config with ``quantization_config``.  ``tensors`` are
    keyed by the model's names and stored under the checkpoint names of its model type.
    The target is checked by :mod:`torchquant.checkpoint.save_guard` (the folders the
    model came from are never written) and the tensors must be finite, all before
    anything is written.  ``shard_metadata`` joins every shard's safetensors metadata.
    """
    config = model_config_dict(model)
    config["quantization_config"] = quantization_config
    target = resolve_save_target(directory, overwrite=overwrite, sources=model_sources(model))
    max_bytes = parse_size(max_shard_size)
    check_tensors_to_save(tensors)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    tensors = names_for_type(config.get("model_type")).keys_to_checkpoint(tensors)
    shards = split_shards(tensors, max_bytes)
    metadata = {"format": "pt", WRITER_KEY: "torchquant", **(shard_metadata or {})}
    with staged_directory(target.path, merge=target.merge) as staging:
        write_shards(staging, shards, lambda shard: metadata)
        (staging / "config.json").write_text(json.dumps(config, indent=2, default=str))
        for fname, data in (extra_json or {}).items():
            (staging / fname).write_text(json.dumps(data, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
    return Path(directory)


def read_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / "config.json"
    if not path.exists():
        raise CheckpointError(f"{directory}: no config.json")
    data = read_json_file(path, "config.json")
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def declared_tensors(directory: str | Path) -> tuple[list[Path], dict[str, TensorEntry]]:
    """The folder's validated shards and every tensor they declare, read from headers only.

    Shard names must stay inside the folder, each header must be sound (sizes that
    match shapes and the file, within the memory budget) and a shard index must
    agree with the shards tensor by tensor, all before any tensor is allocated.
    Tensors are keyed by the model's names (see ``checkpoint.names``).
    """
    directory = Path(directory)
    files, headers = read_headers(directory)
    has_config = (directory / "config.json").exists()
    model_type = read_config(directory).get("model_type") if has_config else None
    return files, names_for_type(model_type).keys_to_model(declared_entries(headers))


def shard_metadata(files: list[Path]) -> list[dict[str, str]]:
    """The safetensors metadata of each of the validated shards ``files``."""
    return [check_safetensors(path).metadata for path in files]


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_float_tensors(
    model: nn.Module, declared: dict[str, TensorEntry], quantized: list[str]
) -> None:
    """Tensors outside the quantized layers must be the skeleton's, shape for shape.

    A float tensor of the model (embeddings, norms, biases, unquantized layers) must be
    stored as F16, BF16 or F32 and is loaded as stored: an integer one would be read as
    garbage numbers, and F64 or FP8 would make the first forward fail on mixed dtypes,
    so all three are refused here rather than cast behind the user's back.
    """
    expected = model.state_dict()
    prefixes = tuple(f"{name}." for name in quantized)
    for key, entry in declared.items():
        if key.startswith(prefixes):
            continue
        if key not in expected:
            raise CheckpointError(f"checkpoint has tensor {key!r}, which the model does not")
        want = expected[key]
        if entry.shape != tuple(want.shape):
            raise CheckpointError(
                f"tensor {key!r}: checkpoint declares {entry.shape}, the model expects "
                f"{tuple(want.shape)}"
            )
        if want.is_floating_point() and entry.dtype not in FLOAT_DTYPES:
            raise CheckpointError(
                f"tensor {key!r}: checkpoint stores {entry.dtype}; a float tensor of the model "
                f"must be one of {[str(d) for d in FLOAT_DTYPES]}"
            )
        if not want.is_floating_point() and entry.dtype != want.dtype:
            raise CheckpointError(
                f"tensor {key!r}: checkpoint stores {entry.dtype}, the model expects {want.dtype}"
            )


def read_tensors(files: list[Path], model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of the validated ``files`` under the model's names, refusing NaN/Inf values."""
    state = read_shards(files)
    state = names_for_model(model).keys_to_model(state)
    check_loaded_values(state, model)
    return state


def linear_layer_names(model: nn.Module) -> dict[str, str]:
    """Name -> class name of every linear-like layer of a (meta) model."""
    return {name: type(m).__name__ for name, m in model.named_modules() if is_linear_like(m)}


def build_skeleton(
    directory: str | Path, config: dict[str, Any], declared: dict[str, TensorEntry]
) -> nn.Module:
    """The model named by ``config.json``'s ``architectures``, on the meta device.

    Fused experts modules whose per-expert linears (``<experts>.<e>.gate_proj`` ...) the
    ``declared`` tensors name are split into them (``QuantExperts``).
    """
    arch = config.get("architectures") or []
    if not isinstance(arch, list) or len(arch) != 1 or not isinstance(arch[0], str):
        raise CheckpointError(f"config.json: 'architectures' must name one class, got {arch!r}")
    model = build_hf_skeleton(Path(directory), arch[0], declared)
    split_experts_for_names(model, (key.rpartition(".")[0] for key in declared))
    return model


def take(local: dict[str, torch.Tensor], key: str, name: str) -> torch.Tensor:
    """Remove and return layer ``name``'s tensor ``key`` from ``local``; refuse a missing one."""
    if key not in local:
        raise CheckpointError(f"layer {name!r}: tensor {key!r} is missing")
    return local.pop(key)


def take_qweight_and_scales(
    local: dict[str, torch.Tensor], name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer ``name``'s ``qweight`` and ``scales`` as GPTQ and AWQ store them: both 2-D."""
    qweight = take(local, "qweight", name)
    scales = take(local, "scales", name)
    if qweight.dim() != 2 or scales.dim() != 2:
        raise CheckpointError(f"layer {name!r}: qweight and scales must be 2-D")
    check_scales(f"{name}.scales", scales)
    return qweight, scales


def scale_groups(scales: torch.Tensor, k: int, n: int, group_size: int, name: str) -> int:
    """The group count of a ``K``-input layer whose ``scales`` must be ``(groups, N)``."""
    groups = 1 if group_size == -1 else -(-k // group_size)
    if scales.shape != (groups, n):
        raise CheckpointError(
            f"layer {name!r}: scales have shape {tuple(scales.shape)}, expected ({groups}, {n})"
        )
    return groups


def assemble(
    model: nn.Module,
    tensors: dict[str, torch.Tensor],
    layer_names: list[str],
    make_layer: Callable[[str, dict[str, torch.Tensor]], QuantLinear],
) -> nn.Module:
    """Replace ``layer_names`` by the layers ``make_layer`` builds, assign the rest.

    ``make_layer(name, local)`` gets the tensors under ``name.`` with local names and
    must consume them all (what it leaves is reported as unexpected).
    """
    remaining = dict(tensors)
    for name in layer_names:
        prefix = f"{name}."
        keys = [k for k in remaining if k.startswith(prefix)]
        local = {k[len(prefix) :]: remaining.pop(k) for k in keys}
        if not local:
            raise CheckpointError(f"layer {name!r}: no tensors for it in the checkpoint")
        layer = make_layer(name, local)
        if local:
            raise CheckpointError(f"layer {name!r}: unexpected tensor(s) {sorted(local)}")
        check_layer_fits(name, model.get_submodule(name), layer)
        set_submodule(model, name, layer)
    expected = model.state_dict()
    quantized = tuple(f"{n}." for n in layer_names)
    unexpected = sorted(k for k in remaining if k not in expected)
    if unexpected:
        raise CheckpointError(
            f"checkpoint has {len(unexpected)} tensor(s) the model does not, e.g. {unexpected[:3]}"
        )
    for key, t in remaining.items():
        want = expected[key]
        if key.startswith(quantized) or t.shape != want.shape:
            raise CheckpointError(
                f"tensor {key!r}: checkpoint shape {tuple(t.shape)}, model {tuple(want.shape)}"
            )
    model.load_state_dict(remaining, strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    for key, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.device.type == "meta":
            raise CheckpointError(f"tensor {key!r} is not in the checkpoint")
    return model.eval()


def load_packed_folder(
    directory: str | Path,
    parse: Callable[[str | Path, dict[str, Any]], dict[str, Any]],
    marker: str,
    make_layer: Callable[[dict[str, torch.Tensor], dict[str, Any], str], QuantLinear],
) -> nn.Module:
    """Load a folder whose quantized layers are the ones holding a ``<layer>.<marker>`` tensor.

    ``parse(directory, config)`` validates the format's config; ``make_layer(local,
    parsed, name)`` builds each layer from its tensors.  Headers, the shard index and
    the float tensors' shapes are all checked before any tensor is read.
    """
    files, declared = declared_tensors(directory)
    config = read_config(directory)
    parsed = parse(directory, config)
    model = build_skeleton(directory, config, declared)
    linear = linear_layer_names(model)
    suffix = f".{marker}"
    marked = {k[: -len(suffix)] for k in declared if k.endswith(suffix)}
    if not marked:
        raise CheckpointError(f"{directory}: no quantized layers (no tensor named '*{suffix}')")
    stray = sorted(marked - set(linear))
    if stray:
        raise CheckpointError(
            f"layer {stray[0]!r} holds quantized tensors but is not a linear layer of "
            f"{type(model).__name__}"
        )
    names = [name for name in linear if name in marked]
    check_float_tensors(model, declared, names)
    tensors = read_tensors(files, model)
    return assemble(model, tensors, names, lambda name, local: make_layer(local, parsed, name))
