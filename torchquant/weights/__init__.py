"""Weight storage formats: one module per kind of quantized weight.

:func:`weight_format` gives the format that stores a scheme's weight; ``QuantLinear``
keeps the buffers the format allocates and calls the op it names, and exchange
formats ask it for INT codes.  Adding a kind is one module here (a
:class:`WeightFormat`) and one entry in :data:`WEIGHT_FORMATS`.
"""

from torchquant.config import QuantScheme
from torchquant.errors import QuantizationError
from torchquant.weights.activation import bind_w8a8, linear_w8a8
from torchquant.weights.base import IntWeightFormat, QuantizedLayer, WeightFormat
from torchquant.weights.fp4 import Fp4Format, Mxfp4Format, Nvfp4Format
from torchquant.weights.fp8 import Fp8Format
from torchquant.weights.fp8_block import Fp8BlockFormat
from torchquant.weights.int8 import Int8Format
from torchquant.weights.mxfp8 import Mxfp8Format
from torchquant.weights.packed_int import PackedIntFormat

# -- every storage kind; each weight scheme is held by exactly one of them
WEIGHT_FORMATS: tuple[WeightFormat, ...] = (
    PackedIntFormat(),
    Int8Format(),
    Fp8Format(),
    Fp8BlockFormat(),
    Nvfp4Format(),
    Mxfp4Format(),
    Mxfp8Format(),
)


def weight_format(scheme: QuantScheme) -> WeightFormat:
    """The format storing ``scheme``'s weight."""
    for fmt in WEIGHT_FORMATS:
        if fmt.holds(scheme.weight):
            return fmt
    known = ", ".join(fmt.name for fmt in WEIGHT_FORMATS)
    raise QuantizationError(f"no weight format stores {scheme.weight!r}; the formats are {known}")


__all__ = [
    "WEIGHT_FORMATS",
    "Fp4Format",
    "Fp8BlockFormat",
    "Fp8Format",
    "Int8Format",
    "IntWeightFormat",
    "Mxfp4Format",
    "Mxfp8Format",
    "Nvfp4Format",
    "PackedIntFormat",
    "QuantizedLayer",
    "WeightFormat",
    "bind_w8a8",
    "linear_w8a8",
    "weight_format",
]
