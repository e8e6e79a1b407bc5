"""What a compressed-tensors folder must satisfy before its layers are built.

A hostile or corrupt ``quantization_config`` is refused field by field with the field
path named: every field has the JSON type the library writes (``"symmetric": "false"``
is a string, not a bool, and is refused rather than read as true).  Each quantized
layer's tensors are checked against the layer of the model built from ``config.json``
(dtype and shape from the headers before anything is read; ``weight_shape``, scales
and zero points once read, before any layer is built), so a shrunk or widened layer,
an integer or non-positive scale, or a zero point a symmetric scheme would drop is
refused instead of surfacing as a wrong answer or a failure in the first forward.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from torchquant.checkpoint.safetensors_check import TensorEntry
from torchquant.checkpoint.validate import check_scales
from torchquant.errors import CheckpointConfigError, CheckpointError
from torchquant.formats.packing_variants import unpack_rows

NONE = type(None)
TOP_LEVEL_TYPES: dict[str, tuple[type, ...]] = {
    "quant_method": (str,),
    "format": (str, NONE),
    "quantization_status": (str,),
    "version": (str,),
    "config_groups": (Mapping,),
    "ignore": (list, NONE),
    "kv_cache_scheme": (Mapping, NONE),
    "global_compression_ratio": (int, float, NONE),
    "sparsity_config": (Mapping, NONE),
    "transform_config": (Mapping, NONE),
    "moe_sparsity_config": (Mapping, NONE),
}
GROUP_TYPES: dict[str, tuple[type, ...]] = {
    "targets": (list,),
    "weights": (Mapping, NONE),
    "input_activations": (Mapping, NONE),
    "output_activations": (Mapping, NONE),
    "format": (str, NONE),
}
ARGS_TYPES: dict[str, tuple[type, ...]] = {
    "num_bits": (int,),
    "type": (str,),
    "symmetric": (bool,),
    "group_size": (int, NONE),
    "strategy": (str, NONE),
    "block_structure": (list, NONE),
    "dynamic": (bool, str),  # the library's "local" dynamic type is a string
    "actorder": (bool, str, NONE),
    "scale_dtype": (str, NONE),
    "zp_dtype": (str, NONE),
    "observer": (str, NONE),
    "observer_kwargs": (Mapping, NONE),
}
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _type_names(types: tuple[type, ...]) -> str:
    names = {Mapping: "object", list: "list", str: "string", int: "int", float: "number"}
    return " or ".join("null" if t is NONE else names.get(t, t.__name__) for t in types)


def check_field_types(
    data: Mapping[str, Any], types: Mapping[str, tuple[type, ...]], where: str
) -> None:
    """Every present field of ``data`` has one of its JSON types (a bool is not an int)."""
    for field, value in data.items():
        allowed = types.get(field)
        if allowed is None:
            continue  # unknown fields are refused by the caller, with the known ones listed
        exact = type(value) in allowed
        mapping = Mapping in allowed and isinstance(value, Mapping)
        if not (exact or mapping):
            raise CheckpointConfigError(
                f"{where}.{field}={value!r}: expected {_type_names(allowed)}, got "
                f"{type(value).__name__}"
            )


def check_config_types(qc: Mapping[str, Any]) -> None:
    """The types of every field of a compressed-tensors ``quantization_config``, nested ones too."""
    where = "quantization_config"
    check_field_types(qc, TOP_LEVEL_TYPES, where)
    groups = qc.get("config_groups")
    for gname, group in (groups or {}).items():
        gwhere = f"{where}.config_groups.{gname}"
        if not isinstance(group, Mapping):
            raise CheckpointConfigError(f"{gwhere}: expected an object, got {type(group).__name__}")
        check_field_types(group, GROUP_TYPES, gwhere)
        for part in ("weights", "input_activations", "output_activations"):
            if isinstance(group.get(part), Mapping):
                check_field_types(group[part], ARGS_TYPES, f"{gwhere}.{part}")


# -- layer tensors, from the headers


def _expect(name: str, key: str, entry: TensorEntry | None, shapes, dtypes, what: str) -> None:
    if entry is None:
        raise CheckpointError(f"layer {name!r}: tensor {key!r} is missing")
    if entry.shape not in shapes:
        raise CheckpointError(
            f"tensor {name}.{key}: shape {entry.shape}, expected "
            f"{' or '.join(str(s) for s in shapes)} for the model's layer ({what})"
        )
    if dtypes is not None and entry.dtype not in dtypes:
        raise CheckpointError(
            f"tensor {name}.{key}: dtype {entry.dtype}, expected one of {[str(d) for d in dtypes]}"
        )


def _is_int(entry: TensorEntry) -> bool:
    return not (entry.dtype.is_floating_point or entry.dtype.is_complex) and (
        entry.dtype != torch.bool
    )


def check_declared_layer(
    name: str,
    fmt: str,
    local: Mapping[str, TensorEntry],
    out_features: int,
    in_features: int,
    block: tuple[int, int] | None = None,
) -> None:
    """A layer's tensors, as the headers declare them, fit the model's ``(N, K)`` linear
    (with one ``weight_scale`` per ``block`` of it, for block-wise weights)."""
    n, k = out_features, in_features
    what = f"{n}x{k}"
    scale = local.get("weight_scale")
    if scale is None:
        raise CheckpointError(f"layer {name!r}: tensor 'weight_scale' is missing")
    if not scale.dtype.is_floating_point:
        raise CheckpointError(
            f"tensor {name}.weight_scale: dtype {scale.dtype}; scales must be floating point"
        )
    if fmt == "pack-quantized":
        shape = local.get("weight_shape")
        _expect(name, "weight_shape", shape, [(2,)], None, "[N, K]")
        if not _is_int(shape):
            raise CheckpointError(
                f"tensor {name}.weight_shape: dtype {shape.dtype}; it must hold integers"
            )
        packed = local.get("weight_packed")
        if packed is None:
            raise CheckpointError(f"layer {name!r}: tensor 'weight_packed' is missing")
        if len(packed.shape) != 2 or packed.shape[0] != n:
            raise CheckpointError(
                f"tensor {name}.weight_packed: shape {packed.shape}, expected {n} rows of "
                f"packed codes for the model's layer ({what})"
            )
        if len(scale.shape) not in (1, 2) or scale.shape[0] != n:
            raise CheckpointError(
                f"tensor {name}.weight_scale: shape {scale.shape}, expected ({n}, groups) for "
                f"the model's layer ({what})"
            )
        g_idx = local.get("weight_g_idx")
        if g_idx is not None and g_idx.shape != (k,):
            raise CheckpointError(
                f"layer {name!r}: g_idx has shape {g_idx.shape}, need ({k},) for the model's "
                f"layer ({what})"
            )
    else:
        want = (torch.int8,) if fmt == "int-quantized" else (torch.float8_e4m3fn,)
        _expect(name, "weight", local.get("weight"), [(n, k)], want, what)
        if block is not None:
            grid = (-(-n // block[0]), -(-k // block[1]))
            _expect(name, "weight_scale", scale, [grid], None, f"{what} in {block} blocks")
        elif fmt == "int-quantized":
            _expect(name, "weight_scale", scale, [(n, 1), (n,), (1,), (1, 1), ()], None, what)
        else:
            _expect(name, "weight_scale", scale, [(n, 1), (n,), (1,), ()], None, what)
        if "input_scale" in local:
            _expect(name, "input_scale", local["input_scale"], [(1,), ()], FLOAT_DTYPES, what)
        if "input_zero_point" in local:
            zero, ints = local["input_zero_point"], (torch.int8, torch.int16, torch.int32)
            _expect(name, "input_zero_point", zero, [(1,), ()], (*ints, torch.int64), what)
    zp = local.get("weight_zero_point")
    if zp is not None and not _is_int(zp):
        raise CheckpointError(
            f"tensor {name}.weight_zero_point: dtype {zp.dtype}; zero points must be integers"
        )
    if "bias" in local:
        _expect(name, "bias", local["bias"], [(n,)], FLOAT_DTYPES, what)


# -- layer tensors, once read


def check_layer_values(
    name: str,
    fmt: str,
    local: Mapping[str, torch.Tensor],
    out_features: int,
    in_features: int,
    bits: int,
    symmetric: bool,
) -> None:
    """``weight_shape`` names the model's layer, scales are positive, zero points are usable."""
    for key in ("weight_scale", "input_scale"):
        if key in local:
            check_scales(f"{name}.{key}", local[key])
    if fmt == "pack-quantized":
        stored = [int(v) for v in local["weight_shape"].tolist()]
        if stored != [out_features, in_features]:
            raise CheckpointError(
                f"tensor {name}.weight_shape: {stored}, but the model's layer is "
                f"[{out_features}, {in_features}] (config.json)"
            )
    zp = local.get("weight_zero_point")
    if zp is None or not symmetric:
        return
    # -- a symmetric scheme drops its zero point: only the "none" fills may be stored
    if not bool((zp == 0).all()) and not (
        fmt == "pack-quantized" and _is_packed_midpoint(zp, bits, out_features, name)
    ):
        raise CheckpointError(
            f"tensor {name}.weight_zero_point: holds non-zero zero points, but the layer's "
            "scheme is symmetric (config.json says 'symmetric': true); they would be dropped"
        )


def _is_packed_midpoint(zp: torch.Tensor, bits: int, n: int, name: str) -> bool:
    """Whether packed zero points all encode signed 0 (stored shifted, as ``2**(bits-1)``)."""
    if zp.dim() != 2:
        return False
    try:
        zeros = unpack_rows(zp.t().contiguous(), bits, n, f"{name}.weight_zero_point")
    except CheckpointError:
        return False
    return bool((zeros == 1 << (bits - 1)).all())
