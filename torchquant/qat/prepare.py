"""``prepare_qat`` and ``convert_qat``: swap linears for ``QatLinear`` and, after training, back.

Which layers get which scheme is decided by ``plan.plan_conversion`` (the same
``QuantConfig`` matcher ``convert_model`` uses), so a model prepared and converted
with one config ends up exactly as ``convert_model`` would quantize it, with the
trained weights and scales.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from torchquant.config import QuantConfig
from torchquant.conversion_guards import check_before_conversion, refuse_nonfinite
from torchquant.errors import ConfigError, QuantizationError
from torchquant.modules import QuantLinear
from torchquant.plan import (
    ConversionSummary,
    plan_conversion,
    quantized_layers,
    replace_layer,
    set_submodule,
    split_experts_for_config,
    tensor_bytes,
)
from torchquant.qat.options import QatOptions
from torchquant.qat.qat_linear import QatLinear


def qat_layers(model: nn.Module) -> dict[str, QatLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QatLinear)}


def prepare_qat(
    model: nn.Module,
    config: QuantConfig,
    options: QatOptions | None = None,
    *,
    ptq_model: nn.Module | None = None,
    calibration: Iterable[Any] | None = None,
    progress: bool = True,
) -> tuple[nn.Module, ConversionSummary]:
    """Replace the linears that ``config`` quantizes by ``QatLinear``, in place.

    Weights and biases are shared with the original layers (no copy).  Scales start
    from the weight's min-max range, or from ``ptq_model`` (a converted copy of the
    model, e.g. RTN/GPTQ: its ``QuantLinear`` layers are matched by name).  Static
    activation scales are calibrated on ``calibration`` (model inputs: tensors or
    keyword dicts), which such schemes require.  Create the optimizer afterwards.
    """
    if not isinstance(config, QuantConfig):
        raise ConfigError(f"config must be a QuantConfig, got {type(config).__name__}")
    options = options or QatOptions()
    if qat_layers(model):
        raise QuantizationError("the model already has QatLinear layers: it is prepared")
    ptq = _quantized_layers(ptq_model) if ptq_model is not None else None
    # -- refuse a bad override or a NaN/Inf weight before any module changes
    check_before_conversion(model, config, plan_conversion(model, config))
    experts_left = split_experts_for_config(model, config)
    plan = plan_conversion(model, config)
    summary = ConversionSummary(skipped=experts_left)
    prepared: dict[str, QatLinear] = {}  # -- swapped in only once every layer is built
    for name, (scheme, why) in tqdm(
        plan.items(), desc="preparing QAT", unit="layer", disable=not progress
    ):
        if scheme is None:
            summary.skipped[name] = why
            continue
        if ptq is not None and name not in ptq:
            raise ConfigError(f"{name}: ptq_model has no quantized layer of that name")
        prepared[name] = QatLinear.from_linear(model.get_submodule(name), scheme, options, name)
        summary.converted[name] = scheme.describe()
    if not summary.converted:
        raise ConfigError(
            f"no linear layer matches the config (found {len(plan)} linear layer(s); "
            f"skipped: {dict(list(summary.skipped.items())[:3])})"
        )
    for name, layer in prepared.items():
        if ptq is not None:
            layer.load_quantized(ptq[name], name)
        set_submodule(model, name, layer)
    static = [n for n, m in qat_layers(model).items() if m.input_scale is not None]
    if static:
        if calibration is None:
            raise ConfigError(
                f"static activation scales ({static[0]}, ...) need calibration inputs; "
                "pass calibration=[batch, ...]"
            )
        calibrate_input_scales(model, calibration)
    return model, summary


def _quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    layers = quantized_layers(model)
    if not layers:
        raise ConfigError("ptq_model has no QuantLinear layers; convert it with convert_model")
    return layers


@torch.no_grad()
def calibrate_input_scales(model: nn.Module, batches: Iterable[Any]) -> int:
    """Set static input scales to ``max |x| / qmax`` seen over ``batches`` (asymmetric ones,
    with their zero points, to the min and max seen); returns the count."""
    layers = [m for m in qat_layers(model).values() if m.input_scale is not None]
    for m in layers:
        m.start_observing()
    count = 0
    try:
        for batch in batches:
            model(**batch) if isinstance(batch, Mapping) else model(batch)
            count += 1
    finally:
        for m in layers:
            m.observing = False
    if layers and count == 0:
        raise ConfigError("calibration produced no batches; static input scales are unset")
    return count


@torch.no_grad()
def convert_qat(
    model: nn.Module, config: QuantConfig | None = None, *, progress: bool = True
) -> tuple[nn.Module, ConversionSummary]:
    """Replace every ``QatLinear`` by the ``QuantLinear`` computing the same function.

    With ``config``, each layer's trained scheme must be what the config resolves
    for it; a mismatch raises :class:`ConfigError` naming the layer.
    """
    layers = qat_layers(model)
    if not layers:
        raise QuantizationError("the model has no QatLinear layers; call prepare_qat first")
    summary = ConversionSummary()
    expected = plan_conversion(model, config) if config is not None else {}
    # -- swapped in only once every layer converted, with the trained layer's bytes
    converted: dict[str, tuple[QuantLinear, int]] = {}
    for name, layer in tqdm(layers.items(), desc="converting", unit="layer", disable=not progress):
        for tname, t in [*layer.named_parameters(recurse=False), *layer.named_buffers()]:
            refuse_nonfinite(f"{name}.{tname}", t, "the trained layer cannot be converted")
        scheme = expected[name][0] if config is not None else "any"
        converted[name] = (layer.to_quant_linear(name, scheme), tensor_bytes(layer))
    for name, (quantized, trained_bytes) in converted.items():
        replace_layer(model, name, quantized, summary, trained_bytes)
    return model, summary
