"""What a checkpoint's contents must be for the model they load into.

``config.json``'s ``quantization_config`` has only known fields that agree with the
safetensors metadata, each declared tensor has the dtype and shape the layer's scheme
implies, and the layer a checkpoint describes is a linear layer of that shape.  After
loading, the values are checked too (no NaN/Inf, scales > 0, zero points in range).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchquant.checkpoint.files import read_json_file
from torchquant.checkpoint.safetensors_check import TensorEntry
from torchquant.config import QuantConfig
from torchquant.errors import CheckpointError, ConfigError
from torchquant.modules import QuantLinear
from torchquant.plan import is_linear_like

QUANTIZATION_CONFIG_FIELDS = ("quant_method", "format_version", "config")


def check_quantization_config(
    directory: Path, metadata: Mapping[str, str], format_version: int, config_key: str
) -> None:
    """Refuse a ``config.json`` whose ``quantization_config`` is unknown, newer or contradictory."""
    path = directory / "config.json"
    if not path.exists():
        return
    data = read_json_file(path, "config.json")
    if not isinstance(data, dict):
        raise CheckpointError("config.json: expected a JSON object")
    qc = data.get("quantization_config")
    if qc is None:
        return
    where = "config.json: quantization_config"
    if not isinstance(qc, dict):
        raise CheckpointError(f"{where} must be an object, got {type(qc).__name__}")
    unknown = sorted(set(qc) - set(QUANTIZATION_CONFIG_FIELDS))
    if unknown:
        raise CheckpointError(
            f"{where}: unknown field(s) {unknown}; known fields are "
            f"{list(QUANTIZATION_CONFIG_FIELDS)}"
        )
    if qc.get("quant_method") != "torchquant":
        raise CheckpointError(
            f"{where}: quant_method={qc.get('quant_method')!r} is not 'torchquant'"
        )
    version = qc.get("format_version")
    if type(version) is not int or version < 1:
        raise CheckpointError(f"{where}: format_version={version!r} is not a positive int")
    if version > format_version:
        raise CheckpointError(
            f"{where}: format_version={version} is newer than this torchquant reads "
            f"({format_version}); upgrade torchquant"
        )
    if str(version) != metadata.get("torchquant_format_version"):
        raise CheckpointError(
            f"{where}: format_version={version} contradicts the safetensors metadata "
            f"({metadata.get('torchquant_format_version')!r})"
        )
    stored = metadata.get(config_key)
    stored_config = json.loads(stored) if stored is not None else None
    if "config" in qc and qc["config"] is not None and qc["config"] != stored_config:
        raise CheckpointError(f"{where}: 'config' contradicts the safetensors metadata")
    if qc.get("config") is not None:
        try:
            QuantConfig.from_dict(qc["config"])
        except (ConfigError, TypeError) as exc:
            raise CheckpointError(f"{where}: 'config' is not a valid QuantConfig: {exc}") from None


def check_declared(
    expected: Mapping[str, torch.Tensor],
    declared: Mapping[str, TensorEntry | torch.Tensor],
    verb: str = "declares",
) -> None:
    """Missing/extra tensors and dtype/shape mismatches.

    ``declared`` are header entries (nothing allocated yet) or, with ``verb="has"``, the
    tensors read.
    """
    missing = sorted(set(expected) - set(declared))
    extra = sorted(set(declared) - set(expected))
    if missing:
        raise CheckpointError(f"checkpoint lacks {len(missing)} tensor(s), e.g. {missing[:5]}")
    if extra:
        raise CheckpointError(f"checkpoint has {len(extra)} unexpected tensor(s), e.g. {extra[:5]}")
    for name, entry in declared.items():
        want = expected[name]
        if tuple(entry.shape) != tuple(want.shape) or entry.dtype != want.dtype:
            raise CheckpointError(
                f"tensor {name!r}: checkpoint {verb} {entry.dtype} {tuple(entry.shape)}, the "
                f"layer's scheme expects {want.dtype} {tuple(want.shape)}"
            )


def _has_nonfinite(t: torch.Tensor) -> bool:
    if t.dtype == torch.float8_e4m3fn:  # no Inf; NaN is S.1111.111
        return bool(((t.view(torch.uint8) & 0x7F) == 0x7F).any())
    if t.dtype == torch.float8_e5m2:
        return bool(((t.view(torch.uint8) & 0x7C) == 0x7C).any())
    return bool((~torch.isfinite(t)).any())


def check_scales(name: str, scales: torch.Tensor) -> None:
    """Scales a correct save writes: floating point, finite and positive, every one of them.

    An integer scale would be read as a float silently, a zero one turns the layer's
    output into zeros or NaN, a negative one flips it; all are refused.
    """
    if not scales.is_floating_point():
        raise CheckpointError(
            f"tensor {name!r}: scales are {scales.dtype}; they must be floating point"
        )
    if _has_nonfinite(scales):
        raise CheckpointError(f"tensor {name!r}: holds a NaN/Inf scale; refusing to load it")
    if scales.numel() and not bool((scales.float() > 0).all()):
        raise CheckpointError(
            f"tensor {name!r}: holds a scale <= 0 ({float(scales.float().min()):.3g}); every "
            "scale must be positive"
        )


def check_zero_points(name: str, zeros: torch.Tensor, low: int, high: int) -> None:
    """Zero points are integers in ``[low, high]`` (the code range of the layer's bits)."""
    if zeros.is_floating_point() or zeros.is_complex() or zeros.dtype == torch.bool:
        raise CheckpointError(
            f"tensor {name!r}: zero points are {zeros.dtype}; they must be integers"
        )
    if zeros.numel():
        lo, hi = int(zeros.min()), int(zeros.max())
        if lo < low or hi > high:
            raise CheckpointError(
                f"tensor {name!r}: zero points span {lo}..{hi}, outside [{low}, {high}]"
            )


def check_loaded_values(state: Mapping[str, torch.Tensor], model: nn.Module) -> None:
    """Values a correct save never writes: NaN/Inf, scales <= 0, zero points beyond the bits."""
    for name, t in state.items():
        if t.is_floating_point() and _has_nonfinite(t):
            raise CheckpointError(f"tensor {name!r} holds NaN/Inf; refusing to load it")
    for prefix, module in model.named_modules():
        scheme = getattr(module, "scheme", None)
        if scheme is None:
            continue
        for field in ("scales", "input_scale", "smooth_scale"):
            key = f"{prefix}.{field}" if prefix else field
            t = state.get(key)
            if t is not None and t.numel() and not bool((t.float() > 0).all()):
                raise CheckpointError(
                    f"tensor {key!r}: holds a scale <= 0 ({float(t.float().min()):.3g}); every "
                    "scale must be positive"
                )
        g_idx = state.get(f"{prefix}.g_idx" if prefix else "g_idx")
        groups = getattr(module, "scales", None)
        if g_idx is not None and groups is not None and g_idx.numel():
            lo, hi = int(g_idx.min()), int(g_idx.max())
            if lo < 0 or hi >= groups.shape[-1]:
                raise CheckpointError(
                    f"tensor {prefix}.g_idx: group indices span {lo}..{hi}, the layer has "
                    f"{groups.shape[-1]} groups"
                )
        zeros = state.get(f"{prefix}.zeros" if prefix else "zeros")
        if zeros is None or scheme.weight.type != "int":
            continue
        limit = (1 << scheme.weight.bits) - 1
        if zeros.numel() and int(zeros.max()) > limit:
            raise CheckpointError(
                f"tensor {prefix}.zeros: zero point {int(zeros.max())} exceeds {limit} for "
                f"{scheme.weight.bits}-bit weights"
            )


def check_aliases(raw: object) -> dict[str, str]:
    """Tied-tensor aliases must map tensor names to tensor names."""
    if not isinstance(raw, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in raw.items()
    ):
        raise CheckpointError("metadata field 'torchquant_aliases' must map names to names")
    return raw


def check_layer_fits(name: str, module: nn.Module, spec: Any) -> None:
    """The model's layer at ``name`` is a linear layer of the shape the checkpoint describes."""
    if isinstance(module, QuantLinear):
        shape = (module.out_features, module.in_features)
    elif is_linear_like(module):
        shape = tuple(module.weight.shape)
        if not isinstance(module, nn.Linear):  # GPT-2 Conv1D stores (in, out)
            shape = shape[::-1]
    else:
        raise CheckpointError(
            f"layer {name!r}: the model has a {type(module).__name__} there, not a linear layer"
        )
    if shape != (spec.out_features, spec.in_features):
        raise CheckpointError(
            f"layer {name!r}: checkpoint describes {spec.out_features}x{spec.in_features}, the "
            f"model's layer is {shape[0]}x{shape[1]}"
        )
