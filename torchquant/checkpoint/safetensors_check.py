"""Validate a safetensors file from its raw bytes before anything trusts it.

The safetensors library already refuses many broken files, but it reports them
as opaque errors, it only checks what it needs to map the file, and it does so
after a caller has committed to reading.  Here the header is parsed by hand,
bounded, and every entry checked (known dtype, shape, offsets inside the data
section, no overlaps or gaps, byte length matching the shape) so that a
checkpoint that lies about its sizes is refused with the file and tensor named,
before a single tensor is allocated.
"""

from __future__ import annotations

import json
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from torchquant.errors import CheckpointError

MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library's own ceiling
MAX_NDIM = 8
# strides and element counts are int64 in torch: every dim counted as at least 1 must fit
MAX_SPAN = 2**62
HEADER_PREFIX_BYTES = 8

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as the header declares it; offsets are relative to the data section."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated header: its entries in file order and its string metadata."""

    path: Path
    entries: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_bytes: int


def physical_memory_bytes() -> int:
    """Installed RAM, the default ceiling for what one checkpoint may declare."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 2**40


def open_regular_file(path: Path, what: str) -> BinaryIO:
    """``path`` opened for reading, refused unless it is a regular file.

    A FIFO or device named as part of a checkpoint would block ``open`` or a read
    forever; the file is checked with ``stat`` first, opened without blocking, and
    checked again on the open descriptor (the name may have been swapped in between).
    """
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise CheckpointError(f"{what}: {path.name} is not a regular file (FIFO, device?)")
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise CheckpointError(f"{what}: {path.name} is missing") from None
    except OSError as exc:
        raise CheckpointError(f"{what}: cannot open {path.name} ({exc})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CheckpointError(f"{what}: {path.name} is not a regular file (FIFO, device?)")
    return os.fdopen(fd, "rb")


def _refuse_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise CheckpointError(f"duplicate key {key!r} in the header")
        out[key] = value
    return out


def _parse_entry(where: str, name: str, raw: object) -> TensorEntry:
    if not isinstance(raw, dict):
        raise CheckpointError(f"{where}: tensor {name!r}: entry must be an object, got {raw!r}")
    unknown = sorted(set(raw) - {"dtype", "shape", "data_offsets"})
    missing = sorted({"dtype", "shape", "data_offsets"} - set(raw))
    if missing or unknown:
        raise CheckpointError(
            f"{where}: tensor {name!r}: entry fields must be dtype, shape, data_offsets "
            f"(missing {missing}, unknown {unknown})"
        )
    dtype = SAFETENSORS_DTYPES.get(raw["dtype"]) if isinstance(raw["dtype"], str) else None
    if dtype is None:
        raise CheckpointError(
            f"{where}: tensor {name!r}: dtype {raw['dtype']!r} is not one of "
            f"{sorted(SAFETENSORS_DTYPES)}"
        )
    shape = raw["shape"]
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_NDIM
        or not all(type(d) is int and d >= 0 for d in shape)
    ):
        raise CheckpointError(
            f"{where}: tensor {name!r}: shape {shape!r} must be a list of at most {MAX_NDIM} "
            "non-negative ints"
        )
    if math.prod(max(d, 1) for d in shape) > MAX_SPAN:
        raise CheckpointError(
            f"{where}: tensor {name!r}: shape {shape} is larger than any tensor can be "
            f"(the dims multiply past {MAX_SPAN}, even where one of them is 0)"
        )
    offsets = raw["data_offsets"]
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise CheckpointError(
            f"{where}: tensor {name!r}: data_offsets {offsets!r} must be [begin, end] with "
            "0 <= begin <= end"
        )
    itemsize = torch.empty((), dtype=dtype).element_size()
    expected = math.prod(shape) * itemsize
    if offsets[1] - offsets[0] != expected:
        raise CheckpointError(
            f"{where}: tensor {name!r}: {raw['dtype']} {tuple(shape)} needs {expected} bytes but "
            f"data_offsets {offsets} span {offsets[1] - offsets[0]}"
        )
    return TensorEntry(name, dtype, tuple(shape), offsets[0], offsets[1])


def _parse_metadata(where: str, raw: object) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in raw.items()
    ):
        raise CheckpointError(f"{where}: __metadata__ must map strings to strings")
    return dict(raw)


def check_safetensors(path: str | Path, *, memory_budget: int | None = None) -> SafetensorsHeader:
    """Parse and validate the header of the safetensors file at ``path``.

    Raises :class:`CheckpointError` naming the file (and tensor) for a truncated or
    oversized header, bad JSON, an unknown dtype, a shape that disagrees with its
    byte range, offsets that overlap, leave gaps or run past the file, trailing
    bytes, non-string metadata, or declared tensors totalling more than
    ``memory_budget`` bytes (default: installed RAM).  Reads only the header.
    """
    path = Path(path)
    where = path.name
    budget = physical_memory_bytes() if memory_budget is None else memory_budget
    try:
        with open_regular_file(path, where) as f:
            file_size = os.fstat(f.fileno()).st_size
            prefix = f.read(HEADER_PREFIX_BYTES)
            if len(prefix) < HEADER_PREFIX_BYTES:
                raise CheckpointError(
                    f"{where}: {file_size} bytes is too short for a safetensors header"
                )
            header_len = int.from_bytes(prefix, "little")
            if header_len > MAX_HEADER_BYTES:
                raise CheckpointError(
                    f"{where}: header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit"
                )
            if HEADER_PREFIX_BYTES + header_len > file_size:
                raise CheckpointError(
                    f"{where}: header length {header_len} runs past the end of the "
                    f"{file_size}-byte file (truncated?)"
                )
            header_raw = f.read(header_len)
    except OSError as exc:
        raise CheckpointError(f"{where}: cannot read ({exc})") from None
    try:
        header = json.loads(header_raw.decode("utf-8"), object_pairs_hook=_refuse_duplicate_keys)
    except CheckpointError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{where}: header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: header must be a JSON object")
    metadata = _parse_metadata(where, header.pop("__metadata__", None))
    entries = [_parse_entry(where, name, raw) for name, raw in header.items()]
    data_bytes = file_size - HEADER_PREFIX_BYTES - header_len
    # -- the byte ranges must tile the data section exactly: no overlap, no gap, no tail
    cursor = 0
    for entry in sorted(entries, key=lambda e: (e.start, e.end)):
        if entry.start != cursor:
            problem = "overlaps the previous tensor" if entry.start < cursor else "leaves a gap"
            raise CheckpointError(
                f"{where}: tensor {entry.name!r}: data_offsets [{entry.start}, {entry.end}] "
                f"{problem} (expected to start at {cursor})"
            )
        cursor = entry.end
    if cursor > data_bytes:
        raise CheckpointError(
            f"{where}: tensors declare {cursor} bytes but the file holds {data_bytes} after the "
            "header (truncated?)"
        )
    if cursor < data_bytes:
        raise CheckpointError(
            f"{where}: {data_bytes - cursor} trailing byte(s) after the last tensor"
        )
    if cursor > budget:
        raise CheckpointError(
            f"{where}: tensors declare {cursor} bytes, more than the memory budget of "
            f"{budget} bytes"
        )
    return SafetensorsHeader(path, {e.name: e for e in entries}, metadata, data_bytes)
