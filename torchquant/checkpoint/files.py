"""Checks that make reading an untrusted checkpoint directory safe.

Every rule here runs on headers, indexes and JSON before tensor data is read:
shard names stay inside the checkpoint directory (no ``../``, absolute paths or
symlinks leading out), JSON files are small regular files, the index and the shards
agree tensor by tensor, and every shard carries the same torchquant metadata.  What
the files must hold for the model they load into is :mod:`torchquant.checkpoint.validate`.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from torchquant.checkpoint.safetensors_check import (
    SafetensorsHeader,
    TensorEntry,
    open_regular_file,
)
from torchquant.errors import CheckpointError

MAX_JSON_BYTES = 64 * 2**20


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


def declared_entries(headers: list[SafetensorsHeader]) -> dict[str, TensorEntry]:
    out: dict[str, TensorEntry] = {}
    for header in headers:
        for name, entry in header.entries.items():
            if name in out:
                raise CheckpointError(f"tensor {name!r} appears in two shards")
            out[name] = entry
    return out
