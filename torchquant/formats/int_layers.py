"""Plain integer views of ``QuantLinear`` weights, the common ground of the exchange formats.

Every exchange format (compressed-tensors, GPTQ, AWQ) stores the same facts as our
``QuantLinear``: unsigned codes ``(N, K)``, per-group scales ``(N, G)`` and zero points
``(N, G)``, and for act-order weights the group ``g_idx[k]`` of each input column;
only the packing and naming differ.  :class:`IntLayerWeights` is that common form:
format modules convert to and from it, never touching packed buffers.

An act-order ``g_idx`` is only well defined across the formats when every group holds
``group_size`` columns (the last one the remainder): readers such as compressed-tensors
sort the columns by group and cut them into equal groups, while GPTQ kernels look each
column's group up, and the two agree only then.  GPTQ act-order always writes such
groups; anything else is refused as malformed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from torchquant.config import ActivationQuant, QuantScheme, WeightQuant
from torchquant.errors import CheckpointError
from torchquant.modules import QuantLinear
from torchquant.numerics import num_groups, packed_width
from torchquant.weights import weight_format


@dataclass
class IntLayerWeights:
    """Unsigned codes ``(N, K)`` uint8, scales ``(N, G)``, zeros ``(N, G)`` (``None``: symmetric).

    ``group_size`` is -1 for one group per row.  Symmetric weights have the implied
    zero ``2**(bits-1)``.  ``bias`` is ``(N,)`` or ``None``; ``dtype`` is the layer's
    compute dtype.  Readers whose format stores our bitstream may give ``packed``
    (int32 rows in our packed layout) instead of ``codes``, skipping an unpack/repack.
    ``g_idx`` is the group of each input column ``(K,)`` for act-order weights, ``None``
    when column ``k`` is in group ``k // group_size``.
    """

    codes: torch.Tensor | None
    scales: torch.Tensor
    zeros: torch.Tensor | None
    bits: int
    group_size: int
    bias: torch.Tensor | None
    dtype: torch.dtype
    packed: torch.Tensor | None = None
    in_features: int | None = None
    g_idx: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        if self.codes is None:
            return (self.scales.shape[0], self.in_features)
        return tuple(self.codes.shape)

    def zeros_or_implied(self) -> torch.Tensor:
        """Zero points ``(N, G)`` uint8, filling in ``2**(bits-1)`` for symmetric weights."""
        if self.zeros is not None:
            return self.zeros
        return torch.full(self.scales.shape, 1 << (self.bits - 1), dtype=torch.uint8)


def int_weights_of(layer: QuantLinear, name: str, with_activation: bool = False) -> IntLayerWeights:
    """The codes and qparams of an INT weight-only ``layer`` (refuses other schemes);
    ``with_activation``: of a W4A8 layer too, for formats that also write its activations."""
    w = layer.scheme.weight
    if not layer.weight_format.is_int:
        raise CheckpointError(f"layer {name!r}: {layer.scheme.describe()} is not an INT weight")
    if layer.scheme.activation is not None and not (with_activation and layer.scheme.is_w4a8):
        raise CheckpointError(
            f"layer {name!r}: {layer.scheme.describe()} quantizes its activations, which a "
            "weight-only format would silently drop; save in the native or compressed-tensors "
            "format"
        )
    if layer.smooth_scale is not None:
        raise CheckpointError(
            f"layer {name!r}: has a SmoothQuant input divisor, which this format cannot hold; "
            "fold it into the preceding layer or save in the native format"
        )
    codes = layer.weight_format.int_codes(layer)
    scales = layer.scales.detach().clone()
    if w.group_size == -1:
        scales = scales.reshape(layer.out_features, 1)
    zeros = None if layer.zeros is None else layer.zeros.detach().clone()
    bias = None if layer.bias is None else layer.bias.detach().clone()
    g_idx = None
    if layer.g_idx is not None:
        g_idx = checked_g_idx(layer.g_idx.cpu(), layer.in_features, w.group_size, name)
    return IntLayerWeights(
        codes, scales, zeros, w.bits, w.group_size, bias, layer.dtype, g_idx=g_idx
    )


def regroup_evenly(weights: IntLayerWeights) -> IntLayerWeights:
    """Exactly re-express a shorter last group with groups that divide ``K``.

    Formats that need ``K % group_size == 0`` (compressed-tensors, GPTQ, AWQ) cannot
    hold our partial last group.  Groups of ``gcd(group_size, K)`` tile both the full
    groups and the partial one, so repeating each scale/zero gives the very same
    dequantized weight.  An act-order group is split the same way: its columns, taken
    in order, fill the sub-groups that share its scale and zero point.
    """
    n, k = weights.shape
    g = weights.group_size
    if g == -1 or k % g == 0:
        return weights
    new_g = math.gcd(g, k)
    repeat = g // new_g
    count = k // new_g

    def spread(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.repeat_interleave(repeat, dim=1)[:, :count].contiguous()

    g_idx = None
    if weights.g_idx is not None:
        group = weights.g_idx.long()
        order = torch.sort(group, stable=True).indices  # columns grouped, each in order
        within = torch.arange(k) - torch.searchsorted(group[order], group[order])
        rank = torch.empty(k, dtype=torch.long)
        rank[order] = within  # position of each column inside its group
        g_idx = (group * repeat + rank // new_g).to(torch.int32)
    return IntLayerWeights(
        weights.codes,
        spread(weights.scales),
        spread(weights.zeros),
        weights.bits,
        new_g,
        weights.bias,
        weights.dtype,
        g_idx=g_idx,
    )


def exchange_weights_of(
    layer: QuantLinear, name: str, with_activation: bool = False
) -> IntLayerWeights:
    """``int_weights_of`` in groups that divide ``K``, as every exchange format stores them."""
    return regroup_evenly(int_weights_of(layer, name, with_activation))


def checked_g_idx(
    g_idx: torch.Tensor | None, k: int, group_size: int, name: str
) -> torch.Tensor | None:
    """A checkpoint's ``g_idx`` as int32 ``(K,)``, or ``None`` for the plain ``k // group_size``.

    Refuses a wrong shape or dtype, groups outside ``[0, G)`` and groups that do not
    each hold ``group_size`` columns (the last one ``K - (G - 1) * group_size``).
    """
    if g_idx is None:
        return None
    if g_idx.shape != (k,):
        raise CheckpointError(f"layer {name!r}: g_idx has shape {tuple(g_idx.shape)}, need ({k},)")
    if g_idx.dtype.is_floating_point or g_idx.dtype.is_complex or g_idx.dtype == torch.bool:
        raise CheckpointError(f"layer {name!r}: g_idx must hold integers, got {g_idx.dtype}")
    gs = k if group_size == -1 else min(group_size, max(k, 1))  # one group either way
    groups = num_groups(k, group_size) if group_size != -1 else 1
    group = g_idx.to(torch.int64)
    if k and (int(group.min()) < 0 or int(group.max()) >= groups):
        raise CheckpointError(
            f"layer {name!r}: g_idx holds groups {int(group.min())}..{int(group.max())}, "
            f"outside [0, {groups}) for {k} inputs in groups of {gs}"
        )
    plain = torch.arange(k) // gs
    if torch.equal(group, plain):
        return None
    counts = torch.bincount(group, minlength=groups)
    expected = torch.bincount(plain, minlength=groups)
    if not torch.equal(counts, expected):
        bad = int(torch.nonzero(counts != expected)[0])
        raise CheckpointError(
            f"layer {name!r}: g_idx puts {int(counts[bad])} columns in group {bad}, but its "
            f"scales are for groups of {int(expected[bad])} columns (group size {gs})"
        )
    return group.to(torch.int32)


def build_int_layer(
    weights: IntLayerWeights,
    symmetric: bool,
    name: str,
    activation: ActivationQuant | None = None,
) -> QuantLinear:
    """A ``QuantLinear`` holding exactly ``weights`` (on CPU), quantizing its input as
    ``activation`` says (W4A8) when given.

    An act-order ``weights.g_idx`` is checked (see :func:`checked_g_idx`); a plain one
    is dropped so the layer keeps the contiguous-group path.  Symmetric 8-bit weights
    with a real ``g_idx`` are held as asymmetric ones with zero point 128 (the same
    values) where the format of symmetric ones cannot carry a ``g_idx`` (INT8).
    """
    n, k = weights.shape
    g = weights.group_size
    expect = 1 if g == -1 else num_groups(k, g)
    if weights.scales.shape != (n, expect):
        raise CheckpointError(
            f"layer {name!r}: scales have shape {tuple(weights.scales.shape)}, "
            f"expected ({n}, {expect}) for group size {g}"
        )
    if not symmetric and (weights.zeros is None or weights.zeros.shape != (n, expect)):
        raise CheckpointError(f"layer {name!r}: zero points missing or of the wrong shape")
    g_idx = checked_g_idx(weights.g_idx, k, g, name)
    if g_idx is not None and activation is not None:
        raise CheckpointError(
            f"layer {name!r}: act-order groups (g_idx) with quantized activations; W4A8 reads "
            "its groups in column order"
        )
    zeros = None if symmetric else weights.zeros
    scheme = _int_scheme(weights.bits, g, symmetric, name, activation)
    if g_idx is not None and not weight_format(scheme).takes_g_idx(scheme.weight):
        scheme, zeros = _int_scheme(weights.bits, g, False, name), weights.zeros_or_implied()
    # grouped scales follow the layer dtype: take the checkpoint's so they stay exact
    dtype = weights.scales.dtype if g != -1 else weights.dtype
    layer = QuantLinear(k, n, scheme, weights.bias is not None, dtype, g_idx=g_idx is not None)
    if weights.codes is not None:
        layer.set_int_codes(weights.codes, weights.scales, zeros)
    else:  # our bitstream: the layer's format stores it as is or unpacks it
        expected = (n, packed_width(k, weights.bits))
        if tuple(weights.packed.shape) != expected:
            raise CheckpointError(
                f"layer {name!r}: packed weight {tuple(weights.packed.shape)}, expected {expected}"
            )
        layer.weight_format.set_packed_codes(layer, weights.packed, weights.scales, zeros)
    if g_idx is not None:
        layer.g_idx.copy_(g_idx)
    if weights.bias is not None:
        layer.bias.copy_(weights.bias)
    layer.cpu_layout()
    return layer


def _int_scheme(
    bits: int,
    group_size: int,
    symmetric: bool,
    name: str,
    activation: ActivationQuant | None = None,
) -> QuantScheme:
    try:
        return QuantScheme(WeightQuant("int", bits, group_size, symmetric), activation)
    except ValueError as exc:
        raise CheckpointError(f"layer {name!r}: unsupported weight layout ({exc})") from None


def model_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype hidden states have: the input embeddings', else the first float parameter's."""
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    weight = getattr(embeddings, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        return weight.dtype
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def hold_model_dtype(model: nn.Module) -> nn.Module:
    """Give every ``QuantLinear`` the model's dtype, casting its scales and bias to it.

    GPTQModel writes float16 scales into models whose other tensors (and
    ``config.json``'s dtype) are float32; layers built in the scales' dtype would hand
    float16 activations to float32 attention.  Widening float16 scales is exact.
    """
    dtype = model_dtype(model)
    if dtype is None:
        return model
    for layer in model.modules():
        if not isinstance(layer, QuantLinear) or layer.dtype == dtype:
            continue
        if layer.scales.dtype == layer.dtype:  # grouped INT scales follow the layer dtype
            layer.scales = layer.scales.to(dtype)
        if layer.bias is not None:
            layer.bias = layer.bias.to(dtype)
        layer.dtype = dtype
    return model
