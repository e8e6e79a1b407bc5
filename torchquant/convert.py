"""``convert_model``: replace a model's linear layers by ``QuantLinear`` as the config says.

Which layers convert, and how fused mixture-of-experts modules are split into per-expert
linears first, is :mod:`torchquant.plan`'s; layers whose scheme needs calibration are
quantized block by block by :mod:`torchquant.calibration.engine`.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from torchquant.calibration.engine import calibrate_model
from torchquant.config import QuantConfig, QuantScheme
from torchquant.conversion_guards import ModelSnapshot, check_before_conversion
from torchquant.errors import ConfigError, QuantizationError
from torchquant.modules import QuantExperts, fuse_rms_norms, fuse_sibling_linears
from torchquant.offload import carry_hook, execution_device, is_offloaded, onloaded
from torchquant.plan import (
    ConversionSummary,
    build_quant_linear,
    get_weight,
    plan_conversion,
    replace_layer,
    split_experts_and_plan,
    tensor_bytes,
)
from torchquant.qat import QatLinear

__all__ = ["ConversionSummary", "convert_model"]


@torch.no_grad()
def convert_model(
    model: nn.Module,
    config: QuantConfig,
    *,
    device: torch.device | str | None = None,
    progress: bool = True,
    calibration_data: torch.Tensor | None = None,
    offload: bool = True,
    calibration_shards: int | None = None,
) -> tuple[nn.Module, ConversionSummary]:
    """Quantize ``model`` in place, layer by layer; returns it and a summary.

    Each weight is rounded by its scheme's algorithm (``quantize_weight``).  If any
    layer's scheme needs calibration (GPTQ, AWQ, SmoothQuant or static activation
    scales), ``calibration_data`` (token ids ``(n, seq_len)``, see
    ``torchquant.calibration.calibration_tokens``) is run through the model block by
    block instead (``torchquant.calibration.calibrate_model``).

    Each layer is quantized on ``device`` (default: where its weight lives) and the
    result is moved back to the layer's own device, so a model larger than the
    accelerator converts one layer at a time.  The float weight of each layer is
    released as soon as its quantized replacement is in place.

    A model dispatched by accelerate (``device_map``) converts too: a layer whose
    weight is offloaded (meta behind an ``AlignDevicesHook``) is read from the hook's
    weights map, quantized, and kept resident on the hook's execution device.
    Calibration and fused experts are refused when their weights are offloaded.

    On CUDA, sibling projections (q/k/v, gate/up) end up sharing one concatenated weight
    that serves them with one launch at batch 1 (``fuse_sibling_linears``), and RMSNorm
    modules of known families run as one kernel each (``fuse_rms_norms``; undo with
    ``torchquant.modules.unfuse_rms_norms``).
    """
    if not isinstance(config, QuantConfig):
        raise ConfigError(f"config must be a QuantConfig, got {type(config).__name__}")
    # -- refuse a bad override, a meta or a NaN/Inf weight before any module changes
    plan = plan_conversion(model, config)
    schemes = [config.default, *(s for _, s in config.overrides)]
    calibrated = [s for s in schemes if s is not None and s.needs_calibration]
    check_before_conversion(model, config, plan)
    snapshot = None
    if calibrated:
        rescales = any(s.rescales_weights for s in calibrated)
        snapshot = ModelSnapshot(model, rescaled=plan if rescales else None)
    plan, experts_left = split_experts_and_plan(model, config, plan)
    split = {n: m.num_experts for n, m in model.named_modules() if isinstance(m, QuantExperts)}
    needing = [n for n, (s, _) in plan.items() if s is not None and s.needs_calibration]
    if needing:
        snapshot.keep(model, list(plan))
        try:
            summary = _calibrate(
                model,
                config,
                calibration_data,
                plan,
                needing,
                device,
                offload,
                progress,
                calibration_shards,
            )
        except BaseException:
            snapshot.restore(model)  # -- e.g. NaN activations in a late block
            raise
        _finish_experts(model, summary, experts_left, split)
        fuse_sibling_linears(model)
        fuse_rms_norms(model)
        return model, summary
    summary = ConversionSummary()
    for name, (scheme, why) in tqdm(
        plan.items(), desc="quantizing", unit="layer", disable=not progress
    ):
        layer = model.get_submodule(name)
        if isinstance(layer, QatLinear):
            # -- a QAT-trained layer keeps its learned scales (and must match the config)
            quantized = layer.to_quant_linear(name, expected=scheme)
            replace_layer(model, name, quantized, summary, tensor_bytes(layer))
            continue
        if scheme is None:
            summary.skipped[name] = why
            continue
        with onloaded(layer):
            home = execution_device(layer, layer.weight.device)
            work = layer if device is None else layer.to(device)
            bias = getattr(work, "bias", None)
            quantized = build_quant_linear(get_weight(work), bias, scheme, name).to(home)
            float_bytes = tensor_bytes(layer)
        carry_hook(layer, quantized)
        replace_layer(model, name, quantized, summary, float_bytes)
        del layer, work, bias
    _finish_experts(model, summary, experts_left, split)
    fuse_sibling_linears(model)
    fuse_rms_norms(model)
    return model, summary


def _calibrate(
    model: nn.Module,
    config: QuantConfig,
    calibration_data: torch.Tensor | None,
    plan: dict[str, tuple[QuantScheme | None, str]],
    needing: list[str],
    device: torch.device | str | None,
    offload: bool,
    progress: bool,
    shards: int | None,
) -> ConversionSummary:
    offloaded = [n for n, m in model.named_modules() if is_offloaded(m)]
    if offloaded:
        raise QuantizationError(
            f"{offloaded[0]}: weights are offloaded by accelerate (device_map), which "
            f"calibration does not support ({len(needing)} layer(s), e.g. {needing[0]!r}, "
            "need it); load the model without offloading, or convert round-to-nearest"
        )
    if calibration_data is None:
        raise ConfigError(
            f"calibration_data is required: {len(needing)} layer(s) (e.g. {needing[0]!r}) "
            "use an algorithm or static activation scales that need calibration"
        )
    return calibrate_model(
        model,
        config,
        calibration_data,
        device=device,
        offload=offload,
        progress=progress,
        plan=plan,
        shards=shards,
    )


def _finish_experts(
    model: nn.Module, summary: ConversionSummary, left: dict[str, str], split: dict[str, int]
) -> None:
    summary.skipped.update(left)
    summary.split_experts.update(split)
    for module in model.modules():
        if isinstance(module, QuantExperts):
            module.release_views()
