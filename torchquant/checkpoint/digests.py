"""Content digests that let a checkpoint prove it is the one that was saved.

Header checks catch files that are malformed; they cannot see a flipped bit in a
tensor's bytes or an edited metadata value that is still well-formed.  Each shard
therefore records a BLAKE2b digest of every tensor it holds and of its own
torchquant metadata, plus one of ``config.json`` when the save wrote one, and
loading compares them before any value is trusted.  Digests guard against
corruption (a torn copy, a bad disk, a careless edit), not against an author who
recomputes them: the structural checks still apply to every file.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import torch

from torchquant.checkpoint.files import read_small_file
from torchquant.errors import CheckpointError

DIGEST_BYTES = 16


def digest_bytes(data: bytes | memoryview) -> str:
    return hashlib.blake2b(data, digest_size=DIGEST_BYTES).hexdigest()


def digest_tensor(t: torch.Tensor) -> str:
    """Digest of a CPU tensor's raw bytes in row-major order (no copy when contiguous)."""
    raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
    return digest_bytes(memoryview(raw.numpy()))


def digest_metadata(metadata: Mapping[str, str], skip: str) -> str:
    """Digest of all metadata entries except ``skip`` (the field holding the digests)."""
    canonical = json.dumps({k: v for k, v in metadata.items() if k != skip}, sort_keys=True)
    return digest_bytes(canonical.encode())


def shard_digests(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], key: str, config_json: str
) -> str:
    """The JSON value of the digest field for one shard."""
    record = {
        "tensors": {name: digest_tensor(t) for name, t in tensors.items()},
        "metadata": digest_metadata(metadata, key),
    }
    if config_json:
        record["config.json"] = digest_bytes(config_json.encode())
    return json.dumps(record, sort_keys=True)


def parse_digests(where: str, metadata: Mapping[str, str], key: str) -> dict:
    """The shard's digest record, shape-checked; refuses a missing or malformed one."""
    raw = metadata.get(key)
    if raw is None:
        raise CheckpointError(f"{where}: metadata has no {key!r}; cannot verify the contents")
    try:
        record = json.loads(raw)
    except ValueError as exc:
        raise CheckpointError(
            f"{where}: metadata field {key!r} is not valid JSON ({exc})"
        ) from None
    tensors = record.get("tensors") if isinstance(record, dict) else None
    fields_ok = (
        isinstance(tensors, dict)
        and all(isinstance(v, str) for v in tensors.values())
        and isinstance(record.get("metadata"), str)
        and isinstance(record.get("config.json", ""), str)
        and set(record) <= {"tensors", "metadata", "config.json"}
    )
    if not fields_ok:
        raise CheckpointError(f"{where}: metadata field {key!r} is malformed")
    return record


def check_metadata_digest(where: str, metadata: Mapping[str, str], record: dict, key: str) -> None:
    if digest_metadata(metadata, key) != record["metadata"]:
        raise CheckpointError(
            f"{where}: torchquant metadata does not match its digest (edited or corrupted)"
        )


def check_tensor_digests(where: str, tensors: Mapping[str, torch.Tensor], record: dict) -> None:
    expected = record["tensors"]
    if set(expected) != set(tensors):
        raise CheckpointError(f"{where}: digests list other tensors than the file holds")
    for name, t in tensors.items():
        if digest_tensor(t) != expected[name]:
            raise CheckpointError(
                f"{where}: tensor {name!r} does not match its digest (corrupted data)"
            )


def check_config_json_digest(directory: Path, record: dict) -> None:
    """``config.json`` must be the file the save wrote, when the save wrote one."""
    want = record.get("config.json")
    if want is None:
        return
    if digest_bytes(read_small_file(directory / "config.json", "config.json")) != want:
        raise CheckpointError("config.json: does not match its digest (edited or corrupted)")
