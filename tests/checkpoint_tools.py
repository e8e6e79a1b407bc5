"""Helpers for tests that build small checkpoints and then damage them.

``write_safetensors`` writes a file from a raw header dict and data bytes, so a
test can produce headers the safetensors library would never write.  ``reseal``
recomputes a shard's digests after an edit: it plays an author who tampers on
purpose, so that the checks behind the digests are exercised too.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_models import tiny_llama
from torch import nn

from torchquant import QuantConfig, convert_model
from torchquant.checkpoint.digests import digest_bytes, shard_digests
from torchquant.serialization import KEY_DIGESTS, save_quantized

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
