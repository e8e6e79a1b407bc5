"""HQQ: half-quadratic quantization (Badri & Shaji, 2023), fitted to the float weight alone.

HQQ chooses each group's qparams to minimize the lp reconstruction error
``||W - dequant(quant(W))||_p^p`` with ``p < 1``, which lets a few outlying weights keep a
large error instead of stretching the whole group's grid.  The non-convex problem is split
half-quadratically with an error variable ``E``: each iteration rounds ``W``, shrinks the
residual into ``E`` (the proximal step of the lp term, a generalized soft threshold) and
solves the quadratic ``||W - E - dequant||^2`` for the qparam in closed form; the penalty
``beta`` grows by ``kappa`` per step and the solve stops once the mean absolute error no
longer falls (keeping the best iterate).  No calibration data is needed.

HQQ's zero point is a float, whereas our layouts store an integer zero in ``[0, 2**bits)``.
So the solve runs in two phases: HQQ's zero solve on the min/max scale, then the zero is
rounded to the integer grid and the same half-quadratic solve fits the scale with that
zero fixed (symmetric schemes run only this phase: their zero is implied).  Each group
keeps whichever of this result and round-to-nearest has the lower lp error, so HQQ never
does worse than RTN in the objective it minimizes.  The result is an ordinary
:class:`~torchquant.numerics.IntWeight`, exported like any round-to-nearest weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from torchquant.errors import QuantizationError
from torchquant.numerics import IntWeight, quantize_codes, quantize_int_weight

# -- HQQ's defaults (mobiusml/hqq, the proximal solver)
LP_NORM = 0.7
BETA = 10.0
KAPPA = 1.01
ITERATIONS = 20
EARLY_STOP = True


@dataclass(frozen=True)
class _Solver:
    """One group matrix ``x: (M, L)`` (a row per group) at a time; qparams are ``(M, 1)``."""

    bits: int
    iterations: int
    lp_norm: float
    beta: float
    kappa: float
    early_stop: bool

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    def codes(self, x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return torch.round(x / scale + zero).clamp_(0, self.qmax)

    def shrink(self, residual: torch.Tensor, beta: float) -> torch.Tensor:
        """Proximal step of ``|.|^p / beta``: ``sign(r) * relu(|r| - |r|^(p-1) / beta)``."""
        keep = residual.abs().pow_(self.lp_norm - 2).div_(-beta).add_(1).clamp_(min=0)
        return keep.mul_(residual)

    def lp_error(self, x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """``sum |x - dequant(quant(x))|^p`` per group, ``(M, 1)``."""
        residual = x - (self.codes(x, scale, zero) - zero) * scale
        return residual.abs_().pow_(self.lp_norm).sum(1, keepdim=True)

    def fit_zero(self, x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """HQQ's solve: the float zero minimizing the lp error with ``scale`` fixed."""
        mean_x = x.mean(1, keepdim=True)

        def step(zero: torch.Tensor, beta: float) -> tuple[torch.Tensor, float]:
            q = self.codes(x, scale, zero)
            residual = x - (q - zero) * scale
            error = self.shrink(residual, beta)
            # -- argmin_z ||x - E - (q - z) * scale||^2
            new = q.mean(1, keepdim=True) - (mean_x - error.mean(1, keepdim=True)) / scale
            return new.clamp_(0, self.qmax), float(residual.abs_().mean())

        return self._iterate(step, zero)

    def fit_scale(self, x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """The same solve on the scale, ``zero`` fixed (an integer, as stored)."""

        def step(scale: torch.Tensor, beta: float) -> tuple[torch.Tensor, float]:
            steps = self.codes(x, scale, zero).sub_(zero)
            residual = x - steps * scale
            target = x - self.shrink(residual, beta)
            # -- argmin_s ||x - E - (q - z) * s||^2
            norm = steps.square().sum(1, keepdim=True)
            new = (target * steps).sum(1, keepdim=True) / norm
            new = torch.where((norm > 0) & (new > 0), new, scale)
            return new, float(residual.abs_().mean())

        return self._iterate(step, scale)

    def _iterate(self, step, value: torch.Tensor) -> torch.Tensor:
        """Run ``step(value, beta) -> (next value, mean |error| of value)`` with growing
        ``beta``; with early stopping, return the last value whose error still fell."""
        beta, best, previous = self.beta, float("inf"), value
        for _ in range(self.iterations):
            new, error = step(value, beta)
            if self.early_stop and not error < best:
                return previous
            best, previous, value = error, value, new
            beta *= self.kappa
        return value


def hqq_quantize(
    weight: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool = False,
    scale_dtype: torch.dtype | None = None,
    *,
    iterations: int = ITERATIONS,
    lp_norm: float = LP_NORM,
    beta: float = BETA,
    kappa: float = KAPPA,
    early_stop: bool = EARLY_STOP,
    what: str = "weight",
) -> IntWeight:
    """Codes and per-group qparams of ``weight: (N, K)`` chosen by HQQ's proximal solver.

    ``iterations`` bounds each phase's solve; ``beta`` is the initial penalty and grows by
    ``kappa`` per iteration; ``early_stop`` ends a phase once the mean absolute error stops
    falling.  Shapes, dtypes, partial last groups and ``group_size=-1`` (per channel) are
    those of :func:`~torchquant.numerics.quantize_int_weight`; NaN/Inf are refused by name.
    """
    _check_params(iterations, lp_norm, beta, kappa, what)
    # -- validates the weight and gives the starting point every group is compared with
    rtn = quantize_int_weight(weight, bits, group_size, symmetric, scale_dtype, what)
    solver = _Solver(bits, iterations, lp_norm, beta, kappa, early_stop)
    n, k = weight.shape
    w = weight.detach().float()
    scales = rtn.scales.float()
    zeros = torch.full_like(scales, 1 << (bits - 1)) if symmetric else rtn.zeros.float()
    limit = torch.finfo(weight.dtype).max
    for cols, groups, length in _blocks(k, group_size):
        x = w[:, cols].reshape(-1, length)  # -- x: (N * groups, length), a row per group
        s0 = scales[:, groups].reshape(-1, 1)
        z0 = zeros[:, groups].reshape(-1, 1)
        z = z0
        if not symmetric:
            lo = x.amin(1, keepdim=True).clamp_(max=0)
            z = torch.round(solver.fit_zero(x, s0, -lo / s0))
        s = solver.fit_scale(x, s0, z).to(rtn.scales.dtype).float()
        reach = torch.maximum(z, solver.qmax - z) * s
        better = (
            (s > 0) & (reach <= limit) & (solver.lp_error(x, s, z) < solver.lp_error(x, s0, z0))
        )
        scales[:, groups] = torch.where(better, s, s0).view(n, -1)
        zeros[:, groups] = torch.where(better, z, z0).view(n, -1)
    scales = scales.to(rtn.scales.dtype)
    zeros = None if symmetric else zeros.to(torch.uint8)
    codes = quantize_codes(weight, scales, zeros, bits, group_size)
    return IntWeight(codes, scales, zeros, bits, group_size)


def _blocks(in_features: int, group_size: int) -> list[tuple[slice, slice, int]]:
    """``(weight columns, group columns, group length)`` of the whole groups and of a
    shorter last group."""
    length = in_features if group_size == -1 else min(group_size, in_features)
    whole, rest = divmod(in_features, length)
    blocks = [(slice(0, whole * length), slice(0, whole), length)]
    if rest:
        blocks.append((slice(whole * length, in_features), slice(whole, whole + 1), rest))
    return blocks


def _check_params(iterations: int, lp_norm: float, beta: float, kappa: float, what: str) -> None:
    if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 1:
        raise QuantizationError(
            f"hqq iterations for {what} must be a positive int, got {iterations!r}"
        )
    if not 0.0 < lp_norm <= 1.0:
        raise QuantizationError(f"hqq lp_norm for {what} must be in (0, 1], got {lp_norm!r}")
    if not beta > 0.0:
        raise QuantizationError(f"hqq beta for {what} must be positive, got {beta!r}")
    if not kappa >= 1.0:
        raise QuantizationError(f"hqq kappa for {what} must be at least 1, got {kappa!r}")
