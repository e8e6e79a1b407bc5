"""Layer-name patterns: exact names, shell globs, and ``re:`` regular expressions.

One matcher serves ``convert_model``, ``prepare_qat``, the calibration engine and the
checkpoint loaders, so every entry point resolves overrides and ignores the same way.

Patterns can come from an untrusted checkpoint (a native checkpoint embeds its
``QuantConfig``, compressed-tensors lists ``re:`` targets), so a regular expression
is bounded before it runs: its length and the size it expands to when compiled are
capped, and it is matched by the ``regex`` engine under a timeout instead of
Python's ``re``, whose backtracking can run for minutes on ``(.*.*)*X``.
"""

from __future__ import annotations

import fnmatch
import re

import regex

from torchquant.errors import ConfigError

try:
    from re import _parser as sre_parse
except ImportError:  # Python < 3.11
    import sre_parse  # type: ignore[no-redef]

_GLOB_CHARS = set("*?[")
MAX_PATTERN_CHARS = 1000
# the compiled program repeats a counted group's body: (a{1000}){1000} is a million nodes
MAX_EXPANDED_NODES = 10_000
MATCH_TIMEOUT_S = 1.0
_REPEATS = {sre_parse.MAX_REPEAT, sre_parse.MIN_REPEAT}
if hasattr(sre_parse, "POSSESSIVE_REPEAT"):
    _REPEATS.add(sre_parse.POSSESSIVE_REPEAT)
_compiled: dict[str, regex.Pattern] = {}


def _expanded_nodes(items: object) -> int:
    """How many nodes a parsed expression becomes once counted repeats are unrolled."""
    total = 0
    for op, av in items:
        if op in _REPEATS:
            lo, hi, body = av
            count = lo if hi == sre_parse.MAXREPEAT else hi
            total += max(count, 1) * _expanded_nodes(body)
            continue
        total += 1
        for part in av if isinstance(av, (tuple, list)) else ():
            if isinstance(part, sre_parse.SubPattern):
                total += _expanded_nodes(part)
            elif isinstance(part, list) and all(isinstance(p, sre_parse.SubPattern) for p in part):
                total += sum(_expanded_nodes(p) for p in part)
    return total


def compile_regex(expr: str, field: str) -> regex.Pattern:
    """``expr`` compiled, after checking it is valid, short and small once unrolled."""
    if expr in _compiled:
        return _compiled[expr]
    if len(expr) > MAX_PATTERN_CHARS:
        raise ConfigError(
            f"{field}: invalid regular expression: {len(expr)} characters, longer than the "
            f"{MAX_PATTERN_CHARS} allowed"
        )
    try:
        re.compile(expr)
        nodes = _expanded_nodes(sre_parse.parse(expr))
    except (re.error, OverflowError, RecursionError) as exc:
        raise ConfigError(f"{field}: invalid regular expression 're:{expr}': {exc}") from None
    if nodes > MAX_EXPANDED_NODES:
        raise ConfigError(
            f"{field}: invalid regular expression 're:{expr}': repeats into {nodes} nodes, "
            f"more than the {MAX_EXPANDED_NODES} allowed"
        )
    try:
        compiled = regex.compile(expr)
    except (regex.error, OverflowError, RecursionError) as exc:
        raise ConfigError(f"{field}: invalid regular expression 're:{expr}': {exc}") from None
    if len(_compiled) >= 1024:  # -- a config with endless patterns must not grow it forever
        _compiled.clear()
    _compiled[expr] = compiled
    return compiled


def match_regex(expr: str, name: str, field: str = "pattern", *, whole: bool = True) -> bool:
    """Whether ``expr`` matches ``name`` (the whole name, or with ``whole=False`` a prefix).

    Raises :class:`ConfigError` naming ``field`` if the match runs past the timeout.
    """
    compiled = compile_regex(expr, field)
    try:
        if whole:
            return compiled.fullmatch(name, timeout=MATCH_TIMEOUT_S) is not None
        return compiled.match(name, timeout=MATCH_TIMEOUT_S) is not None
    except TimeoutError:
        raise ConfigError(
            f"{field}: regular expression 're:{expr}' took over {MATCH_TIMEOUT_S}s to match "
            f"{name!r}; simplify it"
        ) from None


def validate_pattern(pattern: object, field: str) -> None:
    """Raise :class:`ConfigError` naming ``field`` if ``pattern`` is not a usable pattern."""
    if not isinstance(pattern, str) or not pattern:
        raise ConfigError(f"{field}: a pattern must be a non-empty string, got {pattern!r}")
    if pattern.startswith("re:"):
        compile_regex(pattern[3:], field)


def matches(pattern: str, name: str) -> bool:
    """Whether module ``name`` matches ``pattern``.

    ``re:EXPR`` matches if the regex matches the whole name; a pattern with ``* ? [``
    is a shell glob over the whole name; anything else is an exact name, which
    also matches as a suffix at a ``.`` boundary (``lm_head`` matches ``model.lm_head``).
    """
    if pattern.startswith("re:"):
        return match_regex(pattern[3:], name)
    if _GLOB_CHARS & set(pattern):
        return fnmatch.fnmatchcase(name, pattern)
    return name == pattern or name.endswith("." + pattern)


def first_match(patterns: list[str] | tuple[str, ...], name: str) -> str | None:
    """The first pattern that matches ``name``, or ``None``."""
    for pattern in patterns:
        if matches(pattern, name):
            return pattern
    return None
