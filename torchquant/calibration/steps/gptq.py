"""GPTQ step: the linears GPTQ rounds are quantized stage by stage, in execution order.

Quantizing stage by stage (q/k/v, then o, then gate/up, then down on a Llama block)
lets each stage's Hessian come from the already-quantized stages before it, so GPTQ
compensates their error too instead of fitting a float input it never sees.  The first
stage keeps the statistics pass's Hessians unless AWQ scaling changed its inputs.
"""

from __future__ import annotations

import torch

from torchquant.calibration.block import CalibrationStep
from torchquant.calibration.capture import BlockInput, run_block
from torchquant.calibration.stats import LayerStats, StatsRequest
from torchquant.config import QuantScheme


class GptqStep(CalibrationStep):
    def request(self, scheme: QuantScheme) -> StatsRequest | None:
        return StatsRequest(hessian=True) if scheme.rounds_with_gptq else None

    def apply(self) -> None:
        block = self.block
        if not block.samples or not any(s.rounds_with_gptq for s in block.schemes.values()):
            return
        for k, stage in enumerate(self.stages(block.samples[0])):
            if k or any(rel in block.divisor for rel in stage):  # after stages or AWQ scaling
                self.regather(stage)
            block.quantize(set(stage))

    def stages(self, sample: BlockInput) -> list[list[str]]:
        """GPTQ linears in the order the block runs them, grouped by shared input."""
        block = self.block
        order: list[tuple[str, torch.Tensor]] = []  # holding the inputs keeps them distinct
        gptq_rels = [r for r, scheme in block.schemes.items() if scheme.rounds_with_gptq]

        def hook(module, args, rel):
            if all(r != rel for r, _ in order):
                order.append((rel, args[0]))

        handles = [
            block.linears[r].register_forward_pre_hook(lambda m, a, r=r: hook(m, a, r))
            for r in gptq_rels
        ]
        try:
            with torch.no_grad():
                run_block(block.module, sample, block.device)
        finally:
            for h in handles:
                h.remove()
        stages: list[list[str]] = []
        last_input = None
        for rel, x in order:
            if stages and x is last_input:
                stages[-1].append(rel)
            else:
                stages.append([rel])
            last_input = x
        return stages

    def regather(self, stage: list[str]) -> None:
        """Fresh Hessians for ``stage`` from the block as it is now (earlier stages quantized)."""
        block = self.block
        fresh = {rel: LayerStats(block.full(rel), want_hessian=True) for rel in stage}
        block.run(fresh)
        for rel in stage:
            block.stats[rel].hessian, block.stats[rel].tokens = (
                fresh[rel].hessian,
                fresh[rel].tokens,
            )
