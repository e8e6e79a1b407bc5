"""Reference op for INTn weights whose groups are given per input column by ``g_idx``.

GPTQ with act-order (and no static groups) forms groups in its visiting order, so
column ``k`` belongs to group ``g_idx[k]`` rather than ``k // group_size``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from torchquant.numerics import unpack_codes


@torch.library.custom_op("torchquant::linear_intn_gidx", mutates_args=())
def linear_intn_gidx(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    g_idx: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
) -> torch.Tensor:
    """``qweight (N, ceil(K/32)*bits)`` int32, ``scales``/``zeros (N, G)``, ``g_idx (K,)`` int32."""
    k = x.shape[-1]
    codes = unpack_codes(qweight, bits, k).float()
    idx = g_idx.long()
    zero = zeros[:, idx].float() if zeros is not None else float(1 << (bits - 1))
    w = ((codes - zero) * scales[:, idx].float()).to(x.dtype)
    return F.linear(x, w, bias)


@linear_intn_gidx.register_fake
def _(x, qweight, scales, zeros, g_idx, bias, bits):
    return x.new_empty([*x.shape[:-1], qweight.shape[0]])
