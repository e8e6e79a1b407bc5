"""Plain integer views of ``QuantLinear`` weights, the common ground of the exchange formats.

Every exchange format (compressed-tensors, GPTQ, AWQ) stores the same facts as our
``QuantLinear``: unsigned codes ``(N, K)``, per-group scales ``(N, G)`` and zero points
``(N, G)``; only the packing and naming differ.  :class:`IntLayerWeights` is that
common form: format modules convert to and from it, never touching packed buffers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from torchquant.config import QuantScheme, WeightQuant
from torchquant.errors import CheckpointError
from torchquant.modules import QuantLinear
from torchquant.modules.quant_linear import uses_int8_storage
from torchquant.numerics import num_groups, unpack_codes


@dataclass
class IntLayerWeights:
    """Unsigned codes ``(N, K)`` uint8, scales ``(N, G)``, zeros ``(N, G)`` (``None``: symmetric).

    ``group_size`` is -1 for one group per row.  Symmetric weights have the implied
    zero ``2**(bits-1)``.  ``bias`` is ``(N,)`` or ``None``; ``dtype`` is the layer's
    compute dtype.  Readers whose format stores our bitstream may give ``packed``
    (int32 rows in our packed layout) instead of ``codes``, skipping an unpack/repack.
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


def int_weights_of(layer: QuantLinear, name: str) -> IntLayerWeights:
    """The codes and qparams of an INT weight-only ``layer`` (refuses other schemes)."""
    w = layer.scheme.weight
    if w.type != "int":
        raise CheckpointError(f"layer {name!r}: {layer.scheme.describe()} is not an INT weight")
    if layer.smooth_scale is not None:
        raise CheckpointError(
            f"layer {name!r}: has a SmoothQuant input divisor, which this format cannot hold; "
            "fold it into the preceding layer or save in the native format"
        )
    if uses_int8_storage(layer.scheme):
        codes = (layer.qweight.to(torch.int16) + 128).to(torch.uint8)
    else:
        codes = unpack_codes(layer.qweight, w.bits, layer.in_features)
    scales = layer.scales.detach().clone()
    if w.group_size == -1:
        scales = scales.reshape(layer.out_features, 1)
    zeros = None if layer.zeros is None else layer.zeros.detach().clone()
    bias = None if layer.bias is None else layer.bias.detach().clone()
    return IntLayerWeights(codes, scales, zeros, w.bits, w.group_size, bias, layer.dtype)


def regroup_evenly(weights: IntLayerWeights) -> IntLayerWeights:
    """Exactly re-express a shorter last group with groups that divide ``K``.

    Formats that need ``K % group_size == 0`` (compressed-tensors, GPTQ, AWQ) cannot
    hold our partial last group.  Groups of ``gcd(group_size, K)`` tile both the full
    groups and the partial one, so repeating each scale/zero gives the very same
    dequantized weight.
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

    return IntLayerWeights(
        weights.codes,
        spread(weights.scales),
        spread(weights.zeros),
        weights.bits,
        new_g,
        weights.bias,
        weights.dtype,
    )


def check_g_idx(g_idx: torch.Tensor | None, k: int, group_size: int, name: str) -> None:
    """Accept a ``g_idx`` only when it is the plain ``k // group_size`` mapping.

    A permuted ``g_idx`` (GPTQ act-order without static groups) assigns columns to
    groups out of order, which ``QuantLinear``'s contiguous groups cannot express.
    """
    if g_idx is None:
        return
    if g_idx.shape != (k,):
        raise CheckpointError(f"layer {name!r}: g_idx has shape {tuple(g_idx.shape)}, need ({k},)")
    plain = torch.arange(k, device=g_idx.device) // (k if group_size == -1 else group_size)
    if not torch.equal(g_idx.to(torch.int64), plain):
        raise CheckpointError(
            f"layer {name!r}: g_idx reorders input columns (act-order without static groups); "
            "QuantLinear holds contiguous groups only, so this checkpoint cannot be loaded exactly"
        )


def build_int_layer(weights: IntLayerWeights, symmetric: bool, name: str) -> QuantLinear:
    """A ``QuantLinear`` holding exactly ``weights`` (on CPU)."""
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
    try:
        scheme = QuantScheme(WeightQuant("int", weights.bits, g, symmetric))
    except ValueError as exc:
        raise CheckpointError(f"layer {name!r}: unsupported weight layout ({exc})") from None
    # grouped scales follow the layer dtype: take the checkpoint's so they stay exact
    dtype = weights.scales.dtype if g != -1 else weights.dtype
    layer = QuantLinear(k, n, scheme, weights.bias is not None, dtype)
    zeros = None if symmetric else weights.zeros
    if weights.codes is not None:
        layer.set_int_codes(weights.codes, weights.scales, zeros)
    elif uses_int8_storage(scheme):
        codes = unpack_codes(weights.packed, weights.bits, k)
        layer.set_int_codes(codes, weights.scales, zeros)
    else:  # already our bitstream: store it as is
        if weights.packed.shape != layer.qweight.shape:
            raise CheckpointError(
                f"layer {name!r}: packed weight {tuple(weights.packed.shape)}, "
                f"expected {tuple(layer.qweight.shape)}"
            )
        layer.qweight.copy_(weights.packed)
        layer.scales.copy_(weights.scales.reshape(layer.scales.shape))
        if zeros is not None:
            layer.zeros.copy_(zeros)
    if weights.bias is not None:
        layer.bias.copy_(weights.bias)
    return layer
