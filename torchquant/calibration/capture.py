"""Capturing the inputs of the first block and running one block over stored inputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from torchquant.errors import CalibrationError


class _StopForward(Exception):
    """Raised by the capture hook once the first block's inputs are recorded."""


@dataclass
class BlockInput:
    """One calibration sample as the block sees it: hidden states plus keyword arguments."""

    hidden: torch.Tensor
    kwargs: dict[str, Any]


def _to(value: Any, device: torch.device | str) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module,
    first_block: nn.Module,
    tokens: torch.Tensor,
    device: torch.device | str,
    store: torch.device | str,
) -> list[BlockInput]:
    """Run each sample ``tokens[i]`` until ``first_block`` and record what it receives.

    Only the modules before the first block execute; the rest of the model is never
    run.  Inputs are kept on ``store`` (the CPU to offload, else the compute device).
    """
    captured: list[BlockInput] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        rest = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value")}
        extra = {f"__arg{i}": a for i, a in enumerate(args[1:])}
        captured.append(BlockInput(_to(hidden, store), _to({**rest, **extra}, store)))
        raise _StopForward

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for row in tokens:
            try:
                model(row.unsqueeze(0).to(device), use_cache=False)
            except _StopForward:
                pass
            except TypeError:
                try:
                    model(row.unsqueeze(0).to(device))
                except _StopForward:
                    pass
    finally:
        handle.remove()
    if len(captured) != len(tokens):
        raise CalibrationError(
            f"captured {len(captured)} inputs of the first block for {len(tokens)} samples"
        )
    return captured


def run_block(
    block: nn.Module, sample: BlockInput, device: torch.device | str
) -> torch.Tensor | Any:
    """``block(hidden, **kwargs)`` on ``device``; returns the new hidden states."""
    kwargs = _to(sample.kwargs, device)
    extra = [kwargs.pop(k) for k in sorted(k for k in list(kwargs) if k.startswith("__arg"))]
    out = block(sample.hidden.to(device), *extra, **kwargs)
    if isinstance(out, tuple):
        out = out[0]
    elif not isinstance(out, torch.Tensor) and hasattr(out, "last_hidden_state"):
        out = out.last_hidden_state
    return out
