"""What conversion checks before it changes any module, and how a failed calibration is undone.

A NaN or Inf in the last layer must not leave the layers before it converted: the
weights are scanned one layer at a time (an offloaded layer is loaded only for its
scan), so the check costs one read of the model and no extra memory beyond a layer.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from torchquant.config import QuantConfig, QuantScheme
from torchquant.errors import QuantizationError
from torchquant.modules.quant_experts import (
    expert_linear_aliases,
    fused_experts_layout,
    holds_fused_experts,
)
from torchquant.offload import is_offloaded, onloaded
from torchquant.plan import set_submodule


def count_nonfinite(t: torch.Tensor) -> int:
    """How many NaN/Inf values float tensor ``t`` holds (0 for integer tensors)."""
    if not t.is_floating_point() or t.device.type == "meta":
        return 0
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        t = t.float()
    return int((~torch.isfinite(t.detach())).sum())


def refuse_nonfinite(name: str, t: torch.Tensor | None, action: str = "cannot quantize it") -> None:
    """Raise :class:`QuantizationError` naming ``name`` if ``t`` holds NaN/Inf values."""
    if t is None:
        return
    bad = count_nonfinite(t)
    if bad:
        raise QuantizationError(f"{name} contains {bad} NaN/Inf value(s); {action}")


def _own_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from module.named_parameters(recurse=False)
    yield from module.named_buffers(recurse=False)


def _fused_experts_to_split(model: nn.Module, config: QuantConfig) -> list[str]:
    """Fused experts modules ``split_experts_for_config`` will split (held in memory)."""
    names = []
    for name, module in model.named_modules():
        if not holds_fused_experts(module) or is_offloaded(module):
            continue  # -- offloaded fused experts are refused by the split itself
        layout = fused_experts_layout(module)
        if layout is None:
            continue
        prefix = f"{name}." if name else ""
        num = getattr(module, layout.gate_up).shape[0]
        for rel, aliases in expert_linear_aliases(num, layout).items():
            full = tuple(f"{prefix}{a}" if a else name for a in aliases)
            if config.resolve(prefix + rel, full)[0] is not None:
                names.append(name)
                break
    return names


def check_before_conversion(
    model: nn.Module,
    config: QuantConfig,
    plan: dict[str, tuple[QuantScheme | None, str]],
) -> None:
    """Refuse, before any module changes, what would make conversion fail half-way.

    Every layer ``plan`` quantizes (and every fused experts module about to be split)
    must have real, finite tensors: a weight on the meta device that no offload hook
    holds, or a NaN/Inf value, raises :class:`QuantizationError` naming the tensor.
    Other parameters are not scanned: a NaN there (an embedding row) matters only if
    calibration runs through it, which then names the layer it reached.
    """
    for name, (scheme, _) in plan.items():
        layer = model.get_submodule(name)
        if scheme is None and not _converts_itself(layer):
            continue
        with onloaded(layer):
            if layer.weight.device.type == "meta":
                raise QuantizationError(
                    f"{name}: weight is on the meta device and no accelerate offload hook "
                    "holds it; load the model's weights first, or build a meta skeleton and "
                    "use torchquant.streaming.convert_from_safetensors"
                )
            for tname, t in _own_tensors(layer):
                refuse_nonfinite(f"{name}.{tname}", t)
    for name in _fused_experts_to_split(model, config):
        _check_fused_experts(name, model.get_submodule(name))


def _converts_itself(layer: nn.Module) -> bool:
    """A QAT layer converts with its trained scales whatever the plan says (``to_quant_linear``).

    Asked of the layer rather than its class: ``torchquant.qat`` builds on these checks.
    """
    return callable(getattr(layer, "to_quant_linear", None))


def _check_fused_experts(name: str, module: nn.Module) -> None:
    """Scan fused experts under the per-expert names the split will give them."""
    layout = fused_experts_layout(module)
    gate_up, down = getattr(module, layout.gate_up), getattr(module, layout.down)
    inter = gate_up.shape[1] // 2
    for e in range(gate_up.shape[0]):
        refuse_nonfinite(f"{name}.{e}.gate_proj.weight", gate_up[e, :inter])
        refuse_nonfinite(f"{name}.{e}.up_proj.weight", gate_up[e, inter:])
        refuse_nonfinite(f"{name}.{e}.down_proj.weight", down[e])
    for tname, t in _own_tensors(module):
        if tname not in (layout.gate_up, layout.down):
            refuse_nonfinite(f"{name}.{tname}", t)


class ModelSnapshot:
    """Enough of a model to put it back as it was after a calibration that failed midway.

    Holds the original modules (references: their float weights stay alive until the
    conversion ends) and where every tensor lived.  With ``rescaled`` (the linear-like
    layers, when SmoothQuant or AWQ will fold scales into norms and linears in place),
    CPU copies of their parameters, of fused experts' and of every 1-D parameter.
    """

    def __init__(self, model: nn.Module, rescaled: Iterable[str] | None = None) -> None:
        self.modules: dict[str, nn.Module] = {
            name: m for name, m in model.named_modules() if holds_fused_experts(m)
        }
        self.devices = {name: t.device for name, t in _named_tensors(model)}
        self.values: dict[str, torch.Tensor] = {}
        if rescaled is not None:
            owners = set(rescaled) | set(self.modules)
            for name, p in model.named_parameters():
                if p.device.type == "meta":
                    continue
                if p.dim() == 1 or name.rpartition(".")[0] in owners:
                    self.values[name] = p.detach().to("cpu", copy=True)

    def keep(self, model: nn.Module, names: list[str]) -> None:
        """Also hold the modules now at ``names`` (the layers about to be replaced)."""
        for name in names:
            self.modules.setdefault(name, model.get_submodule(name))

    def restore(self, model: nn.Module) -> None:
        for name in sorted(self.modules, key=len, reverse=True):  # -- children first
            set_submodule(model, name, self.modules[name])
        for name, t in _named_tensors(model):
            home = self.devices.get(name, t.device)
            if name in self.values:
                t.data = self.values[name].to(home)
            elif t.device != home:
                t.data = t.data.to(home)


def _named_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from model.named_parameters()
    yield from model.named_buffers()
