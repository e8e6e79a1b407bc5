"""The same model and config keep writing the same checkpoint: digests pinned per scheme and format.

Every scheme, algorithm and format is saved from a small seeded Llama (one layer whose
input does not divide the group, so partial groups are covered) and each checkpoint
is reduced to one digest of its tensors (name, dtype, shape, bytes), the torchquant
metadata of native shards and ``config.json``'s ``quantization_config``.  A change to
any of them fails here; when a change is meant, regenerate the pins with
``TORCHQUANT_PIN_DIGESTS=1 python -m pytest tests/checkpoint/test_checkpoint_digests.py`` and say
why in the commit.

AWQ and SmoothQuant store scales computed from float32 forward passes, whose last bits
depend on the CPU (PyTorch picks AVX2 or AVX-512 kernels for its reductions at run time),
and GPTQ onto the E4M3 grid of block-wise FP8 rounds weights that its float32 Hessian
solve has updated, and those float32 kernels (MKL's GEMM and Cholesky among them) round
differently from one CPU model to another: two AVX2 CPUs seen write different ones, while
GPTQ's integer-grid checkpoints agree on every CPU seen.  Their checkpoints are
bit-identical on one machine, and their pins may list one digest per kind of machine seen
(``TORCHQUANT_PIN_DIGESTS=add`` adds this machine's).  Every other pin is a single digest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny_models import tiny_llama

from torchquant import (
    ActivationQuant,
    QuantConfig,
    QuantScheme,
    TorchquantError,
    WeightQuant,
    convert_model,
    scheme_from_name,
)
from torchquant.formats.dispatch import FORMATS, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

PINS = Path(__file__).with_name("data") / "checkpoint_digests.json"
SCHEMES = {
    "w8a16": dict(name="w8a16"),
    "w8a16-g32": dict(name="w8a16", group_size=32),
    "w4a16-g32": dict(name="w4a16", group_size=32),
    "w4a16-g32-sym": dict(name="w4a16", group_size=32, symmetric=True),
    "w4a16-g64": dict(name="w4a16", group_size=64),  # 96 = 1.5 x 64: a partial group
    "w3a16-g32": dict(name="w3a16", group_size=32),
    "w2a16-g32-sym": dict(name="w2a16", group_size=32, symmetric=True),
    "w8a16-fp8": dict(name="w8a16-fp8"),
    "w8a8": dict(name="w8a8"),
    "fp8": dict(name="fp8"),
    "nvfp4a16": dict(name="nvfp4a16"),
    "nvfp4a16-mse": dict(name="nvfp4a16-mse"),
    "mxfp4a16": dict(name="mxfp4a16"),
    "mxfp4a16-mse": dict(name="mxfp4a16-mse"),
    "nvfp4": dict(name="nvfp4"),
    # -- NVFP4 activations with a calibrated global scale (what compressed-tensors stores)
    "nvfp4-static": dict(
        scheme=QuantScheme(WeightQuant("nvfp4"), ActivationQuant("nvfp4", dynamic=False))
    ),
    "mxfp4": dict(name="mxfp4"),
    "mxfp8": dict(name="mxfp8"),
    "fp8-block": dict(name="fp8-block"),  # 96 and 128 wide: one partial 128x128 block
    "w8a16-fp8-block": dict(name="w8a16-fp8-block"),
    "fp8-block-mse": dict(name="fp8-block-mse"),
}
CALIBRATED = {"gptq": "w4a16-g32-sym", "awq": "w4a16-g32", "smoothquant": "w8a8"}
# -- the cases whose pins may list one digest per kind of CPU (see the module docstring)
CPU_DEPENDENT = {"awq", "smoothquant", "gptq:fp8-block", "gptq:w8a16-fp8-block"}
# -- the algorithms on the FP4 grids (block scales fixed first)
CALIBRATED_FP4 = [("gptq", "nvfp4a16"), ("gptq", "mxfp4a16"), ("awq", "nvfp4a16")]
# -- GPTQ on the E4M3 grid of block-wise FP8 (block scales fixed first)
CALIBRATED_FP8_BLOCK = [("gptq", "fp8-block"), ("gptq", "w8a16-fp8-block")]


def cpu_dependent(key: str) -> bool:
    """Whether the pin of ``key`` (``algorithm:scheme/format``) may list several digests."""
    case = key.partition("/")[0]
    return case in CPU_DEPENDENT or case.partition(":")[0] in CPU_DEPENDENT


def allowed(pin: str | list[str] | None) -> list[str]:
    """The digests a pin accepts: one, or one per kind of CPU (:func:`cpu_dependent`)."""
    return [] if pin is None else pin if isinstance(pin, list) else [pin]


def digest_folder(folder: Path) -> str:
    h = hashlib.sha256()
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            metadata = {k: v for k, v in (f.metadata() or {}).items() if k.startswith("torchquant")}
            metadata.pop("torchquant_writer", None)  # a marker, not part of the model
            h.update(json.dumps(metadata, sort_keys=True).encode())
            for key in sorted(f.keys()):
                t = f.get_tensor(key).contiguous()
                h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
                h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    config = json.loads((folder / "config.json").read_text())
    h.update(json.dumps(config.get("quantization_config"), sort_keys=True).encode())
    return h.hexdigest()[:32]


def build(case: str) -> torch.nn.Module:
    algorithm, _, scheme_name = case.partition(":")
    spec = dict(SCHEMES[scheme_name])
    scheme = spec.pop("scheme") if "scheme" in spec else scheme_from_name(spec.pop("name"), **spec)
    scheme = dataclasses.replace(scheme, algorithm=algorithm)
    model = tiny_llama(hidden=96, inter=128, heads=2, kv_heads=1, layers=2, seed=7)
    config = QuantConfig(default=scheme)
    if algorithm == "rtn" and not scheme.needs_calibration:
        return convert_model(model, config, progress=False)[0]
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(3))
    return convert_model(model, config, calibration_data=ids, progress=False)[0]


CASES = [f"rtn:{s}" for s in SCHEMES] + [f"{a}:{s}" for a, s in CALIBRATED.items()]
CASES += [f"{a}:{s}" for a, s in CALIBRATED_FP4 + CALIBRATED_FP8_BLOCK]


def current_digests(tmp_path: Path) -> dict[str, str]:
    out = {}
    for case in CASES:
        model = build(case)
        for fmt in FORMATS:
            folder = tmp_path / case.replace(":", "-") / fmt
            try:
                save_checkpoint(model, folder, fmt)
            except TorchquantError as exc:
                out[f"{case}/{fmt}"] = f"refused: {type(exc).__name__}"
                continue
            out[f"{case}/{fmt}"] = digest_folder(folder)
    return out


def test_checkpoints_are_bit_identical_to_the_pinned_ones(tmp_path):
    got = current_digests(tmp_path)
    mode = os.environ.get("TORCHQUANT_PIN_DIGESTS")
    if mode:
        pins: dict = dict(got)
        if mode == "add":
            pinned = json.loads(PINS.read_text())
            for key, digest in got.items():
                seen = allowed(pinned.get(key))
                if cpu_dependent(key) and seen and digest not in seen:
                    pins[key] = [*seen, digest]
                elif digest in seen:
                    pins[key] = pinned[key]
        PINS.parent.mkdir(exist_ok=True)
        PINS.write_text(json.dumps(pins, indent=1, sort_keys=True) + "\n")
    want = json.loads(PINS.read_text())
    several = sorted(k for k, v in want.items() if isinstance(v, list))
    assert all(cpu_dependent(k) for k in several), several
    changed = sorted(k for k in want.keys() | got.keys() if got.get(k) not in allowed(want.get(k)))
    assert not changed, f"{len(changed)} checkpoint(s) changed, e.g. {changed[:5]}"
    assert sum(not str(v).startswith("refused") for v in got.values()) >= 30
