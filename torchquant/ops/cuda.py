"""The CUDA implementation of every op (the Triton kernels), by op name.

Each family's file registers its own with ``torch.library.register_kernel(op, "cuda")``;
this table names them for tests and callers that run a kernel directly.  Everything
is CUDA-graph safe: no host synchronisation and only shape-dependent allocations.
Autotuning runs on the first call of each shape class, so warm a model up before
capturing it in a graph.  Fallbacks to the reference, with a warning: FP8 on GPUs
below compute capability 8.9, and percentile activation scales (which need a sort).
"""

from torchquant.ops.fake_quant import (
    fake_quant_int_weight_backward_cuda,
    fake_quant_int_weight_cuda,
)
from torchquant.ops.fp8_block import linear_fp8_block_cuda
from torchquant.ops.rms_norm import rms_norm_cuda
from torchquant.ops.w4a8 import (
    linear_w4a8_fp8_cuda,
    linear_w4a8_int4_cuda,
    linear_w4a8_int8_cuda,
)
from torchquant.ops.w8a8 import (
    linear_w8a8_fp8_cuda,
    linear_w8a8_int4_cuda,
    linear_w8a8_int8_cuda,
    quantize_activation_cuda,
)
from torchquant.ops.w8a8_asym import linear_w8a8_asym_cuda
from torchquant.ops.weight_fp4 import linear_fp4_weight_cuda
from torchquant.ops.weight_fp8 import linear_fp8_weight_cuda
from torchquant.ops.weight_int import linear_intn_act_order_cuda, linear_intn_cuda
from torchquant.ops.weight_int8 import linear_int8_weight_cuda

CUDA_KERNELS = {
    "torchquant::linear_intn": linear_intn_cuda,
    "torchquant::linear_intn_act_order": linear_intn_act_order_cuda,
    "torchquant::linear_int8_weight": linear_int8_weight_cuda,
    "torchquant::linear_fp8_weight": linear_fp8_weight_cuda,
    "torchquant::linear_fp4_weight": linear_fp4_weight_cuda,
    "torchquant::linear_w8a8_int8": linear_w8a8_int8_cuda,
    "torchquant::linear_w8a8_fp8": linear_w8a8_fp8_cuda,
    "torchquant::linear_w8a8_int4": linear_w8a8_int4_cuda,
    "torchquant::linear_w8a8_int8_asym": linear_w8a8_asym_cuda,
    "torchquant::linear_fp8_block": linear_fp8_block_cuda,
    "torchquant::linear_w4a8_int8": linear_w4a8_int8_cuda,
    "torchquant::linear_w4a8_fp8": linear_w4a8_fp8_cuda,
    "torchquant::linear_w4a8_int4": linear_w4a8_int4_cuda,
    "torchquant::quantize_activation": quantize_activation_cuda,
    "torchquant::fake_quant_int_weight": fake_quant_int_weight_cuda,
    "torchquant::fake_quant_int_weight_backward": fake_quant_int_weight_backward_cuda,
    "torchquant::rms_norm": rms_norm_cuda,
}

__all__ = ["CUDA_KERNELS", *(f.__name__ for f in CUDA_KERNELS.values())]
