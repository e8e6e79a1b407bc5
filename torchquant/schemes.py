"""Scheme shorthands used by the CLI and accepted wherever a scheme is expected."""

from __future__ import annotations

import re

from torchquant.config import ActivationQuant, QuantScheme, WeightQuant
from torchquant.errors import ConfigError

SCHEME_NAMES = ("w8a16", "w2a16..w7a16", "w8a16-fp8", "w8a8", "fp8")
DEFAULT_GROUP_SIZE = 128


def scheme_from_name(
    name: str, group_size: int | None = None, symmetric: bool | None = None
) -> QuantScheme:
    """Turn ``w8a16``, ``wNa16`` (N = 2..8), ``w8a16-fp8``, ``w8a8`` or ``fp8`` into a scheme.

    ``wNa16`` is asymmetric with ``group_size`` 128 by default; ``w8a16`` is INT8
    symmetric per channel unless a group size is given.
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key == "w8a16-fp8":
        return QuantScheme(WeightQuant(type="fp8", bits=8, group_size=-1))
    if key == "fp8":
        return QuantScheme(WeightQuant(type="fp8"), ActivationQuant(type="fp8"))
    if key == "w8a8":
        return QuantScheme(WeightQuant(bits=8, group_size=-1), ActivationQuant(type="int8"))
    m = re.fullmatch(r"w([2-8])a16", key) if isinstance(key, str) else None
    if m is None:
        raise ConfigError(f"scheme={name!r} is not known; expected one of {SCHEME_NAMES}")
    bits = int(m.group(1))
    if bits == 8:
        gs = -1 if group_size is None else group_size
        sym = True if symmetric is None else symmetric
    else:
        gs = DEFAULT_GROUP_SIZE if group_size is None else group_size
        sym = False if symmetric is None else symmetric
    return QuantScheme(WeightQuant(type="int", bits=bits, group_size=gs, symmetric=sym))
