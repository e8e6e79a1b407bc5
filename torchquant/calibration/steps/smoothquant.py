"""SmoothQuant step: per-channel factors from the inputs' max ``|x|``, folded into the source.

Each balance mapping whose linears all use SmoothQuant gets one factor ``s`` over their
shared input: the linears' input columns are multiplied by it and the source (a norm, or
a linear when ``smooth_linear_inputs``) divided by it.  Linears no mapping covers, or
whose source cannot take it, divide their input by ``s`` at run time instead.
``SmoothQuantConfig(rounding="gptq")`` leaves the rounding to the GPTQ step, which reads
the factors as the inputs' divisors (as AWQ's).
"""

from __future__ import annotations

import torch

from torchquant.algorithms import smoothquant
from torchquant.calibration.block import CalibrationStep
from torchquant.calibration.layers import fold_into_source, scale_inputs
from torchquant.calibration.stats import StatsRequest
from torchquant.config import QuantScheme
from torchquant.plan import get_weight

ALGORITHM = "smoothquant"


class SmoothQuantStep(CalibrationStep):
    def request(self, scheme: QuantScheme) -> StatsRequest | None:
        return StatsRequest(absmax=True) if scheme.algorithm == ALGORITHM else None

    @torch.no_grad()
    def apply(self) -> None:
        block = self.block
        done: set[str] = set()
        for m in block.mappings_for(ALGORITHM):
            if not block.reached(m.linears):
                continue
            config = block.schemes[m.linears[0]].smoothquant
            if m.source_is_linear and not config.smooth_linear_inputs:
                done.update(m.linears)
                continue
            absmax = torch.stack([block.stats[x].absmax for x in m.linears]).amax(dim=0)
            ws = [get_weight(block.linears[x]) for x in m.linears]
            s = smoothquant.smoothing_factors(absmax, ws, config.alpha).to(ws[0].device)
            source = block.foldable_source(m)
            for x in m.linears:
                self.smooth(x, s, runtime=source is None)
                done.add(x)
            if source is not None:
                fold_into_source(source, s)
                block.rescaled.add(m.source)
        for rel, st in block.stats.items():
            if block.schemes[rel].algorithm == ALGORITHM and rel not in done and st.tokens > 0:
                alpha = block.schemes[rel].smoothquant.alpha
                w = get_weight(block.linears[rel])
                s = smoothquant.smoothing_factors(st.absmax, [w], alpha).to(w.device)
                self.smooth(rel, s, runtime=True)

    def smooth(self, rel: str, s: torch.Tensor, runtime: bool) -> None:
        """Scale linear ``rel``'s input columns by ``s``; its input is divided by ``s`` at run
        time, or by the source it was folded into.  GPTQ rounding (``rounding="gptq"``) then
        takes the Hessian of that divided input (see the GPTQ step)."""
        block = self.block
        scale_inputs(block.linears[rel], s)
        block.rescaled.add(rel)
        if runtime:
            block.smooth[rel] = s
        if block.schemes[rel].rounds_with_gptq:
            block.divisor[rel] = s
