"""The compressed-tensors checkpoint format (written by llm-compressor, served by vLLM).

Per quantized ``nn.Linear`` named ``p`` the folder holds:

- ``pack-quantized`` (INTn weight-only, n = 2..8): ``p.weight_packed`` int32
  ``(N, ceil(K*n/32))``, the signed codes plus ``2**(n-1)`` as a little-endian
  bitstream along the input dimension; ``p.weight_scale`` ``(N, G)`` (``(N, 1)`` per
  channel); ``p.weight_shape`` int64 ``[N, K]``; for asymmetric weights
  ``p.weight_zero_point`` int32 ``(ceil(N*n/32), G)``, the zero points (shifted the same
  way) packed along the *output* dimension; for act-order (GPTQ ``actorder: group``)
  ``p.weight_g_idx`` int32 ``(K,)``, the group of each input column, every group
  ``group_size`` columns wide (the library sorts columns by group, then cuts them
  into equal groups).
  W4A8 (``w4a8``, ``w4a8-fp8``) is the same INT4 symmetric weight with dynamic per-token
  ``input_activations`` (``type`` int or float, 8 bits), as the library's ``W4A8`` and
  ``W4AFP8`` presets and vLLM's ``CompressedTensorsW4A8Int`` / ``CompressedTensorsW4A8Fp8``.
- ``int-quantized`` (W8A8 INT8): ``p.weight`` int8 ``(N, K)``, ``p.weight_scale``
  ``(N, 1)``, ``p.input_scale`` ``(1,)`` for static activations (with ``p.input_zero_point``
  ``(1,)`` int8 for asymmetric ones, ``input_activations.symmetric: false``; INT4
  activations are ``num_bits: 4``, dynamic and symmetric).
- ``float-quantized`` (FP8 W8A8) / ``naive-quantized`` (FP8 weight-only):
  ``p.weight`` float8_e4m3fn ``(N, K)``, ``p.weight_scale`` ``(N, 1)`` or ``(1,)``; for
  ``strategy: block`` (``block_structure [bn, bk]``) ``(ceil(N/bn), ceil(K/bk))``, with
  input activations ``strategy: group`` (dynamic, ``group_size`` bk) when quantized.
- ``nvfp4-pack-quantized`` / ``mxfp4-pack-quantized`` / ``mxfp8-quantized`` (microscaled,
  weight-only or with activations of the same format): packed E2M1 ``p.weight_packed``
  uint8 ``(N, K/2)`` or E4M3 ``p.weight`` with block scales, see ``compressed_tensors_fp4``.

Signed codes ``q`` with zero point ``zp`` are our unsigned codes and zeros minus
``2**(n-1)``, so ``(q - zp) * s`` equals our ``(code - zero) * s`` exactly.
``config.json`` carries ``quantization_config`` with ``config_groups`` (targets and
quantization args), ``ignore``, ``format`` and ``version``.

compressed-tensors 0.19 dropped act-order groups: its readers refuse ``actorder:
group``, so act-order exports are for readers built on compressed-tensors 0.18 or
older (GPTQ's ``desc_act`` checkpoints carry the same weights).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchquant.checkpoint.names import CheckpointNames, names_for_model
from torchquant.checkpoint.safetensors_check import TensorEntry
from torchquant.config import ActivationQuant, QuantScheme, WeightQuant
from torchquant.config.matching import compile_regex, match_regex
from torchquant.config.scheme import MICROSCALED_BLOCKS
from torchquant.errors import CheckpointConfigError, CheckpointError, ConfigError
from torchquant.formats import hf_checkpoint as hf
from torchquant.formats import int_layers
from torchquant.formats.compressed_tensors_checks import (
    check_config_types,
    check_declared_layer,
    check_layer_values,
)
from torchquant.formats.compressed_tensors_fp4 import (
    FP4_FORMATS,
    MICROSCALED_WEIGHT_FORMATS,
    check_declared_fp4_layer,
    fp4_layer,
    fp4_layer_tensors,
    fp4_scheme_of,
    microscaled_input_args,
)
from torchquant.formats.compressed_tensors_mx_rounding import (
    folder_roundings,
    rounding_metadata,
    scheme_roundings,
    with_roundings,
)
from torchquant.formats.packing_variants import (
    dense_to_canonical,
    dense_width,
    pack_dense,
    unpack_rows,
)
from torchquant.modules import QuantLinear
from torchquant.plan import split_experts_for_names
from torchquant.weights import weight_format

QUANT_METHOD = "compressed-tensors"
# the compressed-tensors release whose layout we write (dense packing for every width)
WRITTEN_VERSION = "0.20.0"
SUPPORTED_MAJOR = 0
MIN_MINOR = 7

TOP_LEVEL_FIELDS = {
    "quant_method",
    "format",
    "quantization_status",
    "version",
    "config_groups",
    "ignore",
    "kv_cache_scheme",
    "global_compression_ratio",
    "sparsity_config",
    "transform_config",
    "moe_sparsity_config",
}
GROUP_FIELDS = {"targets", "weights", "input_activations", "output_activations", "format"}
ARGS_FIELDS = {
    "num_bits",
    "type",
    "symmetric",
    "group_size",
    "strategy",
    "block_structure",
    "dynamic",
    "actorder",
    "scale_dtype",
    "zp_dtype",
    "observer",
    "observer_kwargs",
}
FORMATS = ("pack-quantized", "int-quantized", "float-quantized", "naive-quantized", *FP4_FORMATS)
# -- (args type, activations quantized) -> the format of weights stored dense ``(N, K)``
DENSE_FORMATS = {
    ("int", True): "int-quantized",
    ("float", True): "float-quantized",
    ("float", False): "naive-quantized",
}
# "weight"/"static" reorder only during calibration; "group"/"dynamic" (older releases:
# true) store a weight_g_idx.  Either way the tensors say how to read the weight.
ACTORDERS = (None, False, True, "weight", "static", "group", "dynamic")


# -- export


def _weight_args(scheme: QuantScheme, group_size: int, act_order: bool = False) -> dict[str, Any]:
    """Weight quantization args for ``group_size`` (-1 per channel, 0 per tensor)."""
    w = scheme.weight
    strategy = {-1: "channel", 0: "tensor"}.get(group_size, "group")
    strategy = strategy if w.block is None else "block"
    group = group_size if group_size > 0 else None
    args = _args(w.bits, weight_format(scheme).args_type, w.symmetric, strategy, group)
    if w.block is not None:
        args["block_structure"] = list(w.block)
    if act_order:
        args["actorder"] = "group"
    return args


def _args(bits: int, kind: str, sym: bool, strategy: str, group: int | None, dynamic=False):
    return {
        "num_bits": bits,
        "type": kind,
        "symmetric": sym,
        "group_size": group,
        "strategy": strategy,
        "block_structure": None,
        "dynamic": dynamic,
        "actorder": None,
        "observer": None if dynamic else "minmax",
    }


def _input_args(act: ActivationQuant | None, name: str) -> dict[str, Any] | None:
    if act is None:
        return None
    if act.type in MICROSCALED_BLOCKS:
        return microscaled_input_args(act, name)
    if act.percentile != 100.0:
        raise CheckpointError(
            f"layer {name!r}: percentile activation scales ({act.percentile}) have no "
            "compressed-tensors equivalent; use max-abs scales or the native format"
        )
    kind = "int" if act.type in ("int8", "int4") else "float"
    strategy = act.granularity if act.dynamic else "tensor"
    bits = 4 if act.type == "int4" else 8
    return _args(bits, kind, act.symmetric, strategy, act.group_size, dynamic=act.dynamic)


def _layer_tensors(name: str, layer: QuantLinear) -> tuple[str, dict, dict[str, torch.Tensor]]:
    """(format, weight args, local tensors) of one layer."""
    scheme = layer.scheme
    w = scheme.weight
    if layer.smooth_scale is not None:
        raise CheckpointError(
            f"layer {name!r}: has a SmoothQuant input divisor, which compressed-tensors cannot "
            "hold; fold it into the preceding layer or save in the native format"
        )
    if isinstance(layer.weight_format, MICROSCALED_WEIGHT_FORMATS):
        return fp4_layer_tensors(name, layer)
    out: dict[str, torch.Tensor] = {}
    if layer.bias is not None:
        out["bias"] = layer.bias
    fmt = layer.weight_format
    if fmt.is_int and (scheme.activation is None or scheme.is_w4a8):
        iw = int_layers.exchange_weights_of(layer, name, with_activation=True)
        n, k = iw.shape
        out["weight_packed"] = pack_dense(iw.codes, iw.bits)
        out["weight_scale"] = iw.scales
        out["weight_shape"] = torch.tensor([n, k], dtype=torch.int64)
        if iw.zeros is not None:
            out["weight_zero_point"] = pack_dense(iw.zeros.t().contiguous(), iw.bits).t()
        if iw.g_idx is not None:
            out["weight_g_idx"] = iw.g_idx
        ct_format = "pack-quantized"
        args = _weight_args(scheme, iw.group_size, act_order=iw.g_idx is not None)
    else:  # -- the stored (N, K) weight as it is, one scale per channel or per tensor
        out["weight"] = layer.qweight
        per_channel = w.group_size == -1
        per_block = w.block is not None  # -- (ceil(N/bn), ceil(K/bk)) in both conventions
        shape = layer.scales.shape if per_block else (-1, 1) if per_channel else (1,)
        out["weight_scale"] = layer.scales.reshape(shape)
        ct_format = DENSE_FORMATS[(fmt.args_type, scheme.activation is not None)]
        args = _weight_args(scheme, w.group_size)
    if scheme.activation is not None and not scheme.activation.dynamic:
        out["input_scale"] = layer.input_scale.reshape(1)
    if layer.input_zero_point is not None:
        out["input_zero_point"] = layer.input_zero_point.reshape(1)
    return ct_format, args, out


def _original_layer_types(model: nn.Module) -> dict[str, str]:
    """Class names of the layers the model had before conversion (from a meta copy).

    Fused experts the model has split (``QuantExperts``) are split in the copy too, so
    their per-expert projections count as the ``nn.Linear`` layers they now are.
    """
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        skeleton = type(model)._from_config(model.config)
    with warnings.catch_warnings():  # -- unknown fused experts were reported at conversion
        warnings.simplefilter("ignore")
        split_experts_for_names(skeleton, (name for name, _ in model.named_modules()))
    return hf.linear_layer_names(skeleton)


def quantization_config_for(
    model: nn.Module,
) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, str]]:
    """The ``quantization_config``, every tensor of ``model`` in compressed-tensors form and
    the shard metadata recording MX scale roundings (``compressed_tensors_mx_rounding``).

    Targets and ignores name layers as the files do; the tensors are keyed by the
    model's names (``hf.write_checkpoint`` stores them under the files' names).
    """
    layers = hf.quantized_layers(model)
    if not layers:
        raise CheckpointError("model has no QuantLinear layers; run convert_model first")
    types = _original_layer_types(model)
    names = names_for_model(model)
    tensors = hf.float_state(model)
    groups: dict[str, dict[str, Any]] = {}
    roundings: dict[str, dict[str, str]] = {}
    for name, layer in layers.items():
        if types.get(name, "Linear") != "Linear":
            raise CheckpointError(
                f"layer {name!r} is a {types[name]}, not nn.Linear; compressed-tensors readers "
                "expect Linear weights (N, K): save this model in the native format"
            )
        fmt, wargs, local = _layer_tensors(name, layer)
        iargs = _input_args(layer.scheme.activation, name)
        rounding = scheme_roundings(layer.scheme)
        key = repr((fmt, sorted(wargs.items()), sorted((iargs or {}).items()), rounding))
        roundings[key] = rounding
        group = groups.setdefault(
            key,
            {
                "targets": [],
                "weights": wargs,
                "input_activations": iargs,
                "output_activations": None,
                "format": fmt,
            },
        )
        group["targets"].append(names.to_checkpoint(name))
        tensors.update({f"{name}.{k}": v for k, v in local.items()})
    ignore = sorted(names.to_checkpoint(n) for n in types if n not in layers)
    if len(groups) == 1:
        # one scheme everywhere: the idiomatic form, every Linear minus the ignored ones
        next(iter(groups.values()))["targets"] = ["Linear"]
    formats = {g["format"] for g in groups.values()}
    config = {
        "quant_method": QUANT_METHOD,
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "version": WRITTEN_VERSION,
        "config_groups": {f"group_{i}": g for i, g in enumerate(groups.values())},
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
    }
    by_group = {f"group_{i}": roundings[key] for i, key in enumerate(groups)}
    return config, tensors, rounding_metadata(by_group)


def save_compressed_tensors(
    model: nn.Module,
    directory: str | Path,
    *,
    tokenizer: Any = None,
    max_shard_size: int | str = hf.DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> Path:
    """Write a converted Hugging Face model as a compressed-tensors checkpoint folder."""
    qconfig, tensors, metadata = quantization_config_for(model)
    return hf.write_checkpoint(
        model,
        directory,
        qconfig,
        tensors,
        tokenizer,
        max_shard_size,
        overwrite,
        shard_metadata=metadata,
    )


# -- import


def _check_fields(data: object, known: set[str], where: str) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise CheckpointConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - known)
    if unknown:
        raise CheckpointConfigError(
            f"{where}: unknown field(s) {unknown}; this torchquant understands {sorted(known)}"
        )
    return data


def _check_version(version: object) -> None:
    m = re.match(r"^(\d+)\.(\d+)", str(version)) if version is not None else None
    if m is None:
        raise CheckpointError(f"quantization_config.version={version!r}: not a version number")
    major, minor = int(m.group(1)), int(m.group(2))
    if major != SUPPORTED_MAJOR or minor < MIN_MINOR:
        raise CheckpointError(
            f"compressed-tensors version {version} is not supported; this torchquant reads "
            f"{SUPPORTED_MAJOR}.{MIN_MINOR} up to (not including) {SUPPORTED_MAJOR + 1}.0"
        )


def _check_patterns(patterns: object, where: str) -> None:
    """Targets and ignores: a list of layer names, class names or ``re:`` expressions."""
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise CheckpointConfigError(f"{where} must be a list of strings, got {patterns!r}")
    for pattern in patterns:
        if pattern.startswith("re:"):
            try:
                compile_regex(pattern[3:], where)
            except ConfigError as exc:
                raise CheckpointConfigError(str(exc)) from None


def parse_quantization_config(qc: object) -> dict[str, Any]:
    """Validate a compressed-tensors ``quantization_config``; refuse what we cannot honour."""
    qc = dict(_check_fields(qc, TOP_LEVEL_FIELDS, "quantization_config"))
    check_config_types(qc)
    if qc.get("quant_method") != QUANT_METHOD:
        raise CheckpointConfigError(f"quantization_config.quant_method={qc.get('quant_method')!r}")
    _check_version(qc.get("version"))
    status = qc.get("quantization_status", "compressed")
    if status != "compressed":
        raise CheckpointError(
            f"quantization_status={status!r}: only compressed checkpoints can be loaded"
        )
    for key in ("sparsity_config", "transform_config", "moe_sparsity_config", "kv_cache_scheme"):
        if qc.get(key):
            raise CheckpointError(f"quantization_config.{key} is set; it is not supported")
    _check_patterns(qc.get("ignore") or [], "quantization_config.ignore")
    groups = qc.get("config_groups")
    if not isinstance(groups, Mapping) or not groups:
        raise CheckpointConfigError("quantization_config.config_groups must be a non-empty mapping")
    for gname, group in groups.items():
        where = f"config_groups.{gname}"
        group = _check_fields(group, GROUP_FIELDS, where)
        for part in ("weights", "input_activations", "output_activations"):
            if group.get(part) is not None:
                _check_fields(group[part], ARGS_FIELDS, f"{where}.{part}")
        if group.get("output_activations") is not None:
            raise CheckpointError(f"{where}: output activation quantization is not supported")
        if not isinstance(group.get("targets"), list) or not group["targets"]:
            raise CheckpointConfigError(f"{where}.targets must be a non-empty list")
        _check_patterns(group["targets"], f"{where}.targets")
        fmt = group.get("format") or qc.get("format")
        if fmt not in FORMATS:
            raise CheckpointError(f"{where}: format {fmt!r} is not supported; expected {FORMATS}")
    return qc


def _matches(pattern: str, name: str, class_name: str, where: str) -> bool:
    """The library's rule: ``re:`` matches a prefix of the name, anything else the name or class."""
    if pattern.startswith("re:"):
        try:
            return match_regex(pattern[3:], name, where, whole=False)
        except ConfigError as exc:
            raise CheckpointConfigError(str(exc)) from None
    return pattern in (name, class_name)


def _assign_groups(
    qc: dict[str, Any], layers: dict[str, str], names: CheckpointNames
) -> dict[str, dict[str, Any]]:
    """Layer name -> its config group (first group whose targets match, minus ``ignore``).

    Patterns may name a layer as the model does or as the checkpoint's files do.
    """
    ignore = qc.get("ignore") or []
    plan = {}
    for name, cls in layers.items():
        aliases = names.all_names(name)
        if any(_matches(p, a, cls, "quantization_config.ignore") for p in ignore for a in aliases):
            continue
        for gname, group in qc["config_groups"].items():
            where = f"config_groups.{gname}.targets"
            if any(_matches(t, a, cls, where) for t in group["targets"] for a in aliases):
                fmt = group.get("format") or qc.get("format")
                plan[name] = {**group, "format": fmt, "group_name": gname}
                break
    if not plan:
        raise CheckpointError("quantization_config targets match no linear layer of the model")
    return plan


def _activation_of(a: dict[str, Any], name: str) -> ActivationQuant:
    """Input activation args: 8-bit (symmetric, or asymmetric INT) or dynamic symmetric
    4-bit INT."""
    bits, sym, is_int = a.get("num_bits"), a.get("symmetric", True), a.get("type") == "int"
    if bits not in (4, 8) or sym not in (True, False) or (bits == 4 and not is_int):
        raise CheckpointError(
            f"layer {name!r}: activations of {bits} bits, type {a.get('type')!r}, symmetric "
            f"{sym!r} are not supported (8-bit int or float, or 4-bit int)"
        )
    dynamic = a.get("dynamic") is True
    gran = a.get("strategy") if dynamic else "tensor"
    if gran not in ("token", "tensor", "group") or a.get("dynamic") not in (True, False):
        raise CheckpointError(f"layer {name!r}: activation strategy {a!r} is not supported")
    act_type = ("int4" if bits == 4 else "int8") if is_int else "fp8"
    group = a.get("group_size") if gran == "group" else None
    try:
        return ActivationQuant(act_type, gran, dynamic, group_size=group, symmetric=sym)
    except ConfigError as exc:
        raise CheckpointError(f"layer {name!r}: unsupported activation args ({exc})") from None


def _scheme_of(group: dict[str, Any], name: str) -> QuantScheme:
    w, a = group.get("weights"), group.get("input_activations")
    if w is None or w.get("num_bits") is None:
        raise CheckpointError(f"layer {name!r}: its config group quantizes no weights")
    if w.get("type") not in ("int", "float"):
        raise CheckpointError(
            f"layer {name!r}: weights of type {w.get('type')!r}; expected 'int' or 'float'"
        )
    bad = w.get("actorder") not in ACTORDERS
    block = w.get("block_structure")
    if w.get("strategy") == "block" and w.get("type") == "float":
        bad = bad or not (isinstance(block, list) and len(block) == 2)
    elif block:
        bad = True
    strategies = ("channel", "group", "tensor", "block")
    if bad or w.get("strategy") not in strategies:
        raise CheckpointError(
            f"layer {name!r}: weight strategy {w.get('strategy')!r} / block / actorder "
            f"{w.get('actorder')!r} is not supported"
        )
    act = None if a is None else _activation_of(a, name)
    try:
        if w.get("type") == "float":
            if w.get("num_bits") != 8 or w.get("strategy") == "group":
                raise ConfigError("FP8 weights must be 8-bit, per channel, tensor or block")
            if w["strategy"] == "block":
                return QuantScheme(WeightQuant("fp8", block=tuple(block)), act)
            gs = -1 if w["strategy"] == "channel" else 0
            return QuantScheme(WeightQuant("fp8", 8, gs, True), act)
        gs = w.get("group_size") if w["strategy"] == "group" else -1
        return QuantScheme(WeightQuant("int", w["num_bits"], gs, bool(w["symmetric"])), act)
    except (ValueError, KeyError, TypeError) as exc:  # ConfigError is a ValueError
        raise CheckpointError(f"layer {name!r}: unsupported quantization args ({exc!r})") from None


def _packed_layer(name, local, scheme: QuantScheme, dtype) -> QuantLinear:
    """A ``pack-quantized`` layer: INTn weight-only, or W4A8 (INT4 with 8-bit activations)."""
    w = scheme.weight
    n, k = (int(v) for v in hf.take(local, "weight_shape", name).tolist())
    words = hf.take(local, "weight_packed", name)
    if words.dim() != 2 or words.shape[0] != n:
        raise CheckpointError(
            f"layer {name!r}: weight_packed {tuple(words.shape)} has not {n} rows"
        )
    codes = packed = None
    if words.dtype == torch.int32 and words.shape[1] == dense_width(k, w.bits):
        packed = dense_to_canonical(words, w.bits, k)  # our bitstream already
    else:
        codes = unpack_rows(words, w.bits, k, f"{name}.weight_packed")
    scales = hf.take(local, "weight_scale", name)
    if scales.dim() == 1:
        scales = scales.reshape(-1, 1)
    zeros = None
    if not w.symmetric:
        zp = hf.take(local, "weight_zero_point", name)
        zeros = unpack_rows(zp.t().contiguous(), w.bits, n, f"{name}.weight_zero_point").t()
    local.pop("weight_zero_point", None)  # symmetric schemes may carry an all-zero one
    g_idx = local.pop("weight_g_idx", None)
    if g_idx is not None and not g_idx.is_floating_point() and bool((g_idx == -1).all()):
        g_idx = None  # the library's "not yet computed" fill: column order
    bias = local.pop("bias", None)
    weights = int_layers.IntLayerWeights(
        codes, scales, zeros, w.bits, w.group_size, bias, dtype, packed, k, g_idx=g_idx
    )
    return int_layers.build_int_layer(weights, w.symmetric, name, scheme.activation)


def _dense_layer(name, local, scheme: QuantScheme, dtype) -> QuantLinear:
    weight = hf.take(local, "weight", name)
    if weight.dim() != 2:
        raise CheckpointError(f"layer {name!r}: weight must be 2-D, got {tuple(weight.shape)}")
    n, k = weight.shape
    scales = hf.take(local, "weight_scale", name).float()
    local.pop("weight_zero_point", None)
    bias = local.pop("bias", None)
    layer = QuantLinear(k, n, scheme, bias is not None, dtype)
    if layer.weight_format.is_int and scales.numel() == 1:
        scales = scales.reshape(1, 1).expand(n, 1)  # per-tensor = every channel alike
    if weight.dtype != layer.qweight.dtype or weight.shape != layer.qweight.shape:
        raise CheckpointError(
            f"layer {name!r}: weight is {weight.dtype} {tuple(weight.shape)}, but "
            f"{scheme.describe()} stores {layer.qweight.dtype} {tuple(layer.qweight.shape)}"
        )
    if scales.numel() != layer.scales.numel():
        raise CheckpointError(
            f"layer {name!r}: weight_scale has {scales.numel()} values, expected "
            f"{layer.scales.numel()}"
        )
    layer.qweight.copy_(weight)
    layer.scales.copy_(scales.reshape(layer.scales.shape))
    if layer.input_scale is not None:
        layer.input_scale.copy_(hf.take(local, "input_scale", name).float().reshape(1))
    if layer.input_zero_point is not None:
        zero = hf.take(local, "input_zero_point", name)
        if zero.is_floating_point() or zero.numel() != 1 or not -128 <= int(zero) <= 127:
            raise CheckpointError(
                f"tensor {name}.input_zero_point: {zero.dtype} {tuple(zero.shape)}; expected "
                "one integer in [-128, 127]"
            )
        layer.input_zero_point.copy_(zero.reshape(1).to(torch.int8))
    if bias is not None:
        layer.bias.copy_(bias)
    return layer


def _check_layers_declared(
    plan: dict[str, dict[str, Any]],
    declared: dict[str, TensorEntry],
    model: nn.Module,
    roundings: dict[str, dict[str, str]],
) -> dict[str, QuantScheme]:
    """Each planned layer is an ``nn.Linear`` whose tensors (from the headers) fit it;
    ``roundings`` (config group -> part -> rounding) sets MX layers' scale roundings."""
    by_layer: dict[str, dict[str, TensorEntry]] = {name: {} for name in plan}
    for key, entry in declared.items():
        layer, _, local = key.rpartition(".")
        if layer in by_layer:
            by_layer[layer][local] = entry
    schemes = {}
    for name, group in plan.items():
        module = model.get_submodule(name)
        if type(module) is not nn.Linear:
            raise CheckpointError(f"layer {name!r} is a {type(module).__name__}, not nn.Linear")
        n, k = module.weight.shape
        if group["format"] in FP4_FORMATS:
            weights, inputs = group.get("weights") or {}, group.get("input_activations")
            scheme = fp4_scheme_of(group["format"], weights, inputs, name)
            schemes[name] = with_roundings(scheme, roundings[group["group_name"]], name)
            check_declared_fp4_layer(name, schemes[name], by_layer[name], n, k)
            continue
        schemes[name] = _scheme_of(group, name)
        block = schemes[name].weight.block
        check_declared_layer(name, group["format"], by_layer[name], n, k, block)
    return schemes


def load_compressed_tensors(directory: str | Path) -> nn.Module:
    """Load a compressed-tensors folder into a ``transformers`` model with ``QuantLinear`` layers.

    The model is built on the meta device from ``config.json``; every tensor is taken
    straight from the files, so no full-precision weight is ever materialised.  Every
    refusal is a :class:`CheckpointError` (a bad config field a ``CheckpointConfigError``).
    """
    files, declared = hf.declared_tensors(directory)
    config = hf.read_config(directory)
    qc = parse_quantization_config(config.get("quantization_config"))
    model = hf.build_skeleton(directory, config, declared)
    plan = _assign_groups(qc, hf.linear_layer_names(model), names_for_model(model))
    hf.check_float_tensors(model, declared, list(plan))
    roundings = folder_roundings(hf.shard_metadata(files), qc["config_groups"])
    schemes = _check_layers_declared(plan, declared, model, roundings)
    tensors = hf.read_tensors(files, model)
    for name, scheme in schemes.items():
        n, k = model.get_submodule(name).weight.shape
        prefix = f"{name}."
        local = {key[len(prefix) :]: t for key, t in tensors.items() if key.startswith(prefix)}
        w = scheme.weight
        if plan[name]["format"] not in FP4_FORMATS:  # -- fp4_layer checks its own
            check_layer_values(name, plan[name]["format"], local, n, k, w.bits, w.symmetric)

    def make(name: str, local: dict[str, torch.Tensor]) -> QuantLinear:
        scheme = schemes[name]
        dtype = model.get_submodule(name).weight.dtype
        if plan[name]["format"] in FP4_FORMATS:
            return fp4_layer(name, local, scheme, dtype)
        if plan[name]["format"] == "pack-quantized":
            if scheme.activation is not None and not scheme.is_w4a8:
                raise CheckpointError(
                    f"layer {name!r}: packed INT weights with activations are W4A8 only (INT4 "
                    f"symmetric), got {scheme.describe()}"
                )
            return _packed_layer(name, local, scheme, dtype)
        return _dense_layer(name, local, scheme, dtype)

    # -- layers whose scales say nothing of the model's dtype (FP4, per channel) take it
    return int_layers.hold_model_dtype(hf.assemble(model, tensors, list(plan), make))
