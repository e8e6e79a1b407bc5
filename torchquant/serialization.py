"""Save and load quantized models as safetensors (the native format).

The format itself is :mod:`torchquant.formats.native`; the checkpoint folder machinery
it uses (shards, checks, digests) is :mod:`torchquant.checkpoint`.
"""

from torchquant.checkpoint.folder import DEFAULT_MAX_SHARD_BYTES, INDEX_FILE, SINGLE_FILE
from torchquant.formats.native import (
    FORMAT_VERSION,
    KEY_ALIASES,
    KEY_CONFIG,
    KEY_DIGESTS,
    KEY_LAYERS,
    KEY_MODEL_CLASS,
    KEY_VERSION,
    checkpoint_files,
    layer_specs,
    load_quantized,
    read_metadata,
    save_quantized,
)

__all__ = [
    "DEFAULT_MAX_SHARD_BYTES",
    "FORMAT_VERSION",
    "INDEX_FILE",
    "KEY_ALIASES",
    "KEY_CONFIG",
    "KEY_DIGESTS",
    "KEY_LAYERS",
    "KEY_MODEL_CLASS",
    "KEY_VERSION",
    "SINGLE_FILE",
    "checkpoint_files",
    "layer_specs",
    "load_quantized",
    "read_metadata",
    "save_quantized",
]
