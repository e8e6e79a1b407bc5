"""Tensor and module names that differ between a model's checkpoints and its transformers 5 modules.

transformers 5 renames some architectures' modules at load time and reverses the renaming
when it saves, so the files keep the names the original checkpoints (and vLLM) use.
Mixtral's mixture-of-experts block, for instance, is ``layers.N.mlp`` in the module tree
but ``layers.N.block_sparse_moe`` in the files, and its per-expert projections are
``w1`` (gate), ``w3`` (up) and ``w2`` (down) rather than ``gate_proj``, ``up_proj`` and
``down_proj``.  :data:`CHECKPOINT_NAMES` records those renamings per ``config.model_type``
as pairs of dotted templates (module side, checkpoint side) in which ``*`` stands for one
numeric segment (a layer or expert index), bound in order; a template matches whole
segments anywhere in a name.  A name is renamed by the first pair whose template for its
side matches (so specific pairs come before general ones): module side to checkpoint side
on export, back on import.  A name no pair matches is the same on both sides, so folders
written with the module names load as well.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, TypeVar

from torchquant.errors import CheckpointError

T = TypeVar("T")

_MIXTRAL_STYLE = (
    ("layers.*.mlp.experts.*.gate_proj", "layers.*.block_sparse_moe.experts.*.w1"),
    ("layers.*.mlp.experts.*.up_proj", "layers.*.block_sparse_moe.experts.*.w3"),
    ("layers.*.mlp.experts.*.down_proj", "layers.*.block_sparse_moe.experts.*.w2"),
    ("layers.*.mlp", "layers.*.block_sparse_moe"),
)

# model_type -> (module-side template, checkpoint-side template), first match wins.
# Taken from transformers' conversion_mapping.py (the renamings it reverses on save); types
# whose per-expert checkpoint names equal the split module names (Qwen2/3-MoE, OLMoE,
# DeepSeek-V2/V3, Jamba, ...) need no entry.
CHECKPOINT_NAMES: dict[str, tuple[tuple[str, str], ...]] = {
    "mixtral": _MIXTRAL_STYLE,
    "minimax": _MIXTRAL_STYLE,
    "minimax_m2": _MIXTRAL_STYLE,
    "phimoe": (
        *_MIXTRAL_STYLE[:3],
        ("layers.*.mlp.router", "layers.*.block_sparse_moe.gate"),
        _MIXTRAL_STYLE[3],
    ),
    "lfm2_moe": (
        ("layers.*.feed_forward.experts.*.gate_proj", "layers.*.feed_forward.experts.*.w1"),
        ("layers.*.feed_forward.experts.*.up_proj", "layers.*.feed_forward.experts.*.w3"),
        ("layers.*.feed_forward.experts.*.down_proj", "layers.*.feed_forward.experts.*.w2"),
    ),
}


@lru_cache(maxsize=256)
def _compile(template: str) -> re.Pattern[str]:
    parts = [r"(\d+)" if seg == "*" else re.escape(seg) for seg in template.split(".")]
    return re.compile(r"(?:^|(?<=\.))" + r"\.".join(parts) + r"(?=\.|$)")


def _filler(template: str) -> Callable[[re.Match[str]], str]:
    segments = template.split(".")

    def fill(match: re.Match[str]) -> str:
        numbers = iter(match.groups())
        return ".".join(next(numbers) if seg == "*" else seg for seg in segments)

    return fill


@dataclass(frozen=True)
class CheckpointNames:
    """The renamings of one model type; the identity when ``pairs`` is empty."""

    model_type: str | None
    pairs: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        for ours, theirs in self.pairs:
            if ours.count("*") != theirs.count("*"):
                raise ValueError(
                    f"pairs: {ours!r} and {theirs!r} must hold the same number of '*' segments"
                )

    def _rename(self, name: str, forward: bool) -> str:
        for ours, theirs in self.pairs:
            source, target = (ours, theirs) if forward else (theirs, ours)
            renamed, count = _compile(source).subn(_filler(target), name, count=1)
            if count:
                return renamed
        return name

    def to_checkpoint(self, name: str) -> str:
        """The name a module or tensor ``name`` of the model has in the files."""
        return self._rename(name, forward=True)

    def to_model(self, name: str) -> str:
        """The model's name for a module or tensor that the files call ``name``."""
        return self._rename(name, forward=False)

    def keys_to_checkpoint(self, tensors: Mapping[str, T]) -> dict[str, T]:
        return self._rekey(tensors, self.to_checkpoint, "the model")

    def keys_to_model(self, tensors: Mapping[str, T]) -> dict[str, T]:
        """``tensors`` keyed by the model's names; two names for one tensor are refused."""
        return self._rekey(tensors, self.to_model, "the checkpoint")

    def _rekey(
        self, tensors: Mapping[str, T], rename: Callable[[str], str], where: str
    ) -> dict[str, T]:
        out: dict[str, T] = {}
        origin: dict[str, str] = {}
        for key, value in tensors.items():
            new = rename(key)
            if new in out:
                raise CheckpointError(
                    f"{where} names tensor {new!r} twice, as {origin[new]!r} and {key!r} "
                    f"({self.model_type} checkpoints and modules name it differently)"
                )
            out[new], origin[new] = value, key
        return out

    def all_names(self, name: str) -> Iterable[str]:
        """``name`` as the model calls it and as the files do (once if they agree)."""
        theirs = self.to_checkpoint(name)
        return (name,) if theirs == name else (name, theirs)


def names_for_type(model_type: object) -> CheckpointNames:
    """The renamings of ``config.model_type`` (none for types the table does not list)."""
    key = model_type if isinstance(model_type, str) else None
    return CheckpointNames(key, CHECKPOINT_NAMES.get(key, ()) if key else ())


def names_for_model(model: Any) -> CheckpointNames:
    """The renamings of a transformers model (through its ``config.model_type``)."""
    return names_for_type(getattr(getattr(model, "config", None), "model_type", None))
