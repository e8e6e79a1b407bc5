"""The quantized-linear ops by their former module; each family now has its own file."""

from torchquant.ops.w8a8 import (
    linear_w8a8_fp8,
    linear_w8a8_int8,
    linear_w8a8_reference,
    quantize_activation_op,
)
from torchquant.ops.weight_fp8 import linear_fp8_weight, linear_fp8_weight_reference
from torchquant.ops.weight_int import linear_intn, linear_intn_reference
from torchquant.ops.weight_int8 import linear_int8_weight, linear_int8_weight_reference

__all__ = [
    "linear_fp8_weight",
    "linear_fp8_weight_reference",
    "linear_int8_weight",
    "linear_int8_weight_reference",
    "linear_intn",
    "linear_intn_reference",
    "linear_w8a8_fp8",
    "linear_w8a8_int8",
    "linear_w8a8_reference",
    "quantize_activation_op",
]
