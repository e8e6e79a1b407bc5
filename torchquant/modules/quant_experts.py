"""``QuantExperts``: a mixture-of-experts layer split into one linear layer per expert projection.

transformers 5.x keeps an MoE layer's experts as fused 3-D parameters, e.g. Mixtral's
``gate_up_proj (E, 2I, H)`` (gate rows first, then up rows) and ``down_proj (E, H, I)``.
``QuantExperts`` replaces such a module by ``E`` experts of three linears each,
``{e}.gate_proj (I, H)``, ``{e}.up_proj (I, H)`` and ``{e}.down_proj (H, I)``, the names
per-expert checkpoints (and vLLM's compressed-tensors MoE loader) use.  Each linear can
then become a ``QuantLinear`` like any other, so experts get every weight format,
calibration algorithm and checkpoint format that linears have.  The routing math is
the original module's: each expert runs only on the tokens routed to it.

Which modules can be split is data: :data:`FUSED_EXPERTS_LAYOUTS` lists the fused
layouts with the class names whose forward is the standard one above.

On CUDA, when every expert projection is a weight-only ``QuantLinear`` of one scheme
and shape, the forward runs the grouped op ``ops.moe.moe_linear_weight_only`` twice (gate
and up together, then down): one launch per projection over all active experts.  It
reads the experts' weights stacked over the experts (:class:`StackedExperts`), derived
once from the linears' buffers and re-derived when one changes; a plain attribute,
never a buffer, so checkpoints are unchanged (on CUDA the weights are then held twice).
On CPU the per-expert loop runs, on each linear's own CPU kernel layout.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import nn

from torchquant.errors import QuantizationError
from torchquant.modules.quant_linear import QuantLinear
from torchquant.ops.common import run
from torchquant.ops.moe import moe_linear_weight_only

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# -- where QuantExperts caches its stacked weights (a plain attribute: never saved)
_STACKED = "_stacked_experts_cache"

# -- transformers' experts decorator records the storage on each instance; any other
# value there means another layout (transposed, interleaved, biased, ungated, normed)
_STANDARD_FLAGS = (
    ("is_transposed", False),
    ("is_concatenated", True),
    ("has_bias", False),
    ("has_gate", True),
    ("has_post_expert_norm", False),
)


@dataclass(frozen=True)
class FusedExpertsLayout:
    """Where a fused experts module keeps its weights and how its forward uses them.

    ``gate_up``: attribute ``(E, 2I, H)`` whose rows ``[:I]`` are the gate projection
    and ``[I:]`` the up projection of each expert; ``down``: attribute ``(E, H, I)``;
    ``activation``: the attribute holding the gate's activation function.  The
    module's forward must be ``down(act(gate(x)) * up(x))`` weighted per token by
    ``top_k_weights`` and summed, with ``top_k_index == E`` meaning "no expert".
    """

    name: str
    class_patterns: tuple[str, ...]
    gate_up: str = "gate_up_proj"
    down: str = "down_proj"
    activation: str = "act_fn"
    flags: tuple[tuple[str, object], ...] = _STANDARD_FLAGS

    def matches(self, module: nn.Module) -> bool:
        cls = type(module).__name__
        if not any(fnmatch.fnmatchcase(cls, p) for p in self.class_patterns):
            return False
        if any(getattr(module, flag, value) != value for flag, value in self.flags):
            return False
        gate_up, down = getattr(module, self.gate_up, None), getattr(module, self.down, None)
        if not (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor)):
            return False
        if gate_up.dim() != 3 or down.dim() != 3 or not callable(getattr(module, self.activation)):
            return False
        e, two_i, h = gate_up.shape
        return two_i % 2 == 0 and tuple(down.shape) == (e, h, two_i // 2)


# Classes of transformers 5.x whose experts forward is exactly the concatenated
# gate/up one described above (checked against their source).
FUSED_EXPERTS_LAYOUTS: tuple[FusedExpertsLayout, ...] = (
    FusedExpertsLayout(
        "gate_up_concat",
        (
            "MixtralExperts", "MiniMaxExperts", "MiniMaxM2Experts", "PhimoeExperts",
            "Qwen2MoeExperts", "Qwen3MoeExperts", "Qwen3NextExperts", "Qwen3_5MoeExperts",
            "Qwen3VLMoeTextExperts", "Qwen3OmniMoe*TextExperts", "OlmoeExperts",
            "FlexOlmoExperts", "DeepseekV2Experts", "DeepseekV3Experts", "DeepseekV32Experts",
            "Glm4MoeExperts", "Glm4MoeLiteExperts", "Glm4vMoeTextExperts", "GlmMoeDsaExperts",
            "Ernie4_5_MoeExperts", "Dots1Experts", "HunYuanMoEV1Experts", "GraniteMoe*Experts",
            "JambaExperts", "Lfm2MoeExperts", "SolarOpenExperts", "ExaoneMoeExperts",
            "Cohere2MoeExperts", "AfmoeExperts", "Mistral4Experts", "KimiLinearExperts",
        ),
    ),
)  # fmt: skip


def fused_experts_layout(module: nn.Module) -> FusedExpertsLayout | None:
    """The first layout of :data:`FUSED_EXPERTS_LAYOUTS` that fits ``module``, or ``None``."""
    return next((layout for layout in FUSED_EXPERTS_LAYOUTS if layout.matches(module)), None)


def holds_fused_experts(module: nn.Module) -> bool:
    """Whether ``module`` looks like fused experts: a 3-D float parameter, one slice per expert."""
    if isinstance(module, QuantExperts):
        return False
    named = "expert" in type(module).__name__.lower() or hasattr(module, "num_experts")
    return named and any(
        p.dim() == 3 and p.is_floating_point() for p in module.parameters(recurse=False)
    )


def layout_named(name: str) -> FusedExpertsLayout:
    return next(layout for layout in FUSED_EXPERTS_LAYOUTS if layout.name == name)


def expert_linear_aliases(
    num_experts: int, layout: FusedExpertsLayout
) -> dict[str, tuple[str, ...]]:
    """Per-expert linear name (relative) -> other names the config may use for it.

    ``""`` stands for the experts module itself; the fused attribute's name (e.g.
    ``gate_up_proj``) for the weight the linear came from.
    """
    fused = {"gate_proj": layout.gate_up, "up_proj": layout.gate_up, "down_proj": layout.down}
    return {f"{e}.{proj}": (fused[proj], "") for e in range(num_experts) for proj in PROJECTIONS}


class Expert(nn.Module):
    """One expert's three projections (``nn.Linear`` or ``QuantLinear``, without bias)."""

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module) -> None:
        super().__init__()
        self.gate_proj = gate_proj
        self.up_proj = up_proj
        self.down_proj = down_proj


def _linear_from(weight: torch.Tensor, requires_grad: bool) -> nn.Linear:
    """An ``nn.Linear`` using ``weight: (out, in)`` as is (a view: no copy, meta stays meta)."""
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=False, device="meta", dtype=weight.dtype)
    linear.weight = nn.Parameter(weight, requires_grad=requires_grad)
    return linear


@dataclass(frozen=True)
class StackedExperts:
    """The grouped op's weights: ``(qweight, scales, zeros, bias)`` stacked over the experts.

    ``gate_up``: gate rows then up rows of each expert, ``(E, 2I, ...)``; ``down``:
    ``(E, H, ...)``; ``zeros`` and ``bias`` are ``None`` where the linears have none.
    """

    gate_up: tuple[torch.Tensor | None, ...]
    down: tuple[torch.Tensor | None, ...]
    bits: int
    group_size: int
    dtype: torch.dtype

    def nbytes(self) -> int:
        tensors = (*self.gate_up, *self.down)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


_WEIGHT = ("qweight", "scales", "zeros", "bias")
# -- the stored weights the grouped op reads: packed INT codes, INT8, FP8 with row scales
_GROUPED_QWEIGHT_DTYPES = (torch.int32, torch.int8, torch.float8_e4m3fn)


def _groupable(linears: list[nn.Module]) -> bool:
    """Whether the linears are weight-only ``QuantLinear`` layers one grouped op can run."""
    first = linears[0]
    if not isinstance(first, QuantLinear) or first.scheme.activation is not None:
        return False
    if first.qweight.dtype not in _GROUPED_QWEIGHT_DTYPES:
        return False
    if not first.weight_format.groups_experts:
        return False

    def signature(m: QuantLinear) -> tuple:
        weight = [getattr(m, name) for name in _WEIGHT]
        buffers = tuple(None if t is None else (t.dtype, t.shape) for t in weight)
        return (m.scheme, m.dtype, m.g_idx is None, m.smooth_scale is None, buffers)

    want = signature(first)
    return (
        want[2]
        and want[3]
        and all(isinstance(m, QuantLinear) and signature(m) == want for m in linears)
    )


def _stack(experts: list[list[QuantLinear]]) -> tuple[torch.Tensor | None, ...]:
    """Each weight buffer of each expert's linears, concatenated along N, stacked over E."""
    stacked = []
    for name in _WEIGHT:
        if getattr(experts[0][0], name) is None:
            stacked.append(None)
            continue
        per_expert = [torch.cat([getattr(m, name) for m in linears]) for linears in experts]
        stacked.append(torch.stack(per_expert))
    return tuple(stacked)


class QuantExperts(nn.Module):
    """Experts ``0..E-1`` (children named by index), each an :class:`Expert`.

    ``forward(hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k))`` returns
    ``(T, H)`` like the fused module it replaces; index ``E`` marks a slot routed to
    no expert (expert parallelism), as in transformers.
    """

    def __init__(self, experts: list[Expert], act_fn: nn.Module, layout: str) -> None:
        super().__init__()
        self.num_experts = len(experts)
        self.layout = layout
        self.act_fn = act_fn
        for e, expert in enumerate(experts):
            self.add_module(str(e), expert)

    @classmethod
    def from_fused(cls, module: nn.Module, layout: FusedExpertsLayout) -> QuantExperts:
        """Split ``module``'s fused weights into per-expert linears holding views of them.

        No weight is copied: on the meta device this builds a skeleton for loading.
        """
        gate_up = getattr(module, layout.gate_up)
        down = getattr(module, layout.down)
        grad = gate_up.requires_grad
        gate_up, down = gate_up.detach(), down.detach()
        inter = down.shape[2]
        experts = [
            Expert(
                _linear_from(gate_up[e, :inter], grad),
                _linear_from(gate_up[e, inter:], grad),
                _linear_from(down[e], grad),
            )
            for e in range(gate_up.shape[0])
        ]
        return cls(experts, getattr(module, layout.activation), layout.name)

    def expert(self, index: int) -> Expert:
        return self._modules[str(index)]

    def fused_sources(self) -> dict[str, tuple[str, tuple[int | slice, ...]]]:
        """Per-expert linear (relative name) -> (fused attribute, index of its weight in it)."""
        layout = layout_named(self.layout)
        inter = self.expert(0).gate_proj.out_features
        out: dict[str, tuple[str, tuple[int | slice, ...]]] = {}
        for e in range(self.num_experts):
            out[f"{e}.gate_proj"] = (layout.gate_up, (e, slice(0, inter)))
            out[f"{e}.up_proj"] = (layout.gate_up, (e, slice(inter, 2 * inter)))
            out[f"{e}.down_proj"] = (layout.down, (e,))
        return out

    def release_views(self) -> None:
        """Give float linears still viewing the fused weight their own copy.

        Otherwise one float projection keeps the whole fused tensor alive.
        """
        for e in range(self.num_experts):
            for proj in PROJECTIONS:
                linear = getattr(self.expert(e), proj)
                weight = getattr(linear, "weight", None)
                if not isinstance(linear, nn.Linear) or weight.device.type == "meta":
                    continue
                if weight.untyped_storage().nbytes() > weight.numel() * weight.element_size():
                    linear.weight = nn.Parameter(weight.detach().clone(), weight.requires_grad)

    # -- the grouped path's stacked weights

    def _linears(self) -> list[QuantLinear]:
        return [
            getattr(self.expert(e), proj) for e in range(self.num_experts) for proj in PROJECTIONS
        ]

    def _stacked_key(self, linears: list[nn.Module]) -> tuple:
        """Changes whenever a linear is replaced or one of its weight buffers is written."""
        key = []
        for m in linears:
            key.append(id(m))
            for t in (getattr(m, name, None) for name in _WEIGHT):
                if isinstance(t, torch.Tensor):
                    key += (t.data_ptr(), t._version)
        return tuple(key)

    def stacked_experts(self) -> StackedExperts | None:
        """The experts' weights stacked for the grouped op, or ``None`` where it cannot run.

        Derived once and cached; inside ``torch.compile`` only an existing cache is used.
        """
        cache = self.__dict__.get(_STACKED)
        if torch.compiler.is_compiling():
            return cache[1] if cache is not None else None
        linears = self._linears()
        key = self._stacked_key(linears)
        if cache is None or cache[0] != key:
            cache = (key, self._derive_stacked(linears))
            self.__dict__[_STACKED] = cache
        return cache[1]

    def _derive_stacked(self, linears: list[nn.Module]) -> StackedExperts | None:
        gate_up = [m for i, m in enumerate(linears) if i % 3 != 2]
        down = linears[2::3]
        if not (_groupable(gate_up) and _groupable(down)) or gate_up[0].scheme != down[0].scheme:
            return None
        first = linears[0]
        with torch.no_grad():
            pairs = [gate_up[i : i + 2] for i in range(0, len(gate_up), 2)]
            return StackedExperts(
                _stack(pairs),
                _stack([[m] for m in down]),
                first.scheme.weight.bits,
                first.scheme.weight.group_size,
                first.dtype,
            )

    def __getstate__(self) -> dict:
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        return {key: value for key, value in state.items() if key != _STACKED}

    # -- inference

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        self._check_routing(top_k_index)
        if hidden_states.device.type == "cuda":
            stacked = self.stacked_experts()
            if stacked is not None:
                return self.grouped_forward(stacked, hidden_states, top_k_index, top_k_weights)
        return self._per_expert_forward(hidden_states, top_k_index, top_k_weights)

    def grouped_forward(
        self,
        stacked: StackedExperts,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
    ) -> torch.Tensor:
        """The forward as two grouped ops (gate and up together, then down), on any device."""
        t, k = top_k_index.shape
        inter = stacked.gate_up[0].shape[1] // 2
        op, bits, group_size = moe_linear_weight_only, stacked.bits, stacked.group_size
        x = hidden_states.to(stacked.dtype)
        gate_up = run(op, x, *stacked.gate_up, top_k_index, None, bits, group_size)
        h = self.act_fn(gate_up[:, :inter]) * gate_up[:, inter:]
        out = run(op, h, *stacked.down, top_k_index, top_k_weights, bits, group_size)
        return out.view(t, k, -1).sum(1).to(hidden_states.dtype)

    def _check_routing(self, top_k_index: torch.Tensor) -> None:
        """Expert indices in ``0..E`` (skipped inside a CUDA-graph capture: it synchronises)."""
        if top_k_index.is_cuda and torch.cuda.is_current_stream_capturing():
            return
        n = self.num_experts
        if top_k_index.numel():
            lo, hi = (int(v) for v in torch.aminmax(top_k_index))
            if lo < 0 or hi > n:
                raise QuantizationError(
                    f"experts: top_k_index spans {lo}..{hi}, expected expert indices in "
                    f"0..{n - 1} (or {n} for none)"
                )

    def _per_expert_forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        n = self.num_experts
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            # -- mask: (E + 1, k, T), the last row collecting slots routed to no expert
            mask = nn.functional.one_hot(top_k_index, num_classes=n + 1).permute(2, 1, 0)
            hit = torch.greater(mask[:n].sum(dim=(-1, -2)), 0).nonzero()[:, 0].tolist()
        for e in hit:
            top_k_pos, token_idx = torch.where(mask[e])
            x = hidden_states[token_idx]
            expert = self.expert(e)
            h = self.act_fn(expert.gate_proj(x)) * expert.up_proj(x)
            out = expert.down_proj(h) * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, out.to(final.dtype))
        return final

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, layout={self.layout}"
