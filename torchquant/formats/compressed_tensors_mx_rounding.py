"""Which E8M0 scale rounding a compressed-tensors folder's MX layers compute with.

compressed-tensors has one rule (``generate_mx_scales``: the block max rounded to a
power of two, up where its significand is 1.75 or more), and its forward quantizes MX
input activations with it; the config has no field for another.  So a folder that
torchquant did not write is read with ``"compressed-tensors"`` for MX weights and
inputs: that reproduces the producer's forward.

A folder torchquant wrote (its shards carry ``torchquant_writer``) records every
rounding other than the spec's in the shards' metadata under :data:`RECORD_KEY`, as
JSON ``{config group: {"weights" | "input_activations": rounding}}``; what it leaves out
is ``"ocp"``, which is also what torchquant wrote before the record existed.  The
metadata, not ``quantization_config``, holds it so that the library's strict config
models never see a field they do not know.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping

from torchquant.checkpoint.save_guard import WRITER_KEY
from torchquant.config import MX_SCALE_ROUNDING_TYPES, MX_SCALE_ROUNDINGS, QuantScheme
from torchquant.errors import CheckpointError, ConfigError

RECORD_KEY = "torchquant_mx_scale_rounding"
# -- the library's own rule, what its forward computes MX scales with
PRODUCER_ROUNDING = "compressed-tensors"
PARTS = ("weights", "input_activations")


def scheme_roundings(scheme: QuantScheme) -> dict[str, str]:
    """The parts of an MX ``scheme`` that round other than the spec (empty for the rest)."""
    if scheme.weight.type not in MX_SCALE_ROUNDING_TYPES:
        return {}
    act = scheme.activation
    got = {"weights": scheme.weight.scale_rounding}
    if act is not None:
        got["input_activations"] = act.scale_rounding
    return {part: rounding for part, rounding in got.items() if rounding != "ocp"}


def rounding_metadata(by_group: Mapping[str, Mapping[str, str]]) -> dict[str, str]:
    """The shard metadata recording ``by_group`` (nothing when every rounding is the spec's)."""
    record = {group: dict(parts) for group, parts in by_group.items() if parts}
    return {RECORD_KEY: json.dumps(record, sort_keys=True)} if record else {}


def folder_roundings(
    shard_metadata: list[Mapping[str, str]], groups: Mapping[str, object]
) -> dict[str, dict[str, str]]:
    """Config group -> ``{part: rounding}`` for both parts, from the shards' metadata."""
    written_here = any(WRITER_KEY in m for m in shard_metadata)
    records = {m[RECORD_KEY] for m in shard_metadata if RECORD_KEY in m}
    if len(records) > 1:
        raise CheckpointError(f"shard metadata {RECORD_KEY!r} differs between shards")
    if records and not written_here:
        raise CheckpointError(f"shard metadata {RECORD_KEY!r} without {WRITER_KEY!r}")
    record = _parse_record(records.pop(), groups) if records else {}
    default = "ocp" if written_here else PRODUCER_ROUNDING
    return {g: {part: record.get(g, {}).get(part, default) for part in PARTS} for g in groups}


def _parse_record(text: str, groups: Mapping[str, object]) -> dict[str, dict[str, str]]:
    where = f"shard metadata {RECORD_KEY!r}"
    try:
        record = json.loads(text)
    except ValueError:
        raise CheckpointError(f"{where}: not JSON") from None
    if not isinstance(record, dict):
        raise CheckpointError(f"{where}: expected a mapping of config groups")
    for group, parts in record.items():
        if group not in groups:
            raise CheckpointError(f"{where}: names config group {group!r}, which is not declared")
        if not isinstance(parts, dict) or not set(parts) <= set(PARTS):
            raise CheckpointError(f"{where}.{group}: expected a mapping with keys among {PARTS}")
        for part, rounding in parts.items():
            if rounding not in MX_SCALE_ROUNDINGS:
                raise CheckpointError(
                    f"{where}.{group}.{part}: {rounding!r} is not one of {MX_SCALE_ROUNDINGS}"
                )
    return record


def with_roundings(scheme: QuantScheme, roundings: Mapping[str, str], name: str) -> QuantScheme:
    """``scheme`` (an MX one) rounding its weights and inputs as ``roundings`` says."""
    if scheme.weight.type not in MX_SCALE_ROUNDING_TYPES:
        return scheme
    try:
        weight = dataclasses.replace(scheme.weight, scale_rounding=roundings["weights"])
        act = scheme.activation
        if act is not None:
            act = dataclasses.replace(act, scale_rounding=roundings["input_activations"])
    except ConfigError as exc:
        raise CheckpointError(f"layer {name!r}: {exc}") from None
    return dataclasses.replace(scheme, weight=weight, activation=act)
