"""Parameters of the algorithms: GPTQ, AWQ, SmoothQuant and HQQ, one frozen dataclass each."""

from __future__ import annotations

from dataclasses import dataclass, replace

from torchquant.config.fields import is_int, is_number, require

ALGORITHMS = ("rtn", "gptq", "awq", "smoothquant", "hqq")
# -- those that read calibration activations, and those that rescale the float weights first
CALIBRATED_ALGORITHMS = ("gptq", "awq", "smoothquant")
RESCALING_ALGORITHMS = ("awq", "smoothquant")
INT_WEIGHT_ALGORITHMS = ("gptq", "awq", "hqq")  # -- they choose INT codes and qparams
OBSERVERS = ("minmax", "moving_minmax", "percentile", "kl", "mse")
WEIGHT_OBSERVERS = ("minmax", "mse")
GPTQ_OBSERVERS = (*WEIGHT_OBSERVERS, "hessian_mse")
ROUNDINGS = ("rtn", "gptq")  # -- how AWQ and SmoothQuant round the weights they rescaled
ALPHA_GRIDS = ("open", "closed")  # -- AWQ's scale exponents: 1 left out, or 0 to 1 inclusive
PROPAGATIONS = ("quantized", "float")  # -- which outputs of a block AWQ calibrates the next on


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

    ``sequential`` quantizes a block's linears stage by stage (q/k/v, o, gate/up, down),
    each stage's Hessians regathered from a forward over the already-quantized stages
    before it, at one more pass of the calibration samples per stage (three more on a
    Llama block).  Off by default: every Hessian then comes from the one statistics pass
    over the float block, as llm-compressor does; SmolLM2-135M w4 g64 scored 25.80
    perplexity that way against llm-compressor's 27.53 (README, "GPTQ speed").
    """

    block_size: int = 128
    dampening: float = 0.01
    act_order: bool = True
    static_groups: bool = True
    observer: str = "hessian_mse"
    sequential: bool = False

    def __post_init__(self) -> None:
        require(
            is_int(self.block_size) and self.block_size > 0,
            "gptq.block_size",
            self.block_size,
            "a positive int",
        )
        require(
            is_number(self.dampening) and 0.0 < self.dampening < 1.0,
            "gptq.dampening",
            self.dampening,
            "a number in (0, 1)",
        )
        require(isinstance(self.act_order, bool), "gptq.act_order", self.act_order, "a bool")
        require(
            isinstance(self.static_groups, bool), "gptq.static_groups", self.static_groups, "a bool"
        )
        require(isinstance(self.sequential, bool), "gptq.sequential", self.sequential, "a bool")
        require(
            self.observer in GPTQ_OBSERVERS,
            "gptq.observer",
            self.observer,
            f"one of {GPTQ_OBSERVERS}",
        )


@dataclass(frozen=True)
class AWQConfig:
    """AWQ parameters: ``grid`` points for the scale exponent alpha, ``clip``
    search on or off with ``clip_grid`` points down to ``max_shrink`` of the range (on
    MXFP4 each block's exponent, the one below and the one above instead: nothing between
    powers of two changes its rounding), and ``max_tokens`` of calibration activations
    used in the searches.
    ``duo_scaling`` divides the activation term by the weights' group-relative
    magnitude (``True``), leaves it out (``False``: on SmolLM2-135M w4 g128 it measured
    26.94 perplexity vs 27.32 with it) or searches both (``"both"``).
    ``alpha_grid`` is ``"open"`` (alpha in ``{0, 1/grid, ..., 1 - 1/grid}``) or ``"closed"``
    (:func:`~torchquant.algorithms.awq.closed_scale_candidates`: 0 to 1 inclusive, duo
    scaling's grid led by the unscaled weights).  ``propagate`` is what the next block is
    calibrated on: this block's ``"quantized"`` outputs or its ``"float"`` ones (the float
    model's activations, as llm-awq and llm-compressor's AWQ calibrate).
    ``rounding="gptq"`` rounds the scaled weights with GPTQ (the scheme's ``gptq``
    parameters) instead of round-to-nearest with the clipping search.
    ``search_rows`` caps the rows a token-wise inspected module (an MLP, a linear) is
    scored on in the scale search: above it, that many rows evenly spaced over the
    captured ones (``None``, the default: all of them); attention is always scored on
    whole samples.

    ``clip``, ``duo_scaling``, ``alpha_grid`` and ``propagate`` left ``None`` take the
    weight format's defaults when a scheme is made (:meth:`resolved`).
    """

    grid: int = 20
    duo_scaling: bool | str | None = None
    rounding: str = "rtn"
    clip: bool | None = None
    clip_grid: int = 20
    max_shrink: float = 0.5
    max_tokens: int = 4096
    search_rows: int | None = None
    alpha_grid: str | None = None
    propagate: str | None = None

    def __post_init__(self) -> None:
        require(is_int(self.grid) and self.grid >= 1, "awq.grid", self.grid, "an int >= 1")
        require(
            self.duo_scaling is None
            or isinstance(self.duo_scaling, bool)
            or self.duo_scaling == "both",
            "awq.duo_scaling",
            self.duo_scaling,
            'True, False, "both" or None',
        )
        require(
            self.alpha_grid in (None, *ALPHA_GRIDS),
            "awq.alpha_grid",
            self.alpha_grid,
            f"one of {ALPHA_GRIDS} or None",
        )
        require(
            self.propagate in (None, *PROPAGATIONS),
            "awq.propagate",
            self.propagate,
            f"one of {PROPAGATIONS} or None",
        )
        if self.alpha_grid == "closed" and self.duo_scaling is not None:
            least = {False: 2, True: 3, "both": 4}[self.duo_scaling]
            require(
                self.grid >= least,
                "awq.grid",
                self.grid,
                f"an int >= {least} for a closed alpha grid with duo_scaling={self.duo_scaling!r}",
            )
        require(self.rounding in ROUNDINGS, "awq.rounding", self.rounding, "'rtn' or 'gptq'")
        require(self.clip is None or isinstance(self.clip, bool), "awq.clip", self.clip,
                "a bool or None")  # fmt: skip
        require(
            is_int(self.clip_grid) and self.clip_grid >= 1,
            "awq.clip_grid",
            self.clip_grid,
            "an int >= 1",
        )
        require(
            is_number(self.max_shrink) and 0.0 < self.max_shrink < 1.0,
            "awq.max_shrink",
            self.max_shrink,
            "a number in (0, 1)",
        )
        require(
            is_int(self.max_tokens) and self.max_tokens > 0,
            "awq.max_tokens",
            self.max_tokens,
            "a positive int",
        )
        require(
            self.search_rows is None or (is_int(self.search_rows) and self.search_rows > 0),
            "awq.search_rows",
            self.search_rows,
            "None or a positive int",
        )

    def resolved(self, weight_type: str, scale_rounding: str = "ocp") -> AWQConfig:
        """This config with each ``None`` field given the default of ``weight_type``
        with block scales rounded by ``scale_rounding``.

        MXFP4 with compressed-tensors rounding defaults to no clip search, duo scaling on
        the closed grid and float propagation: on SmolLM2-135M (8 x 256 calibration
        tokens) each alone lowered perplexity from 30.36 (to 29.62, 29.31, 29.67) and the
        three together gave 28.88.  With the spec's rounding they measured 32.09 together
        against 30.72, and one at a time 31.40 (no clip), 30.77 (float propagation), 32.12
        (the closed duo grid), so it keeps the earlier defaults, as every other format does
        (clip, no duo scaling, the open grid, quantized propagation).
        """
        defaults = AWQ_DEFAULTS.get((weight_type, scale_rounding), AWQ_DEFAULTS[None])
        given = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        return replace(self, **given) if given else self


# -- AWQConfig's defaults per (weight type, scale rounding); None: every other format
AWQ_DEFAULTS = {
    None: {"clip": True, "duo_scaling": False, "alpha_grid": "open", "propagate": "quantized"},
    ("mxfp4", "compressed-tensors"): {
        "clip": False,
        "duo_scaling": True,
        "alpha_grid": "closed",
        "propagate": "float",
    },
}


@dataclass(frozen=True)
class SmoothQuantConfig:
    """SmoothQuant migration strength: ``s_j = max|x_j|^alpha / max|w_j|^(1 - alpha)``.

    As in the SmoothQuant paper, only inputs that come out of a norm are smoothed by
    default; the inputs a linear produces (``o_proj`` from ``v_proj``, ``down_proj`` from
    ``up_proj``) carry outliers too large to move into per-channel weights, and smoothing
    them costs accuracy.  ``smooth_linear_inputs`` smooths those too.

    ``rounding="gptq"`` rounds the smoothed weights with GPTQ (the scheme's ``gptq``
    parameters; each Hessian is that of the smoothed input, ``H / (s s^T)``) instead of
    round-to-nearest: SmoothQuant for the activations, GPTQ for the weights (W4A8).
    """

    alpha: float = 0.5
    smooth_linear_inputs: bool = False
    rounding: str = "rtn"

    def __post_init__(self) -> None:
        require(
            is_number(self.alpha) and 0.0 <= self.alpha <= 1.0,
            "smoothquant.alpha",
            self.alpha,
            "a number in [0, 1]",
        )
        require(
            isinstance(self.smooth_linear_inputs, bool),
            "smoothquant.smooth_linear_inputs",
            self.smooth_linear_inputs,
            "true or false",
        )
        ok = self.rounding in ROUNDINGS
        require(ok, "smoothquant.rounding", self.rounding, "'rtn' or 'gptq'")


@dataclass(frozen=True)
class HQQConfig:
    """HQQ's solver (no calibration data): each group's qparams minimize the lp error
    ``||W - dequant(quant(W))||_p^p`` with ``lp_norm`` p in (0, 1], in at most
    ``iterations`` half-quadratic steps per phase; the penalty starts at ``beta`` and
    grows by ``kappa`` per step; ``early_stop`` ends a phase once the mean absolute error
    stops falling.  The defaults are HQQ's own (mobiusml/hqq's proximal solver).
    """

    iterations: int = 20
    lp_norm: float = 0.7
    beta: float = 10.0
    kappa: float = 1.01
    early_stop: bool = True

    def __post_init__(self) -> None:
        require(
            is_int(self.iterations) and 1 <= self.iterations < 2**31,
            "hqq.iterations",
            self.iterations,
            "a positive int",
        )
        require(
            is_number(self.lp_norm) and 0.0 < self.lp_norm <= 1.0,
            "hqq.lp_norm",
            self.lp_norm,
            "a number in (0, 1]",
        )
        require(is_number(self.beta) and self.beta > 0.0, "hqq.beta", self.beta, "a number > 0")
        require(
            is_number(self.kappa) and self.kappa >= 1.0, "hqq.kappa", self.kappa, "a number >= 1"
        )
        require(isinstance(self.early_stop, bool), "hqq.early_stop", self.early_stop, "a bool")
