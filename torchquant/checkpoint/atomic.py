"""Crash-safe directory writes: build a checkpoint aside, then swap it in atomically."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from torchquant.checkpoint.save_guard import check_replaceable, is_checkpoint_file

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def fsync_path(path: Path) -> None:
    """Flush a file's (or directory's) contents and metadata to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux ``renameat2(RENAME_EXCHANGE)``; False if unsupported."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


@contextmanager
def staged_directory(target: Path, *, merge: bool = False) -> Iterator[Path]:
    """Yield an empty staging directory beside ``target``; on success it replaces ``target``.

    Every file in the staging directory is fsynced before the swap.  If the body
    raises (or the process dies), ``target`` is untouched and the partial staging
    directory is removed (or left as a hidden ``.NAME.partial-*`` folder).

    With ``merge`` the folder itself stays: the staged files replace the checkpoint
    files in it one by one (old shards the new checkpoint lacks are removed), and
    every other file is left alone.  That step is not atomic.
    """
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
        for f in staging.iterdir():
            fsync_path(f)
        fsync_path(staging)
        if merge:
            _merge_into(staging, target)
        elif target.exists() and _exchange(staging, target):
            shutil.rmtree(staging)  # now holds the previous checkpoint
        else:
            if target.exists():
                old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
                os.rename(target, old)
                os.rename(staging, target)
                shutil.rmtree(old)
            else:
                os.rename(staging, target)
        fsync_path(target.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _merge_into(staging: Path, target: Path) -> None:
    """Move the staged checkpoint files into ``target``, dropping its stale checkpoint files."""
    staged = sorted(p.name for p in staging.iterdir())
    check_replaceable(target, staged)
    for entry in target.iterdir():
        if entry.name not in staged and is_checkpoint_file(entry.name):
            if entry.is_symlink() or entry.is_file():
                entry.unlink()
    # -- config.json last: until it lands, the folder does not look like the new checkpoint
    for name in sorted(staged, key=lambda n: n == "config.json"):
        os.replace(staging / name, target / name)
    staging.rmdir()
    fsync_path(target)
