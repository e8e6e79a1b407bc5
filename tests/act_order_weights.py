"""Act-order INTn weights for the tests: random codes and qparams with the grouping GPTQ's
act-order writes, a random permutation of ``k // group_size``."""

from __future__ import annotations

import torch

from torchquant.numerics import pack_codes


def act_order_weight(n: int, k: int, bits: int, group_size: int, symmetric: bool, seed: int):
    """``(qweight, scales, zeros, g_idx)``: column ``perm[j]`` is in group ``j // group_size``
    for a random ``perm``; the last group is partial when ``group_size`` does not divide ``k``."""
    gen = torch.Generator().manual_seed(seed)
    groups = -(-k // group_size)
    codes = torch.randint(0, 1 << bits, (n, k), generator=gen)
    scales = (torch.rand(n, groups, generator=gen) + 0.1).to(torch.bfloat16)
    zeros = None
    if not symmetric:
        zeros = torch.randint(0, 1 << bits, (n, groups), generator=gen).to(torch.uint8)
    perm = torch.randperm(k, generator=gen)
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[perm] = (torch.arange(k) // group_size).to(torch.int32)
    return pack_codes(codes, bits), scales, zeros, g_idx
