"""Checks that make loading an untrusted checkpoint directory safe.

Every rule here runs on headers, indexes and JSON before tensor data is read:
shard names stay inside the checkpoint directory (no ``../``, absolute paths or
symlinks leading out), the index and the shards agree tensor by tensor, every
shard carries the same torchquant metadata, ``config.json``'s
``quantization_config`` has only known fields that agree with that metadata,
and each declared tensor has the dtype and shape the layer's scheme implies.
After loading, the values are checked too (no NaN/Inf, zero points in range).
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchquant.errors import CheckpointError
from torchquant.safetensors_check import SafetensorsHeader, TensorEntry, open_regular_file

MAX_JSON_BYTES = 64 * 2**20
QUANTIZATION_CONFIG_FIELDS = ("quant_method", "format_version", "config")


def read_small_file(path: Path, what: str) -> bytes:
    """The bytes of a regular file beside the checkpoint (no symlink out, no FIFO, bounded)."""
    if not path.parent.resolve() == path.resolve().parent:
        raise CheckpointError(f"{what}: is a symlink leading outside {path.parent}")
    with open_regular_file(path, what) as f:
        try:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_JSON_BYTES:
                raise CheckpointError(
                    f"{what}: {size} bytes exceeds the {MAX_JSON_BYTES}-byte limit"
                )
            data = f.read(MAX_JSON_BYTES + 1)
        except OSError as exc:
            raise CheckpointError(f"{what}: cannot read ({exc})") from None
    if len(data) > MAX_JSON_BYTES:
        raise CheckpointError(f"{what}: grew past the {MAX_JSON_BYTES}-byte limit while read")
    return data


def read_json_file(path: Path, what: str) -> Any:
    """Parse a small JSON file, refusing oversized files and duplicate keys."""
    try:
        text = read_small_file(path, what).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{what}: not UTF-8 text ({exc})") from None

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            raise CheckpointError(f"{what}: duplicate key in a JSON object")
        return dict(pairs)

    try:
        return json.loads(text, object_pairs_hook=no_duplicates)
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{what}: not valid JSON ({exc})") from None


def resolve_inside(directory: Path, name: object, what: str) -> Path:
    """``directory / name`` if it is a plain file name whose real path stays in ``directory``."""
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
        raise CheckpointError(
            f"{what}: shard {name!r} lies outside {directory} (not a plain file name)"
        )
    path = (directory / name).resolve()
    if path.parent != directory.resolve():
        raise CheckpointError(f"{what}: shard {name!r} lies outside {directory} (symlink?)")
    if not path.exists():
        raise CheckpointError(f"{what}: shard {name!r} is missing")
    if not stat.S_ISREG(path.stat().st_mode):
        raise CheckpointError(
            f"{what}: shard {name!r} is missing as a regular file (a directory, FIFO, device?)"
        )
    return path


def read_shard_index(directory: Path, index_name: str) -> tuple[dict[str, str], int | None]:
    """The index's ``weight_map`` (tensor name -> shard file) and ``total_size``, shape-checked."""
    index = read_json_file(directory / index_name, index_name)
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        raise CheckpointError(f"{index_name}: malformed index (no 'weight_map' object)")
    weight_map = index["weight_map"]
    if not weight_map:
        raise CheckpointError(f"{index_name}: 'weight_map' is empty")
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str):
            raise CheckpointError(f"{index_name}: tensor {tensor!r} maps to {shard!r}, not a name")
    meta = index.get("metadata", {})
    total = meta.get("total_size") if isinstance(meta, dict) else None
    if total is not None and (type(total) is not int or total < 0):
        raise CheckpointError(f"{index_name}: metadata.total_size={total!r} is not a byte count")
    return weight_map, total


def shard_files(directory: Path, single_name: str, index_name: str) -> list[Path]:
    """The checkpoint's safetensors files, refusing ambiguity and anything leading outside."""
    has_index = (directory / index_name).exists()
    has_single = (directory / single_name).exists()
    if has_index and has_single:
        raise CheckpointError(
            f"{directory} holds both {single_name} and {index_name}; which one is meant is "
            "ambiguous"
        )
    if has_single:
        return [resolve_inside(directory, single_name, single_name)]
    if not has_index:
        raise CheckpointError(f"{directory} holds neither {single_name} nor {index_name}")
    weight_map, _ = read_shard_index(directory, index_name)
    names = sorted(set(weight_map.values()))
    files = [resolve_inside(directory, name, index_name) for name in names]
    stray = sorted(
        p.name for p in directory.iterdir() if p.suffix == ".safetensors" and p.name not in names
    )
    if stray:
        raise CheckpointError(f"{index_name}: shard file(s) {stray} are not named in the index")
    return files


def check_index_matches_shards(
    directory: Path, index_name: str, headers: list[SafetensorsHeader]
) -> None:
    """Each tensor sits in exactly the shard the index names, and nowhere else."""
    weight_map, total = read_shard_index(directory, index_name)
    seen: dict[str, str] = {}
    for header in headers:
        for name in header.entries:
            if name in seen:
                raise CheckpointError(
                    f"tensor {name!r} appears in two shards ({seen[name]} and {header.path.name})"
                )
            seen[name] = header.path.name
            if weight_map.get(name) != header.path.name:
                raise CheckpointError(
                    f"{index_name}: tensor {name!r} is in {header.path.name} but the index says "
                    f"{weight_map.get(name)!r}"
                )
    absent = sorted(set(weight_map) - set(seen))
    if absent:
        raise CheckpointError(
            f"{index_name}: names {len(absent)} tensor(s) that no shard holds, e.g. {absent[:5]}"
        )
    declared = sum(h.data_bytes for h in headers)
    if total is not None and total != declared:
        raise CheckpointError(
            f"{index_name}: metadata.total_size={total} but the shards hold {declared} bytes"
        )


def check_total_size(headers: list[SafetensorsHeader], budget: int) -> None:
    """All shards together must fit the memory budget (each one alone was checked already)."""
    total = sum(h.data_bytes for h in headers)
    if total > budget:
        raise CheckpointError(
            f"{headers[0].path.parent.name}: shards declare {total} bytes in all, more than the "
            f"memory budget of {budget} bytes"
        )


def check_same_metadata(headers: list[SafetensorsHeader], keys: tuple[str, ...]) -> None:
    """Every shard must describe the checkpoint identically (no shard may contradict another)."""
    first = headers[0]
    for header in headers[1:]:
        for key in keys:
            if header.metadata.get(key) != first.metadata.get(key):
                raise CheckpointError(
                    f"{header.path.name}: metadata {key!r} contradicts {first.path.name}"
                )


def check_quantization_config(
    directory: Path, metadata: Mapping[str, str], format_version: int, config_key: str
) -> None:
    """Refuse a ``config.json`` whose ``quantization_config`` is unknown, newer or contradictory."""
    path = directory / "config.json"
    if not path.exists():
        return
    data = read_json_file(path, "config.json")
    if not isinstance(data, dict):
        raise CheckpointError("config.json: expected a JSON object")
    qc = data.get("quantization_config")
    if qc is None:
        return
    where = "config.json: quantization_config"
    if not isinstance(qc, dict):
        raise CheckpointError(f"{where} must be an object, got {type(qc).__name__}")
    unknown = sorted(set(qc) - set(QUANTIZATION_CONFIG_FIELDS))
    if unknown:
        raise CheckpointError(
            f"{where}: unknown field(s) {unknown}; known fields are "
            f"{list(QUANTIZATION_CONFIG_FIELDS)}"
        )
    if qc.get("quant_method") != "torchquant":
        raise CheckpointError(
            f"{where}: quant_method={qc.get('quant_method')!r} is not 'torchquant'"
        )
    version = qc.get("format_version")
    if type(version) is not int or version < 1:
        raise CheckpointError(f"{where}: format_version={version!r} is not a positive int")
    if version > format_version:
        raise CheckpointError(
            f"{where}: format_version={version} is newer than this torchquant reads "
            f"({format_version}); upgrade torchquant"
        )
    if str(version) != metadata.get("torchquant_format_version"):
        raise CheckpointError(
            f"{where}: format_version={version} contradicts the safetensors metadata "
            f"({metadata.get('torchquant_format_version')!r})"
        )
    stored = metadata.get(config_key)
    stored_config = json.loads(stored) if stored is not None else None
    if "config" in qc and qc["config"] is not None and qc["config"] != stored_config:
        raise CheckpointError(f"{where}: 'config' contradicts the safetensors metadata")
    if qc.get("config") is not None:
        from torchquant.config import QuantConfig
        from torchquant.errors import ConfigError

        try:
            QuantConfig.from_dict(qc["config"])
        except (ConfigError, TypeError) as exc:
            raise CheckpointError(f"{where}: 'config' is not a valid QuantConfig: {exc}") from None


def declared_entries(headers: list[SafetensorsHeader]) -> dict[str, TensorEntry]:
    out: dict[str, TensorEntry] = {}
    for header in headers:
        for name, entry in header.entries.items():
            if name in out:
                raise CheckpointError(f"tensor {name!r} appears in two shards")
            out[name] = entry
    return out


def check_declared(
    expected: Mapping[str, torch.Tensor], declared: Mapping[str, TensorEntry]
) -> None:
    """Missing/extra tensors and dtype/shape mismatches, from headers alone (nothing allocated)."""
    missing = sorted(set(expected) - set(declared))
    extra = sorted(set(declared) - set(expected))
    if missing:
        raise CheckpointError(f"checkpoint lacks {len(missing)} tensor(s), e.g. {missing[:5]}")
    if extra:
        raise CheckpointError(f"checkpoint has {len(extra)} unexpected tensor(s), e.g. {extra[:5]}")
    for name, entry in declared.items():
        want = expected[name]
        if entry.shape != tuple(want.shape) or entry.dtype != want.dtype:
            raise CheckpointError(
                f"tensor {name!r}: checkpoint declares {entry.dtype} {entry.shape}, the layer's "
                f"scheme expects {want.dtype} {tuple(want.shape)}"
            )


def _has_nonfinite(t: torch.Tensor) -> bool:
    if t.dtype == torch.float8_e4m3fn:  # no Inf; NaN is S.1111.111
        return bool(((t.view(torch.uint8) & 0x7F) == 0x7F).any())
    if t.dtype == torch.float8_e5m2:
        return bool(((t.view(torch.uint8) & 0x7C) == 0x7C).any())
    return bool((~torch.isfinite(t)).any())


def check_scales(name: str, scales: torch.Tensor) -> None:
    """Scales a correct save writes: floating point, finite and positive, every one of them.

    An integer scale would be read as a float silently, a zero one turns the layer's
    output into zeros or NaN, a negative one flips it; all are refused.
    """
    if not scales.is_floating_point():
        raise CheckpointError(
            f"tensor {name!r}: scales are {scales.dtype}; they must be floating point"
        )
    if _has_nonfinite(scales):
        raise CheckpointError(f"tensor {name!r}: holds a NaN/Inf scale; refusing to load it")
    if scales.numel() and not bool((scales.float() > 0).all()):
        raise CheckpointError(
            f"tensor {name!r}: holds a scale <= 0 ({float(scales.float().min()):.3g}); every "
            "scale must be positive"
        )


def check_zero_points(name: str, zeros: torch.Tensor, low: int, high: int) -> None:
    """Zero points are integers in ``[low, high]`` (the code range of the layer's bits)."""
    if zeros.is_floating_point() or zeros.is_complex() or zeros.dtype == torch.bool:
        raise CheckpointError(
            f"tensor {name!r}: zero points are {zeros.dtype}; they must be integers"
        )
    if zeros.numel():
        lo, hi = int(zeros.min()), int(zeros.max())
        if lo < low or hi > high:
            raise CheckpointError(
                f"tensor {name!r}: zero points span {lo}..{hi}, outside [{low}, {high}]"
            )


def check_loaded_values(state: Mapping[str, torch.Tensor], model: nn.Module) -> None:
    """Values a correct save never writes: NaN/Inf, scales <= 0, zero points beyond the bits."""
    for name, t in state.items():
        if t.is_floating_point() and _has_nonfinite(t):
            raise CheckpointError(f"tensor {name!r} holds NaN/Inf; refusing to load it")
    for prefix, module in model.named_modules():
        scheme = getattr(module, "scheme", None)
        if scheme is None:
            continue
        for field in ("scales", "input_scale", "smooth_scale"):
            key = f"{prefix}.{field}" if prefix else field
            t = state.get(key)
            if t is not None and t.numel() and not bool((t.float() > 0).all()):
                raise CheckpointError(
                    f"tensor {key!r}: holds a scale <= 0 ({float(t.float().min()):.3g}); every "
                    "scale must be positive"
                )
        g_idx = state.get(f"{prefix}.g_idx" if prefix else "g_idx")
        groups = getattr(module, "scales", None)
        if g_idx is not None and groups is not None and g_idx.numel():
            lo, hi = int(g_idx.min()), int(g_idx.max())
            if lo < 0 or hi >= groups.shape[-1]:
                raise CheckpointError(
                    f"tensor {prefix}.g_idx: group indices span {lo}..{hi}, the layer has "
                    f"{groups.shape[-1]} groups"
                )
        zeros = state.get(f"{prefix}.zeros" if prefix else "zeros")
        if zeros is None or scheme.weight.type != "int":
            continue
        limit = (1 << scheme.weight.bits) - 1
        if zeros.numel() and int(zeros.max()) > limit:
            raise CheckpointError(
                f"tensor {prefix}.zeros: zero point {int(zeros.max())} exceeds {limit} for "
                f"{scheme.weight.bits}-bit weights"
            )


def check_aliases(raw: object) -> dict[str, str]:
    """Tied-tensor aliases must map tensor names to tensor names."""
    if not isinstance(raw, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in raw.items()
    ):
        raise CheckpointError("metadata field 'torchquant_aliases' must map names to names")
    return raw


def check_layer_fits(name: str, module: nn.Module, spec: Any) -> None:
    """The model's layer at ``name`` is a linear layer of the shape the checkpoint describes."""
    from torchquant.convert import is_linear_like
    from torchquant.modules import QuantLinear

    if isinstance(module, QuantLinear):
        shape = (module.out_features, module.in_features)
    elif is_linear_like(module):
        shape = tuple(module.weight.shape)
        if not isinstance(module, nn.Linear):  # GPT-2 Conv1D stores (in, out)
            shape = shape[::-1]
    else:
        raise CheckpointError(
            f"layer {name!r}: the model has a {type(module).__name__} there, not a linear layer"
        )
    if shape != (spec.out_features, spec.in_features):
        raise CheckpointError(
            f"layer {name!r}: checkpoint describes {spec.out_features}x{spec.in_features}, the "
            f"model's layer is {shape[0]}x{shape[1]}"
        )
