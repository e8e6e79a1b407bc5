"""GPTQ: quantize a weight column by column, spreading each column's rounding error
over the columns not yet quantized, weighted by the inverse Hessian of the layer input.

Two pure functions: :func:`accumulate_hessian` (``H = 2/n * sum x x^T`` over calibration
tokens) and :func:`gptq_quantize`.  Columns are processed in blocks of ``block_size``:
inside a block the standard per-column loop updates only the block, and the block's
accumulated error updates the rest of the matrix in one matmul (lazy batch updates).
The weight is held transposed, one visited column per contiguous row, so each step of
the column loop reads and writes whole rows; with static groups (or per-channel
qparams) every column's scale and zero are gathered per block before the loop, leaving
it a handful of vector operations per column.  The result is plain codes/scales/zeros,
the same format round-to-nearest produces.  :func:`gptq_quantize_fp4` runs the same loop
onto the FP4 grid (NVFP4, MXFP4) and :func:`gptq_quantize_fp8_block` onto the E4M3 grid of
128x128-block FP8, each with the block scales fixed beforehand.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from torchquant.errors import CalibrationError, QuantizationError
from torchquant.numerics import (
    choose_int_qparams,
    group_min_max,
    num_groups,
    quantize_fp8_block_weight,
    search_fp8_block_weight,
    to_fp8_e4m3,
)
from torchquant.numerics import expand_blocks as expand_weight_blocks
from torchquant.numerics.fp4 import (
    Fp4Weight,
    decode_e2m1,
    encode_e2m1,
    expand_blocks,
    fp4_block_scales,
    fp4_rounding,
)
from torchquant.numerics.range_search import mse_range

DAMPING_STEPS = 4  # -- tries, each with ten times the damping of the one before
INNER_BLOCK = 16  # -- columns updated one by one before a matmul updates the rest


def accumulate_hessian(
    hessian: torch.Tensor | None, count: int, x: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """Fold inputs ``x: (..., K)`` into the running ``H = 2/n * X^T X`` (float32, ``(K, K)``)."""
    x = x.reshape(-1, x.shape[-1]).float()
    m = x.shape[0]
    if hessian is None:
        hessian = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
    if m == 0:
        return hessian, count
    hessian.mul_(count / (count + m))
    x = x * (2.0 / (count + m)) ** 0.5
    hessian.addmm_(x.t(), x)
    return hessian, count + m


@dataclass
class GPTQResult:
    """Codes ``(N, K)`` uint8, ``scales``/``zeros`` ``(N, G)`` and, for act-order without
    static groups, ``g_idx`` ``(K,)`` (the group of each input column)."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    g_idx: torch.Tensor | None


def _qparams(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    observer: str,
    sdt: torch.dtype,
    h_diag: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row (``group_size=-1``) or per-group qparams ``(N, G)`` of ``w: (N, cols)``;
    ``h_diag (cols,)`` weighs each column's error for the ``hessian_mse`` observer."""
    if observer in ("mse", "hessian_mse"):
        gran = "channel" if group_size == -1 else "group"
        weight = h_diag if observer == "hessian_mse" else None
        lo, hi = mse_range(w, bits, symmetric, gran, group_size, column_weight=weight)
    else:
        lo, hi = group_min_max(w, group_size)
    return choose_int_qparams(lo, hi, bits, symmetric, sdt)


def inverse_hessian_factor(h: torch.Tensor, dampening: float, name: str = "weight") -> torch.Tensor:
    """Upper Cholesky factor ``U`` ``(K, K)`` float32 of ``(H + damp I)^-1`` (``U^T U``
    equals it), ``damp`` being ``dampening`` times the mean of the diagonal.

    With rows and columns reversed, the lower Cholesky factor of the damped ``H``,
    reversed back, is an upper ``R`` with ``H = R R^T``; then ``U = R^-1``: one
    factorisation and one triangular solve (forming the inverse and factoring it again
    costs three times as much, and float32 ``cholesky_inverse`` is slow on CPU).  It
    runs in float32; where that fails (a Hessian singular but for the damping, e.g. from
    fewer tokens than columns) the same damping is tried in float64 before the damping
    is raised tenfold, so such a Hessian keeps the damping asked for.
    """
    damp = dampening * float(torch.diag(h).mean())
    for attempt in range(DAMPING_STEPS):
        for dtype in (torch.float32, torch.float64):
            eye = torch.eye(h.shape[0], dtype=dtype, device=h.device)
            damped = h.to(dtype) + damp * (10**attempt) * eye
            low, info = torch.linalg.cholesky_ex(damped.flip(0, 1))
            if int(info) != 0:
                continue
            upper = torch.linalg.solve_triangular(low.flip(0, 1), eye, upper=True).float()
            if bool(torch.isfinite(upper).all()):
                return upper
    raise QuantizationError(f"{name}: Hessian is not positive definite even after dampening")


def _round(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | float, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and dequantized values of ``w`` (any shape broadcasting with scale/zero)."""
    code = torch.clamp(torch.round(w / scale) + zero, 0, (1 << bits) - 1)
    return code, (code - zero) * scale


# -- rounds visited column ``i`` (a row ``(N,)``) into its codes row and dequantized row
RoundColumn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]


def _quantize_columns(
    w1: torch.Tensor,
    hinv1: torch.Tensor,
    count: int,
    round_column: RoundColumn,
    codes1: torch.Tensor,
    err1: torch.Tensor,
) -> None:
    """The column loop on fixed qparams: for each of the first ``count`` rows ``i`` of
    ``w1: (B, N)``, round it into ``codes1[i]`` (``round_column(i, row, code, deq)``), keep
    its error over the pivot in ``err1[i]`` and spread that error over every row after it.

    ``hinv1`` is the ``(B, B)`` block of the inverse-Hessian factor.  The updates are lazy
    once more inside the block: each column updates the rest of its chunk of
    ``INNER_BLOCK`` rows, and a finished chunk updates the rows after it in one matmul, so
    the per-column operations stay small (they run without thread hand-offs) and read few
    rows.
    """
    pivots = torch.diagonal(hinv1).tolist()
    deq = torch.empty_like(w1[0])
    for c1 in range(0, count, INNER_BLOCK):
        c2 = min(c1 + INNER_BLOCK, count)
        for i in range(c1, c2):
            err = err1[i]
            round_column(i, w1[i], codes1[i], deq)
            torch.sub(w1[i], deq, out=err).div_(pivots[i])
            w1[i + 1 : c2].addcmul_(hinv1[i, i + 1 : c2, None], err, value=-1)
        w1[c2:].sub_(hinv1[c1:c2, c2:].t() @ err1[c1:c2])


def _int_rounding(scale1: torch.Tensor, zero1: torch.Tensor | float, bits: int) -> RoundColumn:
    """Round column ``i`` to INT codes on ``scale1[i]`` / ``zero1[i]`` (``(C, N)``; ``zero1``
    a number when symmetric)."""
    qmax = (1 << bits) - 1

    def round_column(i: int, row: torch.Tensor, code: torch.Tensor, deq: torch.Tensor) -> None:
        scale = scale1[i]
        zero = zero1 if isinstance(zero1, float) else zero1[i]
        torch.div(row, scale, out=code)
        code.round_().add_(zero).clamp_(0, qmax)
        torch.sub(code, zero, out=deq).mul_(scale)

    return round_column


def _group_qparams(
    wt: torch.Tensor,
    w1: torch.Tensor,
    err1: torch.Tensor,
    hinv: torch.Tensor,
    block: tuple[int, int],
    col: int,
    gs: int,
    importance: torch.Tensor,
    choose: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Qparams ``(N, 1)`` of the group starting at visited column ``col`` (inside the
    block ``(i1, i2)`` held in ``w1``), from its columns with every update so far,
    including the pending (lazy) updates of this block to the columns after it."""
    i1, i2 = block
    rest = max(0, col + gs - i2)
    later = wt[i2 : i2 + rest] - hinv[i1:col, i2 : i2 + rest].t() @ err1[: col - i1]
    upcoming = torch.cat([w1[col - i1 :], later])[:gs]  # upcoming: (cols, N)
    return choose(upcoming.t(), importance[col : col + upcoming.shape[0]])


@dataclass(frozen=True)
class HessianFactor:
    """What GPTQ derives from one input Hessian ``(K, K)``, the same for every linear fed
    that input (q/k/v, gate/up): ``importance`` ``(K,)`` (its diagonal, dead columns
    given 1), ``dead`` ``(K,)`` (columns that never saw an input), the visiting order
    ``perm`` ``(K,)`` and the inverse-Hessian factor ``hinv`` ``(K, K)`` in that order,
    for the ``act_order`` and ``dampening`` it was made with."""

    importance: torch.Tensor
    dead: torch.Tensor
    perm: torch.Tensor
    hinv: torch.Tensor
    act_order: bool
    dampening: float


def factor_hessian(
    hessian: torch.Tensor, act_order: bool, dampening: float, name: str = "weight"
) -> HessianFactor:
    """The :class:`HessianFactor` of ``hessian``: compute it once for the linears sharing it."""
    if hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1]:
        raise QuantizationError(f"{name}: Hessian {tuple(hessian.shape)} is not square")
    if not bool(torch.isfinite(hessian).all()):
        raise CalibrationError(f"{name}: the input Hessian holds NaN/Inf values")
    h = hessian.detach().float().clone()  # h: (K, K)
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    perm = torch.arange(h.shape[0], device=h.device)
    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True)
    hinv = inverse_hessian_factor(h[perm][:, perm], dampening, name)  # hinv: (K, K)
    return HessianFactor(torch.diag(h), dead, perm, hinv, act_order, dampening)


def _prepare(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    act_order: bool,
    dampening: float,
    name: str,
    factor: HessianFactor | None,
) -> tuple[torch.Tensor, HessianFactor]:
    """A float32 copy of ``weight: (N, K)`` with dead columns zeroed, and the Hessian's
    factor (``factor`` when given: it must have been made with these settings)."""
    if weight.dim() != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise QuantizationError(
            f"{name}: weight {tuple(weight.shape)} and Hessian {tuple(hessian.shape)} disagree"
        )
    if factor is None:
        factor = factor_hessian(hessian, act_order, dampening, name)
    elif (factor.act_order, factor.dampening) != (act_order, dampening):
        raise QuantizationError(
            f"{name}: the Hessian factor was made with act_order={factor.act_order}, "
            f"dampening={factor.dampening}, expected act_order={act_order}, "
            f"dampening={dampening}"
        )
    w = weight.detach().float().clone()  # w: (N, K)
    w[:, factor.dead] = 0.0
    return w, factor


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int = -1,
    symmetric: bool = False,
    block_size: int = 128,
    dampening: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
    observer: str = "minmax",
    scale_dtype: torch.dtype | None = None,
    name: str = "weight",
    factor: HessianFactor | None = None,
) -> GPTQResult:
    """GPTQ-quantize ``weight: (N, K)`` given the input Hessian ``(K, K)``.

    ``group_size`` -1 is per output channel, else groups of that many input columns
    (a shorter last group when it does not divide ``K``).  ``act_order`` visits columns
    by decreasing Hessian diagonal; its groups then follow the visiting order and
    ``g_idx`` records them, unless ``static_groups`` fixes the groups' qparams on the
    original contiguous groups before the search (no ``g_idx`` needed).  ``factor`` is
    ``factor_hessian(hessian, act_order, dampening)`` when the caller shares it.
    """
    if not 2 <= bits <= 8:
        raise QuantizationError(f"{name}: bits must be in 2..8, got {bits}")
    w, factor = _prepare(weight, hessian, act_order, dampening, name, factor)
    perm, hinv = factor.perm, factor.hinv
    n, k = weight.shape
    sdt = scale_dtype or (weight.dtype if group_size != -1 else torch.float32)
    gs = k if group_size == -1 else group_size
    g_count = num_groups(k, group_size)
    importance = factor.importance  # how much each column's error costs, for hessian_mse

    scales = torch.zeros(n, g_count, dtype=sdt, device=w.device)
    zeros = None if symmetric else torch.zeros(n, g_count, dtype=torch.uint8, device=w.device)
    static = group_size == -1 or static_groups
    if static:
        scale, zero = _qparams(w, bits, group_size, symmetric, observer, sdt, importance)
        scales.copy_(scale)
        if zeros is not None:
            zeros.copy_(zero)
    wt = w[:, perm].t().contiguous()  # wt: (K, N), row j is the j-th visited column
    importance = importance[perm]
    col_group = perm // gs  # group of each visited column when groups are static
    scales_t = scales.float().t()  # (G, N)
    zeros_t = None if zeros is None else zeros.float().t()
    mid = float(1 << (bits - 1))  # the implied zero of symmetric codes

    def choose(cols: torch.Tensor, cols_importance: torch.Tensor):
        return _qparams(cols, bits, -1, symmetric, observer, sdt, cols_importance)

    codes_t = torch.empty(k, n, dtype=torch.float32, device=w.device)  # visited order
    rows = None  # (scale, zero) rows of the group in progress, groups in visiting order
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = wt[i1:i2].clone()  # w1: (B, N)
        err1 = torch.empty_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        if static:
            groups = col_group[i1:i2]
            zero1 = mid if zeros_t is None else zeros_t[groups]
            round_column = _int_rounding(scales_t[groups], zero1, bits)
            _quantize_columns(w1, hinv1, i2 - i1, round_column, codes_t[i1:i2], err1)
        else:
            # -- each group's qparams are chosen where it starts; the loop then runs over
            # the part of the group inside this block
            starts = sorted({i1, *range(-(-i1 // gs) * gs, i2, gs)})
            for a, b in zip(starts, [*starts[1:], i2], strict=True):
                if a % gs == 0:
                    scale, zero = _group_qparams(
                        wt, w1, err1, hinv, (i1, i2), a, gs, importance, choose
                    )
                    scales[:, a // gs] = scale[:, 0]
                    if zeros is not None:
                        zeros[:, a // gs] = zero[:, 0]
                    rows = scale.float().t(), mid if zero is None else zero.float().t()
                r, c = a - i1, b - a
                zero_rows = rows[1] if isinstance(rows[1], float) else rows[1].expand(c, n)
                round_column = _int_rounding(rows[0].expand(c, n), zero_rows, bits)
                _quantize_columns(w1[r:], hinv1[r:, r:], c, round_column, codes_t[a:b], err1[r:])
        wt[i2:].sub_(hinv[i1:i2, i2:].t() @ err1)

    g_idx = None
    codes = codes_t.to(torch.uint8)
    if act_order:
        codes = codes[torch.argsort(perm)]
        if not static:
            g_idx = (torch.argsort(perm) // gs).to(torch.int32)
    return GPTQResult(codes.t().contiguous(), scales, zeros, g_idx)


# -- FP4 (NVFP4, MXFP4): the column loop on the E2M1 grid


def _fp4_rounding(multipliers1: torch.Tensor) -> RoundColumn:
    """Round column ``i`` to E2M1 codes on its rows' block multipliers ``multipliers1[i]``."""

    def round_column(i: int, row: torch.Tensor, code: torch.Tensor, deq: torch.Tensor) -> None:
        multiplier = multipliers1[i]
        codes = encode_e2m1(row / multiplier)
        code.copy_(codes)
        torch.mul(decode_e2m1(codes), multiplier, out=deq)

    return round_column


@torch.no_grad()
def gptq_quantize_fp4(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    weight_type: str,
    block_size: int = 128,
    dampening: float = 0.01,
    act_order: bool = False,
    search_scales: bool = False,
    name: str = "weight",
    factor: HessianFactor | None = None,
    scale_rounding: str = "ocp",
) -> Fp4Weight:
    """GPTQ of ``weight: (N, K)`` onto the FP4 grid of ``weight_type`` (``nvfp4``, ``mxfp4``).

    The block scales (and NVFP4's global scale) are fixed before the column loop from the
    float weight, as llm-compressor does: round-to-nearest's (the spec's), or with
    ``search_scales`` the per-block MSE search's; the loop then rounds each column to the
    nearest E2M1 value on its blocks' multipliers and spreads the error.  Fixed scales need
    no group index, so ``act_order`` only changes the visiting order.  ``factor`` as for
    :func:`gptq_quantize`; ``scale_rounding`` how MXFP4's exponents round the block maxima
    (the search's candidates centred on them).
    """
    w, factor = _prepare(weight, hessian, act_order, dampening, name, factor)
    fixed = fp4_rounding(weight_type, scale_rounding, search_scales)(weight, what=name)
    k = w.shape[1]
    element = expand_blocks(fp4_block_scales(fixed.scales, fixed.global_scale), fixed.block, k)
    codes = _quantize_on_multipliers(w, factor, element, _fp4_rounding, block_size)
    return Fp4Weight(
        codes.to(torch.uint8).contiguous(), fixed.scales, fixed.global_scale, fixed.block
    )


def _quantize_on_multipliers(
    w: torch.Tensor,
    factor: HessianFactor,
    element: torch.Tensor,
    rounding: Callable[[torch.Tensor], RoundColumn],
    block_size: int,
) -> torch.Tensor:
    """The column loop of ``w: (N, K)`` on fixed per-element multipliers ``element (N, K)``:
    ``rounding(multipliers1)`` rounds a block's columns; the codes ``(N, K)`` float32 come
    back in column order (a transposed view)."""
    perm, hinv = factor.perm, factor.hinv
    k = w.shape[1]
    wt = w[:, perm].t().contiguous()  # wt: (K, N), row j is the j-th visited column
    element_t = element[:, perm].t().contiguous()
    codes_t = torch.empty_like(wt)  # visited order
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = wt[i1:i2].clone()  # w1: (B, N)
        err1 = torch.empty_like(w1)
        round_column = rounding(element_t[i1:i2])
        _quantize_columns(w1, hinv[i1:i2, i1:i2], i2 - i1, round_column, codes_t[i1:i2], err1)
        wt[i2:].sub_(hinv[i1:i2, i2:].t() @ err1)
    return codes_t[torch.argsort(perm)].t()


# -- FP8 block-wise (128x128 weight blocks): the column loop on the E4M3 grid


def _fp8_rounding(multipliers1: torch.Tensor) -> RoundColumn:
    """Round column ``i`` to E4M3 values (held in float32, exactly) on ``multipliers1[i]``."""

    def round_column(i: int, row: torch.Tensor, code: torch.Tensor, deq: torch.Tensor) -> None:
        multiplier = multipliers1[i]
        code.copy_(to_fp8_e4m3(row / multiplier))
        torch.mul(code, multiplier, out=deq)

    return round_column


@torch.no_grad()
def gptq_quantize_fp8_block(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    block: tuple[int, int],
    block_size: int = 128,
    dampening: float = 0.01,
    act_order: bool = False,
    search_scales: bool = False,
    name: str = "weight",
    factor: HessianFactor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ of ``weight: (N, K)`` onto FP8 E4M3 with one scale per ``block``:
    ``(qweight (N, K) float8_e4m3fn, scales (ceil(N/bn), ceil(K/bk)) float32)``.

    The block scales are fixed from the float weight first (round-to-nearest's, or the
    per-block scale search's with ``search_scales``), then the loop rounds each column to
    E4M3 on them and spreads the error, as :func:`gptq_quantize_fp4` does.  ``factor`` as
    for :func:`gptq_quantize`.
    """
    w, factor = _prepare(weight, hessian, act_order, dampening, name, factor)
    choose = search_fp8_block_weight if search_scales else quantize_fp8_block_weight
    _, scales = choose(weight, block, what=name)
    n, k = w.shape
    element = expand_weight_blocks(scales, block, n, k)
    values = _quantize_on_multipliers(w, factor, element, _fp8_rounding, block_size)
    return values.to(torch.float8_e4m3fn).contiguous(), scales
