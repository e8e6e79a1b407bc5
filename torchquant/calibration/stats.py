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
    hessian_source: LayerStats | None = field(default=None, repr=False)  # -- shared from it
    hessian_shared: bool = field(default=False, repr=False)  # -- another stats holds it too

    def update(self, x: torch.Tensor, same_input: LayerStats | None = None) -> None:
        """Fold one batch of inputs ``x: (..., K)`` into what is kept.

        ``same_input`` is the stats of a linear that took this very tensor just before
        (q/k/v, gate/up): where it keeps a Hessian of the same inputs so far, this one
        shares that Hessian instead of computing it again.
        """
        x = x.detach().reshape(-1, x.shape[-1])
        if x.shape[0] == 0:
            return
        a = x.abs().float()
        amax = a.amax(dim=0)  # -- NaN propagates, so this also checks every value
        if not bool(torch.isfinite(amax).all()):
            raise CalibrationError(
                f"{self.name}: calibration input holds NaN/Inf values; check the data and the "
                "layers before this one"
            )
        if self.divisor is not None:
            x = x / self.divisor.to(x.device, x.dtype)
            a = x.abs().float()
            amax = a.amax(dim=0)
        if self.want_hessian:
            self._fold_hessian(x, same_input)
        if self.want_absmax:
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

    def _fold_hessian(self, x: torch.Tensor, same_input: LayerStats | None) -> None:
        """Share ``same_input``'s Hessian when it holds exactly this layer's inputs so far
        (every earlier batch shared with it too), else accumulate this layer's own."""
        shares = (
            same_input is not None
            and same_input.want_hessian
            and same_input.divisor is None
            and self.divisor is None
            and same_input.tokens == self.tokens + x.shape[0]
            and (self.tokens == 0 or self.hessian_source is same_input)
        )
        if shares:
            self.hessian, self.hessian_source = same_input.hessian, same_input
            self.hessian_shared = same_input.hessian_shared = True
            return
        self.hessian_source = None
        if self.hessian_shared:  # -- others hold this tensor: accumulate into a copy
            self.hessian, self.hessian_shared = self.hessian.clone(), False
        self.hessian, _ = accumulate_hessian(self.hessian, self.tokens, x)

    @classmethod
    def requested(cls, name: str, request: StatsRequest) -> LayerStats:
        return cls(name, request.hessian, request.absmax, request.samples)

    @property
    def act_mean(self) -> torch.Tensor:
        return self.abssum / max(self.tokens, 1)

    def sample_matrix(self) -> torch.Tensor:
        return torch.cat(self.samples) if self.samples else torch.empty(0)


def attach(modules: dict[str, nn.Module], stats: dict[str, LayerStats]) -> list:
    """Forward hooks feeding each module's input to its stats; returns the handles.

    Linears fed the same tensor one after another (q/k/v, gate/up) share one Hessian:
    each hook hands its stats the stats of the module that last took that tensor.
    """
    handles = []
    last: list = [None, None]  # -- (input tensor, stats that took it)

    for rel, st in stats.items():

        def hook(module, args, output, st=st):
            x = args[0]
            st.update(x, last[1] if x is last[0] else None)
            last[0], last[1] = x, st

        handles.append(modules[rel].register_forward_hook(hook))
    return handles
