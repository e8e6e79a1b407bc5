"""Helpers for tests that build small checkpoints and then damage them.

``write_safetensors`` writes a file from a raw header dict and data bytes, so a
test can produce headers the safetensors library would never write.  ``reseal``
recomputes a shard's digests after an edit: it plays an author who tampers on
purpose, so that the checks behind the digests are exercised too.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_models import tiny_llama
from torch import nn

from torchquant import QuantConfig, convert_model
from torchquant.checkpoint.digests import digest_bytes, shard_digests
from torchquant.serialization import KEY_DIGESTS, load_quantized, save_quantized

CONFIG = QuantConfig("w4a16", overrides={"2": "w8a8", "3": "fp8"}, ignore=())


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(96, 160), nn.GELU(), nn.Linear(160, 96), nn.Linear(96, 40))


def save_small_checkpoint(directory: Path, **kwargs) -> nn.Module:
    """A converted ``make_model()`` saved to ``directory``; returns the quantized model."""
    model, _ = convert_model(make_model(), CONFIG, progress=False)
    save_quantized(model, directory, config=CONFIG, **kwargs)
    return model


def read_safetensors(path: Path) -> tuple[dict, bytes]:
    """The parsed JSON header and the data section of a safetensors file."""
    raw = Path(path).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_safetensors(path: Path, header: dict, data: bytes, header_len: int | None = None) -> None:
    """Write ``header`` (padded to 8 bytes) and ``data``; ``header_len`` overrides the prefix."""
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    prefix = len(text) if header_len is None else header_len
    Path(path).write_bytes(prefix.to_bytes(8, "little") + text + data)


def metadata_of(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata())


def reseal(path: Path, tensors: dict | None = None, metadata: dict | None = None) -> None:
    """Rewrite shard ``path`` with (edited) ``tensors``/``metadata`` and matching digests."""
    tensors = load_file(path) if tensors is None else tensors
    metadata = metadata_of(path) if metadata is None else metadata
    old = json.loads(metadata_of(path).get(KEY_DIGESTS, "{}"))
    config_json = old.get("config.json")
    meta = {k: v for k, v in metadata.items() if k != KEY_DIGESTS and v is not None}
    record = json.loads(shard_digests(tensors, meta, KEY_DIGESTS, ""))
    if config_json is not None:
        record["config.json"] = config_json
    save_file(tensors, str(path), metadata={**meta, KEY_DIGESTS: json.dumps(record)})


def edit_metadata(path: Path, **changes: str | None) -> None:
    """Change (``None``: drop) metadata fields of a shard, keeping its digests consistent."""
    meta = metadata_of(path)
    meta.update(changes)
    reseal(path, metadata={k: v for k, v in meta.items() if v is not None})


def reseal_config_json(directory: Path) -> None:
    """Record the current ``config.json`` in every shard's digests (a deliberate edit)."""
    want = digest_bytes((directory / "config.json").read_bytes())
    for shard in directory.glob("*.safetensors"):
        meta = metadata_of(shard)
        record = json.loads(meta[KEY_DIGESTS])
        record["config.json"] = want
        meta[KEY_DIGESTS] = json.dumps(record)
        save_file(load_file(shard), str(shard), metadata=meta)


def edit_config_json(folder: Path, change: Callable[[dict], object]) -> None:
    """Rewrite ``folder/config.json`` after ``change`` edits its parsed contents in place."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


def edit_quantization_config(folder: Path, change: Callable[[dict], object]) -> None:
    """:func:`edit_config_json` on the ``quantization_config`` inside ``config.json``."""
    edit_config_json(folder, lambda config: change(config["quantization_config"]))


def make_hf_model(seed: int = 0) -> nn.Module:
    """A two-layer Llama small enough to build in a fraction of a second."""
    return tiny_llama(
        vocab=64, hidden=32, inter=64, layers=2, seed=seed, max_position_embeddings=64
    )


HF_CONFIG = QuantConfig("w4a16", overrides={"re:.*mlp.*": "w8a16"})


def save_small_hf_checkpoint(directory: Path, **kwargs) -> nn.Module:
    """A converted tiny Llama (with ``config.json``) saved to ``directory``."""
    model, _ = convert_model(make_hf_model(), HF_CONFIG, progress=False)
    save_quantized(model, directory, config=HF_CONFIG, **kwargs)
    return model


@contextmanager
def scratch_copy(folder: Path) -> Iterator[Path]:
    """A copy of ``folder`` in a fresh temporary directory, removed afterwards: hypothesis runs
    many examples in one test, so ``tmp_path`` cannot give each its own."""
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(shutil.copytree(folder, Path(tmp) / folder.name, symlinks=True))


class SmallCheckpoint:
    """One saved small checkpoint of a ``kind`` (``single`` file, ``sharded`` in three, or
    ``hf``, a tiny Llama with ``config.json``) and its tensors, for tests that damage copies."""

    def __init__(self, root: Path, kind: str) -> None:
        self.kind = kind
        self.directory = root / kind
        if kind == "hf":
            model = save_small_hf_checkpoint(self.directory)
        else:
            kwargs = {"max_shard_size": 20_000} if kind == "sharded" else {}
            model = save_small_checkpoint(self.directory, **kwargs)
        self.state = {k: v.clone() for k, v in model.state_dict().items()}

    def copy(self, into: Path) -> Path:
        return Path(shutil.copytree(self.directory, into / "ck", symlinks=True))

    def load(self, directory: Path) -> nn.Module:
        """Load ``directory`` as this kind: native checkpoints load into a fresh skeleton."""
        return load_quantized(directory, None if self.kind == "hf" else make_model(1))
