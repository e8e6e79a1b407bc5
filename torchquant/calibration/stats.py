"""Per-layer statistics gathered by forward hooks while calibration batches run."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from torchquant.algorithms.gptq import accumulate_hessian
from torchquant.errors import CalibrationError
from torchquant.numerics.observers import Observer


@dataclass(frozen=True)
class StatsRequest:
    """What a calibration step needs kept of a linear's inputs in the statistics pass."""

    hessian: bool = False
    absmax: bool = False
    samples: int = 0  # input rows to keep (AWQ searches)

    def __or__(self, other: StatsRequest) -> StatsRequest:
        return StatsRequest(
            self.hessian or other.hessian,
            self.absmax or other.absmax,
            max(self.samples, other.samples),
        )


@dataclass
class LayerStats:
    """What one linear's inputs looked like.  ``want_*`` say what to keep (memory matters)."""

    name: str
    want_hessian: bool = False
    want_absmax: bool = False
    want_samples: int = 0  # keep up to this many input rows (AWQ searches)
    observer: Observer | None = None
    divisor: torch.Tensor | None = None  # observe x / divisor (a run-time smoothing scale)
    hessian: torch.Tensor | None = None
    tokens: int = 0
    absmax: torch.Tensor | None = None
    abssum: torch.Tensor | None = None
    samples: list[torch.Tensor] = field(default_factory=list)

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        if x.shape[0] == 0:
            return
        if not bool(torch.isfinite(x).all()):
            raise CalibrationError(
                f"{self.name}: calibration input holds NaN/Inf values; check the data and the "
                "layers before this one"
            )
        if self.divisor is not None:
            x = x / self.divisor.to(x.device, x.dtype)
        if self.want_hessian:
            self.hessian, _ = accumulate_hessian(self.hessian, self.tokens, x)
        a = x.abs().float()
        if self.want_absmax:
            amax = a.amax(dim=0)
            self.absmax = amax if self.absmax is None else torch.maximum(self.absmax, amax)
        if self.want_samples:
            asum = a.sum(dim=0)
            self.abssum = asum if self.abssum is None else self.abssum + asum
            kept = sum(s.shape[0] for s in self.samples)
            if kept < self.want_samples:
                self.samples.append(x[: self.want_samples - kept].float().cpu())
        if self.observer is not None:
            self.observer.update(x)
        self.tokens += x.shape[0]

    @classmethod
    def requested(cls, name: str, request: StatsRequest) -> LayerStats:
        return cls(name, request.hessian, request.absmax, request.samples)

    @property
    def act_mean(self) -> torch.Tensor:
        return self.abssum / max(self.tokens, 1)

    def sample_matrix(self) -> torch.Tensor:
        return torch.cat(self.samples) if self.samples else torch.empty(0)


def attach(modules: dict[str, nn.Module], stats: dict[str, LayerStats]) -> list:
    """Forward hooks feeding each module's input to its stats; returns the handles."""
    handles = []
    for rel, st in stats.items():

        def hook(module, args, output, st=st):
            st.update(args[0])

        handles.append(modules[rel].register_forward_hook(hook))
    return handles
