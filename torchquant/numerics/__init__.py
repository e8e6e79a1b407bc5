"""Pure-PyTorch quantization numerics: the reference every kernel is tested against."""

from torchquant.numerics.activation import dequantize_activation, quantize_activation
from torchquant.numerics.packing import pack_codes, packed_width, unpack_codes
from torchquant.numerics.qparams import check_finite, choose_fp8_scale, choose_int_qparams
from torchquant.numerics.weight import (
    IntWeight,
    dequantize_fp8_weight,
    dequantize_int_weight,
    expand_groups,
    group_min_max,
    num_groups,
    quantize_codes,
    quantize_fp8_weight,
    quantize_int_weight,
)

__all__ = [
    "IntWeight",
    "check_finite",
    "choose_fp8_scale",
    "choose_int_qparams",
    "dequantize_activation",
    "dequantize_fp8_weight",
    "dequantize_int_weight",
    "expand_groups",
    "group_min_max",
    "num_groups",
    "pack_codes",
    "packed_width",
    "quantize_activation",
    "quantize_codes",
    "quantize_fp8_weight",
    "quantize_int_weight",
    "unpack_codes",
]
