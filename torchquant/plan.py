"""Which layers a conversion touches, and the one way a layer is built and replaced.

``plan_conversion`` resolves a ``QuantConfig`` against a model's linear-like layers;
``build_quant_linear`` rounds a float weight with ``quantize_weight`` into a
``QuantLinear`` (conversion, calibration and streaming all build layers with it);
``replace_layer`` puts a converted layer in place and counts it in the summary (those
three and QAT's convert); ``set_submodule`` swaps one module for another (also the loaders).

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

from torchquant.algorithms.quantize import WeightStats, quantize_weight
from torchquant.config import QuantConfig, QuantScheme
from torchquant.config.matching import first_match
from torchquant.errors import ConfigError, QuantizationError
from torchquant.modules import QuantExperts, QuantLinear
from torchquant.modules.quant_experts import (
    expert_linear_aliases,
    fused_experts_layout,
    holds_fused_experts,
    layout_named,
)
from torchquant.offload import is_offloaded


def is_linear_like(module: nn.Module) -> bool:
    """``nn.Linear`` or transformers' GPT-2 ``Conv1D`` (a linear with a transposed weight)."""
    if isinstance(module, nn.Linear):
        return True
    return type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None


def stores_transposed(module: nn.Module) -> bool:
    """Whether the module keeps its weight as ``(in, out)`` (transformers' GPT-2 ``Conv1D``)."""
    return type(module).__name__ == "Conv1D" and not isinstance(module, nn.Linear)


def get_weight(module: nn.Module) -> torch.Tensor:
    """The weight as ``(out, in)`` (a view of the module's own)."""
    w = module.weight.data
    return w.t() if stores_transposed(module) else w


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of a module's own parameters and buffers (not its children's)."""
    tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where ``model``'s submodule ``name`` is (``name`` must not be empty)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    """Name -> layer of every ``QuantLinear`` in ``model``, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


@torch.no_grad()
def build_quant_linear(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scheme: QuantScheme,
    name: str,
    stats: WeightStats | None = None,
    *,
    smooth: torch.Tensor | None = None,
    input_scale: torch.Tensor | None = None,
    input_zero_point: torch.Tensor | None = None,
) -> QuantLinear:
    """A ``QuantLinear`` on ``weight``'s device holding ``weight: (out, in)`` as
    ``quantize_weight`` rounds it (``stats`` from calibration, when the algorithm reads it).

    ``smooth`` is a run-time SmoothQuant divisor ``(in,)``, ``input_scale`` a static
    activation scale ``(1,)`` (with its zero point ``(1,)`` for asymmetric activations).
    """
    quantized = quantize_weight(scheme, weight, stats, name=f"{name}.weight" if name else "weight")
    n, k = weight.shape
    has_bias, has_g_idx = bias is not None, quantized.g_idx is not None
    layer = QuantLinear(k, n, scheme, has_bias, weight.dtype, weight.device, g_idx=has_g_idx)
    if layer.weight_format.is_int:
        layer.set_int_codes(quantized.codes, quantized.scales, quantized.zeros)
    else:  # -- float values (FP8, FP4 codes), stored as the format lays them out
        fmt = layer.weight_format
        fmt.set_values(layer, quantized.codes, quantized.scales, quantized.global_scale)
    if has_g_idx:
        layer.g_idx.copy_(quantized.g_idx)
    if has_bias:
        layer.bias.copy_(bias.detach())
    if smooth is not None:
        layer.smooth_scale = smooth.to(device=weight.device, dtype=torch.float32)
    if input_scale is not None:
        layer.input_scale.copy_(input_scale)
    if input_zero_point is not None:
        layer.input_zero_point.copy_(input_zero_point)
    return layer


def replace_layer(
    model: nn.Module, name: str, new: nn.Module, summary: ConversionSummary, bytes_before: int
) -> None:
    """Put converted layer ``new`` where ``name`` is and count it in ``summary``.

    ``bytes_before`` is what the float layer held (its weight as read, for streaming).
    """
    summary.bytes_before += bytes_before
    summary.bytes_after += new.nbytes()
    summary.converted[name] = new.scheme.describe()
    set_submodule(model, name, new)


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
    """Replace fused experts modules by ``QuantExperts`` unless ``why_not(linears)`` objects;
    returns ``{experts module name: why}`` for those kept (see :func:`_split_fused_experts`)."""
    return _split_fused_experts(model, why_not)[0]


def _split_fused_experts(
    model: nn.Module, why_not: Callable[[dict[str, tuple[str, ...]]], str | None]
) -> tuple[dict[str, str], list[str]]:
    """Replace fused experts modules by ``QuantExperts`` unless ``why_not(linears)`` objects.

    ``linears`` maps each per-expert linear name the module would split into to its
    config aliases; ``why_not`` returns ``None`` to split, else the reason to keep it.
    Fused experts in a layout not in ``FUSED_EXPERTS_LAYOUTS`` keep their float
    weights, with a warning.  Returns ``{experts module name: why}`` for those kept
    and the names of those split.
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
        set_submodule(model, name, QuantExperts.from_fused(module, fused_experts_layout(module)))
    return kept, list(to_split)


def split_experts_for_names(model: nn.Module, names: Iterable[str]) -> None:
    """Split the fused experts modules whose per-expert linears ``names`` mention."""
    names = set(names)
    split_fused_experts(
        model, lambda linears: None if any(n in names for n in linears) else "not named"
    )


def _quantizes_none_of(config: QuantConfig) -> Callable[[dict[str, tuple[str, ...]]], str | None]:
    """``why_not`` for :func:`split_fused_experts`: why ``config`` leaves experts fused."""

    def why_not(linears: dict[str, tuple[str, ...]]) -> str | None:
        resolved = [config.resolve(n, aliases) for n, aliases in linears.items()]
        return None if any(s is not None for s, _ in resolved) else resolved[0][1]

    return why_not


def split_experts_for_config(model: nn.Module, config: QuantConfig) -> dict[str, str]:
    """Split the fused experts modules in which ``config`` quantizes at least one projection.

    Returns ``{experts module name: why}`` for those left fused.
    """
    return split_fused_experts(model, _quantizes_none_of(config))


def split_experts_and_plan(
    model: nn.Module, config: QuantConfig, plan: dict[str, tuple[QuantScheme | None, str]]
) -> tuple[dict[str, tuple[QuantScheme | None, str]], dict[str, str]]:
    """Split the fused experts ``config`` quantizes; returns the plan and the experts kept.

    ``plan`` is ``plan_conversion``'s for the model before splitting; it is planned again
    only when experts were split (their per-expert linears are new layers).
    """
    kept, split = _split_fused_experts(model, _quantizes_none_of(config))
    return (plan_conversion(model, config) if split else plan), kept
