"""One entry point for every checkpoint format torchquant writes and reads.

The format of a folder is read from ``config.json``'s ``quantization_config.quant_method``
(``torchquant``, ``compressed-tensors``, ``gptq``, ``awq``); a folder without one is a
native torchquant checkpoint if its safetensors metadata says so, else a plain model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from torchquant.checkpoint.folder import DEFAULT_MAX_SHARD_BYTES
from torchquant.config import QuantConfig
from torchquant.errors import CheckpointError, ConfigError
from torchquant.formats import hf_checkpoint as hf
from torchquant.formats.awq import load_awq, save_awq
from torchquant.formats.compressed_tensors import load_compressed_tensors, save_compressed_tensors
from torchquant.formats.gptq import load_gptq, save_gptq
from torchquant.formats.native import load_quantized, read_metadata, save_quantized
from torchquant.formats.serving import model_layouts, warn_if_unservable

FORMATS = ("native", "compressed-tensors", "gptq", "awq")
QUANT_METHODS = {
    "torchquant": "native",
    "compressed-tensors": "compressed-tensors",
    "gptq": "gptq",
    "awq": "awq",
}


def detect_format(directory: str | Path) -> str | None:
    """``native``, ``compressed-tensors``, ``gptq``, ``awq``, or ``None`` for an unquantized folder.

    Raises :class:`CheckpointError` for a ``quant_method`` torchquant does not read.
    """

    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    config = hf.read_config(directory) if (directory / "config.json").exists() else {}
    qc = config.get("quantization_config")
    if qc is None and (directory / "quantize_config.json").exists():
        return "gptq"
    if qc is not None:
        method = qc.get("quant_method") if isinstance(qc, dict) else None
        if not isinstance(method, str) or method not in QUANT_METHODS:
            raise CheckpointError(
                f"{directory}: quantization_config.quant_method={method!r} is not a format "
                f"torchquant reads ({sorted(QUANT_METHODS)})"
            )
        return QUANT_METHODS[method]
    try:
        read_metadata(directory)
    except CheckpointError:
        return None
    return "native"


def load_checkpoint(directory: str | Path) -> nn.Module:
    """Load a quantized folder of any supported format into a model with ``QuantLinear`` layers.

    The model is built on the meta device and filled straight from the files, so no
    full-precision weight is ever materialised.
    """
    fmt = detect_format(directory)
    if fmt is None:
        raise CheckpointError(f"{directory} is not a quantized checkpoint")
    if fmt == "native":
        return load_quantized(directory)
    if fmt == "compressed-tensors":
        return load_compressed_tensors(directory)
    if fmt == "gptq":
        return load_gptq(directory)
    return load_awq(directory)


def save_checkpoint(
    model: nn.Module,
    directory: str | Path,
    fmt: str = "native",
    *,
    config: QuantConfig | None = None,
    tokenizer: Any = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> Path:
    """Save a converted model in ``fmt`` (one of :data:`FORMATS`; ``gptq`` writes version 1).

    ``overwrite`` lets a save replace the checkpoint files of a folder that holds other
    files too (see :mod:`torchquant.checkpoint.save_guard`).
    """
    if fmt not in FORMATS:
        raise ConfigError(f"format={fmt!r}: expected one of {FORMATS}")
    kw: dict[str, Any] = {
        "tokenizer": tokenizer,
        "max_shard_size": max_shard_size,
        "overwrite": overwrite,
    }
    if fmt == "native":
        return save_quantized(model, directory, config=config, **kw)
    if fmt == "compressed-tensors":
        warn_if_unservable(fmt, model_layouts(model), "4- or 8-bit weights serve")
        return save_compressed_tensors(model, directory, **kw)
    if fmt == "gptq":
        return save_gptq(model, directory, **kw)
    return save_awq(model, directory, **kw)
