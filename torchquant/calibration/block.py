"""One block under calibration, and the contract between the engine and its steps.

The engine makes a :class:`CalibrationBlock` for each block in turn and hands it to
every step of :data:`~torchquant.calibration.steps.CALIBRATION_STEPS`.  A step says
what it needs kept of its linears' inputs in the statistics pass (``request``), may add
hooks to that pass (``observe``), then ``apply``-es itself: rescale weights, observe
more, record what rounding needs, or quantize some linears itself (GPTQ, stage by
stage).  Whatever is left is quantized at the end by :meth:`CalibrationBlock.quantize`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from torchquant.algorithms.gptq import HessianFactor, factor_hessian
from torchquant.algorithms.quantize import WeightStats
from torchquant.calibration.capture import BlockInput, run_block
from torchquant.calibration.distributed import RankContext
from torchquant.calibration.layers import out_features
from torchquant.calibration.mappings import BalanceMapping
from torchquant.calibration.shards import (
    attach_hessians,
    hessian_groups,
    merge_shards,
    partial_like,
    split_hessians,
)
from torchquant.calibration.stats import LayerStats, StatsRequest, attach
from torchquant.config import QuantScheme
from torchquant.plan import (
    ConversionSummary,
    build_quant_linear,
    get_weight,
    replace_layer,
    tensor_bytes,
)


class CalibrationBlock:
    """A block's linears (names relative to the block), its samples, and what the steps
    found: statistics, run-time smoothing, AWQ input divisors, clip ranges, input scales.

    ``samples`` are this rank's (all of them in one process), cut into ``shards``: the
    slices of ``samples`` whose statistics ``run`` gathers apart and merges across ranks.
    """

    def __init__(
        self,
        model: nn.Module,
        block: nn.Module,
        prefix: str,
        schemes: dict[str, QuantScheme],
        balance: tuple[BalanceMapping, ...],
        device: torch.device,
        samples: list[BlockInput],
        summary: ConversionSummary,
        ranks: RankContext | None = None,
        shards: list[slice] | None = None,
    ) -> None:
        self.model, self.module, self.prefix = model, block, prefix
        self.ranks = ranks if ranks is not None else RankContext()
        self.shards = shards if shards is not None else [slice(0, len(samples))]
        self.schemes, self.device, self.samples, self.summary = schemes, device, samples, summary
        self.linears = {rel: block.get_submodule(rel) for rel in schemes}
        self.balance = [m for m in balance if all(lin in schemes for lin in m.linears)]
        self.stats: dict[str, LayerStats] = {}  # from the statistics pass on the float block
        self.smooth: dict[str, torch.Tensor] = {}  # run-time smoothing scale per linear
        self.divisor: dict[str, torch.Tensor] = {}  # how each linear's captured input changed
        # -- modules a step rescaled after the statistics pass (what it saw of them is stale)
        self.rescaled: set[str] = set()
        self.clip_ranges: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # AWQ, per linear
        self.input_scales: dict[str, torch.Tensor] = {}  # static activation scales
        self.input_zero_points: dict[str, torch.Tensor] = {}  # and asymmetric ones' zeros
        self.quantized: set[str] = set()
        self.owner: dict[str, int] = {}  # -- the rank holding each GPTQ linear's Hessian
        # -- GPTQ factors by Hessian, kept with the Hessian they factor (the key is its id)
        self.factors: dict[tuple[int, bool, float], tuple[torch.Tensor, HessianFactor]] = {}

    def full(self, rel: str) -> str:
        return f"{self.prefix}.{rel}" if self.prefix else rel

    def run(self, stats: dict[str, LayerStats]) -> None:
        """Run every sample through the block, feeding each linear's input to its stats;
        with several shards, each shard's statistics apart, then merged over all ranks."""
        if len(self.shards) == 1 and not self.ranks.parallel:
            self._run_samples(stats, self.samples)
            return
        partials = []
        for shard in self.shards:
            partial = {rel: partial_like(st) for rel, st in stats.items()}
            self._run_samples(partial, self.samples[shard])
            partials.append(partial)
        if not self.ranks.parallel:
            merge_shards(stats, partials)
            return
        self._merge_over_ranks(stats, partials)

    def _merge_over_ranks(
        self, stats: dict[str, LayerStats], partials: list[dict[str, LayerStats]]
    ) -> None:
        """Merge every rank's shards into ``stats``: the light statistics on every rank,
        each Hessian only on the ranks that solve a linear fed that input (``owner``)."""
        where = self.prefix or "the block"
        split = [split_hessians(partial) for partial in partials]
        light = [(shard, names) for shard, names, _ in split]
        every = [
            shard
            for rank_shards in self.ranks.exchange(light, f"the statistics of {where}", self.device)
            for shard in rank_shards
        ]
        groups = hessian_groups([names for _, names in every])
        owner = dict(zip(groups, self._owners(list(groups), groups), strict=True))
        self.owner.update(owner)
        payloads = []
        for rank in range(self.ranks.world):
            solves = {rel for rel, r in owner.items() if r == rank}
            wanted = {rel for rel in groups if groups[rel] in {groups[x] for x in solves}}
            payloads.append([_tensors_for(wanted, names, tensors) for _, names, tensors in split])
        received = self.ranks.deliver(payloads, f"the Hessians of {where}", self.device)
        solves = {rel for rel, r in owner.items() if r == self.ranks.rank}
        mine = {rel for rel in groups if groups[rel] in {groups[x] for x in solves}}
        tensors = [shard for rank_shards in received for shard in rank_shards]
        for (shard, names), shard_tensors in zip(every, tensors, strict=True):
            attach_hessians(shard, names, shard_tensors, mine)
        merge_shards(stats, [shard for shard, _ in every], hessians_of=mine)

    def _run_samples(self, stats: dict[str, LayerStats], samples: list[BlockInput]) -> None:
        handles = attach(self.linears, stats)
        try:
            with torch.no_grad():
                for sample in samples:
                    run_block(self.module, sample, self.device)
        finally:
            for h in handles:
                h.remove()

    def rescaled_within(self, name: str) -> bool:
        """Whether a step rescaled module ``name`` (``""``: the block) or one inside it since
        the statistics pass."""
        if not name:
            return bool(self.rescaled)
        return any(r == name or r.startswith(f"{name}.") for r in self.rescaled)

    def mappings_for(self, algorithm: str) -> list[BalanceMapping]:
        """Balance mappings whose linears all use ``algorithm``."""
        return [
            m
            for m in self.balance
            if all(self.schemes[x].algorithm == algorithm for x in m.linears)
        ]

    def foldable_source(self, m: BalanceMapping) -> nn.Module | None:
        """``m.source`` when its output channels are exactly the linears' inputs, else ``None``."""
        try:
            source = self.module.get_submodule(m.source)
        except AttributeError:
            return None
        k = get_weight(self.linears[m.linears[0]]).shape[1]
        return source if out_features(source) == k else None

    def reached(self, rels: list[str] | tuple[str, ...]) -> bool:
        """Whether calibration tokens reached every one of ``rels``."""
        return all(self.stats[x].tokens > 0 for x in rels)

    def weight_stats(self, rel: str) -> WeightStats | None:
        """What the rounding of ``rel`` reads (``None`` where nothing was gathered for it)."""
        st = self.stats.get(rel)
        if st is None:
            return None
        hessian = st.hessian if st.tokens > 0 else None
        factor = None
        if hessian is not None and self.schemes[rel].rounds_with_gptq:
            factor = self.hessian_factor(rel, hessian)
        return WeightStats(hessian, self.clip_ranges.get(rel), factor)

    def hessian_factor(self, rel: str, hessian: torch.Tensor) -> HessianFactor:
        """GPTQ's factor of ``hessian`` for ``rel``'s settings, made once for all the
        linears that share that Hessian (q/k/v, gate/up) on this rank."""
        settings = self.schemes[rel].gptq
        key = (id(hessian), settings.act_order, settings.dampening)
        if key not in self.factors:
            made = factor_hessian(hessian, settings.act_order, settings.dampening, self.full(rel))
            self.factors[key] = (hessian, made)
        return self.factors[key][1]

    @torch.no_grad()
    def quantize(self, rels: set[str]) -> None:
        """Replace the linears ``rels`` not yet quantized by ``QuantLinear``, in block order.

        Each GPTQ linear is solved on the rank its Hessian was sent to (``owner``, chosen
        by cost in :meth:`run`) and every rank receives each result; round-to-nearest
        linears are cheap and rounded on every rank.
        """
        todo = [rel for rel in self.schemes if rel in rels and rel not in self.quantized]
        solved = [rel for rel in todo if self.schemes[rel].rounds_with_gptq]
        owner = [self.owner[rel] for rel in solved] if self.ranks.parallel else None
        costs = [1.0] * len(solved)  # -- the owners are known: costs no longer matter
        what = f"the GPTQ layers of {self.prefix}"
        layers = self.ranks.solve_spread(solved, costs, self._build, what, self.device, owner=owner)
        built = dict(zip(solved, layers, strict=True))
        for rel in todo:
            layer = built[rel] if rel in built else self._build(rel)
            module = self.linears[rel]
            replace_layer(self.model, self.full(rel), layer, self.summary, tensor_bytes(module))
            self.quantized.add(rel)

    def _owners(self, rels: list[str], groups: dict[str, str]) -> list[int]:
        """The rank that solves each GPTQ linear of ``rels`` (and receives its Hessian).

        Costs in proportion: the column loop and range search go as ``N * K``, the
        Hessian's factor as ``K^3 / 4096`` (both measured on one CPU thread at K = 576 and
        1536), the factor needed once per rank by all the linears of one Hessian ``group``.
        """
        costs, shared = [], []
        for rel in rels:
            n, k = get_weight(self.linears[rel]).shape
            costs.append(float(n) * k)
            shared.append((groups[rel], float(k) ** 3 / 4096))
        return self.ranks.owners(costs, shared)

    def _build(self, rel: str) -> nn.Module:
        module = self.linears[rel]
        return build_quant_linear(
            get_weight(module),
            getattr(module, "bias", None),
            self.schemes[rel],
            self.full(rel),
            self.weight_stats(rel),
            smooth=self.smooth.get(rel),
            input_scale=self.input_scales.get(rel),
            input_zero_point=self.input_zero_points.get(rel),
        )


def _tensors_for(
    rels: set[str], names: dict[str, str | None], tensors: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The Hessians of one shard that the linears ``rels`` read (each shared tensor once)."""
    needed = {names[rel] for rel in rels if names[rel] is not None}
    return {name: t for name, t in tensors.items() if name in needed}


class CalibrationStep(ABC):
    """One step of calibrating a block; built per block, called in ``CALIBRATION_STEPS`` order."""

    def __init__(self, block: CalibrationBlock) -> None:
        self.block = block

    def request(self, scheme: QuantScheme) -> StatsRequest | None:
        """What the statistics pass keeps for a linear of ``scheme`` (``None``: nothing)."""
        return None

    def observe(self) -> list[RemovableHandle]:
        """Extra hooks for the statistics pass; the engine removes them after it."""
        return []

    @abstractmethod
    def apply(self) -> None:
        """Run the step on the block (after the statistics pass and the steps before it)."""
