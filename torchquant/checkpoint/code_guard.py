"""Refuse model folders whose files would make transformers import, fetch or run code.

transformers runs a folder's Python when a config names it (``auto_map``; with
``trust_remote_code`` it asks on a terminal first), and fetches kernels from the Hub
when ``attn_implementation`` (or ``experts_implementation``) names a repository.  A
folder is data to torchquant: such fields are refused up front, before transformers
reads the folder, and so are files that lead outside it or are not regular files.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from torchquant.checkpoint.files import read_json_file
from torchquant.errors import CheckpointError

# -- the JSON files transformers reads from a model folder to pick its classes
CONFIG_FILES = (
    "config.json",
    "tokenizer_config.json",
    "generation_config.json",
    "processor_config.json",
    "preprocessor_config.json",
    "special_tokens_map.json",
)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
# -- implementations transformers ships itself; anything else may be fetched
LOCAL_IMPLEMENTATIONS = {
    "attn_implementation": {"eager", "sdpa", "flex_attention", "paged|eager"},
    "experts_implementation": {"eager", "grouped_mm", "batched_mm"},
}
CODE_KEYS = ("auto_map", "custom_pipelines")


def _implementation_kind(key: str) -> str | None:
    bare = key.lstrip("_").removesuffix("_internal")
    return bare if bare in LOCAL_IMPLEMENTATIONS else None


def check_config_data(data: Any, where: str) -> None:
    """Refuse any field, at any depth, that would make transformers load code."""
    if isinstance(data, list):
        for i, item in enumerate(data):
            check_config_data(item, f"{where}[{i}]")
        return
    if not isinstance(data, dict):
        return
    for key, value in data.items():
        field = f"{where}.{key}"
        if key in CODE_KEYS:
            raise CheckpointError(
                f"{field}: names custom code; torchquant never runs code from a model folder"
            )
        kind = _implementation_kind(str(key))
        if kind is not None and value is not None:
            choices = value.values() if isinstance(value, dict) else [value]
            for choice in choices:
                if choice is not None and choice not in LOCAL_IMPLEMENTATIONS[kind]:
                    allowed = sorted(LOCAL_IMPLEMENTATIONS[kind])
                    raise CheckpointError(
                        f"{field}={choice!r}: not an implementation transformers ships (would be "
                        f"fetched or imported); expected one of {allowed}"
                    )
        check_config_data(value, field)


def _check_plain_file(folder: Path, name: str) -> None:
    path = folder / name
    try:
        real = path.resolve(strict=True)
        mode = os.stat(real).st_mode
    except (OSError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc})") from None
    if real.parent != folder.resolve():
        raise CheckpointError(f"{path}: is a symlink leading outside {folder}")
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{path}: not a regular file")


def _check_file_references(data: Any, folder: Path, where: str) -> None:
    """``*_file`` fields of a tokenizer config may only name files inside the folder."""
    if not isinstance(data, dict):
        return
    for key, value in data.items():
        if isinstance(key, str) and key.endswith("_file") and isinstance(value, str):
            if Path(value).name != value or value in ("", ".", ".."):
                raise CheckpointError(f"{where}.{key}={value!r}: must name a file inside {folder}")


def refuse_folder_code(folder: str | Path) -> None:
    """Check a folder before transformers reads it: no code, no fetching, no way out."""
    folder = Path(folder)
    for name in CONFIG_FILES:
        if os.path.lexists(folder / name):
            data = read_json_file(folder / name, name)
            check_config_data(data, name)
            if name == "tokenizer_config.json":
                _check_file_references(data, folder, name)
    for name in TOKENIZER_FILES:
        if os.path.lexists(folder / name):
            _check_plain_file(folder, name)


def has_tokenizer(folder: str | Path) -> bool:
    """Whether the folder holds files a tokenizer is built from."""
    names = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")
    return any(os.path.lexists(Path(folder) / n) for n in (*names, "tokenizer_config.json"))
