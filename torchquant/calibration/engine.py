"""Sequential, block-by-block calibration: only one block and its activations on the device.

The inputs of the first block are captured for every calibration sample; then for
each block in turn: move it to the compute device, run the samples through it once
with hooks keeping what the steps asked for, run the steps
(:data:`~torchquant.calibration.steps.CALIBRATION_STEPS`), quantize the linears left,
move it back, and run the samples through the quantized block to produce the next
block's inputs (through the block before rounding where AWQ propagates float outputs,
:func:`propagates_float`).  Stored activations live on the CPU when ``offload=True``.

Under ``torch.distributed`` every rank runs this on its own slice of the samples;
statistics are merged and solves shared through
:class:`~torchquant.calibration.distributed.RankContext`.
"""

from __future__ import annotations

import warnings
from functools import reduce
from operator import or_

import torch
from torch import nn
from tqdm.auto import tqdm

from torchquant.algorithms.quantize import WeightStats
from torchquant.calibration.block import CalibrationBlock, CalibrationStep
from torchquant.calibration.capture import capture_block_inputs, run_block
from torchquant.calibration.distributed import RankContext
from torchquant.calibration.mappings import find_layout
from torchquant.calibration.stats import LayerStats
from torchquant.calibration.steps import CALIBRATION_STEPS
from torchquant.config import QuantConfig, QuantScheme
from torchquant.errors import CalibrationError
from torchquant.plan import (
    ConversionSummary,
    build_quant_linear,
    get_weight,
    plan_conversion,
    replace_layer,
    tensor_bytes,
)


def gather_statistics(block: CalibrationBlock, steps: list[CalibrationStep]) -> None:
    """One pass of the samples over the float block, keeping what the steps request."""
    for rel, scheme in block.schemes.items():
        requests = [r for step in steps if (r := step.request(scheme)) is not None]
        if requests:
            block.stats[rel] = LayerStats.requested(block.full(rel), reduce(or_, requests))
    if not block.stats:
        return
    hooks = [h for step in steps for h in step.observe()]
    try:
        block.run(block.stats)
    finally:
        for h in hooks:
            h.remove()
    for rel, st in block.stats.items():
        if st.tokens == 0:
            warnings.warn(
                f"{st.name}: received no calibration tokens (e.g. an unused MoE expert); "
                f"quantizing it round-to-nearest instead of {block.schemes[rel].algorithm}",
                stacklevel=3,
            )


def propagates_float(schemes: dict[str, QuantScheme]) -> bool:
    """Whether the next block is calibrated on this block's float outputs: every linear
    in it is AWQ rounded to nearest with ``awq.propagate="float"``, so before rounding the
    block computes what the float one does (AWQ's scales fold out exactly)."""
    return bool(schemes) and all(
        s.algorithm == "awq" and s.awq.propagate == "float" and not s.rounds_with_gptq
        for s in schemes.values()
    )


def _quantize_outside_blocks(
    model: nn.Module, name: str, scheme: QuantScheme, summary: ConversionSummary
) -> None:
    """A layer no block holds: no activations are observed for it."""
    if scheme.static_activation:
        raise CalibrationError(
            f"{name}: lies outside the calibrated blocks, so no static activation scale "
            "can be observed for it; give it a dynamic scheme or ignore it"
        )
    if scheme.needs_calibration:
        warnings.warn(
            f"{name}: outside the calibrated blocks; quantized round-to-nearest", stacklevel=3
        )
    layer = model.get_submodule(name)
    bias = getattr(layer, "bias", None)
    new = build_quant_linear(get_weight(layer), bias, scheme, name, WeightStats())
    replace_layer(model, name, new, summary, tensor_bytes(layer))


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
    shards: int | None = None,
) -> ConversionSummary:
    """Quantize ``model`` in place with calibration samples ``tokens: (n, seq_len)``.

    ``device`` is where each block computes (default: where the model's first weight
    is); with ``offload`` the stored block inputs stay on the CPU between blocks.
    Layers outside the blocks are quantized without statistics (calibrated algorithms
    round them to nearest; static activation scales there are refused, as no
    activations are observed for them).  ``plan`` is ``plan_conversion(model, config)``
    when the caller has it already.

    Called on every rank of an initialised process group (same model, config and
    ``tokens`` on each), the samples are split over the ranks: ``tokens`` are cut into
    ``shards`` contiguous shards (default: one per rank), each rank calibrates on its
    own, and their statistics are merged in shard order.  One process given the same
    ``shards`` writes bit-identical weights.
    """
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.shape[0] == 0:
        got = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise CalibrationError(
            f"calibration_data must be a non-empty (n, seq_len) token tensor, got {got}"
        )
    ranks = RankContext.current(shards)
    ranks.check_same(model, config, tokens)
    try:
        return _calibrate_blocks(model, config, tokens, device, offload, progress, plan, ranks)
    except BaseException as exc:
        ranks.announce_failure(exc)
        raise


def _calibrate_blocks(
    model: nn.Module,
    config: QuantConfig,
    tokens: torch.Tensor,
    device: torch.device | str | None,
    offload: bool,
    progress: bool,
    plan: dict[str, tuple[QuantScheme | None, str]] | None,
    ranks: RankContext,
) -> ConversionSummary:
    if plan is None:
        plan = plan_conversion(model, config)
    bounds = ranks.shard_bounds(tokens.shape[0])
    mine = [bounds[s] for s in ranks.local_shards()]
    first = mine[0][0]
    shards = [slice(start - first, stop - first) for start, stop in mine]
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
            _quantize_outside_blocks(model, name, scheme, summary)

    if layout.blocks_path:
        # -- modules outside the blocks (embeddings, rotary, norms) run on the compute device
        for name, module in model.named_modules():
            if name and not name.startswith(layout.blocks_path) and not list(module.children()):
                module.to(device)
    local_tokens = tokens[first : mine[-1][1]]
    samples = capture_block_inputs(model, layout.blocks[0], local_tokens, device, store)
    last = len(layout.blocks) - 1
    shown = progress and ranks.rank == 0
    bar = tqdm(layout.blocks, desc="calibrating", unit="block", disable=not shown)
    for i, block in enumerate(bar):
        prefix = prefix_of[i]
        schemes = {}
        for rel, _ in block.named_modules():
            full = f"{prefix}.{rel}" if prefix else rel
            if rel and full in plan and plan[full][0] is not None:
                schemes[rel] = plan[full][0]
        block_home = next(block.parameters()).device
        block.to(device)
        state = CalibrationBlock(
            model, block, prefix, schemes, layout.balance, device, samples, summary, ranks, shards
        )
        steps = [step(state) for step in CALIBRATION_STEPS]
        gather_statistics(state, steps)
        for step in steps:
            step.apply()
        floats = None
        if i < last and propagates_float(schemes):
            floats = [run_block(block, sample, device).to(store) for sample in samples]
        state.quantize(set(schemes))
        del state, steps
        if i < last:
            for j, sample in enumerate(samples):
                out = floats[j] if floats is not None else run_block(block, sample, device)
                sample.hidden = out.to(store)
            del floats
        block.to(block_home)
    if layout.blocks_path:
        model.to(home)
    return summary
