"""Microscaled weights in compressed-tensors: ``nvfp4-pack-quantized``, ``mxfp4-pack-quantized``
and ``mxfp8-quantized``, weight-only or with activations of the same format.

Per layer ``p``: ``p.weight_packed`` uint8 ``(N, K/2)``, two E2M1 codes a byte, the
even column in the low nibble (FP4), or ``p.weight`` float8_e4m3fn ``(N, K)`` (MXFP8);
``p.weight_scale`` ``(N, K/block)``: float8_e4m3fn (NVFP4, block 16, ``strategy:
tensor_group``) or uint8 E8M0 exponents (MXFP4 / MXFP8, block 32, ``strategy: group``);
NVFP4 adds ``p.weight_global_scale`` float32 ``(1,)``, the divisor of every block scale.
These are our buffers bit for bit, so export and import copy them.  The library cannot
hold a partial last block: K must be a multiple of the block.

Activations (the library's ``NVFP4`` / ``MXFP4`` / ``MXFP8`` presets): ``input_activations``
of the weight's format per block; MX ones ``dynamic: true``; NVFP4's ``dynamic: local``
(block scales per input, the global scale calibrated) with ``p.input_global_scale``
float32 ``(1,)``, which is our static NVFP4 activation's ``input_scale``.  A dynamic NVFP4
global scale has no compressed-tensors form, so such layers are refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from torchquant.checkpoint.safetensors_check import TensorEntry
from torchquant.config import ActivationQuant, QuantScheme, WeightQuant
from torchquant.errors import CheckpointError
from torchquant.formats import hf_checkpoint as hf
from torchquant.modules import QuantLinear
from torchquant.weights import Fp4Format, Mxfp8Format

# -- our format's name -> (compressed-tensors format, weight strategy, scale dtype, our type)
FP4_PACKED = {
    "NVFP4": ("nvfp4-pack-quantized", "tensor_group", torch.float8_e4m3fn, "nvfp4"),
    "MXFP4": ("mxfp4-pack-quantized", "group", torch.uint8, "mxfp4"),
    "MXFP8": ("mxfp8-quantized", "group", torch.uint8, "mxfp8"),
}
FP4_FORMATS = tuple(ct_format for ct_format, *_ in FP4_PACKED.values())
# -- the weight formats this file exchanges
MICROSCALED_WEIGHT_FORMATS = (Fp4Format, Mxfp8Format)
# -- our type -> (bits, block, scale dtype, tensor holding the values, the inputs' ``dynamic``)
TYPE_FIELDS = {
    "nvfp4": (4, 16, torch.float8_e4m3fn, "weight_packed", "local"),
    "mxfp4": (4, 32, torch.uint8, "weight_packed", True),
    "mxfp8": (8, 32, torch.uint8, "weight", True),
}


def _args(weight_type: str, strategy: str, dynamic: bool | str) -> dict[str, Any]:
    bits, block, scale_dtype, _, _ = TYPE_FIELDS[weight_type]
    return {
        "num_bits": bits,
        "type": "float",
        "symmetric": True,
        "group_size": block,
        "strategy": strategy,
        "block_structure": None,
        "dynamic": dynamic,
        "actorder": None,
        "scale_dtype": str(scale_dtype),
        "observer": "minmax" if dynamic is not True else None,
    }


def fp4_weight_args(fmt: Fp4Format | Mxfp8Format) -> dict[str, Any]:
    """The weight quantization args compressed-tensors writes for ``fmt``."""
    _, strategy, _, weight_type = FP4_PACKED[fmt.name]
    return _args(weight_type, strategy, False)


def microscaled_input_args(act: ActivationQuant, name: str) -> dict[str, Any]:
    """The ``input_activations`` args of an NVFP4 / MXFP4 / MXFP8 activation."""
    _, strategy, _, _ = FP4_PACKED[act.type.upper()]
    inputs_dynamic = TYPE_FIELDS[act.type][4]
    if inputs_dynamic == "local" and act.dynamic:  # -- NVFP4: the global scale is stored
        raise CheckpointError(
            f"layer {name!r}: NVFP4 activations with a dynamic global scale have no "
            "compressed-tensors form (it stores a calibrated input_global_scale); quantize "
            "with ActivationQuant('nvfp4', dynamic=False) and calibration data, or save in "
            "the native format"
        )
    return _args(act.type, strategy, inputs_dynamic)


def fp4_layer_tensors(name: str, layer: QuantLinear) -> tuple[str, dict, dict[str, torch.Tensor]]:
    """(format, weight args, local tensors) of a microscaled layer."""
    fmt = layer.weight_format
    if layer.in_features % fmt.block:
        raise CheckpointError(
            f"layer {name!r}: {fmt.name} with K={layer.in_features} leaves a partial block of "
            f"{layer.in_features % fmt.block}; compressed-tensors needs K a multiple of "
            f"{fmt.block} (save in the native format)"
        )
    values_key = TYPE_FIELDS[layer.scheme.weight.type][3]
    out = {values_key: layer.qweight, "weight_scale": layer.scales}
    if fmt.has_global_scale:
        out["weight_global_scale"] = layer.global_scale
    if layer.input_scale is not None:  # -- a static NVFP4 activation's global scale
        out["input_global_scale"] = layer.input_scale
    if layer.bias is not None:
        out["bias"] = layer.bias
    return FP4_PACKED[fmt.name][0], fp4_weight_args(fmt), out


def _activation_of(
    weight_type: str, strategy: str, inputs: Mapping[str, Any] | None, name: str
) -> ActivationQuant | None:
    if inputs is None:
        return None
    bits, block, _, _, dynamic = TYPE_FIELDS[weight_type]
    got = {k: inputs.get(k) for k in ("num_bits", "type", "strategy", "group_size", "dynamic")}
    want = {"num_bits": bits, "type": "float", "strategy": strategy, "group_size": block}
    if {**got, "dynamic": None} != {**want, "dynamic": None} or got["dynamic"] != dynamic:
        raise CheckpointError(
            f"layer {name!r}: {weight_type} weights take {weight_type} input activations "
            f"{ {**want, 'dynamic': dynamic} }, got {dict(inputs)}"
        )
    return ActivationQuant(weight_type, dynamic=weight_type != "nvfp4")


def fp4_scheme_of(
    ct_format: str, weights: Mapping[str, Any], inputs: Mapping[str, Any] | None, name: str
) -> QuantScheme:
    """Our scheme for a microscaled group, whose args must be the format's own."""
    for fmt_name, (packed, strategy, _, weight_type) in FP4_PACKED.items():
        if packed != ct_format:
            continue
        weight = WeightQuant(type=weight_type)
        got = {k: weights.get(k) for k in ("num_bits", "type", "symmetric", "strategy")}
        want = {"num_bits": weight.bits, "type": "float", "symmetric": True, "strategy": strategy}
        if got != want or weights.get("group_size") != weight.group_size:
            raise CheckpointError(
                f"layer {name!r}: {ct_format} weights must be {want} with group_size "
                f"{weight.group_size} ({fmt_name}), got {dict(weights)}"
            )
        return QuantScheme(weight, _activation_of(weight_type, strategy, inputs, name))
    raise CheckpointError(f"layer {name!r}: {ct_format!r} is not a microscaled format")


def check_declared_fp4_layer(
    name: str, scheme: QuantScheme, local: Mapping[str, TensorEntry], n: int, k: int
) -> None:
    """The headers' microscaled tensors fit the model's ``(N, K)`` linear."""
    weight_type = scheme.weight.type
    bits, block, scale_dtype, values_key, _ = TYPE_FIELDS[weight_type]
    what = f"{n}x{k} in blocks of {block}"
    if k % block:
        raise CheckpointError(f"layer {name!r}: K={k} is not a multiple of the block {block}")
    values = ((n, k), torch.float8_e4m3fn) if bits == 8 else ((n, k // 2), torch.uint8)
    expected = {values_key: values, "weight_scale": ((n, k // block), scale_dtype)}
    if weight_type == "nvfp4":
        expected["weight_global_scale"] = ((1,), torch.float32)
    if scheme.static_activation:
        expected["input_global_scale"] = ((1,), torch.float32)
    for key, (shape, dtype) in expected.items():
        entry = local.get(key)
        if entry is None:
            raise CheckpointError(f"layer {name!r}: tensor {key!r} is missing")
        if entry.shape != shape or entry.dtype != dtype:
            raise CheckpointError(
                f"tensor {name}.{key}: {entry.dtype} {entry.shape}, expected {dtype} {shape} "
                f"for the model's layer ({what})"
            )
    if "bias" in local and local["bias"].shape != (n,):
        raise CheckpointError(f"tensor {name}.bias: shape {local['bias'].shape}, expected ({n},)")


def _positive_global_scale(local: dict[str, torch.Tensor], key: str, name: str) -> torch.Tensor:
    scale = hf.take(local, key, name)
    if not (bool(torch.isfinite(scale).all()) and bool((scale > 0).all())):
        raise CheckpointError(f"tensor {name}.{key}: must be finite and > 0")
    return scale


def fp4_layer(name: str, local: dict[str, torch.Tensor], scheme: QuantScheme, dtype) -> QuantLinear:
    """A ``QuantLinear`` holding a microscaled layer's tensors as they are."""
    values = hf.take(local, TYPE_FIELDS[scheme.weight.type][3], name)
    packs = scheme.weight.bits == 4
    n, k = values.shape[0], values.shape[1] * (2 if packs else 1)
    bias = local.pop("bias", None)
    layer = QuantLinear(k, n, scheme, bias is not None, dtype)
    layer.qweight.copy_(values)
    scales = hf.take(local, "weight_scale", name)
    if layer.weight_format.has_global_scale:
        global_scale = _positive_global_scale(local, "weight_global_scale", name)
        if not bool(torch.isfinite(scales.float()).all()):
            raise CheckpointError(f"tensor {name}.weight_scale: holds a NaN E4M3 scale")
        layer.global_scale.copy_(global_scale)
    elif bool((scales == 255).any()):
        raise CheckpointError(f"tensor {name}.weight_scale: holds E8M0 255 (NaN)")
    if not packs and not bool(torch.isfinite(values.float()).all()):
        raise CheckpointError(f"tensor {name}.weight: holds a NaN E4M3 value")
    if layer.input_scale is not None:
        layer.input_scale.copy_(_positive_global_scale(local, "input_global_scale", name))
    layer.scales.copy_(scales)
    if bias is not None:
        layer.bias.copy_(bias)
    return layer
