"""``QuantConfig``: which layers get which scheme, validated up front.

A default :class:`QuantScheme`, ordered per-layer overrides (first match wins, ``None``
skips the layer) and an ignore list; a frozen dataclass that checks itself at
construction and round-trips through JSON.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torchquant.config.fields import from_mapping
from torchquant.config.matching import first_match, validate_pattern
from torchquant.config.scheme import QuantScheme, as_scheme
from torchquant.errors import ConfigError


@dataclass(frozen=True)
class QuantConfig:
    """Which layers get which scheme.

    Resolution for a module named ``name``: if it matches an ``ignore`` pattern it
    is skipped; else the first matching key of ``overrides`` decides (a ``None``
    value skips it); else ``default`` applies (``None`` means "only overrides").
    Patterns are exact names, shell globs, or ``re:`` regexes (see ``matching``).
    """

    default: QuantScheme | None = None
    overrides: tuple[tuple[str, QuantScheme | None], ...] = ()
    ignore: tuple[str, ...] = ("lm_head",)

    def __post_init__(self) -> None:
        object.__setattr__(self, "default", as_scheme(self.default, "default"))
        overrides = self.overrides
        if isinstance(overrides, Mapping):
            overrides = tuple(overrides.items())
        if not isinstance(overrides, Sequence) or isinstance(overrides, str):
            raise ConfigError(f"overrides: expected a mapping or pairs, got {overrides!r}")
        normalized = []
        for i, item in enumerate(overrides):
            if not isinstance(item, Sequence) or isinstance(item, str) or len(item) != 2:
                raise ConfigError(f"overrides[{i}]: expected (pattern, scheme), got {item!r}")
            pattern, scheme = item
            validate_pattern(pattern, f"overrides[{i}]")
            normalized.append((pattern, as_scheme(scheme, f"overrides[{pattern!r}]")))
        object.__setattr__(self, "overrides", tuple(normalized))
        ignore = self.ignore
        if isinstance(ignore, str):
            ignore = (ignore,)
        if ignore is None:
            ignore = ()
        if not isinstance(ignore, Sequence):
            raise ConfigError(f"ignore: expected a pattern or a list of patterns, got {ignore!r}")
        ignore = tuple(ignore)
        for i, pattern in enumerate(ignore):
            validate_pattern(pattern, f"ignore[{i}]")
        object.__setattr__(self, "ignore", ignore)
        if self.default is None and not any(s is not None for _, s in self.overrides):
            raise ConfigError("default is None and no override names a scheme: nothing to quantize")

    def resolve(self, name: str, aliases: Sequence[str] = ()) -> tuple[QuantScheme | None, str]:
        """The scheme for module ``name`` and why (``"default"``, ``"override 'x'"``, ...).

        A pattern that matches one of ``aliases`` counts as matching ``name`` (a per-expert
        linear answers to its experts module's name too, see ``QuantExperts``).
        """
        names = (name, *aliases)

        def hit(patterns: Sequence[str]) -> str | None:
            return next((p for p in patterns if any(first_match((p,), n) for n in names)), None)

        pattern = hit(self.ignore)
        if pattern is not None:
            return None, f"ignored by {pattern!r}"
        for pattern, scheme in self.overrides:
            if hit((pattern,)) is not None:
                return scheme, f"override {pattern!r}" if scheme else f"skipped by {pattern!r}"
        return self.default, "default" if self.default else "no default scheme"

    def to_dict(self) -> dict[str, Any]:
        return {
            "default": None if self.default is None else self.default.to_dict(),
            "overrides": [[p, None if s is None else s.to_dict()] for p, s in self.overrides],
            "ignore": list(self.ignore),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantConfig:
        config = from_mapping(cls, data, "config")
        return config
