"""GPTQ: quantize a weight column by column, spreading each column's rounding error
over the columns not yet quantized, weighted by the inverse Hessian of the layer input.

Two pure functions: :func:`accumulate_hessian` (``H = 2/n * sum x x^T`` over calibration
tokens) and :func:`gptq_quantize`.  Columns are processed in blocks of ``block_size``:
inside a block the standard per-column loop updates only the block, and the block's
accumulated error updates the rest of the matrix in one matmul (lazy batch updates).
The result is plain codes/scales/zeros, the same format round-to-nearest produces.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from torchquant.errors import CalibrationError, QuantizationError
from torchquant.numerics import choose_int_qparams, group_min_max, num_groups
from torchquant.numerics.observers import mse_range


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


def _round(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and dequantized values of ``w`` (any shape broadcasting with scale/zero)."""
    z = (1 << (bits - 1)) if zero is None else zero.float()
    s = scale.float()
    code = torch.clamp(torch.round(w / s) + z, 0, (1 << bits) - 1)
    return code, (code - z) * s


def _inverse_hessian_factor(h: torch.Tensor, dampening: float, name: str) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp I)^-1``, raising more damping when needed."""
    damp = dampening * float(torch.diag(h).mean())
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for attempt in range(4):
        factor, info = torch.linalg.cholesky_ex(h + damp * (10**attempt) * eye)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                return upper
    raise QuantizationError(f"{name}: Hessian is not positive definite even after dampening")


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
) -> GPTQResult:
    """GPTQ-quantize ``weight: (N, K)`` given the input Hessian ``(K, K)``.

    ``group_size`` -1 is per output channel, else groups of that many input columns
    (a shorter last group when it does not divide ``K``).  ``act_order`` visits columns
    by decreasing Hessian diagonal; its groups then follow the visiting order and
    ``g_idx`` records them, unless ``static_groups`` fixes the groups' qparams on the
    original contiguous groups before the search (no ``g_idx`` needed).
    """
    if weight.dim() != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise QuantizationError(
            f"{name}: weight {tuple(weight.shape)} and Hessian {tuple(hessian.shape)} disagree"
        )
    if not bool(torch.isfinite(hessian).all()):
        raise CalibrationError(f"{name}: the input Hessian holds NaN/Inf values")
    if not 2 <= bits <= 8:
        raise QuantizationError(f"{name}: bits must be in 2..8, got {bits}")
    n, k = weight.shape
    sdt = scale_dtype or (weight.dtype if group_size != -1 else torch.float32)
    w = weight.detach().float().clone()  # w: (N, K)
    h = hessian.detach().float().clone()  # h: (K, K)
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    gs = k if group_size == -1 else group_size
    g_count = num_groups(k, group_size)

    perm = torch.arange(k, device=w.device)
    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True)
    hinv = _inverse_hessian_factor(h[perm][:, perm], dampening, name)
    importance = torch.diag(h)  # how much each column's error costs, for hessian_mse

    static = None
    if group_size != -1 and static_groups:
        static = _qparams(w, bits, group_size, symmetric, observer, sdt, importance)
    elif group_size == -1:
        static = _qparams(w, bits, -1, symmetric, observer, sdt, importance)
    if act_order:
        w, importance = w[:, perm], importance[perm]

    codes = torch.zeros(n, k, dtype=torch.float32, device=w.device)
    scales = torch.zeros(n, g_count, dtype=sdt, device=w.device)
    zeros = None if symmetric else torch.zeros(n, g_count, dtype=torch.uint8, device=w.device)
    if static is not None:
        scales.copy_(static[0])
        if zeros is not None:
            zeros.copy_(static[1])
    col_group = perm // gs  # group of each visited column when groups are static
    scale = zero = None
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[:, i1:i2].clone()  # w1: (N, B)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if static is not None:
                g = int(col_group[col])
                scale = scales[:, g : g + 1]
                zero = None if zeros is None else zeros[:, g : g + 1]
            elif col % gs == 0:
                # -- a new group starts: qparams from its columns with every update so far,
                # including the pending (lazy) updates of this block to later columns
                rest = max(0, col + gs - i2)
                later = w[:, i2 : i2 + rest] - err1[:, :i] @ hinv[i1 : i1 + i, i2 : i2 + rest]
                upcoming = torch.cat([w1[:, i:], later], dim=1)[:, :gs]
                cols = importance[col : col + upcoming.shape[1]]
                scale, zero = _qparams(upcoming, bits, -1, symmetric, observer, sdt, cols)
                g = col // gs
                scales[:, g : g + 1] = scale
                if zeros is not None:
                    zeros[:, g : g + 1] = zero
            code, deq = _round(w1[:, i : i + 1], scale, zero, bits)
            codes[:, col : col + 1] = code
            err = (w1[:, i : i + 1] - deq) / hinv1[i, i]
            w1[:, i:] -= err @ hinv1[i : i + 1, i:]
            err1[:, i : i + 1] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    g_idx = None
    if act_order:
        inv = torch.argsort(perm)
        codes = codes[:, inv]
        if static is None and group_size != -1:
            g_idx = (inv // gs).to(torch.int32)
    return GPTQResult(codes.to(torch.uint8), scales, zeros, g_idx)
