"""The one writer and reader of a checkpoint folder's safetensors shards.

A folder holds ``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` shards plus
``model.safetensors.index.json`` mapping each tensor to its shard.  Every format writes
and reads its tensors through this module; what the tensors are called and what the
shard metadata says is the format's business.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from torchquant.checkpoint.files import check_index_matches_shards, check_total_size, shard_files
from torchquant.checkpoint.safetensors_check import SafetensorsHeader, check_safetensors
from torchquant.errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 4 * 2**30


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as ``'2GB'`` or ``'500MiB'``."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)\s*", str(size), re.IGNORECASE)
    if not m:
        raise CheckpointError(f"max_shard_size={size!r}: expected bytes or e.g. '2GB', '500MiB'")
    unit = m.group(2).upper()
    base = 1024 if "I" in unit else 1000
    return int(float(m.group(1)) * base ** {"K": 1, "M": 2, "G": 3}[unit[0]])


def dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop tensors that share storage with an earlier one (tied weights); return the aliases.

    The kept tensors are contiguous CPU copies, ready to write.
    """
    seen: dict[tuple, str] = {}
    kept: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for name, t in state.items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        kept[name] = t.detach().to("cpu").contiguous()
    return kept, aliases


def split_shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """``state`` in order, cut into shards of at most ``max_bytes`` (a bigger tensor: its own)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def write_shards(
    folder: Path,
    shards: list[dict[str, torch.Tensor]],
    metadata: Callable[[dict[str, torch.Tensor]], dict[str, str]],
) -> None:
    """Write ``shards`` into ``folder`` (one file, or numbered shards and their index).

    ``metadata(shard)`` is the safetensors metadata written with each shard.
    """
    if len(shards) == 1:
        save_file(shards[0], str(folder / SINGLE_FILE), metadata=metadata(shards[0]))
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / fname), metadata=metadata(shard))
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for shard in shards for t in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2))


def shard_paths(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder, validated to stay inside it."""
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    return shard_files(directory, SINGLE_FILE, INDEX_FILE)


def read_headers(
    directory: Path, *, memory_budget: int | None = None
) -> tuple[list[Path], list[SafetensorsHeader]]:
    """The folder's shards and their checked headers, read before any tensor is.

    With ``memory_budget``, the tensors together must fit in it; a shard index must agree
    with the shards tensor by tensor.
    """
    files = shard_paths(directory)
    headers = [check_safetensors(path) for path in files]
    if memory_budget is not None:
        check_total_size(headers, memory_budget)
    if (directory / INDEX_FILE).exists():
        check_index_matches_shards(directory, INDEX_FILE, headers)
    return files, headers


def read_tensors(
    files: list[Path],
    check_shard: Callable[[Path, dict[str, torch.Tensor]], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Every tensor of the validated ``files``; ``check_shard(path, tensors)`` sees each shard."""
    state: dict[str, torch.Tensor] = {}
    for path in files:
        shard: dict[str, torch.Tensor] = {}
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    if key in state:
                        raise CheckpointError(f"{path.name}: tensor {key!r} appears in two shards")
                    shard[key] = f.get_tensor(key)
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{path.name}: unreadable or truncated ({exc})") from None
        if check_shard is not None:
            check_shard(path, shard)
        state.update(shard)
    return state
