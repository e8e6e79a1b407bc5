"""Layer-name patterns: exact names, shell globs, and ``re:`` regular expressions.

One matcher serves ``convert_model``, ``prepare_qat`` and the calibration engine,
so every entry point resolves overrides and ignores the same way.
"""

from __future__ import annotations

import fnmatch
import re

from torchquant.errors import ConfigError

_GLOB_CHARS = set("*?[")


def validate_pattern(pattern: object, field: str) -> None:
    """Raise :class:`ConfigError` naming ``field`` if ``pattern`` is not a usable pattern."""
    if not isinstance(pattern, str) or not pattern:
        raise ConfigError(f"{field}: a pattern must be a non-empty string, got {pattern!r}")
    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except (re.error, OverflowError, RecursionError) as exc:
            raise ConfigError(f"{field}: invalid regular expression {pattern!r}: {exc}") from None


def matches(pattern: str, name: str) -> bool:
    """Whether module ``name`` matches ``pattern``.

    ``re:EXPR`` matches if the regex matches the whole name; a pattern with ``* ? [``
    is a shell glob over the whole name; anything else is an exact name, which
    also matches as a suffix at a ``.`` boundary (``lm_head`` matches ``model.lm_head``).
    """
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    if _GLOB_CHARS & set(pattern):
        return fnmatch.fnmatchcase(name, pattern)
    return name == pattern or name.endswith("." + pattern)


def first_match(patterns: list[str] | tuple[str, ...], name: str) -> str | None:
    """The first pattern that matches ``name``, or ``None``."""
    for pattern in patterns:
        if matches(pattern, name):
            return pattern
    return None
