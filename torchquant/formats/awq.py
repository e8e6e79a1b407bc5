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

from torchquant.checkpoint.names import names_for_model
from torchquant.errors import CheckpointError
from torchquant.formats import hf_checkpoint as hf
from torchquant.formats import int_layers
from torchquant.formats.config_fields import MISSING, FieldTable
from torchquant.formats.packing_variants import pack_awq, unpack_awq
from torchquant.formats.serving import IntLayout, warn_if_unservable
from torchquant.modules import QuantLinear

QUANT_METHOD = "awq"
VERSION = "gemm"
BITS = 4
# AutoAWQ, transformers' AwqConfig and GPTQModel fields; anything else is refused
FIELDS = FieldTable(
    "AWQ",
    read={
        "quant_method": "the format: 'awq'",
        "method": "GPTQModel's name for the quantization method: 'awq'",
        "bits": "bits per code: 4 (the GEMM layout)",
        "w_bit": "AutoAWQ's name for bits; must agree with it",
        "group_size": "input columns per scale and zero point; -1: one group per row",
        "q_group_size": "AutoAWQ's name for group_size; must agree with it",
        "zero_point": "false: symmetric, every zero point is 8 (qzeros may be absent)",
        "version": "the packing: 'gemm' only",
        "format": "GPTQModel's name for version; must agree with it",
        "checkpoint_format": "GPTQModel's name for version; must agree with it",
        "pack_dtype": "word type of qweight and qzeros: int32 only",
        "backend": "'llm-awq' means the GEMV_FAST packing, refused; others name a loader",
        "desc_act": "act-order: AWQ groups are contiguous, so true is refused",
        "sym": "GPTQModel's symmetry flag; type-checked, zero_point decides",
        "lm_head": "true: a quantized lm_head, refused",
        "dynamic": "per-module overrides: refused unless empty",
        "modules_to_fuse": "fused attention/MLP modules: refused unless empty",
        "modules_to_not_convert": "float layers; type-checked, the tensors decide",
    },
    ignored={
        "meta": "GPTQModel's record of the tool, version and calibration settings",
        "do_fuse": "a loader option (fuse modules at load time)",
        "fuse_max_seq_len": "a loader option for fused modules",
        "exllama_config": "a kernel choice for loaders",
        "true_sequential": "calibration order; the weights are final",
        "damp_percent": "calibration damping; the weights are final",
        "damp_auto_increment": "calibration damping; the weights are final",
        "static_groups": "a GPTQ calibration option; AWQ groups are contiguous",
        "mse": "calibration clipping search; the weights are final",
        "act_group_aware": "a GPTQ calibration option; the weights are final",
    },
)


# -- config


def parse_awq_config(qc: object) -> dict[str, Any]:
    """Validated ``{group_size, zero_point}``; refuses other layouts and unknown fields.

    Every field is type-checked and every failure is a :class:`CheckpointError`
    naming the field.
    """
    qc = FIELDS.check_object(qc)
    FIELDS.str_field(qc, "quant_method", (QUANT_METHOD,))
    if "method" in qc:
        FIELDS.str_field(qc, "method", (QUANT_METHOD,))
    version = FIELDS.synonyms(
        qc,
        ("version", "format", "checkpoint_format"),
        lambda f: FIELDS.str_field(qc, f, (VERSION, "gemv", "gemv_fast", "llm-awq", "marlin")),
    )
    if version not in (MISSING, VERSION):
        raise CheckpointError(
            f"AWQ version {version!r} is not supported; this torchquant reads the "
            f"{VERSION!r} layout only"
        )
    bits = FIELDS.synonyms(qc, ("bits", "w_bit"), lambda f: FIELDS.int_field(qc, f))
    if bits not in (MISSING, BITS):
        raise CheckpointError(f"{FIELDS.where('bits')}={bits}: the GEMM layout holds 4-bit codes")
    group = FIELDS.synonyms(qc, ("group_size", "q_group_size"), lambda f: FIELDS.int_field(qc, f))
    if group is MISSING:
        raise CheckpointError(f"{FIELDS.where('group_size')} is missing")
    if not (group == -1 or group > 0):
        raise CheckpointError(f"{FIELDS.where('group_size')}={group}: expected -1 or > 0")
    zero_point = FIELDS.bool_field(qc, "zero_point", True)
    if "pack_dtype" in qc:
        FIELDS.str_field(qc, "pack_dtype", ("int32",))
    backend = qc.get("backend")
    if backend is not None and not isinstance(backend, str):
        raise CheckpointError(f"{FIELDS.where('backend')}={backend!r}: expected a string")
    if backend == "llm-awq":
        raise CheckpointError(f"{FIELDS.where('backend')}='llm-awq': GEMV_FAST packing")
    FIELDS.empty_or_null(qc, "desc_act", "act-order groups, which AWQ cannot hold")
    FIELDS.optional_bool(qc, "sym")
    FIELDS.str_list(qc, "modules_to_not_convert")
    FIELDS.empty_or_null(qc, "lm_head", "a quantized lm_head")
    FIELDS.empty_or_null(qc, "dynamic", "per-module overrides")
    FIELDS.empty_or_null(qc, "modules_to_fuse", "fused modules")
    if "meta" in qc and not isinstance(qc["meta"], dict | None):
        raise CheckpointError(f"{FIELDS.where('meta')}: expected an object")
    return {"group_size": group, "zero_point": zero_point}


def read_awq_config(directory: str | Path, config: dict[str, Any]) -> dict[str, Any]:
    qc = config.get("quantization_config")
    if qc is None:
        raise CheckpointError(f"{directory}: config.json has no AWQ quantization_config")
    return parse_awq_config(qc)


# -- export


def awq_tensors(weights: int_layers.IntLayerWeights, name: str) -> dict[str, torch.Tensor]:
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
    weights = {name: int_layers.exchange_weights_of(layer, name) for name, layer in layers.items()}
    groups = {w.group_size for w in weights.values()}
    if len(groups) != 1:
        raise CheckpointError(
            f"AWQ holds one group size for the whole model, but the layers use {sorted(groups)}; "
            "a group size that divides every layer's input avoids this"
        )
    for name, w in weights.items():
        if w.bits != BITS:
            raise CheckpointError(f"layer {name!r}: {w.bits}-bit weights; AWQ holds 4-bit only")
    group = groups.pop()
    warn_if_unservable("awq", [IntLayout(BITS, group, False)], "use group size 32, 64 or 128")
    tensors = hf.float_state(model)
    for name, w in weights.items():
        tensors.update({f"{name}.{k}": v for k, v in awq_tensors(w, name).items()})
    names = names_for_model(model)
    kept_float = [names.to_checkpoint(n) for n in hf.linear_layer_names(model) if n not in layers]
    qc = {
        "quant_method": QUANT_METHOD,
        "bits": BITS,
        "group_size": group,
        "zero_point": True,
        "version": VERSION,
        "modules_to_not_convert": sorted(kept_float) or None,
    }
    return hf.write_checkpoint(model, directory, qc, tensors, tokenizer, max_shard_size, overwrite)


# -- import


def awq_layer(local: dict[str, torch.Tensor], parsed: dict[str, Any], name: str) -> QuantLinear:
    """A ``QuantLinear`` from one layer's AWQ tensors (consumed from ``local``).

    With ``zero_point: false`` every zero point is ``2**(bits-1)``: ``qzeros`` may be
    absent, and when present must say so.
    """
    g = parsed["group_size"]
    qweight, scales = hf.take_qweight_and_scales(local, name)
    k, n = qweight.shape[0], qweight.shape[1] * 8
    groups = hf.scale_groups(scales, k, n, g, name)
    codes = unpack_awq(qweight, n, f"{name}.qweight").t()  # (N, K)
    symmetric = not parsed["zero_point"]
    zeros = None
    if "qzeros" in local or not symmetric:
        zeros = unpack_awq(hf.take(local, "qzeros", name), n, f"{name}.qzeros")
        if zeros.shape[0] != groups:
            raise CheckpointError(f"layer {name!r}: qzeros has {zeros.shape[0]} rows, not {groups}")
        zeros = zeros.t().contiguous()
        if symmetric and not bool((zeros == 1 << (BITS - 1)).all()):
            raise CheckpointError(
                f"layer {name!r}: zero_point is false (every zero point {1 << (BITS - 1)}), "
                "but qzeros holds others"
            )
    weights = int_layers.IntLayerWeights(
        codes.contiguous(),
        scales.t().contiguous(),
        None if symmetric else zeros,
        BITS,
        g,
        local.pop("bias", None),
        scales.dtype,
    )
    return int_layers.build_int_layer(weights, symmetric, name)


def load_awq(directory: str | Path) -> nn.Module:
    """Load an AWQ GEMM folder into a ``transformers`` model with ``QuantLinear`` layers.

    The layers take the model's dtype (see :func:`hold_model_dtype`).
    """
    model = hf.load_packed_folder(directory, read_awq_config, "qweight", awq_layer)
    return int_layers.hold_model_dtype(model)
