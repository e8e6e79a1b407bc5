"""What one layer is quantized to: a weight format, an optional activation format, an algorithm.

Every class is a frozen dataclass that checks itself at construction and round-trips
through JSON; ``scheme_from_name`` turns the shorthands (``w4a16``, ``w8a8``, ``fp8`` ...)
into schemes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from torchquant.config.algorithms import (
    ALGORITHMS,
    CALIBRATED_ALGORITHMS,
    INT_WEIGHT_ALGORITHMS,
    OBSERVERS,
    RESCALING_ALGORITHMS,
    WEIGHT_OBSERVERS,
    AWQConfig,
    GPTQConfig,
    HQQConfig,
    SmoothQuantConfig,
)
from torchquant.config.fields import from_mapping, is_int, require
from torchquant.errors import ConfigError

# -- FP4 E2M1 weights: each type's fixed block of scaled values along K (NVFP4, OCP MXFP4)
FP4_BLOCKS = {"nvfp4": 16, "mxfp4": 32}
# -- algorithms that round FP4 weights (AWQ's scales and clipping search, GPTQ's column
# -- loop with the block scales fixed first, both on the FP4 grid)
FP4_ALGORITHMS = ("rtn", "awq", "gptq")
# -- microscaled types: block of values along K sharing one scale, and the value bits
# -- (NVFP4 and MXFP4 as above, OCP MXFP8: E4M3 values with E8M0 scales)
MICROSCALED_BLOCKS = {**FP4_BLOCKS, "mxfp8": 32}
MICROSCALED_BITS = {"nvfp4": 4, "mxfp4": 4, "mxfp8": 8}
WEIGHT_TYPES = ("int", "fp8", *MICROSCALED_BLOCKS)
ACTIVATION_TYPES = ("int8", "fp8", "int4", *MICROSCALED_BLOCKS)
# -- integer activation types: codes multiply INT weight codes exactly in int32
INT_ACTIVATION_TYPES = ("int8", "int4")
ACTIVATION_GRANULARITIES = ("token", "tensor", "group")
GROUP_SIZES = (-1, 16, 32, 64, 128, 256, 512, 1024)
FP8_BLOCK = (128, 128)  # DeepSeek-V3's weight block (rows, columns) and activation group
# -- how an MXFP4 block's E8M0 scale rounds the block max to a power of two: the OCP MX
# -- reference's floor, or compressed-tensors' (up where the significand is 1.75 or more)
MX_SCALE_ROUNDINGS = ("ocp", "compressed-tensors")
# -- the types with E8M0 block scales, where the rounding is a choice
MX_SCALE_ROUNDING_TYPES = ("mxfp4", "mxfp8")


@dataclass(frozen=True)
class WeightQuant:
    """How a weight is stored.

    ``type="int"``: ``bits`` in 2..8, ``group_size`` -1 (per output channel) or a
    power of two from 16 to 1024 (per group along the input dimension),
    ``symmetric`` or asymmetric (integer zero points).  ``type="fp8"``: E4M3 with a
    float32 scale per channel (``group_size=-1``) or per tensor (``group_size=0``), or,
    with ``block=(rows, columns)`` (powers of two, 16..1024), per block of the weight.
    ``type="nvfp4"`` / ``"mxfp4"``: FP4 E2M1 with ``bits=4``, ``group_size`` 16 / 32
    (the block of each scale) and ``symmetric``; ``type="mxfp8"``: E4M3 values with
    ``bits=8`` and ``group_size`` 32; left at their defaults, ``bits`` and
    ``group_size`` take these values.  ``observer="mse"`` (FP4 and block-wise FP8,
    round-to-nearest only) searches each block's scale for the least squared error instead
    of taking the scale of the block max.  ``scale_rounding`` (``mxfp4``, ``mxfp8``): how the
    block max becomes an E8M0 power of two, ``"ocp"`` (the spec's reference, the default)
    or ``"compressed-tensors"`` (rounded up where the max's significand is 1.75 or more,
    which saturates less; see ``numerics.fp4.e8m0_scales_for_amax``).
    """

    type: str = "int"
    bits: int = 8
    group_size: int = -1
    symmetric: bool = True
    block: tuple[int, int] | None = None
    observer: str = "minmax"
    scale_rounding: str = "ocp"

    def __post_init__(self) -> None:
        require(self.type in WEIGHT_TYPES, "weight.type", self.type, f"one of {WEIGHT_TYPES}")
        _check_scale_rounding(self.scale_rounding, self.type, "weight")
        require(isinstance(self.symmetric, bool), "weight.symmetric", self.symmetric, "a bool")
        ok = isinstance(self.observer, str) and self.observer in WEIGHT_OBSERVERS
        require(ok, "weight.observer", self.observer, f"one of {WEIGHT_OBSERVERS}")
        if self.observer != "minmax":
            require(
                self.type in FP4_BLOCKS or (self.type == "fp8" and self.block is not None),
                "weight.observer",
                self.observer,
                "'minmax' for int and per-channel fp8 weights (the scale search is for "
                "nvfp4 / mxfp4 and block-wise fp8)",
            )
        if self.block is not None:
            self._check_block()
        if self.type in MICROSCALED_BLOCKS:
            self._check_fp4()
            return
        if self.type == "fp8":
            require(
                is_int(self.bits) and self.bits == 8, "weight.bits", self.bits, "8 for fp8 weights"
            )
            require(
                is_int(self.group_size) and self.group_size in (-1, 0),
                "weight.group_size",
                self.group_size,
                "-1 (per channel) or 0 (per tensor) for fp8 weights",
            )
            require(self.symmetric, "weight.symmetric", self.symmetric, "True for fp8 weights")
            return
        require(
            is_int(self.bits) and 2 <= self.bits <= 8, "weight.bits", self.bits, "an int in 2..8"
        )
        require(
            self.group_size in GROUP_SIZES and is_int(self.group_size),
            "weight.group_size",
            self.group_size,
            f"one of {GROUP_SIZES} (-1 = per channel)",
        )

    def _check_fp4(self) -> None:
        block, bits = MICROSCALED_BLOCKS[self.type], MICROSCALED_BITS[self.type]
        for name, default, value in (("bits", 8, bits), ("group_size", -1, block)):
            if getattr(self, name) == default and is_int(getattr(self, name)):
                object.__setattr__(self, name, value)  # -- a field left at its default
        what = f"for {self.type} weights"
        ok = is_int(self.bits) and self.bits == bits
        require(ok, "weight.bits", self.bits, f"{bits} {what}")
        ok = is_int(self.group_size) and self.group_size == block
        require(ok, "weight.group_size", self.group_size, f"{block} (the scale block) {what}")
        require(self.symmetric, "weight.symmetric", self.symmetric, f"True {what}")

    def _check_block(self) -> None:
        """``block`` (a tuple, or a JSON list) of two block sizes, for fp8 weights only."""
        block = self.block
        ok = isinstance(block, (tuple, list)) and len(block) == 2
        ok = ok and all(is_int(b) and b in GROUP_SIZES[1:] for b in block)
        require(ok, "weight.block", block, f"two sizes (rows, columns) from {GROUP_SIZES[1:]}")
        object.__setattr__(self, "block", tuple(block))
        require(self.type == "fp8", "weight.type", self.type, "'fp8' for block-wise weights")
        require(self.group_size == -1, "weight.group_size", self.group_size, "-1 when block is set")


@dataclass(frozen=True)
class ActivationQuant:
    """How a layer's input is quantized at run time (W8A8 schemes).

    ``dynamic=True`` computes the scale from each input (per ``token`` row or per
    ``tensor``), from the max-abs value or the given ``percentile`` of ``|x|``.
    ``dynamic=False`` uses a per-tensor scale fixed by calibration.  ``granularity="group"``
    (dynamic FP8 only) has one scale per ``group_size`` columns of each token.
    ``symmetric=False`` (INT8 only) adds an integer zero point: ``x ~= (q - z) * scale``
    with int8 codes ``q`` and ``z`` in [-128, 127], so the full code range covers
    ``[min, max]`` instead of ``[-max|x|, max|x|]``.  ``type="int4"`` is dynamic and
    symmetric: codes in [-7, 7], scale ``max|x| / 7``.

    ``type="nvfp4"`` / ``"mxfp4"`` / ``"mxfp8"`` (microscaled, with weights of the same
    type): ``granularity="group"`` and ``group_size`` the format's block (16 / 32 / 32),
    filled in when left at their defaults; each block's scale comes from its max.
    NVFP4's float32 global scale is computed per tensor from each input when
    ``dynamic=True`` (the default: no calibration data needed, and each input uses the
    E4M3 scales' full range), or calibrated once when ``dynamic=False`` (what
    compressed-tensors exports as ``input_global_scale``).  MX formats have no global
    scale, so they are dynamic; ``scale_rounding`` (``mxfp4``, ``mxfp8``) as :class:`WeightQuant`'s.
    """

    type: str = "int8"
    granularity: str = "token"
    dynamic: bool = True
    percentile: float = 100.0
    observer: str = "minmax"
    group_size: int | None = None
    symmetric: bool = True
    scale_rounding: str = "ocp"

    def __post_init__(self) -> None:
        require(
            self.type in ACTIVATION_TYPES,
            "activation.type",
            self.type,
            f"one of {ACTIVATION_TYPES}",
        )
        _check_scale_rounding(self.scale_rounding, self.type, "activation")
        if self.type in MICROSCALED_BLOCKS:
            check_microscaled_activation(self)
            return
        require(
            self.granularity in ACTIVATION_GRANULARITIES,
            "activation.granularity",
            self.granularity,
            f"one of {ACTIVATION_GRANULARITIES}",
        )
        require(isinstance(self.dynamic, bool), "activation.dynamic", self.dynamic, "a bool")
        ok = (
            isinstance(self.percentile, (int, float))
            and not isinstance(self.percentile, bool)
            and 0.0 < self.percentile <= 100.0  # compared first: an int too big for a float
            and math.isfinite(self.percentile)
        )
        require(ok, "activation.percentile", self.percentile, "a number in (0, 100]")
        require(
            self.observer in OBSERVERS, "activation.observer", self.observer, f"one of {OBSERVERS}"
        )
        if not self.dynamic:
            require(
                self.granularity == "tensor",
                "activation.granularity",
                self.granularity,
                "'tensor' for static (calibrated) activation scales",
            )
        grouped = self.granularity == "group"
        allowed = f"one of {GROUP_SIZES[1:]} for 'group' granularity, else None"
        ok = self.group_size in GROUP_SIZES[1:] and is_int(self.group_size)
        require(
            ok if grouped else self.group_size is None,
            "activation.group_size",
            self.group_size,
            allowed,
        )
        if grouped:
            require(self.type == "fp8", "activation.type", self.type, "'fp8' for group scales")
        self._check_symmetric()

    def _check_symmetric(self) -> None:
        """Zero points for INT8 only; INT4 activations are dynamic and symmetric."""
        require(isinstance(self.symmetric, bool), "activation.symmetric", self.symmetric, "a bool")
        if not self.symmetric:
            require(
                self.type == "int8",
                "activation.symmetric",
                self.symmetric,
                "True for fp8 and int4 activations (zero points are for int8)",
            )
            require(
                not self.dynamic or self.percentile == 100.0,
                "activation.percentile",
                self.percentile,
                "100 for dynamic asymmetric activations (their range is each input's min-max)",
            )
        if self.type == "int4":
            require(self.dynamic, "activation.dynamic", self.dynamic, "True for int4 activations")


def _check_scale_rounding(scale_rounding: object, type_: str, where: str) -> None:
    """One of ``MX_SCALE_ROUNDINGS``; anything but the spec's ``"ocp"`` for MX types only."""
    field_name = f"{where}.scale_rounding"
    ok = isinstance(scale_rounding, str) and scale_rounding in MX_SCALE_ROUNDINGS
    require(ok, field_name, scale_rounding, f"one of {MX_SCALE_ROUNDINGS}")
    if scale_rounding != "ocp":
        require(
            type_ in MX_SCALE_ROUNDING_TYPES,
            field_name,
            scale_rounding,
            f"'ocp' for {type_} {where}s (the E8M0 scale rounding is an option of "
            f"{MX_SCALE_ROUNDING_TYPES})",
        )


def check_microscaled_activation(act: ActivationQuant) -> None:
    """The fields of an NVFP4 / MXFP4 / MXFP8 activation (its block is the format's)."""
    block, what = MICROSCALED_BLOCKS[act.type], f"for {act.type} activations"
    if act.granularity == "token" and act.group_size is None:  # -- left at their defaults
        object.__setattr__(act, "granularity", "group")
        object.__setattr__(act, "group_size", block)
    ok = act.granularity == "group"
    require(ok, "activation.granularity", act.granularity, f"'group' {what}")
    ok = is_int(act.group_size) and act.group_size == block
    require(ok, "activation.group_size", act.group_size, f"{block} (the format's block) {what}")
    require(isinstance(act.dynamic, bool), "activation.dynamic", act.dynamic, "a bool")
    if act.type != "nvfp4":
        require(act.dynamic, "activation.dynamic", act.dynamic, f"True {what} (no global scale)")
    ok = act.percentile == 100.0 and not isinstance(act.percentile, bool)
    require(ok, "activation.percentile", act.percentile, f"100 {what} (scales from block maxima)")
    require(act.observer in OBSERVERS, "activation.observer", act.observer, f"one of {OBSERVERS}")
    require(act.symmetric is True, "activation.symmetric", act.symmetric, f"True {what}")


# -- the shorthands of INT activations with INT8 and with INT4 weights, for messages
W8_NAMES, W4_NAMES = {"int8": "w8a8", "int4": "w8a4"}, {"int8": "w4a8", "int4": "w4a4"}


def _int4_symmetric(weight: WeightQuant) -> bool:
    """INT4 symmetric codes (per group or per channel): exact as INT8 and as FP8 E4M3 values,
    so W4A8 multiplies them by quantized activations directly."""
    return weight.type == "int" and weight.bits == 4 and weight.symmetric


ALGORITHM_PARAMS = {
    "gptq": GPTQConfig,
    "awq": AWQConfig,
    "smoothquant": SmoothQuantConfig,
    "hqq": HQQConfig,
}
# -- written by ``to_dict`` only when used or changed, so checkpoints of every other
# -- scheme keep the bytes they had before these parameters existed
LATER_PARAMS = ("hqq",)


@dataclass(frozen=True)
class QuantScheme:
    """A weight format, an optional activation format, and the algorithm that picks the weights."""

    weight: WeightQuant = field(default_factory=WeightQuant)
    activation: ActivationQuant | None = None
    algorithm: str = "rtn"
    gptq: GPTQConfig = field(default_factory=GPTQConfig)
    awq: AWQConfig = field(default_factory=AWQConfig)
    smoothquant: SmoothQuantConfig = field(default_factory=SmoothQuantConfig)
    hqq: HQQConfig = field(default_factory=HQQConfig)

    def __post_init__(self) -> None:
        for name, cls in ALGORITHM_PARAMS.items():
            value = getattr(self, name)
            if isinstance(value, Mapping):
                object.__setattr__(self, name, from_mapping(cls, value, name))
            require(isinstance(getattr(self, name), cls), name, value, f"a {cls.__name__}")
        if isinstance(self.weight, Mapping):
            object.__setattr__(self, "weight", from_mapping(WeightQuant, self.weight, "weight"))
        if isinstance(self.activation, Mapping):
            act = from_mapping(ActivationQuant, self.activation, "activation")
            object.__setattr__(self, "activation", act)
        require(isinstance(self.weight, WeightQuant), "weight", self.weight, "a WeightQuant")
        require(
            self.activation is None or isinstance(self.activation, ActivationQuant),
            "activation",
            self.activation,
            "an ActivationQuant or None",
        )
        require(self.algorithm in ALGORITHMS, "algorithm", self.algorithm, f"one of {ALGORITHMS}")
        act, w = self.activation, self.weight
        # -- AWQ's format defaults; other algorithms' schemes keep the ones they always wrote
        awq_defaults = (w.type, w.scale_rounding) if self.algorithm == "awq" else ("int", "ocp")
        object.__setattr__(self, "awq", self.awq.resolved(*awq_defaults))
        fp4_ok = w.type in FP4_BLOCKS and self.algorithm in FP4_ALGORITHMS
        fp8_block_gptq = w.type == "fp8" and w.block is not None and self.algorithm == "gptq"
        if self.algorithm in INT_WEIGHT_ALGORITHMS and not (fp4_ok or fp8_block_gptq):
            require(
                w.type == "int",
                "weight.type",
                w.type,
                f"'int' weights for algorithm {self.algorithm!r} (also: FP4 with rtn / awq / "
                "gptq, block-wise fp8 with gptq)",
            )
        if self.algorithm == "smoothquant" and self.smoothquant.rounding == "gptq":
            ok = w.type == "int"
            require(ok, "weight.type", w.type, "'int' weights for smoothquant.rounding 'gptq'")
        if fp4_ok and self.algorithm == "awq":
            require(
                self.awq.rounding == "rtn",
                "awq.rounding",
                self.awq.rounding,
                f"'rtn' for {w.type} weights (GPTQ rounds INT weights only)",
            )
        if w.observer != "minmax":
            require(
                self.algorithm == "rtn",
                "weight.observer",
                w.observer,
                f"'minmax' for algorithm {self.algorithm!r} (the scale search is "
                "round-to-nearest's)",
            )
        g = self.gptq
        if (fp4_ok and self.algorithm == "gptq") or fp8_block_gptq:
            require(
                g.static_groups or not g.act_order,
                "gptq.static_groups",
                g.static_groups,
                f"True with act_order for {'block-wise fp8' if fp8_block_gptq else w.type} "
                "weights (fixed block scales, no g_idx)",
            )
        if self.rounds_with_gptq and g.act_order and not g.static_groups:
            require(
                not self.is_w4a8,
                "gptq.static_groups",
                g.static_groups,
                "True for W4A8 with act_order (its op reads groups in column order, no g_idx)",
            )
            require(
                not (w.bits == 8 and w.symmetric and w.group_size > 0),
                "gptq.static_groups",
                g.static_groups,
                "True for grouped symmetric 8-bit weights with act_order (stored unpacked, "
                "they cannot carry a g_idx)",
            )
        if self.algorithm == "smoothquant":
            require(
                act is not None,
                "activation",
                act,
                "an activation format (w8a8 or fp8) for algorithm 'smoothquant'",
            )
        if act is None:
            return
        if act.type in MICROSCALED_BLOCKS or w.type == "mxfp8":
            require(
                w.type == act.type,
                "weight.type",
                w.type,
                f"{act.type!r} weights when activations are {act.type}",
            )
            require(self.algorithm == "rtn", "algorithm", self.algorithm, f"'rtn' for {w.type}")
            return
        if not act.symmetric:
            require(
                w.type == "int" and w.bits == 8 and w.symmetric and w.group_size == -1,
                "weight",
                w,
                "INT8 symmetric per-channel weights for asymmetric activations (w8a8-asym)",
            )
        if _int4_symmetric(w):
            pass  # -- any INT activation or FP8 (w4a8, w4a8-fp8, w4a4); groups are the weight's
        elif act.type in INT_ACTIVATION_TYPES:
            require(
                w.type == "int" and w.bits == 8 and w.symmetric and w.group_size == -1,
                "weight",
                w,
                f"INT8 symmetric per-channel weights when activations are {act.type} "
                f"({W8_NAMES[act.type]}), or INT4 symmetric weights ({W4_NAMES[act.type]})",
            )
        else:
            require(
                w.type == "fp8",
                "weight.type",
                w.type,
                "'fp8' when activations are fp8, or INT4 symmetric weights (w4a8-fp8)",
            )
        if act.granularity == "group" or w.block is not None:
            require(
                w.block is not None and act.group_size == w.block[1],
                "activation",
                act,
                "'group' activations with group_size equal to the weight's block columns, "
                "exactly when the weight is block-wise",
            )
            require(
                self.algorithm in ("rtn", "gptq"),
                "algorithm",
                self.algorithm,
                "'rtn' or 'gptq' for block-wise FP8 with group activations",
            )

    @property
    def rounds_with_gptq(self) -> bool:
        """Whether GPTQ rounds the weights (plain GPTQ, or AWQ / SmoothQuant with
        ``rounding="gptq"``)."""
        rounding = {"awq": self.awq.rounding, "smoothquant": self.smoothquant.rounding}
        return self.algorithm == "gptq" or rounding.get(self.algorithm) == "gptq"

    @property
    def needs_calibration(self) -> bool:
        """Whether quantizing with this scheme needs calibration activations."""
        return self.algorithm in CALIBRATED_ALGORITHMS or self.static_activation

    @property
    def static_activation(self) -> bool:
        """Whether the input scale is fixed by calibration (not computed per input)."""
        return self.activation is not None and not self.activation.dynamic

    @property
    def rescales_weights(self) -> bool:
        """Whether calibration rescales the float weights before rounding (SmoothQuant, AWQ)."""
        return self.algorithm in RESCALING_ALGORITHMS

    @property
    def is_w4a8(self) -> bool:
        """INT4 symmetric weights times INT8, FP8 or INT4 activations (``w4a8``, ``w4a8-fp8``,
        ``w4a4``)."""
        return self.activation is not None and _int4_symmetric(self.weight)

    @property
    def weight_only(self) -> bool:
        return self.activation is None

    def describe(self) -> str:
        """Short human-readable name, e.g. ``w4a16 g128 asym`` or ``w8a8 int8``."""
        w, a = self.weight, self.activation
        wname = f"int{w.bits}" if w.type == "int" else w.type
        gran = {-1: "per-channel", 0: "per-tensor"}.get(w.group_size, f"g{w.group_size}")
        gran = gran if w.block is None else f"block{w.block[0]}x{w.block[1]}"
        sym = "" if w.type != "int" else (" sym" if w.symmetric else " asym")
        abits = 8 if a is None else {**MICROSCALED_BITS, "int4": 4}.get(a.type, 8)
        act = (
            "a16"
            if a is None
            else f"a{abits} {a.type} {'dyn' if a.dynamic else 'static'} {a.granularity}"
        )
        act += "" if a is None or a.group_size is None else str(a.group_size)
        act += "" if a is None or a.symmetric else " asym"
        algo = "" if self.algorithm == "rtn" else f" {self.algorithm}"
        algo += "" if w.observer == "minmax" else f" {w.observer}"
        roundings = {w.scale_rounding, "ocp" if a is None else a.scale_rounding} - {"ocp"}
        algo += "".join(f" scales {r}" for r in sorted(roundings))
        return f"w-{wname} {gran}{sym} {act}{algo}".strip()

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for name in LATER_PARAMS:
            if self.algorithm != name and getattr(self, name) == ALGORITHM_PARAMS[name]():
                del data[name]
        # -- block-wise fields likewise, so every earlier scheme serializes as before
        if self.weight.block is None:
            del data["weight"]["block"]
        if self.weight.observer == "minmax":
            del data["weight"]["observer"]
        if self.weight.scale_rounding == "ocp":  # -- MXFP4's later option, likewise
            del data["weight"]["scale_rounding"]
        if not self.gptq.sequential:  # -- GPTQ's later option, likewise
            del data["gptq"]["sequential"]
        if self.awq.search_rows is None:  # -- AWQ's later option, likewise
            del data["awq"]["search_rows"]
        if self.awq.alpha_grid == "open":  # -- AWQ's later options, likewise
            del data["awq"]["alpha_grid"]
        if self.awq.propagate == "quantized":
            del data["awq"]["propagate"]
        if self.smoothquant.rounding == "rtn":  # -- SmoothQuant's later option, likewise
            del data["smoothquant"]["rounding"]
        if data["activation"] is not None and self.activation.group_size is None:
            del data["activation"]["group_size"]
        if data["activation"] is not None and self.activation.symmetric:
            del data["activation"]["symmetric"]  # -- written only for zero-point activations
        if data["activation"] is not None and self.activation.scale_rounding == "ocp":
            del data["activation"]["scale_rounding"]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantScheme:
        return from_mapping(cls, data, "scheme")


SCHEME_NAMES = (
    "w8a16",
    "w2a16..w7a16",
    "w8a16-fp8",
    "w8a8",
    "w4a8",
    "w4a8-fp8",
    "w8a8-asym",
    "w8a8-static-asym",
    "w8a4",
    "w4a4",
    "fp8",
    "fp8-block",
    "w8a16-fp8-block",
    "fp8-block-mse",
    "w8a16-fp8-block-mse",
    "nvfp4a16",
    "mxfp4a16",
    "nvfp4a16-mse",
    "mxfp4a16-mse",
    "nvfp4",
    "mxfp4",
    "mxfp8",
)
DEFAULT_GROUP_SIZE = 128
# -- shorthands of INT8 per-channel weights, by their activation format
ACTIVATION_SHORTHANDS = {
    "w8a8": ActivationQuant(type="int8"),
    "w8a8-asym": ActivationQuant(type="int8", symmetric=False),
    "w8a8-static-asym": ActivationQuant(
        type="int8", granularity="tensor", dynamic=False, symmetric=False
    ),
    "w8a4": ActivationQuant(type="int4"),
}
# -- shorthands of INT4 symmetric grouped weights, by their activation type
W4_ACTIVATIONS = {"w4a8": "int8", "w4a8-fp8": "fp8", "w4a4": "int4"}


def scheme_from_name(
    name: str, group_size: int | None = None, symmetric: bool | None = None
) -> QuantScheme:
    """Turn ``w8a16``, ``wNa16`` (N = 2..8), ``w8a16-fp8``, ``w8a8`` or ``fp8`` into a scheme.

    ``w4a8`` / ``w4a8-fp8`` / ``w4a4`` are INT4 symmetric weights (``group_size`` 128 by
    default) with dynamic per-token INT8 / FP8 E4M3 / INT4 activations.

    ``nvfp4a16`` / ``mxfp4a16`` are FP4 weights with the spec's block scales; with
    ``-mse`` each block's scale is searched (``WeightQuant.observer="mse"``), as in
    ``fp8-block-mse`` / ``w8a16-fp8-block-mse``.
    ``nvfp4`` / ``mxfp4`` / ``mxfp8`` quantize the activations to the weight's format too
    (NVFP4's activation global scale dynamic, see :class:`ActivationQuant`).
    ``w8a8-asym`` has dynamic per-token asymmetric INT8 activations, ``w8a8-static-asym``
    a calibrated per-tensor scale and zero point; ``w8a4`` dynamic per-token INT4 ones.

    ``wNa16`` is asymmetric with ``group_size`` 128 by default; ``w8a16`` is INT8
    symmetric per channel unless a group size is given.
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key == "w8a16-fp8":
        return QuantScheme(WeightQuant(type="fp8", bits=8, group_size=-1))
    if key == "fp8":
        return QuantScheme(WeightQuant(type="fp8"), ActivationQuant(type="fp8"))
    if key in ("fp8-block", "w8a16-fp8-block", "fp8-block-mse", "w8a16-fp8-block-mse"):
        observer = "mse" if key.endswith("-mse") else "minmax"
        weight = WeightQuant(type="fp8", block=FP8_BLOCK, observer=observer)
        group = ActivationQuant(type="fp8", granularity="group", group_size=FP8_BLOCK[1])
        return QuantScheme(weight, None if key.startswith("w8a16") else group)
    if key in ("nvfp4a16", "mxfp4a16", "nvfp4a16-mse", "mxfp4a16-mse"):
        observer = "mse" if key.endswith("-mse") else "minmax"
        return QuantScheme(WeightQuant(type=key[:5], observer=observer))
    if key in ("nvfp4", "mxfp4", "mxfp8"):
        return QuantScheme(WeightQuant(type=key), ActivationQuant(type=key))
    if key in ACTIVATION_SHORTHANDS:
        return QuantScheme(WeightQuant(bits=8, group_size=-1), ACTIVATION_SHORTHANDS[key])
    if key in W4_ACTIVATIONS:
        gs = DEFAULT_GROUP_SIZE if group_size is None else group_size
        weight = WeightQuant(
            bits=4, group_size=gs, symmetric=True if symmetric is None else symmetric
        )
        return QuantScheme(weight, ActivationQuant(type=W4_ACTIVATIONS[key]))
    m = re.fullmatch(r"w([2-8])a16", key) if isinstance(key, str) else None
    if m is None:
        raise ConfigError(f"scheme={name!r} is not known; expected one of {SCHEME_NAMES}")
    bits = int(m.group(1))
    if bits == 8:
        gs = -1 if group_size is None else group_size
        sym = True if symmetric is None else symmetric
    else:
        gs = DEFAULT_GROUP_SIZE if group_size is None else group_size
        sym = False if symmetric is None else symmetric
    return QuantScheme(WeightQuant(type="int", bits=bits, group_size=gs, symmetric=sym))


def as_scheme(value: object, where: str) -> QuantScheme | None:
    """Accept a scheme, a shorthand name (``"w4a16"``), a mapping, or ``None``."""
    if value is None or isinstance(value, QuantScheme):
        return value
    if isinstance(value, str):
        return scheme_from_name(value)
    if isinstance(value, Mapping):
        return from_mapping(QuantScheme, value, where)
    raise ConfigError(f"{where}: expected a QuantScheme, a scheme name or None, got {value!r}")
