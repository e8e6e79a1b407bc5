"""Quantization configuration: what each layer is quantized to, validated up front.

``QuantConfig`` holds a default :class:`QuantScheme`, ordered per-layer overrides
(first match wins, ``None`` skips the layer) and an ignore list.  Every class is a
frozen dataclass that checks itself at construction and round-trips through JSON.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from torchquant.errors import ConfigError
from torchquant.matching import first_match, validate_pattern

WEIGHT_TYPES = ("int", "fp8")
ACTIVATION_TYPES = ("int8", "fp8")
ACTIVATION_GRANULARITIES = ("token", "tensor")
ALGORITHMS = ("rtn", "gptq", "awq", "smoothquant")
GROUP_SIZES = (-1, 16, 32, 64, 128, 256, 512, 1024)
OBSERVERS = ("minmax", "moving_minmax", "percentile", "kl", "mse")
WEIGHT_OBSERVERS = ("minmax", "mse")
GPTQ_OBSERVERS = (*WEIGHT_OBSERVERS, "hessian_mse")


def _require(cond: bool, field_name: str, value: object, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"{field_name}={value!r} is not allowed; expected {allowed}")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _from_mapping(cls: type, data: object, where: str) -> Any:
    """Build dataclass ``cls`` from a mapping, refusing unknown keys by name."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; known fields are {sorted(known)}")
    return cls(**data)


@dataclass(frozen=True)
class WeightQuant:
    """How a weight is stored.

    ``type="int"``: ``bits`` in 2..8, ``group_size`` -1 (per output channel) or a
    power of two from 16 to 1024 (per group along the input dimension),
    ``symmetric`` or asymmetric (integer zero points).  ``type="fp8"``: E4M3 with a
    float32 scale per channel (``group_size=-1``) or per tensor (``group_size=0``).
    """

    type: str = "int"
    bits: int = 8
    group_size: int = -1
    symmetric: bool = True

    def __post_init__(self) -> None:
        _require(self.type in WEIGHT_TYPES, "weight.type", self.type, f"one of {WEIGHT_TYPES}")
        _require(isinstance(self.symmetric, bool), "weight.symmetric", self.symmetric, "a bool")
        if self.type == "fp8":
            _require(
                _is_int(self.bits) and self.bits == 8, "weight.bits", self.bits, "8 for fp8 weights"
            )
            _require(
                _is_int(self.group_size) and self.group_size in (-1, 0),
                "weight.group_size",
                self.group_size,
                "-1 (per channel) or 0 (per tensor) for fp8 weights",
            )
            _require(self.symmetric, "weight.symmetric", self.symmetric, "True for fp8 weights")
            return
        _require(
            _is_int(self.bits) and 2 <= self.bits <= 8, "weight.bits", self.bits, "an int in 2..8"
        )
        _require(
            self.group_size in GROUP_SIZES and _is_int(self.group_size),
            "weight.group_size",
            self.group_size,
            f"one of {GROUP_SIZES} (-1 = per channel)",
        )


@dataclass(frozen=True)
class ActivationQuant:
    """How a layer's input is quantized at run time (W8A8 schemes).

    ``dynamic=True`` computes the scale from each input (per ``token`` row or per
    ``tensor``), from the max-abs value or the given ``percentile`` of ``|x|``.
    ``dynamic=False`` uses a per-tensor scale fixed by calibration.
    """

    type: str = "int8"
    granularity: str = "token"
    dynamic: bool = True
    percentile: float = 100.0
    observer: str = "minmax"

    def __post_init__(self) -> None:
        _require(
            self.type in ACTIVATION_TYPES,
            "activation.type",
            self.type,
            f"one of {ACTIVATION_TYPES}",
        )
        _require(
            self.granularity in ACTIVATION_GRANULARITIES,
            "activation.granularity",
            self.granularity,
            f"one of {ACTIVATION_GRANULARITIES}",
        )
        _require(isinstance(self.dynamic, bool), "activation.dynamic", self.dynamic, "a bool")
        ok = (
            isinstance(self.percentile, (int, float))
            and not isinstance(self.percentile, bool)
            and 0.0 < self.percentile <= 100.0  # compared first: an int too big for a float
            and math.isfinite(self.percentile)
        )
        _require(ok, "activation.percentile", self.percentile, "a number in (0, 100]")
        _require(
            self.observer in OBSERVERS, "activation.observer", self.observer, f"one of {OBSERVERS}"
        )
        if not self.dynamic:
            _require(
                self.granularity == "tensor",
                "activation.granularity",
                self.granularity,
                "'tensor' for static (calibrated) activation scales",
            )


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class GPTQConfig:
    """GPTQ parameters: column ``block_size``, ``dampening`` (fraction of the mean Hessian
    diagonal added to it), ``act_order`` (columns by decreasing Hessian diagonal) and
    ``static_groups`` (group qparams fixed before reordering, so no ``g_idx`` is needed),
    ``observer`` choosing each group's range (``minmax``, ``mse`` clipping search, or
    ``hessian_mse``: the search weighing each column by its input Hessian diagonal).

    Act-order with static groups is the default: visiting the outlier-fed columns first
    matters most on models with activation outliers, and it keeps the plain group layout.
    The groups' ranges come from the clipping search weighted by the Hessian diagonal:
    GPTQ's objective counts a column's error in proportion to its inputs' energy, so the
    range should too (SmolLM2-135M g128: w4 28.51 -> 26.62, w3 46.58 -> 39.39 perplexity
    vs the unweighted search).
    """

    block_size: int = 128
    dampening: float = 0.01
    act_order: bool = True
    static_groups: bool = True
    observer: str = "hessian_mse"

    def __post_init__(self) -> None:
        _require(
            _is_int(self.block_size) and self.block_size > 0,
            "gptq.block_size",
            self.block_size,
            "a positive int",
        )
        _require(
            _is_number(self.dampening) and 0.0 < self.dampening < 1.0,
            "gptq.dampening",
            self.dampening,
            "a number in (0, 1)",
        )
        _require(isinstance(self.act_order, bool), "gptq.act_order", self.act_order, "a bool")
        _require(
            isinstance(self.static_groups, bool), "gptq.static_groups", self.static_groups, "a bool"
        )
        _require(
            self.observer in GPTQ_OBSERVERS,
            "gptq.observer",
            self.observer,
            f"one of {GPTQ_OBSERVERS}",
        )


@dataclass(frozen=True)
class AWQConfig:
    """AWQ parameters: ``grid`` points for the scale exponent alpha in [0, 1), ``clip``
    search on or off with ``clip_grid`` points down to ``max_shrink`` of the range,
    and ``max_tokens`` of calibration activations used in the searches.
    ``duo_scaling`` divides the activation term by the weights' group-relative
    magnitude (``True``), leaves it out (``False``, the default: on SmolLM2-135M w4 g128
    it measured 26.94 perplexity vs 27.32 with it) or searches both (``"both"``).
    ``rounding="gptq"`` rounds the scaled weights with GPTQ (the scheme's ``gptq``
    parameters) instead of round-to-nearest with the clipping search.
    """

    grid: int = 20
    duo_scaling: bool | str = False
    rounding: str = "rtn"
    clip: bool = True
    clip_grid: int = 20
    max_shrink: float = 0.5
    max_tokens: int = 4096

    def __post_init__(self) -> None:
        _require(_is_int(self.grid) and self.grid >= 1, "awq.grid", self.grid, "an int >= 1")
        _require(
            isinstance(self.duo_scaling, bool) or self.duo_scaling == "both",
            "awq.duo_scaling",
            self.duo_scaling,
            'True, False or "both"',
        )
        _require(self.rounding in ("rtn", "gptq"), "awq.rounding", self.rounding, "'rtn' or 'gptq'")
        _require(isinstance(self.clip, bool), "awq.clip", self.clip, "a bool")
        _require(
            _is_int(self.clip_grid) and self.clip_grid >= 1,
            "awq.clip_grid",
            self.clip_grid,
            "an int >= 1",
        )
        _require(
            _is_number(self.max_shrink) and 0.0 < self.max_shrink < 1.0,
            "awq.max_shrink",
            self.max_shrink,
            "a number in (0, 1)",
        )
        _require(
            _is_int(self.max_tokens) and self.max_tokens > 0,
            "awq.max_tokens",
            self.max_tokens,
            "a positive int",
        )


@dataclass(frozen=True)
class SmoothQuantConfig:
    """SmoothQuant migration strength: ``s_j = max|x_j|^alpha / max|w_j|^(1 - alpha)``.

    As in the SmoothQuant paper, only inputs that come out of a norm are smoothed by
    default; the inputs a linear produces (``o_proj`` from ``v_proj``, ``down_proj`` from
    ``up_proj``) carry outliers too large to move into per-channel weights, and smoothing
    them costs accuracy.  ``smooth_linear_inputs`` smooths those too.
    """

    alpha: float = 0.5
    smooth_linear_inputs: bool = False

    def __post_init__(self) -> None:
        _require(
            _is_number(self.alpha) and 0.0 <= self.alpha <= 1.0,
            "smoothquant.alpha",
            self.alpha,
            "a number in [0, 1]",
        )
        _require(
            isinstance(self.smooth_linear_inputs, bool),
            "smoothquant.smooth_linear_inputs",
            self.smooth_linear_inputs,
            "true or false",
        )


_ALGORITHM_PARAMS = {"gptq": GPTQConfig, "awq": AWQConfig, "smoothquant": SmoothQuantConfig}


@dataclass(frozen=True)
class QuantScheme:
    """A weight format, an optional activation format, and the algorithm that picks the weights."""

    weight: WeightQuant = field(default_factory=WeightQuant)
    activation: ActivationQuant | None = None
    algorithm: str = "rtn"
    gptq: GPTQConfig = field(default_factory=GPTQConfig)
    awq: AWQConfig = field(default_factory=AWQConfig)
    smoothquant: SmoothQuantConfig = field(default_factory=SmoothQuantConfig)

    def __post_init__(self) -> None:
        for name, cls in _ALGORITHM_PARAMS.items():
            value = getattr(self, name)
            if isinstance(value, Mapping):
                object.__setattr__(self, name, _from_mapping(cls, value, name))
            _require(isinstance(getattr(self, name), cls), name, value, f"a {cls.__name__}")
        if isinstance(self.weight, Mapping):
            object.__setattr__(self, "weight", _from_mapping(WeightQuant, self.weight, "weight"))
        if isinstance(self.activation, Mapping):
            act = _from_mapping(ActivationQuant, self.activation, "activation")
            object.__setattr__(self, "activation", act)
        _require(isinstance(self.weight, WeightQuant), "weight", self.weight, "a WeightQuant")
        _require(
            self.activation is None or isinstance(self.activation, ActivationQuant),
            "activation",
            self.activation,
            "an ActivationQuant or None",
        )
        _require(self.algorithm in ALGORITHMS, "algorithm", self.algorithm, f"one of {ALGORITHMS}")
        act, w = self.activation, self.weight
        if self.algorithm in ("gptq", "awq"):
            _require(
                w.type == "int",
                "weight.type",
                w.type,
                f"'int' weights for algorithm {self.algorithm!r}",
            )
        g = self.gptq
        if self.rounds_with_gptq and g.act_order and not g.static_groups:
            _require(
                not (w.bits == 8 and w.symmetric and w.group_size > 0),
                "gptq.static_groups",
                g.static_groups,
                "True for grouped symmetric 8-bit weights with act_order (stored unpacked, "
                "they cannot carry a g_idx)",
            )
        if self.algorithm == "smoothquant":
            _require(
                act is not None,
                "activation",
                act,
                "an activation format (w8a8 or fp8) for algorithm 'smoothquant'",
            )
        if act is None:
            return
        if act.type == "int8":
            _require(
                w.type == "int" and w.bits == 8 and w.symmetric and w.group_size == -1,
                "weight",
                w,
                "INT8 symmetric per-channel weights when activations are int8 (w8a8)",
            )
        else:
            _require(
                w.type == "fp8",
                "weight.type",
                w.type,
                "'fp8' when activations are fp8",
            )

    @property
    def rounds_with_gptq(self) -> bool:
        """Whether GPTQ rounds the weights (plain GPTQ, or AWQ with ``rounding="gptq"``)."""
        return self.algorithm == "gptq" or (self.algorithm == "awq" and self.awq.rounding == "gptq")

    @property
    def needs_calibration(self) -> bool:
        """Whether quantizing with this scheme needs calibration activations."""
        static_act = self.activation is not None and not self.activation.dynamic
        return self.algorithm != "rtn" or static_act

    @property
    def weight_only(self) -> bool:
        return self.activation is None

    def describe(self) -> str:
        """Short human-readable name, e.g. ``w4a16 g128 asym`` or ``w8a8 int8``."""
        w, a = self.weight, self.activation
        wname = "fp8" if w.type == "fp8" else f"int{w.bits}"
        gran = {-1: "per-channel", 0: "per-tensor"}.get(w.group_size, f"g{w.group_size}")
        sym = "" if w.type == "fp8" else (" sym" if w.symmetric else " asym")
        act = (
            "a16"
            if a is None
            else f"a8 {a.type} {'dyn' if a.dynamic else 'static'} {a.granularity}"
        )
        algo = "" if self.algorithm == "rtn" else f" {self.algorithm}"
        return f"w-{wname} {gran}{sym} {act}{algo}".strip()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantScheme:
        return _from_mapping(cls, data, "scheme")


def _as_scheme(value: object, where: str) -> QuantScheme | None:
    """Accept a scheme, a shorthand name (``"w4a16"``), a mapping, or ``None``."""
    from torchquant.schemes import scheme_from_name

    if value is None or isinstance(value, QuantScheme):
        return value
    if isinstance(value, str):
        return scheme_from_name(value)
    if isinstance(value, Mapping):
        return _from_mapping(QuantScheme, value, where)
    raise ConfigError(f"{where}: expected a QuantScheme, a scheme name or None, got {value!r}")


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
        object.__setattr__(self, "default", _as_scheme(self.default, "default"))
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
            normalized.append((pattern, _as_scheme(scheme, f"overrides[{pattern!r}]")))
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
        config = _from_mapping(cls, data, "config")
        return config
