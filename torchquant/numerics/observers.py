"""Observers: estimate a quantization range from the tensors they are shown.

An observer sees 2-D tensors ``(rows, cols)`` and reduces them at one granularity:
``tensor`` (one range), ``channel`` / ``token`` (one range per row: a weight's output
channel, an activation's token), or ``group`` (per row, per ``group_size`` columns,
the last group possibly shorter, as ``numerics.group_min_max``).  Rules:

- ``minmax``: running minimum and maximum.
- ``moving_minmax``: exponential moving average of each batch's min/max.
- ``percentile``: the ``percentile`` / ``100 - percentile`` quantiles, averaged over batches.
- ``kl``: a histogram of ``|x|`` and the TensorRT-style threshold that minimises the
  KL divergence between the clipped and the quantized distribution (per tensor only);
  asymmetric, the range ``[-t, t]`` is cut to the min and max seen, so a one-sided
  distribution spends no codes on the side it never reaches.
- ``mse``: for each batch, the shrink of the min/max range minimising the squared
  fake-quantization error, averaged over batches.

Weights and static activation scales use the same classes; :func:`weight_qparams` is
the one-shot entry point for a weight.
"""

from __future__ import annotations

import math

import torch

from torchquant.config.algorithms import OBSERVERS
from torchquant.errors import CalibrationError, ConfigError
from torchquant.numerics import choose_int_qparams, group_min_max
from torchquant.numerics.range_search import mse_range, view_units

GRANULARITIES = ("tensor", "channel", "token", "group")
KL_BINS = 2048


def _unit_min_max(x: torch.Tensor, granularity: str, group_size: int) -> tuple:
    if granularity == "group":
        lo, hi = group_min_max(x, group_size)
        return lo.float(), hi.float()
    v = view_units(x, granularity, group_size, float("nan"))
    return v.amin(dim=1, keepdim=True).float(), v.amax(dim=1, keepdim=True).float()


def kl_threshold(hist: torch.Tensor, bin_width: float, levels: int = 128, stride: int = 8) -> float:
    """TensorRT-style entropy calibration: the ``|x|`` threshold minimising KL(P || Q).

    ``hist`` counts ``|x|`` in equal bins from 0.  For each candidate threshold ``i``
    bins wide, ``P`` is the histogram clipped at ``i`` (outliers added to its last
    bin) and ``Q`` is ``P`` merged into ``levels`` quantization bins and expanded back
    over the non-empty bins; the threshold with the smallest KL divergence wins.
    """
    h = hist.double()
    nbins = h.numel()
    if nbins <= levels or float(h.sum()) == 0.0:
        return nbins * bin_width
    best_kl, best_i = math.inf, nbins
    for i in range(levels, nbins + 1, stride):
        p = h[:i].clone()
        p[-1] += h[i:].sum()
        nonzero = p > 0
        # -- merge the i reference bins into `levels` quantization bins (np.array_split style)
        idx = torch.arange(i) * levels // i
        merged = torch.zeros(levels, dtype=torch.float64).index_add_(0, idx, h[:i])
        count = torch.zeros(levels, dtype=torch.float64).index_add_(0, idx, nonzero.double())
        q = torch.where(nonzero, merged[idx] / count[idx].clamp(min=1), torch.zeros_like(p))
        ps, qs = p / p.sum(), q / q.sum().clamp(min=1e-30)
        mask = ps > 0
        if bool((qs[mask] == 0).any()):
            continue
        kl = float((ps[mask] * torch.log(ps[mask] / qs[mask])).sum())
        if kl < best_kl:
            best_kl, best_i = kl, i
    return (best_i + 0.5) * bin_width


class Observer:
    """Accumulates a range over calls to :meth:`update`; :meth:`range` returns ``(lo, hi)``.

    Ranges have shape ``(1, 1)`` per tensor, ``(rows, 1)`` per channel/token and
    ``(rows, groups)`` per group.
    """

    def __init__(
        self,
        kind: str = "minmax",
        granularity: str = "tensor",
        group_size: int = -1,
        bits: int = 8,
        symmetric: bool = True,
        percentile: float = 99.99,
        momentum: float = 0.9,
        name: str = "tensor",
    ) -> None:
        if kind not in OBSERVERS:
            raise ConfigError(f"observer={kind!r} is not known; expected one of {OBSERVERS}")
        if granularity not in GRANULARITIES:
            raise ConfigError(
                f"granularity={granularity!r} is not known; expected one of {GRANULARITIES}"
            )
        if granularity == "group" and (not isinstance(group_size, int) or group_size <= 0):
            raise ConfigError(f"group_size={group_size!r}: expected a positive int for 'group'")
        if kind == "kl" and granularity != "tensor":
            raise ConfigError(
                f"observer='kl' works per tensor only, got granularity={granularity!r}"
            )
        if not 0.0 < percentile <= 100.0:
            raise ConfigError(f"percentile={percentile!r}: expected a number in (0, 100]")
        self.kind, self.granularity, self.group_size = kind, granularity, group_size
        self.bits, self.symmetric, self.name = bits, symmetric, name
        self.percentile, self.momentum = percentile, momentum
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None
        self.batches = 0
        self.hist: torch.Tensor | None = None
        self.hist_edge = 0.0
        self.seen_max = 0.0
        self.seen_lo, self.seen_hi = math.inf, -math.inf

    def update(self, x: torch.Tensor) -> None:
        x = x.detach()
        if x.dim() != 2:
            x = x.reshape(-1, x.shape[-1])
        if x.numel() == 0:
            return
        if not bool(torch.isfinite(x).all()):
            raise CalibrationError(f"{self.name}: observed NaN/Inf values during calibration")
        x = x.float()
        if self.kind == "kl":
            self.seen_lo = min(self.seen_lo, float(x.min()))
            self.seen_hi = max(self.seen_hi, float(x.max()))
            self._update_histogram(x.abs().reshape(-1))
            return
        lo, hi = self._batch_range(x)
        if self.lo is not None and lo.shape != self.lo.shape:
            raise CalibrationError(
                f"{self.name}: observed shape changed ({tuple(self.lo.shape)} -> "
                f"{tuple(lo.shape)}); per-{self.granularity} ranges need equal shapes"
            )
        self._combine(lo, hi)
        self.batches += 1

    def _batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kind == "percentile":
            v = view_units(x, self.granularity, self.group_size, float("nan"))
            q = torch.tensor([1.0 - self.percentile / 100.0, self.percentile / 100.0])
            if self.granularity == "group":
                # -- a short last group is NaN-padded: its quantiles must skip the padding
                # -- (groups are small, so nanquantile's size limit never applies)
                lo = torch.nanquantile(v, float(q[0]), dim=1, keepdim=True, interpolation="lower")
                hi = torch.nanquantile(v, float(q[1]), dim=1, keepdim=True, interpolation="higher")
                return self._reshape_units(lo, x), self._reshape_units(hi, x)
            n = v.shape[1]
            k_lo = max(1, min(n, math.ceil(float(q[0]) * n)))
            k_hi = max(1, min(n, math.ceil(float(q[1]) * n)))
            lo = v.kthvalue(k_lo, dim=1, keepdim=True).values
            hi = v.kthvalue(k_hi, dim=1, keepdim=True).values
            return self._reshape_units(lo, x), self._reshape_units(hi, x)
        if self.kind == "mse":
            return mse_range(x, self.bits, self.symmetric, self.granularity, self.group_size)
        return _unit_min_max(x, self.granularity, self.group_size)

    def _reshape_units(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return t.reshape(x.shape[0], -1) if self.granularity == "group" else t

    def _combine(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        if self.lo is None:
            self.lo, self.hi = lo, hi
        elif self.kind == "minmax":
            self.lo, self.hi = torch.minimum(self.lo, lo), torch.maximum(self.hi, hi)
        elif self.kind == "moving_minmax":
            m = self.momentum
            self.lo, self.hi = m * self.lo + (1 - m) * lo, m * self.hi + (1 - m) * hi
        else:  # percentile, mse: running mean of per-batch estimates
            n = self.batches
            self.lo = (self.lo * n + lo) / (n + 1)
            self.hi = (self.hi * n + hi) / (n + 1)

    def _update_histogram(self, a: torch.Tensor) -> None:
        top = float(a.max())
        self.seen_max = max(self.seen_max, top)
        if self.hist is None:
            self.hist_edge = top if top > 0 else 1.0
            self.hist = torch.zeros(KL_BINS, dtype=torch.float64)
        while top > self.hist_edge:  # -- double the range: merging bin pairs is exact
            self.hist = torch.cat([self.hist.view(-1, 2).sum(dim=1), torch.zeros(KL_BINS // 2)])
            self.hist_edge *= 2
        self.hist += torch.histc(a, bins=KL_BINS, min=0.0, max=self.hist_edge).double()
        self.batches += 1

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.batches == 0:
            raise CalibrationError(f"{self.name}: the observer saw no calibration data")
        if self.kind == "kl":
            levels = 1 << (self.bits - 1)
            t = kl_threshold(self.hist, self.hist_edge / KL_BINS, levels)
            # -- a bin's upper edge can pass the largest value seen: never exceed min-max
            t = min(t, self.seen_max)
            if self.symmetric:
                return torch.tensor([[-t]]), torch.tensor([[t]])
            return torch.tensor([[max(-t, self.seen_lo)]]), torch.tensor([[min(t, self.seen_hi)]])
        return self.lo, self.hi

    def absmax(self) -> torch.Tensor:
        lo, hi = self.range()
        return torch.maximum(-lo, hi)


def weight_qparams(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    observer: str = "minmax",
    scale_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales and zeros ``(N, G)`` of weight ``w: (N, K)`` with the range an observer picks."""
    granularity = "channel" if group_size == -1 else "group"
    obs = Observer(observer, granularity, group_size, bits, symmetric, name="weight")
    obs.update(w)
    lo, hi = obs.range()
    return choose_int_qparams(lo, hi, bits, symmetric, scale_dtype)
