"""One ``torch.library`` custom op per quantized-linear scheme.

The implementation registered here is the plain-PyTorch reference used on CPU
and as the oracle in tests; ``torchquant.ops.cuda`` registers the Triton kernels
as the CUDA implementation of the same ops.  Every op has a fake (meta)
implementation so ``torch.compile`` can trace models that use it.
"""

from torchquant.ops.linear import (
    linear_fp8_weight,
    linear_int8_weight,
    linear_intn,
    linear_w8a8_fp8,
    linear_w8a8_int8,
    quantize_activation_op,
)

try:  # the Triton kernels become the CUDA implementation of the ops above
    import triton  # noqa: F401
except ImportError:  # no Triton (e.g. not Linux): the reference implementation runs everywhere
    HAS_TRITON_KERNELS = False
else:
    from torchquant.ops import cuda  # noqa: F401

    HAS_TRITON_KERNELS = True

__all__ = [
    "HAS_TRITON_KERNELS",
    "linear_fp8_weight",
    "linear_int8_weight",
    "linear_intn",
    "linear_w8a8_fp8",
    "linear_w8a8_int8",
    "quantize_activation_op",
]
