"""Sibling projections: linears of one module that read the same input run as one launch.

q/k/v and gate/up of a Llama/Mistral/Qwen-style block each read one tensor.  At batch 1
on CUDA that is five weight-only GEMVs per layer where two would do, and the small k/v
ones (N = 1024 at Llama-3-8B) fill the GPU's SMs poorly.  :func:`fuse_sibling_linears`
finds such siblings (a set of names below, checked against the structure: children of
one module, weight-only ``QuantLinear`` layers with the same scheme, dtype, device and
input features, every weight buffer laid out by output row) and gives each group one
:class:`SiblingProjections`, which holds a ``QuantLinear`` over their weights
concatenated along N.  Each sibling's buffers then become row slices (views) of that
layer's, so the weights are held once: the bytes per layer are unchanged (Llama-3-8B
w4a16 g128 q/k/v: 12.6 MB of codes, 0.39 MB of scales, 0.20 MB of zeros), nothing new
is saved, and checkpoints stay bit-identical.

At run time the first sibling, called on one row on the fused layer's device, runs the
concatenated layer once and keeps its output; every other sibling called afterwards
with that very tensor (same object, not written since; weights not written or
replaced since) returns its slice of it.  Any other call -- another input, a hook that
changed it, a sibling called alone, more rows -- computes the sibling's own output as
before.  ``torch.compile(fullgraph=True)`` traces the same protocol into one graph.
Nothing is derived during a forward, so a CUDA-graph capture records exactly the
warm-up's launches.  Moving or casting a sibling drops its group (call
:func:`fuse_sibling_linears` again afterwards).  CPU layers are not fused unless asked
(their int4pack path gains nothing from it).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from torchquant.modules.quant_experts import Expert
from torchquant.modules.quant_linear import SIBLINGS_KEY, QuantLinear

# -- sibling names (children of one module, in the order its forward calls them); a set
# -- is fused only when its linears also agree in structure (see ``_signature``)
SIBLING_NAMES: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("w1", "w3"),
)
FUSED_DEVICES = ("cuda",)


def sibling_sets(model: nn.Module) -> list[tuple[str, list[str]]]:
    """``(parent name, [child names])`` of every complete set of :data:`SIBLING_NAMES` whose
    members are linears (``nn.Linear`` or ``QuantLinear``) with the same input features."""
    found = []
    for parent_name, parent in model.named_modules():
        children = parent._modules
        for names in SIBLING_NAMES:
            members = [children.get(n) for n in names]
            if any(m is None or not hasattr(m, "in_features") for m in members):
                continue
            if len({m.in_features for m in members}) == 1:
                found.append((parent_name, list(names)))
    return found


def _signature(layer: nn.Module) -> tuple | None:
    """What siblings must share to run as one layer; None for a layer that cannot."""
    if type(layer) is not QuantLinear or layer.scheme.activation is not None:
        return None
    buffers = []
    for name, t in layer._buffers.items():
        if t is None:
            buffers.append((name, None))
        elif t.dim() == 0 or t.shape[0] != layer.out_features or not t.is_contiguous():
            return None  # -- per-tensor scales, g_idx, smoothing: not rows of the output
        else:
            buffers.append((name, t.dtype, tuple(t.shape[1:]), t.device))
    return (layer.scheme, layer.dtype, layer.in_features, tuple(buffers))


class SiblingProjections:
    """One group of siblings and the ``QuantLinear`` over their weights concatenated along N.

    ``members`` in call order; ``fused`` holds the weights (each member's buffers are its
    row slices); ``pending`` is the last fused output: ``(x, x's version, weights'
    versions, out)`` until every other member has taken its slice.  Each member keeps
    ``(group, its index)`` in a plain attribute.
    """

    def __init__(self, members: list[nn.Module]) -> None:
        first = members[0]
        widths = [m.out_features for m in members]
        self.members = members
        self.offsets = [sum(widths[:i]) for i in range(len(widths) + 1)]
        self.fused = QuantLinear(
            first.in_features, self.offsets[-1], first.scheme, first.bias is not None,
            first.dtype, "meta",
        )  # fmt: skip
        self.pending: tuple | None = None
        self._served = 0
        self._names = [name for name, t in first._buffers.items() if t is not None]
        with torch.no_grad():
            for name in self._names:
                whole = torch.cat([m._buffers[name] for m in members])
                self.fused._buffers[name] = whole
                for m, start, stop in zip(members, self.offsets, self.offsets[1:], strict=False):
                    m._buffers[name] = whole[start:stop]
        # -- each member's views, and where they start: replaced or re-pointed buffers
        # -- no longer count as the group's
        self._views = [[m._buffers[name] for name in self._names] for m in members]
        self._pointers = [[t.data_ptr() for t in views] for views in self._views]
        for index, m in enumerate(members):
            m.__dict__[SIBLINGS_KEY] = (self, index)

    def nbytes(self) -> int:
        """Bytes of weights the group holds (its members hold views of them: no more)."""
        return self.fused.nbytes()

    def _holds(self, index: int, compiling: bool = False) -> bool:
        """Whether member ``index`` still computes with its slice of the fused weights
        (inside ``torch.compile``, which cannot trace pointers, by the views' identity)."""
        buffers = self.members[index]._buffers
        for name, view in zip(self._names, self._views[index], strict=True):
            if buffers[name] is not view:
                return False
        if compiling:
            return True
        return [t.data_ptr() for t in self._views[index]] == self._pointers[index]

    def holds_all(self, compiling: bool = False) -> bool:
        """Whether every member still computes with its slice of the fused weights."""
        return all(self._holds(i, compiling) for i in range(len(self.members)))

    def _weights_version(self, compiling: bool) -> tuple[int, ...] | None:
        if compiling:
            return None
        return tuple(self.fused._buffers[name]._version for name in self._names)

    def output_of(self, index: int, x: torch.Tensor) -> torch.Tensor | None:
        """Member ``index``'s output for ``x`` from the group's one launch, or None where
        the member must compute it itself.

        Eager calls also compare the versions of ``x`` (unless an inference tensor) and of
        the weights, so in-place writes between the calls are seen; ``torch.compile``
        traces neither, so inside it the check is the input's and the views' identity.
        """
        compiling = torch.compiler.is_compiling()
        version = None if compiling or x.is_inference() else x._version
        if index == 0:
            self.pending = None
            if x.numel() != x.shape[-1] or x.device != self.fused.qweight.device:
                return None
            if not self.holds_all(compiling):
                return None
            if compiling:
                out = self.fused._linear(x, reference=False)
            else:
                x_in = x if x.dtype == self.fused.dtype else x.to(self.fused.dtype)
                out = self.fused._bound_linear()(x_in)
            self.pending = (x, version, self._weights_version(compiling), out)
            self._served = 1
        else:
            pending = self.pending
            if pending is None or pending[0] is not x or pending[1] != version:
                return None
            if pending[2] != self._weights_version(compiling) or not self._holds(index, compiling):
                return None
            out = pending[3]
            self._served += 1
            if self._served == len(self.members):
                self.pending = None  # -- every slice handed out: release the tensors
        return out[..., self.offsets[index] : self.offsets[index + 1]]


def fuse_sibling_linears(
    model: nn.Module, devices: Iterable[str] = FUSED_DEVICES
) -> list[SiblingProjections]:
    """Give every fusable set of siblings of ``model`` on ``devices`` one concatenated layer.

    Sets whose linears differ in anything (scheme, bits, group size, dtype, device, input
    features, bias, a ``g_idx`` or smoothing scale, activation quantization) are skipped,
    as are experts' projections (``QuantExperts`` stacks them itself).  Idempotent: a
    group still in place is kept.  Returns the groups in place.
    """
    devices = tuple(devices)
    groups = []
    for parent_name, names in sibling_sets(model):
        parent = model.get_submodule(parent_name)
        if isinstance(parent, Expert):
            continue
        members = [parent._modules[n] for n in names]
        current = members[0].__dict__.get(SIBLINGS_KEY)
        if current is not None and current[0].members == members and current[0].holds_all():
            groups.append(current[0])
            continue
        signatures = [_signature(m) for m in members]
        if signatures[0] is None or any(s != signatures[0] for s in signatures):
            continue
        if members[0].qweight.device.type not in devices:
            continue
        groups.append(SiblingProjections(members))
    return groups
