"""Pure-PyTorch quantization numerics: the reference every kernel is tested against."""

from torchquant.numerics.activation import (
    activation_qmax,
    dequantize_activation,
    poison_nonfinite_rows,
    quantize_activation,
)
from torchquant.numerics.fp8_block import (
    block_grid,
    dequantize_activation_groups,
    dequantize_fp8_block_weight,
    expand_blocks,
    quantize_activation_groups,
    quantize_fp8_block_weight,
)
from torchquant.numerics.packing import pack_codes, packed_width, unpack_codes
from torchquant.numerics.qparams import (
    check_finite,
    choose_fp8_scale,
    choose_int_qparams,
    to_fp8_e4m3,
)
from torchquant.numerics.weight import (
    IntWeight,
    choose_fp8_weight_scale,
    dequantize_fp8_weight,
    dequantize_int_weight,
    expand_groups,
    expand_qparams,
    group_min_max,
    num_groups,
    quantize_codes,
    quantize_fp8_weight,
    quantize_int_weight,
)

__all__ = [
    "IntWeight",
    "activation_qmax",
    "block_grid",
    "check_finite",
    "choose_fp8_scale",
    "choose_fp8_weight_scale",
    "choose_int_qparams",
    "dequantize_activation",
    "dequantize_activation_groups",
    "dequantize_fp8_block_weight",
    "dequantize_fp8_weight",
    "dequantize_int_weight",
    "expand_blocks",
    "expand_groups",
    "expand_qparams",
    "group_min_max",
    "num_groups",
    "pack_codes",
    "packed_width",
    "poison_nonfinite_rows",
    "quantize_activation",
    "quantize_activation_groups",
    "quantize_codes",
    "quantize_fp8_block_weight",
    "quantize_fp8_weight",
    "quantize_int_weight",
    "to_fp8_e4m3",
    "unpack_codes",
]
