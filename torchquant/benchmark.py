"""Prefill and decode throughput of a causal LM, quantized vs float copies of it.

Prefill throughput is prompt tokens per second of one forward pass over the
prompt; decode throughput is tokens per second of ``new_tokens`` greedy steps
that each feed one token with the key/value cache (the prefill that fills the
cache is not timed).  Each figure is the median of ``repeats`` runs after one
warm-up run.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from torchquant.errors import TorchquantError
from torchquant.modules import QuantLinear


@dataclass(frozen=True)
class Throughput:
    label: str
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    weight_bytes: int


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median(measure: Callable[[], float], repeats: int) -> float:
    measure()  # warm-up: kernel selection, caches
    return statistics.median(measure() for _ in range(repeats))


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _decode_seconds(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> float:
    out = model(ids, use_cache=True)
    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)

    def steps() -> None:
        nonlocal cache, token
        for _ in range(new_tokens):
            out = model(token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)

    return _timed(steps, ids.device)


@torch.no_grad()
def measure_throughput(
    model: nn.Module,
    label: str,
    *,
    batch: int = 1,
    prompt_len: int = 64,
    new_tokens: int = 16,
    repeats: int = 3,
    vocab: int | None = None,
) -> Throughput:
    """Prefill and decode tokens per second of ``model`` on the device its weights are on."""
    counts = {"batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens}
    for name, value in {**counts, "repeats": repeats}.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise TorchquantError(f"{name}={value!r}: expected a positive int")
    device = next(model.parameters()).device
    vocab = vocab or model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, prompt_len), generator=gen).to(device)
    prefill = _median(lambda: _timed(lambda: model(ids, use_cache=False), device), repeats)
    decode = _median(lambda: _decode_seconds(model, ids, new_tokens), repeats)
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    tokens = batch * prompt_len, batch * new_tokens
    return Throughput(label, tokens[0] / prefill, tokens[1] / decode, weight_bytes)


def dequantized_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A float copy of a quantized model (every ``QuantLinear`` back to ``nn.Linear``)."""
    import copy

    baseline = copy.deepcopy(model)
    for name, module in list(baseline.named_modules()):
        if isinstance(module, QuantLinear):
            linear = nn.Linear(module.in_features, module.out_features, module.bias is not None)
            linear.weight.data = module.dequantized_weight(dtype)
            if module.bias is not None:
                linear.bias.data = module.bias.to(dtype)
            parent, _, child = name.rpartition(".")
            setattr(baseline.get_submodule(parent) if parent else baseline, child, linear)
    return baseline.to(dtype)


def throughput_table(rows: list[Throughput]) -> str:
    """One line per row, then each later row's speed against the first (the baseline)."""
    base = rows[0]
    lines = [f"{'model':<22}{'prefill tok/s':>15}{'decode tok/s':>14}{'weights MiB':>13}"]
    for r in rows:
        lines.append(
            f"{r.label:<22}{r.prefill_tokens_per_s:>15.1f}{r.decode_tokens_per_s:>14.2f}"
            f"{r.weight_bytes / 2**20:>13.1f}"
        )
    for r in rows[1:]:
        prefill = r.prefill_tokens_per_s / base.prefill_tokens_per_s
        decode = r.decode_tokens_per_s / base.decode_tokens_per_s
        lines.append(f"{r.label} vs {base.label}: prefill {prefill:.2f}x, decode {decode:.2f}x")
    return "\n".join(lines)
