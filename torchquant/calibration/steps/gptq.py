"""GPTQ step: round the block's GPTQ linears with the Hessians of their inputs.

By default every Hessian comes from the one statistics pass over the float block
(linears fed the same tensor, q/k/v or gate/up, share one), so a block costs a single
forward of the calibration samples besides the one producing the next block's inputs.
Where AWQ (or SmoothQuant with ``rounding="gptq"``) scaling folded a divisor ``s`` into a
linear's input, its Hessian is that of ``x / s``: ``H / (s s^T)``, exact without another
pass.

With ``GPTQConfig(sequential=True)`` the linears are quantized stage by stage in
execution order (q/k/v, then o, then gate/up, then down on a Llama block), each stage's
Hessians regathered from the block with the stages before it already quantized, so GPTQ
compensates their error too; it costs one more forward per stage.  The first stage
keeps the statistics pass's Hessians unless AWQ scaling changed its inputs.
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
        rels = [r for r, s in block.schemes.items() if s.rounds_with_gptq]
        if not block.samples or not rels:
            return
        one_pass = [r for r in rels if not block.schemes[r].gptq.sequential]
        self.rescale_hessians(one_pass)
        block.quantize(set(one_pass))
        if len(one_pass) == len(rels):
            return
        for k, stage in enumerate(self.stages(block.samples[0])):
            if k or any(rel in block.divisor for rel in stage):  # after stages or AWQ scaling
                self.regather(stage)
            block.quantize(set(stage))

    def rescale_hessians(self, rels: list[str]) -> None:
        """Hessians of the inputs AWQ divided by ``s``: ``H_ij / (s_i s_j)``, computed once
        for linears sharing both the Hessian and the divisor."""
        block = self.block
        done: dict[tuple[int, int], torch.Tensor] = {}
        for rel in rels:
            st, s = block.stats.get(rel), block.divisor.get(rel)
            if st is None or st.hessian is None or s is None:
                continue
            key = (id(st.hessian), id(s))
            if key not in done:
                inv = 1.0 / s.to(st.hessian.device, torch.float32)
                done[key] = st.hessian * inv.unsqueeze(1) * inv.unsqueeze(0)
            st.hessian = done[key]

    def stages(self, sample: BlockInput) -> list[list[str]]:
        """GPTQ linears not yet quantized, in the order the block runs them, grouped by
        shared input."""
        block = self.block
        order: list[tuple[str, torch.Tensor]] = []  # holding the inputs keeps them distinct
        rels = [
            r
            for r, scheme in block.schemes.items()
            if scheme.rounds_with_gptq and r not in block.quantized
        ]

        def hook(module, args, rel):
            if all(r != rel for r, _ in order):
                order.append((rel, args[0]))

        handles = [
            block.linears[r].register_forward_pre_hook(lambda m, a, r=r: hook(m, a, r))
            for r in rels
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
