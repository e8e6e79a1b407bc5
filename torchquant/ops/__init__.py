"""One ``torch.library`` custom op per quantized-linear scheme, one file per family.

``weight_int`` (packed INTn, with ``g_idx``), ``weight_int8``, ``weight_fp8``,
``weight_fp4`` (NVFP4, MXFP4), ``microscaled`` (NVFP4 / MXFP4 / MXFP8 weights with
activations of the same format, and MXFP8 weight-only), ``w8a8``, ``w4a8`` (INT4 weights,
INT8 or FP8 activations) and ``fp8_block`` (block-scaled FP8, weight-only and with
per-group FP8 activations) each hold their op, its exact reference (``*_reference``, the
oracle of every test), its fast CPU implementation on PyTorch's own kernels
(``cpu_kernels``) and its CUDA implementation (the Triton kernels, where Triton is
installed).  Every op has a fake (meta) implementation so ``torch.compile`` can trace
models that use it; layers call them through :func:`run`, or bind their arguments once
with :func:`bind`; both skip the dispatcher on eager CPU calls.  ``rms_norm`` (RMSNorm in one
kernel) serves the norms around the linears (``torchquant.modules.fuse_rms_norms``).
"""

from torchquant.ops.common import HAS_TRITON_KERNELS, bind, run
from torchquant.ops.fake_quant import fake_quant_int_weight, fake_quant_int_weight_backward
from torchquant.ops.fp8_block import (
    linear_fp8_block,
    linear_fp8_block_reference,
    linear_fp8_block_weight,
    linear_fp8_block_weight_reference,
)
from torchquant.ops.moe import moe_linear_reference, moe_linear_weight_only
from torchquant.ops.rms_norm import rms_norm, rms_norm_reference
from torchquant.ops.w4a8 import (
    linear_w4a8_cpu,
    linear_w4a8_fp8,
    linear_w4a8_int4,
    linear_w4a8_int8,
    linear_w4a8_reference,
    w4a8_cpu_layout,
)
from torchquant.ops.w8a8 import (
    ActivationQuant,
    bind_w8a8_cpu,
    linear_w8a8_cpu,
    linear_w8a8_fp8,
    linear_w8a8_int4,
    linear_w8a8_int8,
    linear_w8a8_reference,
    quantize_activation_op,
)
from torchquant.ops.w8a8_asym import (
    linear_w8a8_asym_cpu,
    linear_w8a8_asym_reference,
    linear_w8a8_int8_asym,
    weight_code_sums,
)
from torchquant.ops.weight_fp4 import linear_fp4_weight, linear_fp4_weight_reference
from torchquant.ops.weight_fp8 import (
    fp8_cpu_layout,
    linear_fp8_weight,
    linear_fp8_weight_cpu,
    linear_fp8_weight_reference,
)
from torchquant.ops.weight_int import (
    ActOrderLayout,
    act_order_layout,
    bind_intn_cpu,
    intn_cpu_layout,
    linear_intn,
    linear_intn_act_order,
    linear_intn_gidx,
    linear_intn_reference,
)
from torchquant.ops.weight_int8 import (
    bind_int8_weight_cpu,
    int8_cpu_layout,
    linear_int8_weight,
    linear_int8_weight_reference,
)

__all__ = [
    "ActOrderLayout",
    "ActivationQuant",
    "HAS_TRITON_KERNELS",
    "act_order_layout",
    "bind",
    "bind_int8_weight_cpu",
    "bind_intn_cpu",
    "bind_w8a8_cpu",
    "fake_quant_int_weight",
    "fake_quant_int_weight_backward",
    "fp8_cpu_layout",
    "int8_cpu_layout",
    "intn_cpu_layout",
    "linear_fp8_block",
    "linear_fp8_block_reference",
    "linear_fp8_block_weight",
    "linear_fp8_block_weight_reference",
    "linear_fp4_weight",
    "linear_fp4_weight_reference",
    "linear_fp8_weight",
    "linear_fp8_weight_cpu",
    "linear_fp8_weight_reference",
    "linear_int8_weight",
    "linear_int8_weight_reference",
    "linear_intn",
    "linear_intn_act_order",
    "linear_intn_gidx",
    "linear_intn_reference",
    "linear_w4a8_cpu",
    "linear_w4a8_fp8",
    "linear_w4a8_int4",
    "linear_w4a8_int8",
    "linear_w4a8_reference",
    "linear_w8a8_asym_cpu",
    "linear_w8a8_asym_reference",
    "linear_w8a8_cpu",
    "linear_w8a8_fp8",
    "linear_w8a8_int4",
    "linear_w8a8_int8",
    "linear_w8a8_int8_asym",
    "linear_w8a8_reference",
    "moe_linear_reference",
    "moe_linear_weight_only",
    "quantize_activation_op",
    "rms_norm",
    "rms_norm_reference",
    "run",
    "w4a8_cpu_layout",
    "weight_code_sums",
]
