"""AWQ checkpoints in the GEMM layout (AutoAWQ ``version: gemm``).

Per quantized linear layer ``p`` with ``K`` inputs, ``N`` outputs, ``G`` groups:

- ``p.qweight`` int32 ``(K, N/8)``: 4-bit codes packed along the *output* dimension,
  eight per word, nibble ``i`` holding column ``[0, 2, 4, 6, 1, 3, 5, 7][i]`` of its
  block of eight;
- ``p.qzeros`` int32 ``(G, N/8)``: zero points, packed the same way, stored as is;
- ``p.scales`` ``(G, N)``; ``p.bias`` ``(N,)`` when the layer has one.

The weight is ``w[n, k] = (q[k, n] - zero[k // group, n]) * scale[k // group, n]``:
groups are always contiguous, so act-order weights (a ``g_idx``) cannot be stored.
``config.json`` carries ``quantization_config`` (``quant_method: awq``, ``bits``,
``group_size``, ``zero_point``, ``version``, ``modules_to_not_convert``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchquant.errors import CheckpointError, ConfigError
from torchquant.formats import hf_checkpoint as hf
from torchquant.formats.checkpoint_names import names_for_model
from torchquant.formats.int_layers import (
    IntLayerWeights,
    build_int_layer,
    int_weights_of,
    regroup_evenly,
)
from torchquant.formats.packing_variants import pack_awq, unpack_awq
from torchquant.modules import QuantLinear
from torchquant.save_guard import model_sources

QUANT_METHOD = "awq"
VERSION = "gemm"
BITS = 4
SEMANTIC_FIELDS = {
    "quant_method",
    "bits",
    "group_size",
    "zero_point",
    "version",
    "modules_to_not_convert",
    "modules_to_fuse",
}
# loader hints: they pick kernels or fusing, not what the weights are
INFORMATIONAL_FIELDS = {"backend", "do_fuse", "fuse_max_seq_len", "exllama_config"}


# -- config


def parse_awq_config(qc: object) -> dict[str, Any]:
    """Validated ``{group_size}``; refuses other layouts and fields we do not understand."""
    if not isinstance(qc, dict):
        raise ConfigError(f"AWQ quantization_config must be an object, got {type(qc).__name__}")
    unknown = sorted(set(qc) - SEMANTIC_FIELDS - INFORMATIONAL_FIELDS)
    if unknown:
        raise ConfigError(
            f"AWQ quantization_config: unknown field(s) {unknown}; this torchquant understands "
            f"{sorted(SEMANTIC_FIELDS | INFORMATIONAL_FIELDS)}"
        )
    if qc.get("quant_method") != QUANT_METHOD:
        raise ConfigError(f"quantization_config.quant_method={qc.get('quant_method')!r}")
    version = str(qc.get("version", VERSION)).lower()
    if version != VERSION:
        raise CheckpointError(
            f"AWQ version {qc.get('version')!r} is not supported; this torchquant reads the "
            f"{VERSION!r} layout only"
        )
    if qc.get("bits", BITS) != BITS:
        raise ConfigError(f"AWQ bits={qc.get('bits')!r}: the GEMM layout holds 4-bit weights")
    if qc.get("zero_point", True) is not True:
        raise CheckpointError("AWQ zero_point=false checkpoints are not supported")
    if qc.get("modules_to_fuse"):
        raise CheckpointError("AWQ modules_to_fuse (fused modules) are not supported")
    group = qc.get("group_size")
    if type(group) is not int or not (group == -1 or group > 0):
        raise ConfigError(f"AWQ group_size={group!r}: expected -1 or a positive int")
    return {"group_size": group}


def read_awq_config(directory: str | Path, config: dict[str, Any]) -> dict[str, Any]:
    qc = config.get("quantization_config")
    if qc is None:
        raise CheckpointError(f"{directory}: config.json has no AWQ quantization_config")
    return parse_awq_config(qc)


# -- export


def awq_tensors(weights: IntLayerWeights, name: str) -> dict[str, torch.Tensor]:
    """The AWQ GEMM tensors of one 4-bit layer (group sizes must divide ``K``)."""
    if weights.bits != BITS:
        raise CheckpointError(f"layer {name!r}: {weights.bits}-bit weights; AWQ holds 4-bit only")
    if weights.g_idx is not None:
        raise CheckpointError(
            f"layer {name!r}: act-order weights (groups given by a g_idx) cannot be stored in "
            "AWQ, whose groups are contiguous; save as gptq or compressed-tensors, or quantize "
            "with GPTQ static_groups"
        )
    out = {
        "qweight": pack_awq(weights.codes.t().contiguous(), f"{name}.qweight"),
        "qzeros": pack_awq(weights.zeros_or_implied().t().contiguous(), f"{name}.qzeros"),
        "scales": weights.scales.t().contiguous(),
    }
    if weights.bias is not None:
        out["bias"] = weights.bias
    return out


def save_awq(
    model: nn.Module,
    directory: str | Path,
    *,
    tokenizer: Any = None,
    max_shard_size: int | str = hf.DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> Path:
    """Write a converted Hugging Face model (4-bit INT weights) as an AWQ GEMM folder."""
    layers = hf.quantized_layers(model)
    if not layers:
        raise CheckpointError("model has no QuantLinear layers; run convert_model first")
    weights = {name: regroup_evenly(int_weights_of(layer, name)) for name, layer in layers.items()}
    groups = {w.group_size for w in weights.values()}
    if len(groups) != 1:
        raise CheckpointError(
            f"AWQ holds one group size for the whole model, but the layers use {sorted(groups)}; "
            "a group size that divides every layer's input avoids this"
        )
    tensors = hf.float_state(model)
    for name, w in weights.items():
        tensors.update({f"{name}.{k}": v for k, v in awq_tensors(w, name).items()})
    names = names_for_model(model)
    kept_float = [names.to_checkpoint(n) for n in hf.linear_layer_names(model) if n not in layers]
    qc = {
        "quant_method": QUANT_METHOD,
        "bits": BITS,
        "group_size": groups.pop(),
        "zero_point": True,
        "version": VERSION,
        "modules_to_not_convert": sorted(kept_float) or None,
    }
    config = hf.model_config_dict(model)
    config["quantization_config"] = qc
    return hf.write_checkpoint(
        directory, config, tensors, tokenizer=tokenizer, max_shard_size=max_shard_size,
        overwrite=overwrite, sources=model_sources(model),
    )


# -- import


def _take(local: dict[str, torch.Tensor], key: str, name: str) -> torch.Tensor:
    if key not in local:
        raise CheckpointError(f"layer {name!r}: tensor {key!r} is missing")
    return local.pop(key)


def awq_layer(local: dict[str, torch.Tensor], parsed: dict[str, Any], name: str) -> QuantLinear:
    """A ``QuantLinear`` from one layer's AWQ tensors (consumed from ``local``)."""
    g = parsed["group_size"]
    qweight = _take(local, "qweight", name)
    scales = _take(local, "scales", name)
    if qweight.dim() != 2 or scales.dim() != 2:
        raise CheckpointError(f"layer {name!r}: qweight and scales must be 2-D")
    k, n = qweight.shape[0], qweight.shape[1] * 8
    groups = 1 if g == -1 else -(-k // g)
    if scales.shape != (groups, n):
        raise CheckpointError(
            f"layer {name!r}: scales have shape {tuple(scales.shape)}, expected ({groups}, {n})"
        )
    codes = unpack_awq(qweight, n, f"{name}.qweight").t()  # (N, K)
    zeros = unpack_awq(_take(local, "qzeros", name), n, f"{name}.qzeros")
    if zeros.shape[0] != groups:
        raise CheckpointError(f"layer {name!r}: qzeros has {zeros.shape[0]} rows, not {groups}")
    weights = IntLayerWeights(
        codes.contiguous(),
        scales.t().contiguous(),
        zeros.t().contiguous(),
        BITS,
        g,
        local.pop("bias", None),
        scales.dtype,
    )
    return build_int_layer(weights, False, name)


def load_awq(directory: str | Path) -> nn.Module:
    """Load an AWQ GEMM folder into a ``transformers`` model with ``QuantLinear`` layers."""
    return hf.load_packed_folder(directory, read_awq_config, "qweight", awq_layer)
