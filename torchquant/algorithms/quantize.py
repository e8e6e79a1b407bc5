"""``quantize_weight``: the one entry that rounds a weight, whatever the algorithm.

``WEIGHT_ROUNDING`` maps each ``QuantScheme.algorithm`` to a function
``(scheme, weight, stats, name) -> QuantizedWeight``.  Calibration-free algorithms
(round-to-nearest, HQQ) ignore ``stats``; GPTQ reads the input Hessian from it and AWQ the
ranges its clipping search chose.  Transforms that keep the float function (SmoothQuant,
AWQ scaling) are calibration steps that run first: they change the weight handed in
here, not how it is rounded.  A new algorithm is a pure function on tensors in this
package and one entry in the table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from torchquant.algorithms import awq, gptq, hqq
from torchquant.config import QuantScheme
from torchquant.errors import CalibrationError, ConfigError, QuantizationError
from torchquant.numerics import (
    quantize_fp8_block_weight,
    quantize_fp8_weight,
    quantize_int_weight,
    search_fp8_block_weight,
)
from torchquant.numerics.fp4 import FP4_ROUNDING, Fp4Weight, fp4_rounding
from torchquant.numerics.microscaling import quantize_mxfp8_weight


@dataclass(frozen=True)
class WeightStats:
    """What calibration measured for one linear, as the rounding reads it.

    ``hessian``: ``(K, K)`` float32 ``2/n X^T X`` of the layer's inputs (GPTQ rounding);
    ``None`` when calibration never reached the layer (an unused expert), which is then
    rounded to nearest.  ``clip_range``: per-group ``(lo, hi)`` ``(N, G)`` from AWQ's
    clipping search (``None``: the plain min/max range).  ``hessian_factor``: GPTQ's
    factor of ``hessian``, when the caller shares one among the linears fed that input.
    """

    hessian: torch.Tensor | None = None
    clip_range: tuple[torch.Tensor, torch.Tensor] | None = None
    hessian_factor: gptq.HessianFactor | None = None


@dataclass
class QuantizedWeight:
    """A weight ``(N, K)`` as a layer stores it.

    INT: unsigned ``codes`` uint8 ``(N, K)``, ``scales`` and ``zeros`` (uint8; ``None``
    when symmetric) ``(N, G)``, and ``g_idx`` int32 ``(K,)`` when groups follow a column
    order (GPTQ act-order without static groups).  FP8: ``codes`` float8_e4m3fn
    ``(N, K)`` with float32 ``scales`` ``(N, 1)`` or per tensor.  FP4: E2M1 ``codes``
    uint8 ``(N, K)``, block ``scales`` and NVFP4's float32 ``global_scale (1,)``.
    MXFP8: ``codes`` float8_e4m3fn ``(N, K)`` with uint8 E8M0 ``scales (N, ceil(K/32))``.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None = None
    g_idx: torch.Tensor | None = None
    global_scale: torch.Tensor | None = None


Rounding = Callable[[QuantScheme, torch.Tensor, WeightStats | None, str], QuantizedWeight]


def round_to_nearest(
    scheme: QuantScheme, weight: torch.Tensor, stats: WeightStats | None, name: str
) -> QuantizedWeight:
    """Each weight to its nearest grid point on the min/max range (no calibration); FP4
    and block-wise FP8 scales searched per block with ``weight.observer="mse"``."""
    w = scheme.weight
    if w.type == "fp8" and w.block is not None:
        rounding = search_fp8_block_weight if w.observer == "mse" else quantize_fp8_block_weight
        return QuantizedWeight(*rounding(weight, w.block, what=name))
    if w.type in FP4_ROUNDING:
        rounding = fp4_rounding(w.type, w.scale_rounding, search=w.observer == "mse")
        return _fp4_weight(rounding(weight, what=name))
    if w.type == "mxfp8":
        q = quantize_mxfp8_weight(weight, name, w.scale_rounding)
        return QuantizedWeight(q.values, q.scales)
    if w.type == "fp8":
        values, scales = quantize_fp8_weight(weight, per_channel=w.group_size == -1, what=name)
        return QuantizedWeight(values, scales)
    q = quantize_int_weight(weight, w.bits, w.group_size, w.symmetric, what=name)
    return QuantizedWeight(q.codes, q.scales, q.zeros)


def _fp4_weight(q: Fp4Weight) -> QuantizedWeight:
    return QuantizedWeight(q.codes, q.scales, global_scale=q.global_scale)


def _measured(scheme: QuantScheme, stats: WeightStats | None, name: str) -> WeightStats:
    if stats is None:
        raise CalibrationError(
            f"{name}: algorithm {scheme.algorithm!r} rounds with calibration statistics "
            "(stats); quantize it through convert_model(..., calibration_data=...)"
        )
    return stats


def gptq_rounding(
    scheme: QuantScheme, weight: torch.Tensor, stats: WeightStats | None, name: str
) -> QuantizedWeight:
    """GPTQ with the scheme's ``gptq`` parameters and the measured input Hessian."""
    measured = _measured(scheme, stats, name)
    hessian, factor = measured.hessian, measured.hessian_factor
    if hessian is None:
        return round_to_nearest(scheme, weight, stats, name)
    w, p = scheme.weight, scheme.gptq
    if w.type in FP4_ROUNDING:
        search = p.observer != "minmax"
        args = (p.block_size, p.dampening, p.act_order, search)
        fp4 = gptq.gptq_quantize_fp4(
            weight, hessian, w.type, *args, name=name, factor=factor,
            scale_rounding=w.scale_rounding,
        )  # fmt: skip
        return _fp4_weight(fp4)
    if w.type == "fp8":  # -- block-wise (the scheme allows GPTQ on no other FP8 weight)
        search = p.observer != "minmax"
        args = (p.block_size, p.dampening, p.act_order, search)
        values, scales = gptq.gptq_quantize_fp8_block(
            weight, hessian, w.block, *args, name=name, factor=factor
        )
        return QuantizedWeight(values, scales)
    res = gptq.gptq_quantize(
        weight,
        hessian,
        w.bits,
        w.group_size,
        w.symmetric,
        p.block_size,
        p.dampening,
        p.act_order,
        p.static_groups,
        p.observer,
        name=name,
        factor=factor,
    )
    return QuantizedWeight(res.codes, res.scales, res.zeros, res.g_idx)


def awq_rounding(
    scheme: QuantScheme, weight: torch.Tensor, stats: WeightStats | None, name: str
) -> QuantizedWeight:
    """The AWQ-scaled weight on its clipped ranges, or by GPTQ (``awq.rounding="gptq"``)."""
    if scheme.rounds_with_gptq:
        return gptq_rounding(scheme, weight, stats, name)
    clip_range = _measured(scheme, stats, name).clip_range
    if clip_range is None:
        return round_to_nearest(scheme, weight, stats, name)
    w = scheme.weight
    if w.type in FP4_ROUNDING:
        q = awq.quantize_fp4_in_ranges(weight, clip_range, w.type, name, w.scale_rounding)
        return _fp4_weight(q)
    q = awq.quantize_in_ranges(weight, clip_range, w.bits, w.group_size, w.symmetric)
    return QuantizedWeight(q.codes, q.scales, q.zeros)


def hqq_rounding(
    scheme: QuantScheme, weight: torch.Tensor, stats: WeightStats | None, name: str
) -> QuantizedWeight:
    """HQQ's lp-error solve for each group's qparams, from the weight alone."""
    w, solver = scheme.weight, asdict(scheme.hqq)  # -- HQQConfig's fields are the solver's
    q = hqq.hqq_quantize(weight, w.bits, w.group_size, w.symmetric, what=name, **solver)
    return QuantizedWeight(q.codes, q.scales, q.zeros)


def smoothquant_rounding(
    scheme: QuantScheme, weight: torch.Tensor, stats: WeightStats | None, name: str
) -> QuantizedWeight:
    """The smoothed weight to nearest, or by GPTQ (``smoothquant.rounding="gptq"``)."""
    if scheme.rounds_with_gptq:
        return gptq_rounding(scheme, weight, stats, name)
    return round_to_nearest(scheme, weight, stats, name)


# -- algorithm name -> how it rounds; SmoothQuant only rescales (a calibration step) first
WEIGHT_ROUNDING: dict[str, Rounding] = {
    "rtn": round_to_nearest,
    "hqq": hqq_rounding,
    "gptq": gptq_rounding,
    "awq": awq_rounding,
    "smoothquant": smoothquant_rounding,
}


def quantize_weight(
    scheme: QuantScheme,
    weight: torch.Tensor,
    stats: WeightStats | None = None,
    *,
    name: str = "weight",
) -> QuantizedWeight:
    """Round ``weight: (out, in)`` as ``scheme`` says; ``name`` labels errors.

    ``stats`` is what calibration measured for the layer (required by GPTQ and AWQ,
    ignored by the calibration-free algorithms).
    """
    rounding = WEIGHT_ROUNDING.get(scheme.algorithm)
    if rounding is None:
        raise ConfigError(
            f"algorithm={scheme.algorithm!r} has no weight rounding; expected one of "
            f"{tuple(WEIGHT_ROUNDING)}"
        )
    if weight.dim() != 2:
        raise QuantizationError(f"{name}: expected a 2-D weight, got {tuple(weight.shape)}")
    return rounding(scheme, weight, stats, name)
