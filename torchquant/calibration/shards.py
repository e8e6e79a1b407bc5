"""Per-shard partial statistics and their merge, in shard order.

The calibration samples are cut into a fixed number of contiguous shards.  Each shard's
statistics are gathered on their own (on whichever rank holds the shard) and merged in
shard order, so one process given the same shard count produces bit-identical
statistics to any number of ranks:

- token counts add; maxima (``|x|`` per channel) take the maximum;
- Hessians ``2/t_s X_s^T X_s`` are summed as ``sum_s (t_s / T) H_s``; sums of ``|x|``
  add, shard after shard;
- kept input rows are the first rows of the shards in order (those one pass would keep);
- an activation observer replays every batch's range in sample order (the ``kl``
  observer's histograms cannot be replayed and are refused with more than one shard).

With one shard the merge is not used: statistics accumulate as they always did.

Across ranks, Hessians travel apart from the rest (:func:`split_hessians`): every rank
receives every shard's light statistics, but a Hessian only reaches the ranks that solve
a linear fed that input, which merge it in the same shard order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Sequence
from functools import reduce

import torch

from torchquant.calibration.stats import LayerStats
from torchquant.errors import CalibrationError
from torchquant.numerics.observers import Observer


class BatchRanges(Observer):
    """An observer that keeps each batch's ``(lo, hi)`` in order instead of combining them,
    so that the batches of all shards can be combined later, in sample order."""

    def __init__(self, like: Observer) -> None:
        if like.kind == "kl":
            raise CalibrationError(
                f"{like.name}: the 'kl' observer's histograms cannot be merged across "
                "calibration shards; calibrate in one shard (one process) or use another "
                "observer (minmax, moving_minmax, percentile, mse)"
            )
        super().__init__(
            like.kind,
            like.granularity,
            like.group_size,
            like.bits,
            like.symmetric,
            like.percentile,
            like.momentum,
            like.name,
        )
        self.ranges: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _combine(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        self.ranges.append((lo, hi))


def partial_like(st: LayerStats) -> LayerStats:
    """Empty statistics for one shard, asking for what ``st`` asks for."""
    observer = BatchRanges(st.observer) if st.observer is not None else None
    return LayerStats(
        st.name,
        st.want_hessian,
        st.want_absmax,
        st.want_samples,
        observer=observer,
        divisor=st.divisor,
    )


def merge_shards(
    stats: dict[str, LayerStats],
    partials: Sequence[dict[str, LayerStats]],
    hessians_of: Collection[str] | None = None,
) -> None:
    """Fold the shards' ``partials`` (in shard order) into ``stats``.

    Linears whose partial Hessians are shared in every shard (q/k/v, gate/up) share the
    merged one too.  With ``hessians_of``, only those linears' Hessians are merged (the
    others were not sent here) and the rest get none.
    """
    merged_hessians: dict[tuple[int, ...], torch.Tensor | None] = {}
    for rel, st in stats.items():
        parts = [p[rel] for p in partials]
        st.tokens = sum(p.tokens for p in parts)
        if st.want_hessian and hessians_of is not None and rel not in hessians_of:
            st.hessian = None
        elif st.want_hessian:
            key = tuple(id(p.hessian) for p in parts)
            if key in merged_hessians:
                st.hessian_shared = True
            else:
                merged_hessians[key] = _weighted_hessian(parts, st.tokens)
            st.hessian = merged_hessians[key]
        if st.want_absmax:
            st.absmax = _fold([p.absmax for p in parts], torch.maximum)
        if st.want_samples:
            st.abssum = _fold([p.abssum for p in parts], torch.add)
            rows = torch.cat([s for p in parts for s in p.samples]) if st.tokens else None
            st.samples = [rows[: st.want_samples]] if rows is not None else []
        if st.observer is not None:
            for p in parts:
                for lo, hi in p.observer.ranges:
                    st.observer._combine(lo, hi)
                    st.observer.batches += 1


def _weighted_hessian(parts: list[LayerStats], tokens: int) -> torch.Tensor | None:
    """``sum_s (t_s / T) H_s`` over the shards that saw tokens, in shard order."""
    terms = [p.hessian * (p.tokens / tokens) for p in parts if p.tokens > 0]
    return _fold(terms, torch.add)


def _fold(values: list[torch.Tensor | None], op) -> torch.Tensor | None:
    present = [v for v in values if v is not None]
    return reduce(op, present) if present else None


# -- per shard: each linear's Hessian group (the first linear holding the same tensor in
# -- that shard, None where it saw no tokens), and the Hessian tensors by group
HessianNames = dict[str, str | None]
ShardHessians = dict[str, torch.Tensor]


def split_hessians(
    partial: dict[str, LayerStats],
) -> tuple[dict[str, LayerStats], HessianNames, ShardHessians]:
    """One shard's ``partial`` without its Hessians, which linear's Hessian is which, and
    the Hessians themselves (each shared tensor once)."""
    light, names, tensors = {}, {}, {}
    first: dict[int, str] = {}
    for rel, st in partial.items():
        light[rel] = dataclasses.replace(st, hessian=None, hessian_source=None)
        if st.want_hessian:
            name = None if st.hessian is None else first.setdefault(id(st.hessian), rel)
            names[rel] = name
            if name == rel:
                tensors[rel] = st.hessian
    return light, names, tensors


def hessian_groups(names: Sequence[HessianNames]) -> dict[str, str]:
    """Each linear's group over all shards (``names`` in shard order), named by its first
    linear: linears share the merged Hessian when they share it in every shard."""
    groups: dict[tuple[str | None, ...], str] = {}
    rels = names[0].keys() if names else []
    return {rel: groups.setdefault(tuple(n[rel] for n in names), rel) for rel in rels}


def attach_hessians(
    light: dict[str, LayerStats], names: HessianNames, tensors: ShardHessians, rels: set[str]
) -> None:
    """Give the light statistics of one shard back the Hessians of ``rels`` received."""
    for rel in rels:
        name = names[rel]
        light[rel].hessian = None if name is None else tensors[name]
