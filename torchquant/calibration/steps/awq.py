"""AWQ step: per-channel scales searched on an inspected module's output, then clip ranges.

For each balance mapping whose linears all use AWQ and whose source can take the
inverse, the scale search (:func:`~torchquant.algorithms.awq.search_scales`) scores
candidates by the output error of the mapping's ``inspect`` module, run on inputs
captured in the statistics pass (or, without one, by the linears' own outputs on
sampled inputs); a token-wise ``inspect`` (an MLP, a linear) on at most
``awq.search_rows`` of those rows, evenly spaced.  The float outputs candidates are
scored against are the ones ``inspect`` gave in the statistics pass, while no step
has rescaled it since (the same tensors a fresh forward gives, one forward fewer per
sample).  Then, for linears AWQ also rounds,
each group's range is shrunk to the factor minimising its partial products' error;
rounding reads the ranges.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from torchquant.algorithms import awq
from torchquant.calibration.block import CalibrationBlock, CalibrationStep
from torchquant.calibration.layers import fold_into_source, scale_inputs, set_weight
from torchquant.calibration.mappings import BalanceMapping
from torchquant.calibration.stats import StatsRequest
from torchquant.config import QuantScheme
from torchquant.plan import get_weight

ALGORITHM = "awq"
CLIP_TOKENS = 512  # input rows the clipping search scores on


def _call(module: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    out = module(*args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


class AwqStep(CalibrationStep):
    def __init__(self, block: CalibrationBlock) -> None:
        super().__init__(block)
        self.inspect_inputs: dict[str, list] = {}  # inspect module -> (rows, args, kwargs)
        self.inspect_outputs: dict[str, list] = {}  # inspect module -> its float outputs

    def request(self, scheme: QuantScheme) -> StatsRequest | None:
        if scheme.algorithm != ALGORITHM:
            return None
        return StatsRequest(samples=max(scheme.awq.max_tokens, CLIP_TOKENS))

    def observe(self) -> list[RemovableHandle]:
        """Record what each inspected module receives (up to ``awq.max_tokens`` rows) and
        what it returns for those inputs."""
        hooks = []
        for m in self.block.mappings_for(ALGORITHM):
            if m.inspect is None or m.inspect in self.inspect_inputs:
                continue
            store: list = []
            outputs: list = []
            self.inspect_inputs[m.inspect] = store
            self.inspect_outputs[m.inspect] = outputs
            limit = self.block.schemes[m.linears[0]].awq.max_tokens
            kept: list[bool] = []  # -- whether the call under way had its input recorded

            def pre(module, args, kwargs, store=store, limit=limit, kept=kept):
                x = args[0] if args else next(iter(kwargs.values()))
                kept.append(sum(n for n, _, _ in store) < limit)
                if kept[-1]:
                    store.append((x.reshape(-1, x.shape[-1]).shape[0], args, dict(kwargs)))

            def post(module, args, kwargs, out, outputs=outputs, kept=kept):
                if kept.pop():
                    outputs.append((out[0] if isinstance(out, tuple) else out).clone())

            inspect = self.block.module.get_submodule(m.inspect)
            hooks.append(inspect.register_forward_pre_hook(pre, with_kwargs=True))
            hooks.append(inspect.register_forward_hook(post, with_kwargs=True))
        return hooks

    @torch.no_grad()
    def apply(self) -> None:
        block = self.block
        self._gather_inspect_inputs()
        scaled = [
            m
            for m in block.mappings_for(ALGORITHM)
            if block.foldable_source(m) is not None and block.reached(m.linears)
        ]
        for wave in independent_waves(scaled):
            costs = [sum(get_weight(block.linears[x]).numel() for x in m.linears) for m in wave]
            what = f"the AWQ scales of {block.prefix}"
            scales = block.ranks.solve_spread(wave, costs, self._search, what, block.device)
            for m, s in zip(wave, scales, strict=True):
                self._apply_scale(m, s)
        self._clip()

    def _gather_inspect_inputs(self) -> None:
        """Every rank's inspected inputs in rank (sample) order, cut as one pass cuts them."""
        block = self.block
        if not block.ranks.parallel:
            return
        what = f"the AWQ inputs of {block.prefix}"
        mine = (self.inspect_inputs, self.inspect_outputs)
        every = block.ranks.exchange(mine, what, block.device)
        for name, store in self.inspect_inputs.items():
            mapping = next(m for m in block.mappings_for(ALGORITHM) if m.inspect == name)
            limit = block.schemes[mapping.linears[0]].awq.max_tokens
            outputs = self.inspect_outputs[name]
            store.clear()
            outputs.clear()
            for inputs, outs in every:
                for entry, out in zip(inputs[name], outs[name], strict=True):
                    if sum(n for n, _, _ in store) < limit:
                        store.append(entry)
                        outputs.append(out)

    def _loss(self, m: BalanceMapping, linears: list[nn.Module], originals: list[torch.Tensor]):
        """The output error of weights ``ws`` (the objective the scale search minimises)."""
        block = self.block
        inspect = block.module.get_submodule(m.inspect) if m.inspect else None
        captured = self.inspect_inputs.get(m.inspect, []) if inspect else []
        if inspect is None or not captured:
            x = block.stats[m.linears[0]].sample_matrix().to(block.device)
            ref = [x @ w.t() for w in originals]

            def linears_error(ws):
                pairs = zip(ws, ref, strict=True)
                return float(sum(((x @ w.t()) - r).pow(2).mean() for w, r in pairs))

            return linears_error
        rows = _token_rows(captured, block.schemes[m.linears[0]].awq.search_rows)
        ref = None if block.rescaled_within(m.inspect) else self.inspect_outputs[m.inspect]
        if m.inspects_tokens and rows is not None:
            captured, ref = [(rows.shape[1], (rows,), {})], None
        if ref is None:
            ref = [_call(inspect, a, kw) for _, a, kw in captured]
        loaded: list = []  # -- the effective weights the linears hold now

        def inspected_error(ws: list[torch.Tensor], i: int) -> torch.Tensor:
            if not loaded or loaded[0] is not ws:
                for lin, w in zip(linears, ws, strict=True):
                    set_weight(lin, w)
                loaded[:] = [ws]
            _, a, kw = captured[i]
            return (_call(inspect, a, kw) - ref[i]).pow(2).mean()

        return awq.PartedLoss(len(captured), inspected_error)

    def _search(self, m: BalanceMapping) -> torch.Tensor:
        """The input scale ``s`` of mapping ``m``'s linears with the least output error."""
        block = self.block
        cfg, wq = block.schemes[m.linears[0]].awq, block.schemes[m.linears[0]].weight
        linears = [block.linears[x] for x in m.linears]
        originals = [get_weight(lin).clone() for lin in linears]

        quantize = awq.weight_fake_quantize(wq)
        act_mean = block.stats[m.linears[0]].act_mean.to(block.device)
        duo = awq.weight_salience(originals, wq.group_size)
        w_means = {True: [duo], False: [None], "both": [None, duo]}[cfg.duo_scaling]
        candidates = None
        if cfg.alpha_grid == "closed":
            candidates = awq.closed_scale_candidates(act_mean, cfg.grid, cfg.duo_scaling, duo)
        loss_with = self._loss(m, linears, originals)
        try:
            s, _, _ = awq.search_scales(
                act_mean, originals, quantize, loss_with, cfg.grid, w_means, candidates=candidates
            )
        finally:
            for lin, w in zip(linears, originals, strict=True):
                set_weight(lin, w)
        return s

    def _apply_scale(self, m: BalanceMapping, s: torch.Tensor) -> None:
        block = self.block
        for x in m.linears:
            scale_inputs(block.linears[x], s)
            block.divisor[x] = s
        fold_into_source(block.foldable_source(m), s)
        block.rescaled.update((*m.linears, m.source))

    def _clip(self) -> None:
        """Each AWQ-rounded linear's clip ranges, the searches spread over the ranks."""
        block = self.block
        rels = []
        for rel, st in block.stats.items():
            scheme = block.schemes[rel]
            awq_rounds = scheme.algorithm == ALGORITHM and not scheme.rounds_with_gptq
            if awq_rounds and st.tokens > 0 and scheme.awq.clip:
                rels.append(rel)
        costs = [get_weight(block.linears[rel]).numel() for rel in rels]
        what = f"the AWQ clip ranges of {block.prefix}"
        ranges = block.ranks.solve_spread(rels, costs, self._search_clip, what, block.device)
        block.clip_ranges.update(zip(rels, ranges, strict=True))

    def _search_clip(self, rel: str) -> tuple[torch.Tensor, torch.Tensor]:
        block = self.block
        scheme = block.schemes[rel]
        x = block.stats[rel].sample_matrix()[:CLIP_TOKENS].to(block.device)
        if rel in block.divisor:
            x = x / block.divisor[rel]
        w, wq, cfg = get_weight(block.linears[rel]), scheme.weight, scheme.awq
        quantize = awq.weight_fake_quantize(wq)
        factors = awq.clip_factors(wq.type, cfg.clip_grid, cfg.max_shrink)
        return awq.search_clip_ranges(w, x, wq.group_size, quantize, factors=factors)


def _token_rows(captured: list, limit: int | None) -> torch.Tensor | None:
    """``limit`` rows ``(1, limit, K)`` evenly spaced over the captured inputs, or ``None``
    where there is no limit, they are no more rows or are not plain hidden states."""
    plain = all(len(a) == 1 and not kw and isinstance(a[0], torch.Tensor) for _, a, kw in captured)
    if limit is None or not plain or sum(n for n, _, _ in captured) <= limit:
        return None
    x = torch.cat([a[0].reshape(-1, a[0].shape[-1]) for _, a, _ in captured])
    picked = torch.arange(limit, device=x.device) * x.shape[0] // limit
    return x[picked].unsqueeze(0)


def independent_waves(mappings: list[BalanceMapping]) -> list[list[BalanceMapping]]:
    """``mappings`` in order, cut into runs whose scale searches read nothing an earlier
    mapping of the run rescales, so a run's searches may run at once (on several ranks)
    and give what one after another would."""
    waves: list[list[BalanceMapping]] = []
    changed: set[str] = set()
    for m in mappings:
        reads = set(m.linears) | ({m.inspect} if m.inspect else set())
        touched = any(c == r or c.startswith(f"{r}.") for c in changed for r in reads)
        if not waves or touched:
            waves.append([])
            changed = set()
        waves[-1].append(m)
        changed |= {*m.linears, m.source}
    return waves
