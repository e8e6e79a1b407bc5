"""FP8 E4M3 with block scales: weights per (rows x columns) block, activations per token group.

DeepSeek-V3's recipe: a weight ``(N, K)`` has one float32 scale per ``block = (bn, bk)``
tile, ``scales (ceil(N / bn), ceil(K / bk))``; an activation row has one scale per
``group_size`` columns, ``scales (M, ceil(K / group_size))``.  Shapes that the block
does not divide leave partial blocks at the end (as INT groups do).  Each scale maps
its block's max ``|x|`` onto 448 (all-zero blocks get scale 1), values saturate at
+-448 and round to nearest.

The weight scale search (``observer="mse"``) keeps, per block, the scale with the least
squared error among the block max's scale widened by ``1 + i / 32`` (i = 0..31): E4M3's
relative step is the same in every octave, so what a scale decides is where the grid
falls between the block's values, and widening it by less than 2x tries every such
alignment without clipping any value.  The plain scale is the first candidate and ties
keep it, so no block gets worse than round-to-nearest.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from torchquant.errors import QuantizationError
from torchquant.numerics.qparams import FP8_E4M3_MAX, choose_fp8_scale, to_fp8_e4m3
from torchquant.numerics.weight import _check_weight


def block_grid(n: int, k: int, block: tuple[int, int]) -> tuple[int, int]:
    """Blocks along ``(N, K)``: ``(ceil(N / bn), ceil(K / bk))``."""
    return -(-n // block[0]), -(-k // block[1])


def _block_absmax(t: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """max ``|t|`` per block of ``t: (N, K)``, ``(ceil(N / bn), ceil(K / bk))`` float32."""
    (n, k), (bn, bk) = t.shape, block
    gn, gk = block_grid(n, k, block)
    padded = F.pad(t.abs().float(), (0, gk * bk - k, 0, gn * bn - n))
    return padded.view(gn, bn, gk, bk).amax(dim=(1, 3))


def expand_blocks(scales: torch.Tensor, block: tuple[int, int], n: int, k: int) -> torch.Tensor:
    """Per-block values ``(ceil(N / bn), ceil(K / bk))`` broadcast to ``(N, K)``."""
    rows = scales.repeat_interleave(block[0], dim=0)[:n]
    return rows.repeat_interleave(block[1], dim=1)[:, :k]


def quantize_fp8_block_weight(
    w: torch.Tensor, block: tuple[int, int], what: str = "weight"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(qweight (N, K) float8_e4m3fn, scales (ceil(N/bn), ceil(K/bk)) float32)``."""
    _check_weight(w, what)
    scales = choose_fp8_scale(_block_absmax(w, block))
    n, k = w.shape
    return to_fp8_e4m3(w.float() / expand_blocks(scales, block, n, k)), scales


# -- widenings of the block max's scale the search tries: one octave of E4M3's grid
FP8_SCALE_WIDENINGS = tuple(1.0 + i / 32 for i in range(32))


def _block_squared_error(
    w: torch.Tensor, scales: torch.Tensor, block: tuple[int, int]
) -> torch.Tensor:
    """``sum (dequant(quant(w)) - w)^2`` per block ``(ceil(N/bn), ceil(K/bk))`` on ``scales``."""
    (n, k), (bn, bk) = w.shape, block
    gn, gk = block_grid(n, k, block)
    element = expand_blocks(scales, block, n, k)
    error = to_fp8_e4m3(w / element).float() * element - w
    padded = F.pad(error.square(), (0, gk * bk - k, 0, gn * bn - n))
    return padded.view(gn, bn, gk, bk).sum(dim=(1, 3))


def search_fp8_block_scales(w: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Per block of ``w: (N, K)``, the scale of ``FP8_SCALE_WIDENINGS`` with the least squared
    error, float32 ``(ceil(N/bn), ceil(K/bk))``; ties keep the earlier (narrower) one."""
    w = w.float()
    amax = _block_absmax(w, block)
    best, best_error = None, None
    for widening in FP8_SCALE_WIDENINGS:
        scales = choose_fp8_scale(amax * widening)
        error = _block_squared_error(w, scales, block)
        if best is None:
            best, best_error = scales, error
            continue
        better = error < best_error
        best, best_error = torch.where(better, scales, best), torch.where(better, error, best_error)
    return best


def search_fp8_block_weight(
    w: torch.Tensor, block: tuple[int, int], what: str = "weight"
) -> tuple[torch.Tensor, torch.Tensor]:
    """As :func:`quantize_fp8_block_weight`, each block's scale from the search."""
    _check_weight(w, what)
    scales = search_fp8_block_scales(w, block)
    n, k = w.shape
    return to_fp8_e4m3(w.float() / expand_blocks(scales, block, n, k)), scales


def dequantize_fp8_block_weight(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    block: tuple[int, int],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``qweight * scale`` of its block, computed in float32, as ``dtype``."""
    n, k = qweight.shape
    return (qweight.float() * expand_blocks(scales.float(), block, n, k)).to(dtype)


def quantize_activation_groups(
    x: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic FP8 of ``x: (M, K)`` per ``1 x group_size`` group: ``(q (M, K), scales (M, G))``.

    Zero (and NaN) groups get scale 1; a linear makes the output row of an input row
    holding NaN/Inf NaN (``poison_nonfinite_rows``), as with per-token scales.
    """
    if x.dim() != 2:
        raise QuantizationError(f"activation must be 2-D (rows, K), got {tuple(x.shape)}")
    m, k = x.shape
    scales = _block_absmax(x, (1, group_size)) / FP8_E4M3_MAX
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    return to_fp8_e4m3(x.float() / expand_blocks(scales, (1, group_size), m, k)), scales


def dequantize_activation_groups(
    q: torch.Tensor, scales: torch.Tensor, group_size: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    m, k = q.shape
    return (q.float() * expand_blocks(scales.float(), (1, group_size), m, k)).to(dtype)
