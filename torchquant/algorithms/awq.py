"""AWQ: activation-aware per-input-channel scaling and weight clipping.

Salient input channels (large mean ``|x|``) are scaled up in the weight before
rounding and down in the input: ``s = mean|x|^alpha`` (normalised), alpha chosen on a
grid to minimise the output error of an inspected module.  Duo scaling also divides by
the channel's mean group-relative weight magnitude to the ``1 - alpha``, so channels
whose weights already span their groups' ranges are scaled less.  Then each group's range is
shrunk to the factor minimising the error of that group's partial products.  Pure
functions; the calibration engine supplies activations and the objective.

On the FP4 grids (NVFP4, MXFP4) a group is a scale block: the searches fake-quantize
with the format's own block scales, and a clipped range is the block max the scale is
chosen from (NVFP4's E4M3 scale of it, MXFP4's power of two).  On MXFP4 only that power
of two matters, so the clipping search tries the block's own exponent, the one below and
the one above (:data:`MXFP4_CLIP_FACTORS`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from torchquant.config import WeightQuant
from torchquant.numerics import (
    IntWeight,
    choose_int_qparams,
    expand_groups,
    group_min_max,
    num_groups,
    quantize_codes,
)
from torchquant.numerics.fp4 import FP4_ROUNDING, Fp4Weight, dequantize_fp4_weight, fp4_rounding

# -- fake quantization of a weight on its grid, from min/max or the given per-group (lo, hi)
FakeQuantize = Callable[[torch.Tensor, tuple | None], torch.Tensor]

# -- how many bytes of candidate weights a parted scale search keeps between its passes
CANDIDATE_CACHE_BYTES = 256 * 2**20
# -- the clipping search's range factors on MXFP4: a block's exponent, one below, one above.
# -- A shrink alone never reaches the one above, which the spec's rounding needs where a
# -- block max lands past 6 times its scale and saturates (up to a quarter of it lost).
MXFP4_CLIP_FACTORS = (1.0, 0.5, 2.0)


def quantize_in_ranges(
    w: torch.Tensor,
    ranges: tuple[torch.Tensor, torch.Tensor],
    bits: int,
    group_size: int,
    symmetric: bool,
    scale_dtype: torch.dtype | None = None,
) -> IntWeight:
    """Round ``w: (N, K)`` to the grid of per-group ranges ``(lo, hi)`` ``(N, G)`` (clipped
    by :func:`search_clip`); scales follow ``quantize_int_weight``'s dtype rule."""
    sdt = scale_dtype or (w.dtype if group_size != -1 else torch.float32)
    scales, zeros = choose_int_qparams(*ranges, bits, symmetric, sdt)
    codes = quantize_codes(w, scales, zeros, bits, group_size)
    return IntWeight(codes, scales, zeros, bits, group_size)


def fake_quantize(
    w: torch.Tensor, bits: int, group_size: int, symmetric: bool, ranges: tuple | None = None
) -> torch.Tensor:
    """``dequant(quant(w))`` round-to-nearest, from min/max or the given ``(lo, hi)``.

    The searches call it once per candidate, so it works on the grouped view
    ``(N, G, group_size)`` with per-group float32 scales broadcast, in place: the same
    element-wise steps as :func:`quantize_in_ranges` then ``dequantize_int_weight``
    (bit for bit), without expanding the qparams to ``(N, K)``.
    """
    n, k = w.shape
    gs = k if group_size == -1 else group_size
    g = num_groups(k, group_size)
    ranges = ranges if ranges is not None else group_min_max(w, group_size)
    scales, zeros = choose_int_qparams(*ranges, bits, symmetric, torch.float32)
    scale = scales.unsqueeze(-1)  # (N, G, 1)
    zero = float(1 << (bits - 1)) if zeros is None else zeros.float().unsqueeze(-1)
    wf = w.float() if g * gs == k else torch.nn.functional.pad(w.float(), (0, g * gs - k))
    # -- the clamped codes are integers below 256, exact in float32: no uint8 round trip
    deq = wf.reshape(n, g, gs).div(scale).round_().add_(zero).clamp_(0, (1 << bits) - 1)
    deq = deq.sub_(zero).mul_(scale)
    return deq.reshape(n, g * gs)[:, :k].to(w.dtype)


def quantize_fp4_in_ranges(
    w: torch.Tensor,
    ranges: tuple[torch.Tensor, torch.Tensor],
    weight_type: str,
    what: str,
    scale_rounding: str = "ocp",
) -> Fp4Weight:
    """FP4 ``weight_type`` of ``w: (N, K)``, each block's scale chosen from ``max(-lo, hi)``
    (MXFP4's rounded to a power of two by ``scale_rounding``)."""
    lo, hi = ranges
    rounding = fp4_rounding(weight_type, scale_rounding)
    return rounding(w, what=what, block_amax=torch.maximum(-lo, hi))


def fake_quantize_fp4(
    w: torch.Tensor, weight_type: str, ranges: tuple | None = None, scale_rounding: str = "ocp"
) -> torch.Tensor:
    """``dequant(quant(w))`` on the FP4 grid, from each block's max or the given ``(lo, hi)``."""
    if ranges is None:
        q = fp4_rounding(weight_type, scale_rounding)(w)
    else:
        q = quantize_fp4_in_ranges(w, ranges, weight_type, "weight", scale_rounding)
    return dequantize_fp4_weight(q.codes, q.scales, q.global_scale, q.block, w.dtype)


def weight_fake_quantize(weight: WeightQuant) -> FakeQuantize:
    """The fake quantization of weights stored as ``weight`` (INT or FP4)."""
    if weight.type in FP4_ROUNDING:
        return lambda w, ranges=None: fake_quantize_fp4(
            w, weight.type, ranges, weight.scale_rounding
        )
    return lambda w, ranges=None: fake_quantize(
        w, weight.bits, weight.group_size, weight.symmetric, ranges
    )


def weight_salience(weights: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """Mean over output rows of ``|w| / max|w|`` within each weight group, per input
    channel ``(K,)``, for linears ``(N_i, K)`` sharing one input."""
    w = torch.cat([t.float() for t in weights]).abs()
    _, group_max = group_min_max(w, group_size)
    per_column = expand_groups(group_max, group_size, w.shape[1])
    return (w / per_column.clamp(min=1e-12)).mean(dim=0)


def scale_candidates(
    act_mean: torch.Tensor, grid: int, w_mean: torch.Tensor | None = None
) -> list[tuple[float, torch.Tensor]]:
    """``(alpha, s)`` for alpha in ``{0, 1/grid, ...}``; ``s = act_mean^alpha``, divided by
    ``w_mean^(1 - alpha)`` when given (duo scaling), normalised so that
    ``max(s) * min(s) = 1``."""
    a = act_mean.float().clamp(min=1e-4)
    return [(i / grid, _scale_at(a, i / grid, w_mean)) for i in range(grid)]


def _scale_at(a: torch.Tensor, alpha: float, w_mean: torch.Tensor | None) -> torch.Tensor:
    """One candidate: ``a^alpha`` (``a`` the clamped ``act_mean``), divided by
    ``w_mean^(1 - alpha)`` when given, normalised so that ``max(s) * min(s) = 1``."""
    s = a.pow(alpha)
    if w_mean is not None:
        s = s / (w_mean.float().to(s.device).pow(1.0 - alpha) + 1e-4)
    s = s.clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def closed_scale_candidates(
    act_mean: torch.Tensor, grid: int, duo_scaling: bool | str, w_mean: torch.Tensor | None = None
) -> list[tuple[float, torch.Tensor]]:
    """``grid`` candidates ``(alpha, s)`` with alpha from 0 to 1 inclusive, formed as in
    :func:`scale_candidates`; duo scaling (``True``) keeps ``s = 1`` as the first and
    spreads the other ``grid - 1`` over the duo alphas, ``"both"`` alternates activation-only
    and duo at each of ``grid // 2`` alphas.  On power-of-two block scales the end points
    matter: the whole activation term (alpha 1) and the unscaled weights (MXFP4 on
    SmolLM2-135M, duo scaling: 30.36 -> 29.31 perplexity against the open activation-only
    grid).
    """
    if duo_scaling is True:
        steps = [(0.0, None)] + [(i / (grid - 2), w_mean) for i in range(grid - 1)]
    elif duo_scaling == "both":
        half = grid // 2
        steps = [(i / (half - 1), wm) for i in range(half) for wm in (None, w_mean)]
    else:
        steps = [(i / (grid - 1), None) for i in range(grid)]
    a = act_mean.float().clamp(min=1e-4)
    return [(alpha, _scale_at(a, alpha, wm)) for alpha, wm in steps]


@dataclass(frozen=True)
class PartedLoss:
    """An output error summed over ``parts`` non-negative parts (one per calibration
    sample): ``part(ws, i)`` is part ``i`` with effective weights ``ws``, a 0-dim tensor.

    Called, it is the whole error, the parts added in order as one float32 sum.
    """

    parts: int
    part: Callable[[list[torch.Tensor], int], torch.Tensor]

    def __call__(self, ws: list[torch.Tensor]) -> float:
        total = 0
        for i in range(self.parts):
            total = total + self.part(ws, i)
        return float(total)


@torch.no_grad()
def search_scales(
    act_mean: torch.Tensor,
    weights: list[torch.Tensor],
    quantize: Callable[[torch.Tensor], torch.Tensor],
    loss_with: Callable[[list[torch.Tensor]], float],
    grid: int,
    w_means: list[torch.Tensor | None] = (None,),
    cache_bytes: int = CANDIDATE_CACHE_BYTES,
    candidates: list[tuple[float, torch.Tensor]] | None = None,
) -> tuple[torch.Tensor, float, float]:
    """Best factors ``s (K,)`` for linears ``(N_i, K)`` sharing one input.

    ``loss_with(ws)`` runs the inspected module with effective weights ``ws`` and
    returns its output error; each candidate is scored with ``quantize(W s) / s``.
    Candidates come from each of ``w_means`` (``None``: activation-only scaling), or are
    the ``candidates`` given (:func:`closed_scale_candidates`).
    A :class:`PartedLoss` is searched by :func:`_search_parted`, which stops scoring a
    candidate once its parts so far exceed the best total (the same choice, less work)
    and keeps up to ``cache_bytes`` of candidate weights from its first pass to its
    second rather than quantizing them again.  Returns ``(s, alpha, loss)``.
    """
    if candidates is None:
        candidates = [c for wm in w_means for c in scale_candidates(act_mean, grid, wm)]
    candidates = [(alpha, s.to(weights[0].device)) for alpha, s in candidates]

    def trial(s: torch.Tensor) -> list[torch.Tensor]:
        return [(quantize(w * s) / s).to(w.dtype) for w in weights]

    if isinstance(loss_with, PartedLoss) and loss_with.parts > 1:
        return _search_parted(act_mean, candidates, trial, loss_with, cache_bytes)
    best = (torch.ones_like(act_mean, dtype=torch.float32), 0.0, float("inf"))
    for alpha, s in candidates:
        loss = loss_with(trial(s))
        if loss < best[2]:
            best = (s, alpha, loss)
    return best


def _search_parted(
    act_mean: torch.Tensor,
    candidates: list[tuple[float, torch.Tensor]],
    trial: Callable[[torch.Tensor], list[torch.Tensor]],
    loss: PartedLoss,
    cache_bytes: int,
) -> tuple[torch.Tensor, float, float]:
    """The candidate a full search picks (least total, the first of equal ones), scoring
    every candidate's first part, then the rest in order of it: partial sums of
    non-negative float32 parts never decrease, so one above the best total is dropped.

    The first pass keeps the weights of the candidates with the least first parts (those
    the second pass scores first and longest) within ``cache_bytes``; the others are
    quantized again if the second pass reaches them.
    """
    first: list[torch.Tensor] = []
    kept = _CandidateCache(cache_bytes)
    for c, (_, s) in enumerate(candidates):
        ws = trial(s)
        first.append(loss.part(ws, 0))
        kept.offer(c, ws, float(first[c]))
        del ws
    order = sorted(range(len(candidates)), key=lambda c: (float(first[c]), c))
    best_c, best_loss = None, float("inf")

    def beaten(value: float, c: int) -> bool:
        return value > best_loss or (best_c is not None and value == best_loss and c > best_c)

    for c in order:
        total, ws = first[c], kept.take(c)
        for i in range(1, loss.parts):
            if beaten(float(total), c):
                break
            ws = ws if ws is not None else trial(candidates[c][1])
            total = total + loss.part(ws, i)
        else:
            value = float(total)
            if value < best_loss or (best_c is not None and value == best_loss and c < best_c):
                best_c, best_loss = c, value
        del ws
    if best_c is None:
        return torch.ones_like(act_mean, dtype=torch.float32), 0.0, float("inf")
    alpha, s = candidates[best_c]
    return s, alpha, best_loss


class _CandidateCache:
    """Candidates' weights within a byte budget, keeping those of least ``(key, index)``."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.held: dict[int, tuple[tuple[float, int], list[torch.Tensor]]] = {}

    def offer(self, c: int, ws: list[torch.Tensor], key: float) -> None:
        size = sum(w.numel() * w.element_size() for w in ws)
        capacity = self.budget // size if size else len(self.held) + 1
        if capacity <= 0:
            return
        self.held[c] = ((key, c), ws)
        if len(self.held) > capacity:
            worst = max(self.held, key=lambda x: self.held[x][0])
            del self.held[worst]

    def take(self, c: int) -> list[torch.Tensor] | None:
        """Candidate ``c``'s weights if kept (and no longer kept here), else ``None``."""
        entry = self.held.pop(c, None)
        return None if entry is None else entry[1]


def clip_factors(weight_type: str, grid: int, max_shrink: float) -> tuple[float, ...]:
    """The factors of each group's range the clipping search tries, the unclipped 1 first:
    ``1 - i / grid`` down to ``max_shrink`` (exclusive), or MXFP4's three exponents."""
    return MXFP4_CLIP_FACTORS if weight_type == "mxfp4" else _shrinks(grid, max_shrink)


def _shrinks(grid: int, max_shrink: float) -> tuple[float, ...]:
    return tuple(1.0 - i / grid for i in range(max(1, int(grid * max_shrink))))


def search_clip(
    w: torch.Tensor,
    x: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    grid: int = 20,
    max_shrink: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`search_clip_ranges` on the INT grid of ``bits``, ``group_size``, ``symmetric``."""

    def quantize(t: torch.Tensor, ranges: tuple | None) -> torch.Tensor:
        return fake_quantize(t, bits, group_size, symmetric, ranges)

    return search_clip_ranges(w, x, group_size, quantize, grid, max_shrink)


@torch.no_grad()
def search_clip_ranges(
    w: torch.Tensor,
    x: torch.Tensor,
    group_size: int,
    quantize: FakeQuantize,
    grid: int = 20,
    max_shrink: float = 0.5,
    factors: tuple[float, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group ranges ``(lo, hi)`` ``(N, G)``: min/max times the factor that
    minimises ``sum_t (x_t . w_g - x_t . q(w_g))^2`` for each group ``g`` separately,
    ``q`` the fake quantization ``quantize(w, ranges)``; the factors tried are ``factors``
    (the first kept on ties) or ``1 - i / grid`` down to ``max_shrink``.

    The error of a group's rounding ``d = q(w_g) - w_g`` is ``d^T H_g d`` with ``H_g`` the
    Gram matrix of the group's inputs; when a group is narrower than the input has rows,
    each shrink is scored that way, ``group_size / T`` of the work of the partial products.
    """
    n, k = w.shape
    gs = k if group_size == -1 else group_size
    g = num_groups(k, group_size)
    pad = g * gs - k
    wf, xf = w.float(), x.reshape(-1, k).float()
    # -- per-group inputs (G, T, gs) and weights (G, gs, N)
    xg = torch.nn.functional.pad(xf, (0, pad)).reshape(-1, g, gs).transpose(0, 1)
    wg = torch.nn.functional.pad(wf, (0, pad)).reshape(n, g, gs).permute(1, 2, 0)
    by_gram = gs < xg.shape[1]
    if by_gram:
        gram = torch.bmm(xg.transpose(1, 2), xg)  # (G, gs, gs)
    else:
        ref = torch.bmm(xg, wg)  # (G, T, N)
    lo0, hi0 = group_min_max(wf, group_size)
    best_err = torch.full((n, g), float("inf"), device=w.device)
    best_p = torch.ones(n, g, device=w.device)
    for p in _shrinks(grid, max_shrink) if factors is None else factors:
        q = quantize(wf, (lo0 * p, hi0 * p))
        qg = torch.nn.functional.pad(q, (0, pad)).reshape(n, g, gs).permute(1, 2, 0)
        if by_gram:
            d = qg - wg
            err = (torch.bmm(gram, d) * d).sum(dim=1).t() / xg.shape[1]  # (N, G)
        else:
            err = (torch.bmm(xg, qg) - ref).pow(2).mean(dim=1).t()  # (N, G)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_p = torch.where(better, torch.full_like(best_p, p), best_p)
    return lo0 * best_p, hi0 * best_p
