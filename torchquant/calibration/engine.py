"""Sequential, block-by-block calibration: only one block and its activations on the device.

The inputs of the first block are captured for every calibration sample; then for
each block in turn: move it to the compute device, run the samples through it with
hooks gathering statistics, apply the algorithms (SmoothQuant / AWQ rescaling, GPTQ),
replace its linears by ``QuantLinear``, move it back, and run the samples through the
quantized block to produce the next block's inputs.  Stored activations live on the
CPU when ``offload=True``.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from tqdm.auto import tqdm

from torchquant.algorithms import awq, gptq, smoothquant
from torchquant.calibration.capture import BlockInput, capture_block_inputs, run_block
from torchquant.calibration.layers import (
    build_quant_linear,
    fold_into_source,
    get_weight,
    out_features,
    scale_inputs,
    set_weight,
    static_input_scale,
)
from torchquant.calibration.mappings import BalanceMapping, find_layout
from torchquant.calibration.stats import LayerStats, attach
from torchquant.config import QuantConfig, QuantScheme
from torchquant.errors import CalibrationError
from torchquant.numerics import choose_int_qparams, quantize_codes
from torchquant.numerics.observers import Observer
from torchquant.plan import ConversionSummary, plan_conversion, set_submodule, tensor_bytes

AWQ_CLIP_TOKENS = 512


def _is_static(scheme: QuantScheme) -> bool:
    return scheme.activation is not None and not scheme.activation.dynamic


def _make_observer(scheme: QuantScheme, name: str) -> Observer:
    act = scheme.activation
    pct = act.percentile if act.percentile < 100.0 else 99.99
    return Observer(act.observer, "tensor", bits=8, symmetric=True, percentile=pct, name=name)


class BlockCalibrator:
    """Calibrates and quantizes the linears of one block (names relative to the block)."""

    def __init__(
        self,
        block: nn.Module,
        prefix: str,
        schemes: dict[str, QuantScheme],
        balance: tuple[BalanceMapping, ...],
        device: torch.device,
    ) -> None:
        self.block, self.prefix, self.schemes, self.device = block, prefix, schemes, device
        self.modules = {rel: block.get_submodule(rel) for rel in schemes}
        self.balance = [m for m in balance if all(lin in schemes for lin in m.linears)]
        self.smooth: dict[str, torch.Tensor] = {}  # run-time smoothing scale per linear
        self.divisor: dict[str, torch.Tensor] = {}  # how each linear's captured input changed
        self.ranges: dict[str, tuple] = {}  # AWQ clip ranges per linear

    def full(self, rel: str) -> str:
        return f"{self.prefix}.{rel}" if self.prefix else rel

    def _algo(self, rel: str) -> str:
        return self.schemes[rel].algorithm

    def _run(self, samples: list[BlockInput], stats: dict[str, LayerStats]) -> None:
        handles = attach(self.modules, stats)
        try:
            with torch.no_grad():
                for sample in samples:
                    run_block(self.block, sample, self.device)
        finally:
            for h in handles:
                h.remove()

    # -- pass A: statistics for the algorithms

    def gather(self, samples: list[BlockInput]) -> dict[str, LayerStats]:
        stats = {}
        for rel, scheme in self.schemes.items():
            algo = scheme.algorithm
            if algo == "rtn":
                continue
            stats[rel] = LayerStats(
                self.full(rel),
                want_hessian=scheme.rounds_with_gptq,
                want_absmax=algo == "smoothquant",
                want_samples=max(scheme.awq.max_tokens, AWQ_CLIP_TOKENS) if algo == "awq" else 0,
            )
        if stats:
            self._inspect_inputs: dict[str, list] = {}
            hooks = self._capture_inspect_inputs()
            try:
                self._run(samples, stats)
            finally:
                for h in hooks:
                    h.remove()
        for rel, st in stats.items():
            if st.tokens == 0:
                warnings.warn(
                    f"{st.name}: received no calibration tokens (e.g. an unused MoE expert); "
                    f"quantizing it round-to-nearest instead of {self._algo(rel)}",
                    stacklevel=3,
                )
        return stats

    def _awq_mappings(self) -> list[BalanceMapping]:
        return [m for m in self.balance if all(self._algo(x) == "awq" for x in m.linears)]

    def _capture_inspect_inputs(self) -> list:
        hooks = []
        for m in self._awq_mappings():
            if m.inspect is None or m.inspect in self._inspect_inputs:
                continue
            store: list = []
            self._inspect_inputs[m.inspect] = store
            limit = self.schemes[m.linears[0]].awq.max_tokens

            def pre(module, args, kwargs, store=store, limit=limit):
                x = args[0] if args else next(iter(kwargs.values()))
                if sum(n for n, _, _ in store) < limit:
                    store.append((x.reshape(-1, x.shape[-1]).shape[0], args, dict(kwargs)))

            inspect = self.block.get_submodule(m.inspect)
            hooks.append(inspect.register_forward_pre_hook(pre, with_kwargs=True))
        return hooks

    # -- transforms that keep the float function (SmoothQuant, AWQ scaling)

    def _foldable(self, m: BalanceMapping) -> nn.Module | None:
        try:
            source = self.block.get_submodule(m.source)
        except AttributeError:
            return None
        k = get_weight(self.modules[m.linears[0]]).shape[1]
        return source if out_features(source) == k else None

    def smooth_quant(self, stats: dict[str, LayerStats]) -> None:
        done = set()
        for m in self.balance:
            if not all(self._algo(x) == "smoothquant" for x in m.linears):
                continue
            if any(stats[x].tokens == 0 for x in m.linears):
                continue
            config = self.schemes[m.linears[0]].smoothquant
            if m.source_is_linear and not config.smooth_linear_inputs:
                done.update(m.linears)
                continue
            alpha = config.alpha
            absmax = torch.stack([stats[x].absmax for x in m.linears]).amax(dim=0)
            ws = [get_weight(self.modules[x]) for x in m.linears]
            s = smoothquant.smoothing_factors(absmax, ws, alpha).to(ws[0].device)
            source = self._foldable(m)
            for x in m.linears:
                scale_inputs(self.modules[x], s)
                if source is None:
                    self.smooth[x] = s
                done.add(x)
            if source is not None:
                fold_into_source(source, s)
        for rel, st in stats.items():
            if self._algo(rel) == "smoothquant" and rel not in done and st.tokens > 0:
                alpha = self.schemes[rel].smoothquant.alpha
                w = get_weight(self.modules[rel])
                s = smoothquant.smoothing_factors(st.absmax, [w], alpha).to(w.device)
                scale_inputs(self.modules[rel], s)
                self.smooth[rel] = s

    @torch.no_grad()
    def awq_scale(self, stats: dict[str, LayerStats]) -> None:
        for m in self._awq_mappings():
            source = self._foldable(m)
            if source is None or any(stats[x].tokens == 0 for x in m.linears):
                continue
            cfg, wq = self.schemes[m.linears[0]].awq, self.schemes[m.linears[0]].weight
            linears = [self.modules[x] for x in m.linears]
            originals = [get_weight(lin).clone() for lin in linears]
            inspect = self.block.get_submodule(m.inspect) if m.inspect else None
            captured = self._inspect_inputs.get(m.inspect, []) if inspect else []
            if inspect is None or not captured:
                x = stats[m.linears[0]].sample_matrix().to(self.device)
                ref = [x @ w.t() for w in originals]

                def loss_with(ws, x=x, ref=ref):
                    pairs = zip(ws, ref, strict=True)
                    return float(sum(((x @ w.t()) - r).pow(2).mean() for w, r in pairs))

            else:
                ref = [self._call(inspect, a, kw) for _, a, kw in captured]

                def loss_with(
                    ws, linears=linears, inspect=inspect, captured=captured, ref=ref, orig=originals
                ):
                    for lin, w in zip(linears, ws, strict=True):
                        set_weight(lin, w)
                    try:
                        return float(
                            sum(
                                (self._call(inspect, a, kw) - r).pow(2).mean()
                                for (_, a, kw), r in zip(captured, ref, strict=True)
                            )
                        )
                    finally:
                        for lin, w in zip(linears, orig, strict=True):
                            set_weight(lin, w)

            def quantize(w, wq=wq):
                return awq.fake_quantize(w, wq.bits, wq.group_size, wq.symmetric)

            act_mean = stats[m.linears[0]].act_mean.to(self.device)
            duo = awq.weight_salience(originals, wq.group_size)
            w_means = {True: [duo], False: [None], "both": [None, duo]}[cfg.duo_scaling]
            s, _, _ = awq.search_scales(act_mean, originals, quantize, loss_with, cfg.grid, w_means)
            for lin in linears:
                scale_inputs(lin, s)
            fold_into_source(source, s)
            for x in m.linears:
                self.divisor[x] = s

    @staticmethod
    def _call(module: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
        out = module(*args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    @torch.no_grad()
    def awq_clip(self, stats: dict[str, LayerStats]) -> None:
        for rel, st in stats.items():
            scheme = self.schemes[rel]
            awq_rounds = scheme.algorithm == "awq" and not scheme.rounds_with_gptq
            if not awq_rounds or st.tokens == 0 or not scheme.awq.clip:
                continue
            x = st.sample_matrix()[:AWQ_CLIP_TOKENS].to(self.device)
            if rel in self.divisor:
                x = x / self.divisor[rel]
            w, wq = get_weight(self.modules[rel]), scheme.weight
            cfg = scheme.awq
            self.ranges[rel] = awq.search_clip(
                w, x, wq.bits, wq.group_size, wq.symmetric, cfg.clip_grid, cfg.max_shrink
            )

    # -- pass B: static activation scales, observed on the transformed float block

    def observe_static(self, samples: list[BlockInput]) -> dict[str, torch.Tensor]:
        stats = {}
        for rel, scheme in self.schemes.items():
            if _is_static(scheme):
                st = LayerStats(self.full(rel), observer=_make_observer(scheme, self.full(rel)))
                st.divisor = self.smooth.get(rel)
                stats[rel] = st
        if not stats:
            return {}
        self._run(samples, stats)
        scales = {}
        for rel, st in stats.items():
            if st.tokens == 0:
                raise CalibrationError(
                    f"{st.name}: received no calibration tokens, so no static activation scale "
                    "can be observed; give it a dynamic scheme or more varied data"
                )
            act_type = self.schemes[rel].activation.type
            scales[rel] = static_input_scale(st.observer.absmax(), act_type)
        return scales

    # -- GPTQ in execution order: each stage sees the error of the stages before it

    def gptq_stages(self, sample: BlockInput) -> list[list[str]]:
        """GPTQ linears in the order the block runs them, grouped by shared input.

        Quantizing stage by stage (q/k/v, then o, then gate/up, then down on a Llama
        block) lets each stage's Hessian come from the already-quantized stages before it,
        so GPTQ compensates their error too instead of fitting a float input it never sees.
        """
        order: list[tuple[str, torch.Tensor]] = []  # holding the inputs keeps them distinct
        gptq_rels = [r for r, scheme in self.schemes.items() if scheme.rounds_with_gptq]

        def hook(module, args, rel):
            if all(r != rel for r, _ in order):
                order.append((rel, args[0]))

        handles = [
            self.modules[r].register_forward_pre_hook(lambda m, a, r=r: hook(m, a, r))
            for r in gptq_rels
        ]
        try:
            with torch.no_grad():
                run_block(self.block, sample, self.device)
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

    def regather_hessians(
        self, samples: list[BlockInput], stats: dict[str, LayerStats], stage: list[str]
    ) -> None:
        """Fresh Hessians for ``stage`` from the block as it is now (earlier stages quantized)."""
        fresh = {rel: LayerStats(self.full(rel), want_hessian=True) for rel in stage}
        self._run(samples, fresh)
        for rel in stage:
            stats[rel].hessian, stats[rel].tokens = fresh[rel].hessian, fresh[rel].tokens

    # -- quantization into QuantLinear

    @torch.no_grad()
    def quantize(
        self,
        stats: dict[str, LayerStats],
        input_scales: dict[str, torch.Tensor],
        only: set[str] | None = None,
    ) -> dict[str, str]:
        described = {}
        for rel, scheme in self.schemes.items():
            if only is not None and rel not in only:
                continue
            module, wq = self.modules[rel], scheme.weight
            st = stats.get(rel)
            codes = g_idx = None
            if scheme.rounds_with_gptq and st is not None and st.tokens > 0:
                p = scheme.gptq
                res = gptq.gptq_quantize(
                    get_weight(module),
                    st.hessian,
                    wq.bits,
                    wq.group_size,
                    wq.symmetric,
                    p.block_size,
                    p.dampening,
                    p.act_order,
                    p.static_groups,
                    p.observer,
                    name=self.full(rel),
                )
                codes, g_idx = (res.codes, res.scales, res.zeros), res.g_idx
            elif rel in self.ranges:
                w = get_weight(module)
                sdt = w.dtype if wq.group_size != -1 else torch.float32
                scales, zeros = choose_int_qparams(*self.ranges[rel], wq.bits, wq.symmetric, sdt)
                codes = (quantize_codes(w, scales, zeros, wq.bits, wq.group_size), scales, zeros)
            layer = build_quant_linear(
                module,
                scheme,
                self.full(rel),
                codes,
                g_idx,
                self.smooth.get(rel),
                input_scales.get(rel),
            )
            set_submodule(self.block, rel, layer)
            described[rel] = scheme.describe()
        return described


@torch.no_grad()
def calibrate_model(
    model: nn.Module,
    config: QuantConfig,
    tokens: torch.Tensor,
    *,
    device: torch.device | str | None = None,
    offload: bool = True,
    progress: bool = True,
    plan: dict[str, tuple[QuantScheme | None, str]] | None = None,
) -> ConversionSummary:
    """Quantize ``model`` in place with calibration samples ``tokens: (n, seq_len)``.

    ``device`` is where each block computes (default: where the model's first weight
    is); with ``offload`` the stored block inputs stay on the CPU between blocks.
    Layers outside the blocks are quantized round-to-nearest (static activation
    scales there are refused, as no activations are observed for them).  ``plan`` is
    ``plan_conversion(model, config)`` when the caller has it already.
    """
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.shape[0] == 0:
        got = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise CalibrationError(
            f"calibration_data must be a non-empty (n, seq_len) token tensor, got {got}"
        )
    if plan is None:
        plan = plan_conversion(model, config)
    layout = find_layout(model)
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    store = torch.device("cpu") if offload else device
    summary = ConversionSummary()
    prefix_of = {
        i: f"{layout.blocks_path}.{i}" if layout.blocks_path else ""
        for i in range(len(layout.blocks))
    }

    in_blocks: set[str] = set()
    for i, block in enumerate(layout.blocks):
        for rel, _ in block.named_modules():
            pre = prefix_of[i]
            in_blocks.add(f"{pre}.{rel}" if pre and rel else (rel or pre))
    for name, (scheme, why) in plan.items():
        if scheme is None:
            summary.skipped[name] = why
        elif name not in in_blocks:
            if _is_static(scheme):
                raise CalibrationError(
                    f"{name}: lies outside the calibrated blocks, so no static activation scale "
                    "can be observed for it; give it a dynamic scheme or ignore it"
                )
            if scheme.algorithm != "rtn":
                warnings.warn(
                    f"{name}: outside the calibrated blocks; quantized round-to-nearest",
                    stacklevel=2,
                )
            layer = model.get_submodule(name)
            summary.bytes_before += tensor_bytes(layer)
            new = build_quant_linear(layer, scheme, name)
            summary.bytes_after += new.nbytes()
            summary.converted[name] = scheme.describe()
            set_submodule(model, name, new)

    if layout.blocks_path:
        # -- modules outside the blocks (embeddings, rotary, norms) run on the compute device
        for name, module in model.named_modules():
            if name and not name.startswith(layout.blocks_path) and not list(module.children()):
                module.to(device)
    samples = capture_block_inputs(model, layout.blocks[0], tokens, device, store)
    last = len(layout.blocks) - 1
    bar = tqdm(layout.blocks, desc="calibrating", unit="block", disable=not progress)
    for i, block in enumerate(bar):
        prefix = prefix_of[i]
        schemes = {}
        for rel, _ in block.named_modules():
            full = f"{prefix}.{rel}" if prefix else rel
            if rel and full in plan and plan[full][0] is not None:
                schemes[rel] = plan[full][0]
        block_home = next(block.parameters()).device
        block.to(device)
        cal = BlockCalibrator(block, prefix, schemes, layout.balance, device)
        for rel in schemes:
            summary.bytes_before += tensor_bytes(cal.modules[rel])
        stats = cal.gather(samples)
        cal.smooth_quant(stats)
        cal.awq_scale(stats)
        cal.awq_clip(stats)
        input_scales = cal.observe_static(samples)
        stages = cal.gptq_stages(samples[0]) if samples else []
        described = {}
        for k, stage in enumerate(stages):
            if k or any(rel in cal.divisor for rel in stage):  # after stages or AWQ scaling
                cal.regather_hessians(samples, stats, stage)
            described |= cal.quantize(stats, input_scales, only=set(stage))
        described |= cal.quantize(stats, input_scales, only=set(cal.schemes) - set(described))
        for rel, desc in described.items():
            full = f"{prefix}.{rel}" if prefix else rel
            summary.converted[full] = desc
            summary.bytes_after += block.get_submodule(rel).nbytes()
        del stats, cal
        if i < last:
            for sample in samples:
                sample.hidden = run_block(block, sample, device).to(store)
        block.to(block_home)
    if layout.blocks_path:
        model.to(home)
    return summary
