"""Validation helpers shared by the config dataclasses."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from torchquant.errors import ConfigError


def require(cond: bool, field_name: str, value: object, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"{field_name}={value!r} is not allowed; expected {allowed}")


def is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def from_mapping(cls: type, data: object, where: str) -> Any:
    """Build dataclass ``cls`` from a mapping, refusing unknown keys by name."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; known fields are {sorted(known)}")
    return cls(**data)


def is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
