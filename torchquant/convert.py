"""``convert_model``: replace a model's linear layers by ``QuantLinear`` as the config says.

Fused mixture-of-experts modules (transformers 5.x keeps experts as 3-D parameters)
are first split into per-expert linears (``QuantExperts``), which then convert like
any other linear.  The config sees them as ``<experts>.<e>.gate_proj``, ``.up_proj``
and ``.down_proj``; a pattern naming the experts module (``model.layers.0.mlp.experts``)
or its fused attribute (``<experts>.gate_up_proj``, ``<experts>.down_proj``) applies
to each of them too.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from torchquant.config import QuantConfig, QuantScheme
from torchquant.conversion_guards import ModelSnapshot, check_before_conversion
from torchquant.errors import ConfigError, QuantizationError
from torchquant.matching import first_match
from torchquant.modules import QatLinear, QuantExperts, QuantLinear
from torchquant.modules.quant_experts import (
    expert_linear_aliases,
    fused_experts_layout,
    holds_fused_experts,
    layout_named,
)
from torchquant.offload import carry_hook, execution_device, is_offloaded, onloaded


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
    split_experts: dict[str, int] = field(default_factory=dict)

    def table(self) -> str:
        ratio = self.bytes_before / self.bytes_after if self.bytes_after else float("nan")
        lines = [f"converted {len(self.converted)} layer(s), skipped {len(self.skipped)}"]
        if self.split_experts:
            lines.append(
                f"split {len(self.split_experts)} fused experts module(s) into "
                f"{3 * sum(self.split_experts.values())} per-expert linears"
            )
        lines += [
            f"linear weights: {self.bytes_before / 2**20:.1f} MiB -> "
            f"{self.bytes_after / 2**20:.1f} MiB ({ratio:.2f}x smaller)",
        ]
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def _expert_aliases(
    model: nn.Module,
) -> tuple[dict[str, tuple[str, ...]], dict[str, dict[str, tuple[str, ...]]]]:
    """Config aliases of the per-expert linears: of split modules and of still-fused ones.

    Returns ``{linear name: aliases}`` for ``QuantExperts`` children and, for each fused
    experts module of a known layout, the same mapping for the linears it would split into.
    """
    split: dict[str, tuple[str, ...]] = {}
    fused: dict[str, dict[str, tuple[str, ...]]] = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantExperts):
            layout, num, target = layout_named(module.layout), module.num_experts, split
        elif holds_fused_experts(module) and fused_experts_layout(module) is not None:
            layout = fused_experts_layout(module)
            num, target = getattr(module, layout.gate_up).shape[0], fused.setdefault(name, {})
        else:
            continue
        prefix = f"{name}." if name else ""
        for rel, aliases in expert_linear_aliases(num, layout).items():
            target[prefix + rel] = tuple(f"{prefix}{a}" if a else name for a in aliases)
    return split, fused


def plan_conversion(
    model: nn.Module, config: QuantConfig
) -> dict[str, tuple[QuantScheme | None, str]]:
    """Scheme (or ``None``) and reason for every linear-like layer, in module order.

    Per-expert linears of a split experts module also answer to the names of the
    experts module and of the fused weight they came from (see the module docstring).
    Raises :class:`ConfigError` for an override pattern that matches no layer, since
    a typo there would otherwise silently leave layers at the default scheme.
    """
    split, fused = _expert_aliases(model)
    names = [name for name, m in model.named_modules() if is_linear_like(m)]
    candidates = {name: (name, *split.get(name, ())) for name in names}
    for per_module in fused.values():
        candidates.update({n: (n, *aliases) for n, aliases in per_module.items()})
    for pattern, _ in config.overrides:
        if not any(first_match((pattern,), n) for c in candidates.values() for n in c):
            example = ", ".join(names[:3]) or "none"
            raise ConfigError(
                f"overrides: pattern {pattern!r} matches no linear layer (layers look like: "
                f"{example})"
            )
    return {name: config.resolve(name, split.get(name, ())) for name in names}


def split_fused_experts(
    model: nn.Module, why_not: Callable[[dict[str, tuple[str, ...]]], str | None]
) -> dict[str, str]:
    """Replace fused experts modules by ``QuantExperts`` unless ``why_not(linears)`` objects.

    ``linears`` maps each per-expert linear name the module would split into to its
    config aliases; ``why_not`` returns ``None`` to split, else the reason to keep it.
    Fused experts in a layout not in ``FUSED_EXPERTS_LAYOUTS`` keep their float
    weights, with a warning.  Returns ``{experts module name: why}`` for those kept.
    Fused experts that accelerate offloads are refused (``QuantizationError``).
    """
    _split, fused = _expert_aliases(model)
    kept: dict[str, str] = {}
    to_split: dict[str, nn.Module] = {}
    for name, module in list(model.named_modules()):
        if not holds_fused_experts(module):
            continue
        if fused_experts_layout(module) is None:
            warnings.warn(
                f"{name}: {type(module).__name__} holds fused expert weights in a layout "
                "torchquant does not know; its experts stay in full precision",
                stacklevel=3,
            )
            kept[name] = f"fused experts layout of {type(module).__name__} not supported"
            continue
        why = why_not(fused[name])
        if why is not None:
            kept[name] = why
            continue
        to_split[name] = module
    for name, module in to_split.items():  # -- refuse before any module changes
        if is_offloaded(module):
            raise QuantizationError(
                f"{name}: fused expert weights are offloaded by accelerate (device_map); "
                "splitting them would load every expert at once. Load the model without "
                "offloading, or build a meta skeleton and use "
                "torchquant.streaming.convert_from_safetensors"
            )
    for name, module in to_split.items():
        _set_submodule(model, name, QuantExperts.from_fused(module, fused_experts_layout(module)))
    return kept


def split_experts_for_names(model: nn.Module, names: Iterable[str]) -> None:
    """Split the fused experts modules whose per-expert linears ``names`` mention."""
    names = set(names)
    split_fused_experts(
        model, lambda linears: None if any(n in names for n in linears) else "not named"
    )


def split_experts_for_config(model: nn.Module, config: QuantConfig) -> dict[str, str]:
    """Split the fused experts modules in which ``config`` quantizes at least one projection.

    Returns ``{experts module name: why}`` for those left fused.
    """

    def why_not(linears: dict[str, tuple[str, ...]]) -> str | None:
        resolved = [config.resolve(n, aliases) for n, aliases in linears.items()]
        return None if any(s is not None for s, _ in resolved) else resolved[0][1]

    return split_fused_experts(model, why_not)


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

    A model dispatched by accelerate (``device_map``) converts too: a layer whose
    weight is offloaded (meta behind an ``AlignDevicesHook``) is read from the hook's
    weights map, quantized, and kept resident on the hook's execution device.
    Calibration and fused experts are refused when their weights are offloaded.
    """
    if not isinstance(config, QuantConfig):
        raise ConfigError(f"config must be a QuantConfig, got {type(config).__name__}")
    # -- refuse a bad override, a meta or a NaN/Inf weight before any module changes
    plan = plan_conversion(model, config)
    schemes = [config.default, *(s for _, s in config.overrides)]
    calibrated = [s for s in schemes if s is not None and s.needs_calibration]
    check_before_conversion(model, config, plan)
    snapshot = None
    if calibrated:
        rescales = any(s.algorithm in ("smoothquant", "awq") for s in calibrated)
        snapshot = ModelSnapshot(model, rescaled=plan if rescales else None)
    experts_left = split_experts_for_config(model, config)
    split = {n: m.num_experts for n, m in model.named_modules() if isinstance(m, QuantExperts)}
    plan = plan_conversion(model, config)
    needing = [n for n, (s, _) in plan.items() if s is not None and s.needs_calibration]
    if needing:
        snapshot.keep(model, list(plan))
        try:
            summary = _calibrate(
                model, config, calibration_data, needing, device, offload, progress
            )
        except BaseException:
            snapshot.restore(model)  # -- e.g. NaN activations in a late block
            raise
        _finish_experts(model, summary, experts_left, split)
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
        with onloaded(layer):
            home = execution_device(layer, layer.weight.device)
            work = layer if device is None else layer.to(device)
            quantized = QuantLinear.from_linear(work, scheme, name).to(home)
            summary.bytes_before += _tensor_bytes(layer)
        summary.bytes_after += quantized.nbytes()
        summary.converted[name] = scheme.describe()
        carry_hook(layer, quantized)
        _set_submodule(model, name, quantized)
        del layer, work
    _finish_experts(model, summary, experts_left, split)
    return model, summary


def _calibrate(
    model: nn.Module,
    config: QuantConfig,
    calibration_data: torch.Tensor | None,
    needing: list[str],
    device: torch.device | str | None,
    offload: bool,
    progress: bool,
) -> ConversionSummary:
    offloaded = [n for n, m in model.named_modules() if is_offloaded(m)]
    if offloaded:
        raise QuantizationError(
            f"{offloaded[0]}: weights are offloaded by accelerate (device_map), which "
            f"calibration does not support ({len(needing)} layer(s), e.g. {needing[0]!r}, "
            "need it); load the model without offloading, or convert round-to-nearest"
        )
    if calibration_data is None:
        raise ConfigError(
            f"calibration_data is required: {len(needing)} layer(s) (e.g. {needing[0]!r}) "
            "use an algorithm or static activation scales that need calibration"
        )
    from torchquant.calibration.engine import calibrate_model

    return calibrate_model(
        model, config, calibration_data, device=device, offload=offload, progress=progress
    )


def _finish_experts(
    model: nn.Module, summary: ConversionSummary, left: dict[str, str], split: dict[str, int]
) -> None:
    summary.skipped.update(left)
    summary.split_experts.update(split)
    for module in model.modules():
        if isinstance(module, QuantExperts):
            module.release_views()
