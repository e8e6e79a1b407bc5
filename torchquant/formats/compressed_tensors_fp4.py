"""FP4 weights in compressed-tensors: ``nvfp4-pack-quantized`` and ``mxfp4-pack-quantized``.

Per layer ``p``: ``p.weight_packed`` uint8 ``(N, K/2)``, two E2M1 codes a byte, the
even column in the low nibble; ``p.weight_scale`` ``(N, K/block)``: float8_e4m3fn
(NVFP4, block 16, ``strategy: tensor_group``) or uint8 E8M0 exponents (MXFP4, block
32, ``strategy: group``); NVFP4 adds ``p.weight_global_scale`` float32 ``(1,)``, the
divisor of every block scale.  These are our buffers bit for bit, so export and
import copy them.  The library cannot hold a partial last block: K must be a
multiple of the block.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from torchquant.checkpoint.safetensors_check import TensorEntry
from torchquant.config import QuantScheme, WeightQuant
from torchquant.errors import CheckpointError
from torchquant.formats import hf_checkpoint as hf
from torchquant.modules import QuantLinear
from torchquant.weights import Fp4Format

# -- our format's name -> (compressed-tensors format, weight strategy, scale dtype, our type)
FP4_PACKED = {
    "NVFP4": ("nvfp4-pack-quantized", "tensor_group", torch.float8_e4m3fn, "nvfp4"),
    "MXFP4": ("mxfp4-pack-quantized", "group", torch.uint8, "mxfp4"),
}
FP4_FORMATS = tuple(ct_format for ct_format, *_ in FP4_PACKED.values())


def fp4_weight_args(fmt: Fp4Format) -> dict[str, Any]:
    """The weight quantization args compressed-tensors writes for ``fmt``."""
    _, strategy, scale_dtype, _ = FP4_PACKED[fmt.name]
    return {
        "num_bits": 4,
        "type": "float",
        "symmetric": True,
        "group_size": fmt.block,
        "strategy": strategy,
        "block_structure": None,
        "dynamic": False,
        "actorder": None,
        "scale_dtype": str(scale_dtype),
        "observer": "minmax",
    }


def fp4_layer_tensors(name: str, layer: QuantLinear) -> tuple[str, dict, dict[str, torch.Tensor]]:
    """(format, weight args, local tensors) of an FP4 layer."""
    fmt = layer.weight_format
    if layer.in_features % fmt.block:
        raise CheckpointError(
            f"layer {name!r}: {fmt.name} with K={layer.in_features} leaves a partial block of "
            f"{layer.in_features % fmt.block}; compressed-tensors needs K a multiple of "
            f"{fmt.block} (save in the native format)"
        )
    out = {"weight_packed": layer.qweight, "weight_scale": layer.scales}
    if fmt.has_global_scale:
        out["weight_global_scale"] = layer.global_scale
    if layer.bias is not None:
        out["bias"] = layer.bias
    return FP4_PACKED[fmt.name][0], fp4_weight_args(fmt), out


def fp4_scheme_of(ct_format: str, weights: Mapping[str, Any], name: str) -> QuantScheme:
    """Our scheme for an FP4 group, whose args must be the format's own."""
    for fmt_name, (packed, strategy, _, weight_type) in FP4_PACKED.items():
        if packed != ct_format:
            continue
        scheme = QuantScheme(WeightQuant(type=weight_type))
        got = {k: weights.get(k) for k in ("num_bits", "type", "symmetric", "strategy")}
        want = {"num_bits": 4, "type": "float", "symmetric": True, "strategy": strategy}
        if got != want or weights.get("group_size") != scheme.weight.group_size:
            raise CheckpointError(
                f"layer {name!r}: {ct_format} weights must be {want} with group_size "
                f"{scheme.weight.group_size} ({fmt_name}), got {dict(weights)}"
            )
        return scheme
    raise CheckpointError(f"layer {name!r}: {ct_format!r} is not an FP4 format")


def check_declared_fp4_layer(
    name: str, ct_format: str, local: Mapping[str, TensorEntry], n: int, k: int
) -> None:
    """The headers' FP4 tensors fit the model's ``(N, K)`` linear."""
    nvfp4 = ct_format == FP4_PACKED["NVFP4"][0]
    block, scale_dtype = (16, torch.float8_e4m3fn) if nvfp4 else (32, torch.uint8)
    what = f"{n}x{k} in blocks of {block}"
    if k % block:
        raise CheckpointError(f"layer {name!r}: K={k} is not a multiple of the block {block}")
    expected = {
        "weight_packed": ((n, k // 2), torch.uint8),
        "weight_scale": ((n, k // block), scale_dtype),
    }
    if nvfp4:
        expected["weight_global_scale"] = ((1,), torch.float32)
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


def fp4_layer(name: str, local: dict[str, torch.Tensor], scheme: QuantScheme, dtype) -> QuantLinear:
    """A ``QuantLinear`` holding an FP4 layer's tensors as they are."""
    packed = hf.take(local, "weight_packed", name)
    n, k = packed.shape[0], packed.shape[1] * 2
    bias = local.pop("bias", None)
    layer = QuantLinear(k, n, scheme, bias is not None, dtype)
    layer.qweight.copy_(packed)
    scales = hf.take(local, "weight_scale", name)
    if layer.weight_format.has_global_scale:
        global_scale = hf.take(local, "weight_global_scale", name)
        if not (bool(torch.isfinite(global_scale).all()) and bool((global_scale > 0).all())):
            raise CheckpointError(f"tensor {name}.weight_global_scale: must be finite and > 0")
        if not bool(torch.isfinite(scales.float()).all()):
            raise CheckpointError(f"tensor {name}.weight_scale: holds a NaN E4M3 scale")
        layer.global_scale.copy_(global_scale)
    elif bool((scales == 255).any()):
        raise CheckpointError(f"tensor {name}.weight_scale: holds E8M0 255 (NaN)")
    layer.scales.copy_(scales)
    if bias is not None:
        layer.bias.copy_(bias)
    return layer
