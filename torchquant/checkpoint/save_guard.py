"""What every save checks before it touches the disk: where it may write, and what it writes.

A save may replace a folder only when nothing of the user's can be lost: a folder that
does not exist yet, an empty one, or a checkpoint this library wrote (checkpoint files
only, and a safetensors shard whose metadata carries :data:`WRITER_KEY`).  Anything
else is refused unless the caller passes ``overwrite=True``; even then only the files
a checkpoint consists of (:func:`is_checkpoint_file`) are replaced, everything else in
the folder stays, and the folder a model was loaded from is never written.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from torchquant.checkpoint.code_guard import TOKENIZER_FILES
from torchquant.errors import CheckpointError

# -- safetensors metadata key that marks a shard as written by torchquant (native shards
# -- carry their format version instead)
WRITER_KEY = "torchquant_writer"
NATIVE_KEY = "torchquant_format_version"

CHECKPOINT_FILES = (
    "config.json",
    "generation_config.json",
    "quantize_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    *TOKENIZER_FILES,
)
MAX_HEADER_BYTES = 100 * 2**20
SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def is_checkpoint_file(name: str) -> bool:
    """Whether a file of this name is part of a checkpoint (what an overwrite may replace)."""
    return name in CHECKPOINT_FILES or SHARD_NAME.fullmatch(name) is not None


@dataclass(frozen=True)
class SaveTarget:
    """Where a save writes: ``path`` (symlinks followed), and how.

    ``merge`` is True when the folder holds files that are not ours: the new checkpoint's
    files then replace the old checkpoint files one by one and nothing else is removed.
    Otherwise the whole folder is swapped atomically.
    """

    path: Path
    merge: bool


def _written_by_us(directory: Path) -> bool:
    """Whether ``directory`` holds checkpoint files only, and a shard that we marked."""
    entries = list(directory.iterdir())
    for entry in entries:
        if entry.is_symlink() or not entry.is_file() or not is_checkpoint_file(entry.name):
            return False
    shards = sorted(e for e in entries if e.suffix == ".safetensors")
    return bool(shards) and _marked(shards[0])


def _marked(shard: Path) -> bool:
    """Whether a shard's header metadata names torchquant as its writer.

    Only the header is read, so a checkpoint of ours whose tensor data was damaged
    (a truncated file, say) can still be replaced by a fresh save.
    """
    try:
        with open(shard, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if size > MAX_HEADER_BYTES:
                return False
            header = json.loads(f.read(size))
    except (OSError, ValueError):
        return False
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return isinstance(metadata, dict) and (WRITER_KEY in metadata or NATIVE_KEY in metadata)


def model_sources(model: object) -> list[Path]:
    """The local folders ``model`` was loaded from (Hugging Face's ``name_or_path``)."""
    config = getattr(model, "config", None)
    names = {getattr(model, "name_or_path", None), getattr(config, "_name_or_path", None)}
    return [Path(n) for n in names if isinstance(n, str) and n and Path(n).is_dir()]


def resolve_save_target(
    directory: str | Path, *, overwrite: bool = False, sources: Iterable[str | Path] = ()
) -> SaveTarget:
    """Check that a save may write ``directory``; refuse with a clear reason otherwise.

    Called before any work is done, so that a refused save costs nothing and touches
    nothing.  ``sources`` are folders the model came from: never written, even with
    ``overwrite``.
    """
    given = Path(directory)
    if given.is_symlink() and not given.exists():
        raise CheckpointError(f"{given} is a symlink to nothing; remove it or save elsewhere")
    path = given.resolve()
    for source in sources:
        source = Path(source).resolve()
        if path == source or (source.is_file() and path == source.parent):
            raise CheckpointError(
                f"refusing to save into {given}: the model was loaded from there; "
                "choose another folder"
            )
    if not path.exists():
        return SaveTarget(path, merge=False)
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise CheckpointError(f"{given}: cannot inspect it ({exc})") from None
    if not stat.S_ISDIR(mode):
        raise CheckpointError(f"{given} exists and is not a directory")
    if not any(path.iterdir()) or _written_by_us(path):
        return SaveTarget(path, merge=False)
    if not overwrite:
        raise CheckpointError(
            f"refusing to overwrite {given}: it is not empty and not a checkpoint torchquant "
            "wrote; pass overwrite=True (CLI: --overwrite) to replace only its checkpoint files "
            "(config.json, *.safetensors, the index and tokenizer files), or choose another folder"
        )
    return SaveTarget(path, merge=True)


def check_tensors_to_save(tensors: Mapping[str, torch.Tensor]) -> None:
    """Every tensor must be materialised and finite: a save never writes a broken model."""
    for name, t in tensors.items():
        if t.device.type == "meta":
            raise CheckpointError(f"tensor {name!r} is on the meta device; load it before saving")
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t.float()).all():
            raise CheckpointError(f"tensor {name!r} holds NaN/Inf; refusing to save it")


def check_replaceable(target: Path, staged: Iterable[str]) -> None:
    """In a merge, each staged file may only replace a regular checkpoint file of that name."""
    for name in staged:
        existing = target / name
        if not os.path.lexists(existing):
            continue
        if not is_checkpoint_file(name) or existing.is_symlink() or not existing.is_file():
            raise CheckpointError(
                f"refusing to overwrite {existing}: not a checkpoint file this save may replace"
            )
