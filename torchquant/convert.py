"""``convert_model``: replace a model's linear layers by ``QuantLinear`` as the config says."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from torchquant.config import QuantConfig, QuantScheme
from torchquant.errors import ConfigError, QuantizationError
from torchquant.matching import first_match
from torchquant.modules import QatLinear, QuantLinear


def is_linear_like(module: nn.Module) -> bool:
    """``nn.Linear`` or transformers' GPT-2 ``Conv1D`` (a linear with a transposed weight)."""
    if isinstance(module, nn.Linear):
        return True
    return type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None


def _tensor_bytes(module: nn.Module) -> int:
    tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


@dataclass
class ConversionSummary:
    """What ``convert_model`` did: converted layers with their scheme, skipped ones with why."""

    converted: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    bytes_before: int = 0
    bytes_after: int = 0

    def table(self) -> str:
        ratio = self.bytes_before / self.bytes_after if self.bytes_after else float("nan")
        lines = [
            f"converted {len(self.converted)} layer(s), skipped {len(self.skipped)}",
            f"linear weights: {self.bytes_before / 2**20:.1f} MiB -> "
            f"{self.bytes_after / 2**20:.1f} MiB ({ratio:.2f}x smaller)",
        ]
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def plan_conversion(
    model: nn.Module, config: QuantConfig
) -> dict[str, tuple[QuantScheme | None, str]]:
    """Scheme (or ``None``) and reason for every linear-like layer, in module order.

    Raises :class:`ConfigError` for an override pattern that matches no layer, since
    a typo there would otherwise silently leave layers at the default scheme.
    """
    names = [name for name, m in model.named_modules() if is_linear_like(m)]
    for pattern, _ in config.overrides:
        if not any(first_match((pattern,), n) for n in names):
            example = ", ".join(names[:3]) or "none"
            raise ConfigError(
                f"overrides: pattern {pattern!r} matches no linear layer (layers look like: "
                f"{example})"
            )
    return {name: config.resolve(name) for name in names}


@torch.no_grad()
def convert_model(
    model: nn.Module,
    config: QuantConfig,
    *,
    device: torch.device | str | None = None,
    progress: bool = True,
    calibration_data: torch.Tensor | None = None,
    offload: bool = True,
) -> tuple[nn.Module, ConversionSummary]:
    """Quantize ``model`` in place, layer by layer, round-to-nearest; returns it and a summary.

    If any layer's scheme needs calibration (an algorithm other than ``rtn`` or static
    activation scales), ``calibration_data`` (token ids ``(n, seq_len)``, see
    ``torchquant.calibration.calibration_tokens``) is run through the model block by
    block instead (``torchquant.calibration.calibrate_model``).

    Each layer is quantized on ``device`` (default: where its weight lives) and the
    result is moved back to the layer's own device, so a model larger than the
    accelerator converts one layer at a time.  The float weight of each layer is
    released as soon as its quantized replacement is in place.
    """
    if not isinstance(config, QuantConfig):
        raise ConfigError(f"config must be a QuantConfig, got {type(config).__name__}")
    plan = plan_conversion(model, config)
    needing = [n for n, (s, _) in plan.items() if s is not None and s.needs_calibration]
    if needing:
        if calibration_data is None:
            raise ConfigError(
                f"calibration_data is required: {len(needing)} layer(s) (e.g. {needing[0]!r}) "
                "use an algorithm or static activation scales that need calibration"
            )
        from torchquant.calibration.engine import calibrate_model

        summary = calibrate_model(
            model, config, calibration_data, device=device, offload=offload, progress=progress
        )
        return model, summary
    summary = ConversionSummary()
    for name, (scheme, why) in tqdm(
        plan.items(), desc="quantizing", unit="layer", disable=not progress
    ):
        layer = model.get_submodule(name)
        if isinstance(layer, QatLinear):
            # -- a QAT-trained layer keeps its learned scales (and must match the config)
            quantized = layer.to_quant_linear(name, expected=scheme)
            summary.bytes_before += _tensor_bytes(layer)
            summary.bytes_after += quantized.nbytes()
            summary.converted[name] = scheme.describe()
            _set_submodule(model, name, quantized)
            continue
        if scheme is None:
            summary.skipped[name] = why
            continue
        if layer.weight.device.type == "meta":
            raise QuantizationError(f"{name}: weight is on the meta device; load it first")
        home = layer.weight.device
        work = layer if device is None else layer.to(device)
        quantized = QuantLinear.from_linear(work, scheme, name).to(home)
        summary.bytes_before += _tensor_bytes(layer)
        summary.bytes_after += quantized.nbytes()
        summary.converted[name] = scheme.describe()
        _set_submodule(model, name, quantized)
        del layer, work
    return model, summary
