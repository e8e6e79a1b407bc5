"""Which exports vLLM can serve, as a table, and a warning at export time when it cannot.

The rules are vLLM's (CUDA), read from its sources:

- GPTQ: ``gptq_marlin`` takes ``(bits, sym)`` in ``{(4, True), (8, True)}`` only
  (``GPTQMarlinConfig.TYPE_MAP``; forcing it on others raises "Unsupported
  quantization config: bits=4, sym=False"), with group sizes -1/32/64/128
  (``MARLIN_SUPPORTED_GROUP_SIZES``); ``desc_act`` is fine.  Anything else falls
  back to the legacy exllama ``gptq`` kernel: float16 activations only, several
  times slower, and it reads ``qzeros`` in the v1 convention.
- AWQ: ``awq_marlin`` takes 4-bit weights with zero points and Marlin group sizes;
  the legacy ``awq`` kernel is 4-bit only.
- compressed-tensors ``pack-quantized`` (wNa16): 4 and 8 bits only
  (``WNA16_SUPPORTED_BITS``), symmetric or with zero points, ``actorder`` group or
  weight; no kernel exists for 2/3/5/6/7-bit layers.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from torchquant.modules import QuantLinear

MARLIN_GROUP_SIZES = (-1, 32, 64, 128)


class ServingWarning(UserWarning):
    """An export that vLLM will refuse, or serve only with a slow fallback kernel."""


@dataclass(frozen=True)
class IntLayout:
    """What decides servability of one INT weight-only layer as it is written."""

    bits: int
    group_size: int
    symmetric: bool


@dataclass(frozen=True)
class ServingRule:
    """One row of :data:`VLLM_RULES`: a format, the layouts it matches, vLLM's verdict."""

    fmt: str
    bits: tuple[int, ...]
    symmetric: tuple[bool, ...]
    group_sizes: tuple[int, ...] | None  # None: any
    kernel: str | None  # None: vLLM refuses it
    fast: bool
    note: str


BOTH = (True, False)
# first match wins; a layout no row matches is refused
VLLM_RULES = (
    ServingRule("gptq", (4, 8), (True,), MARLIN_GROUP_SIZES, "gptq_marlin", True, ""),
    ServingRule(
        "gptq",
        (2, 3, 4, 8),
        BOTH,
        None,
        "gptq (legacy exllama)",
        False,
        "no Marlin kernel for asymmetric, 2/3-bit or odd-group GPTQ; the fallback runs "
        "float16 only and several times slower, and '--quantization gptq_marlin' refuses it",
    ),
    ServingRule("awq", (4,), BOTH, MARLIN_GROUP_SIZES, "awq_marlin", True, ""),
    ServingRule("awq", (4,), BOTH, None, "awq (legacy)", False, "group size not in Marlin's"),
    ServingRule("compressed-tensors", (4, 8), BOTH, MARLIN_GROUP_SIZES, "wNa16", True, ""),
    ServingRule(
        "compressed-tensors",
        (4, 8),
        BOTH,
        None,
        None,
        False,
        f"wNa16 kernels take group sizes {list(MARLIN_GROUP_SIZES)}",
    ),
    ServingRule(
        "compressed-tensors",
        (2, 3, 5, 6, 7),
        BOTH,
        None,
        None,
        False,
        "vLLM has no CUDA kernel for 2/3/5/6/7-bit weights",
    ),
)


def vllm_rule(fmt: str, layout: IntLayout) -> ServingRule | None:
    """The first rule of :data:`VLLM_RULES` matching ``layout`` in ``fmt``, or ``None``."""
    for rule in VLLM_RULES:
        if (
            rule.fmt == fmt
            and layout.bits in rule.bits
            and layout.symmetric in rule.symmetric
            and (rule.group_sizes is None or layout.group_size in rule.group_sizes)
        ):
            return rule
    return None


def serving_problems(fmt: str, layouts: Iterable[IntLayout]) -> list[str]:
    """One sentence per distinct layout that vLLM refuses or serves only slowly."""
    problems = []
    for layout in sorted(set(layouts), key=repr):
        rule = vllm_rule(fmt, layout)
        sym = "symmetric" if layout.symmetric else "asymmetric"
        what = f"{layout.bits}-bit {sym} weights in groups of {layout.group_size}"
        if rule is None or rule.kernel is None:
            why = f": {rule.note}" if rule else ""
            problems.append(f"vLLM cannot serve {fmt} {what}{why}")
        elif not rule.fast:
            problems.append(f"vLLM serves {fmt} {what} only with {rule.kernel}: {rule.note}")
    return problems


def warn_if_unservable(fmt: str, layouts: Iterable[IntLayout], hint: str = "") -> None:
    """Warn (:class:`ServingWarning`) when vLLM will refuse the export or fall back."""
    problems = serving_problems(fmt, layouts)
    if problems:
        message = "; ".join(problems) + (f" ({hint})" if hint else "")
        warnings.warn(message, ServingWarning, stacklevel=3)


def model_layouts(model: nn.Module) -> list[IntLayout]:
    """The layouts a model's INT weight-only layers are written with.

    A group size that does not divide ``K`` is written as ``gcd(group, K)``
    (``int_layers.regroup_evenly``), so that is the one judged.
    """
    out = []
    for layer in model.modules():
        if not isinstance(layer, QuantLinear) or layer.scheme.activation is not None:
            continue
        if not layer.weight_format.is_int:
            continue
        w = layer.scheme.weight
        k, g = layer.in_features, w.group_size
        group = g if g == -1 or k % g == 0 else math.gcd(g, k)
        out.append(IntLayout(w.bits, group, w.symmetric))
    return out
