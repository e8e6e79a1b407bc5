"""Perplexity of a causal language model on a text, over non-overlapping windows."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from torchquant.errors import TorchquantError


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    tokens: int
    windows: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def tokenize_text(tokenizer: Any, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """1-D token ids of ``text`` without special tokens (no BOS), truncated to ``max_tokens``."""
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise TorchquantError(f"max_tokens={max_tokens!r}: expected a positive int or None")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    return ids if max_tokens is None else ids[:max_tokens]


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    ids: torch.Tensor,
    seq_len: int = 1024,
    progress: bool = True,
) -> PerplexityResult:
    """exp(mean next-token NLL) over consecutive ``seq_len`` windows of ``ids``.

    Each window is scored independently (no overlap, no BOS); a last window shorter
    than ``seq_len`` is scored too if it has at least two tokens.
    """
    if seq_len < 2:
        raise TorchquantError(f"seq_len must be at least 2, got {seq_len}")
    if ids.numel() < 2:
        raise TorchquantError(f"need at least 2 tokens to measure perplexity, got {ids.numel()}")
    device = next(model.parameters()).device
    windows = [ids[i : i + seq_len] for i in range(0, ids.numel(), seq_len)]
    windows = [w for w in windows if w.numel() >= 2]
    nll, count = 0.0, 0
    start = time.perf_counter()
    for window in tqdm(windows, desc="perplexity", unit="window", disable=not progress):
        x = window.unsqueeze(0).to(device)
        logits = model(x).logits[0, :-1].float()
        loss = F.cross_entropy(logits, x[0, 1:], reduction="sum")
        if not torch.isfinite(loss):
            raise TorchquantError("the model produced NaN/Inf logits; perplexity is undefined")
        nll += loss.item()
        count += x.shape[1] - 1
    seconds = time.perf_counter() - start
    return PerplexityResult(math.exp(nll / count), int(ids.numel()), len(windows), seconds)
