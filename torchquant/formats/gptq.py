"""GPTQ checkpoints (AutoGPTQ / GPTQModel layout, ``checkpoint_format`` v1 and v2).

Per quantized linear layer ``p`` with ``K`` inputs, ``N`` outputs, ``G`` groups:

- ``p.qweight`` int32 ``(K*bits/32, N)``: unsigned codes packed along the *input*
  dimension, a little-endian bitstream down each column (3-bit codes straddle words);
- ``p.qzeros`` int32 ``(G, N*bits/32)``: zero points packed along the output
  dimension; format v1 stores ``zero - 1``, v2 stores ``zero``;
- ``p.scales`` ``(G, N)``; ``p.g_idx`` int32 ``(K,)``: the group of each input column;
- ``p.bias`` ``(N,)`` when the layer has one.

The weight is ``w[n, k] = (q[k, n] - zero[g_idx[k], n]) * scale[g_idx[k], n]``.
With ``desc_act`` (act-order) ``g_idx`` is a permuted grouping, each group still
``group_size`` columns; such layers load into a ``QuantLinear`` that keeps ``g_idx``,
and layers whose ``g_idx`` is the plain ``k // group_size`` load without one.
``config.json`` carries ``quantization_config`` (``quant_method: gptq``, ``bits``,
``group_size``, ``sym``, ``desc_act``, ``checkpoint_format``); older folders keep it
in ``quantize_config.json`` instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchquant.checkpoint.files import read_json_file
from torchquant.errors import CheckpointError, ConfigError
from torchquant.formats import hf_checkpoint as hf
from torchquant.formats import int_layers
from torchquant.formats.config_fields import MISSING, FieldTable
from torchquant.formats.packing_variants import (
    dense_to_canonical,
    pack_columns,
    pack_rows,
    unpack_columns,
)
from torchquant.formats.serving import IntLayout, warn_if_unservable
from torchquant.modules import QuantLinear

QUANT_METHOD = "gptq"
VERSIONS = ("gptq", "gptq_v2")
BITS = (2, 3, 4, 8)
QUANTIZE_CONFIG_FILE = "quantize_config.json"
# AutoGPTQ, GPTQModel and transformers' GPTQConfig fields; anything else is refused
FIELDS = FieldTable(
    "GPTQ",
    read={
        "quant_method": "the format: 'gptq'",
        "method": "GPTQModel's name for the quantization method: 'gptq'",
        "bits": f"bits per code, one of {BITS}",
        "group_size": "input columns per scale and zero point; -1: one group per row",
        "sym": "zero points implied; type-checked, the stored qzeros decide",
        "desc_act": "act-order; type-checked, the stored g_idx decides",
        "checkpoint_format": "'gptq' (qzeros hold zero - 1) or 'gptq_v2' (zero as is)",
        "format": "GPTQModel's name for checkpoint_format; must agree with it",
        "pack_dtype": "word type of qweight and qzeros: int32 only",
        "lm_head": "true: a quantized lm_head, refused",
        "dynamic": "per-module bits/group overrides: refused unless empty",
        "adapter": "a LoRA (EoRA) adapter added to the output: refused unless null",
        "rotation": "weights stored in a rotated basis: refused unless null",
        "is_marlin_format": "true: Marlin-repacked tensors, refused",
        "modules_to_not_convert": "float layers; type-checked, the tensors decide",
    },
    ignored={
        "meta": "GPTQModel's record of the tool, version and calibration settings",
        "static_groups": "how g_idx was chosen; the stored g_idx is read",
        "damp_percent": "calibration damping; the weights are final",
        "damp_auto_increment": "calibration damping; the weights are final",
        "true_sequential": "calibration order; the weights are final",
        "mse": "calibration clipping search; the weights are final",
        "act_group_aware": "calibration column order; the stored g_idx is read",
        "v2": "GPTQModel's GPTAQ calibration; the weights are final",
        "v2_alpha": "GPTQModel's GPTAQ calibration; the weights are final",
        "model_name_or_path": "where the model came from",
        "model_file_base_name": "the file name AutoGPTQ wrote",
        "tokenizer": "the calibration tokenizer",
        "dataset": "the calibration data",
        "batch_size": "the calibration batch",
        "model_seqlen": "the calibration sequence length",
        "pad_token_id": "the calibration padding",
        "max_input_length": "an exllama buffer size for loaders",
        "cache_block_outputs": "a calibration memory option",
        "block_name_to_quantize": "which blocks calibration visited; the tensors decide",
        "module_name_preceding_first_block": "a calibration hook point",
        "modules_in_block_to_quantize": "which layers were quantized; the tensors decide",
        "use_cuda_fp16": "a kernel choice for loaders",
        "use_exllama": "a kernel choice for loaders",
        "exllama_config": "a kernel choice for loaders",
        "backend": "a kernel choice for loaders",
    },
)


# -- config


def _version(qc: dict[str, Any], field: str) -> str:
    value = qc[field]
    if not isinstance(value, str) or value.lower() not in VERSIONS:
        raise CheckpointError(
            f"GPTQ {field} {value!r} is not supported; this torchquant reads {VERSIONS}"
        )
    return value.lower()


def parse_gptq_config(qc: object) -> dict[str, Any]:
    """Validated ``{bits, group_size, sym, version}``; refuses what would change the weights.

    Every field is type-checked (``bits: 4.0`` or ``sym: 1`` is refused, naming the
    field) and every failure is a :class:`CheckpointError`.
    """
    qc = FIELDS.check_object(qc)
    for field in ("quant_method", "method"):
        if field in qc:
            FIELDS.str_field(qc, field, (QUANT_METHOD,))
    version = FIELDS.synonyms(qc, ("checkpoint_format", "format"), lambda f: _version(qc, f))
    version = "gptq" if version is MISSING else version
    bits = FIELDS.int_field(qc, "bits")
    if bits not in BITS:
        raise CheckpointError(f"{FIELDS.where('bits')}={bits}: expected one of {BITS}")
    group = FIELDS.int_field(qc, "group_size", -1)
    if not (group == -1 or group > 0):
        raise CheckpointError(f"{FIELDS.where('group_size')}={group}: expected -1 or > 0")
    sym = FIELDS.optional_bool(qc, "sym")
    FIELDS.optional_bool(qc, "desc_act")
    FIELDS.str_list(qc, "modules_to_not_convert")
    if "pack_dtype" in qc:
        FIELDS.str_field(qc, "pack_dtype", ("int32",))
    FIELDS.empty_or_null(qc, "lm_head", "a quantized lm_head")
    FIELDS.empty_or_null(qc, "dynamic", "per-module overrides")
    FIELDS.empty_or_null(qc, "adapter", "an adapter added to the layers' output")
    FIELDS.empty_or_null(qc, "rotation", "weights stored in a rotated basis")
    FIELDS.empty_or_null(qc, "is_marlin_format", "Marlin-repacked tensors")
    if "meta" in qc and not isinstance(qc["meta"], dict | None):
        raise CheckpointError(f"{FIELDS.where('meta')}: expected an object")
    return {"bits": bits, "group_size": group, "sym": sym is not False, "version": version}


def read_gptq_config(directory: str | Path, config: dict[str, Any]) -> dict[str, Any]:
    """The ``quantization_config`` of ``config.json``, else ``quantize_config.json``."""
    qc = config.get("quantization_config")
    path = Path(directory) / QUANTIZE_CONFIG_FILE
    if qc is None and os.path.lexists(path):  # a FIFO or a dangling link is refused by name
        qc = read_json_file(path, QUANTIZE_CONFIG_FILE)
    if qc is None:
        raise CheckpointError(f"{directory}: no GPTQ quantization_config or {QUANTIZE_CONFIG_FILE}")
    return parse_gptq_config(qc)


# -- export


def gptq_tensors(
    weights: int_layers.IntLayerWeights, version: str, name: str
) -> dict[str, torch.Tensor]:
    """The GPTQ tensors of one layer (group sizes must divide ``K``: regroup first).

    ``g_idx`` is the layer's act-order grouping when it has one, else ``k // group``.
    """
    n, k = weights.shape
    bits, g = weights.bits, weights.group_size
    zeros = weights.zeros_or_implied().to(torch.int16)  # (N, G)
    if version == "gptq":
        if bool((zeros == 0).any()):
            raise CheckpointError(
                f"layer {name!r}: a zero point of 0 cannot be stored in GPTQ v1 (it stores "
                "zero - 1); save with checkpoint_format 'gptq_v2' or symmetric weights"
            )
        zeros = zeros - 1
    group = k if g == -1 else g
    out = {
        "qweight": pack_rows(weights.codes.t(), bits, f"{name}.qweight"),
        "qzeros": pack_columns(zeros.t().to(torch.uint8).contiguous(), bits, f"{name}.qzeros"),
        "scales": weights.scales.t().contiguous(),
        "g_idx": (torch.arange(k) // group).to(torch.int32)
        if weights.g_idx is None
        else weights.g_idx.to(torch.int32),
    }
    if weights.bias is not None:
        out["bias"] = weights.bias
    return out


def _common_layout(layers: dict[str, int_layers.IntLayerWeights]) -> tuple[int, int, bool]:
    layouts = {(w.bits, w.group_size, w.zeros is None) for w in layers.values()}
    if len(layouts) != 1:
        raise CheckpointError(
            f"GPTQ holds one bit width, group size and symmetry for the whole model, but the "
            f"layers use {sorted(layouts)} (bits, group, symmetric); a group size that divides "
            "every layer's input, or the compressed-tensors format, avoids this"
        )
    return layouts.pop()


def save_gptq(
    model: nn.Module,
    directory: str | Path,
    *,
    version: str = "gptq",
    tokenizer: Any = None,
    max_shard_size: int | str = hf.DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> Path:
    """Write a converted Hugging Face model as a GPTQ checkpoint folder (v1 or v2)."""
    if version not in VERSIONS:
        raise ConfigError(f"version={version!r}: expected one of {VERSIONS}")
    layers = hf.quantized_layers(model)
    if not layers:
        raise CheckpointError("model has no QuantLinear layers; run convert_model first")
    weights = {name: int_layers.exchange_weights_of(layer, name) for name, layer in layers.items()}
    for name, w in weights.items():
        if w.bits not in BITS:
            raise CheckpointError(f"layer {name!r}: {w.bits}-bit weights; GPTQ holds {BITS}")
    bits, group, sym = _common_layout(weights)
    warn_if_unservable(
        "gptq",
        [IntLayout(bits, group, sym)],
        "vLLM's Marlin kernel needs symmetric 4/8-bit GPTQ: quantize with symmetric=True "
        "(--symmetric), or save as compressed-tensors, which it serves asymmetric",
    )
    # act-order layers need readers to honour g_idx; plain layers' g_idx reads the same
    desc_act = any(w.g_idx is not None for w in weights.values())
    tensors = hf.float_state(model)
    for name, w in weights.items():
        tensors.update({f"{name}.{k}": v for k, v in gptq_tensors(w, version, name).items()})
    qc = {
        "quant_method": QUANT_METHOD,
        "bits": bits,
        "group_size": group,
        "sym": sym,
        "desc_act": desc_act,
        "static_groups": False,
        "checkpoint_format": version,
        "true_sequential": True,
    }
    extra = {QUANTIZE_CONFIG_FILE: qc}
    return hf.write_checkpoint(
        model, directory, qc, tensors, tokenizer, max_shard_size, overwrite, extra_json=extra
    )


# -- import


def gptq_layer(local: dict[str, torch.Tensor], parsed: dict[str, Any], name: str) -> QuantLinear:
    """A ``QuantLinear`` from one layer's GPTQ tensors (consumed from ``local``)."""
    bits, g = parsed["bits"], parsed["group_size"]
    qweight, scales = hf.take_qweight_and_scales(local, name)
    n = qweight.shape[1]
    k = qweight.shape[0] * 32 // bits
    if qweight.dtype != torch.int32 or qweight.shape[0] * 32 != k * bits:
        raise CheckpointError(f"layer {name!r}: qweight must be int32 (K*bits/32, N)")
    packed = dense_to_canonical(qweight.t().contiguous(), bits, k)  # the same bitstream, (N, .)
    groups = hf.scale_groups(scales, k, n, g, name)
    zeros = unpack_columns(hf.take(local, "qzeros", name), bits, n, f"{name}.qzeros")
    if zeros.shape[0] != groups:
        raise CheckpointError(f"layer {name!r}: qzeros has {zeros.shape[0]} rows, not {groups}")
    if parsed["version"] == "gptq":
        zeros = ((zeros.to(torch.int16) + 1) & ((1 << bits) - 1)).to(torch.uint8)
    zeros = zeros.t().contiguous()  # (N, G)
    symmetric = bool(torch.all(zeros == 1 << (bits - 1)))
    weights = int_layers.IntLayerWeights(
        None,
        scales.t().contiguous(),
        None if symmetric else zeros,
        bits,
        g,
        local.pop("bias", None),
        scales.dtype,
        packed,
        k,
        g_idx=local.pop("g_idx", None),
    )
    return int_layers.build_int_layer(weights, symmetric, name)


def load_gptq(directory: str | Path) -> nn.Module:
    """Load a GPTQ folder into a ``transformers`` model with ``QuantLinear`` layers.

    The layers that carry a ``qweight`` are quantized; the model is built on the
    meta device and every tensor comes straight from the files.  The layers take the
    model's dtype (see :func:`hold_model_dtype`).
    """
    model = hf.load_packed_folder(directory, read_gptq_config, "qweight", gptq_layer)
    return int_layers.hold_model_dtype(model)
