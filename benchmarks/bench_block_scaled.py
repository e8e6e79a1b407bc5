"""Block-scaled float weight-only linear (NVFP4, MXFP4, MXFP8) vs bf16 cuBLAS and our INT4 W4A16.

    python benchmarks/bench_block_scaled.py --shapes 8192x8192 --batches 1,16,64,256,4096
    TRITON_INTERPRET=1 python benchmarks/bench_block_scaled.py --smoke   # correctness only

For every N x K shape and batch M, in one run: bf16 ``F.linear`` (cuBLAS), our W4A16 g128
dispatch (``dequant_matmul``) and the block-scaled dispatch (``block_scaled_matmul``) for
each kind, the path named.  The "vs baseline" column compares each block-scaled kind with
W4A16 g128 on the same shape and M (issue 18's target: within 10%, i.e. >= 0.91x).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from bench_utils import Table, copy_bandwidth_gbs, parse_args, rotating, time_us
from bench_weight_only import quantized_weight, weight_bytes, weight_only_linear
from torchquant.triton_kernels.block_scaled_dispatch import block_scaled_matmul
from torchquant.triton_kernels.block_scaled_gemv import gemv_eligible
from torchquant.triton_kernels.block_scaled_weight import BlockScaledWeight
from torchquant.triton_kernels.dequant_matmul import GEMV_MAX_M, select_path

from torchquant.numerics.fp4 import pack_e2m1, quantize_mxfp4_weight, quantize_nvfp4_weight
from torchquant.numerics.microscaling import quantize_mxfp8_weight
from torchquant.ops.microscaled import linear_mxfp8_weight_reference
from torchquant.ops.weight_fp4 import linear_fp4_weight_reference

KINDS = ("nvfp4a16", "mxfp4a16", "mxfp8a16")
INT4 = "w4 g128"


def block_scaled_weight(w: torch.Tensor, kind: str) -> tuple:
    """``(qweight, scales, global_scale, block)`` of ``w`` in ``kind`` (round to nearest)."""
    if kind == "mxfp8a16":
        q = quantize_mxfp8_weight(w)
        return q.values, q.scales, None, 32
    q = (quantize_nvfp4_weight if kind == "nvfp4a16" else quantize_mxfp4_weight)(w)
    return pack_e2m1(q.codes), q.scales, q.global_scale, q.block


def block_scaled_linear(x, qweight, scales, global_scale, block) -> torch.Tensor:
    """The block-scaled dispatch on loose tensors (so the rotating copies reach every operand)."""
    return block_scaled_matmul(x, BlockScaledWeight(qweight, scales, global_scale, block), None)


def reference(x, qweight, scales, global_scale, block) -> torch.Tensor:
    if qweight.dtype == torch.float8_e4m3fn:
        return linear_mxfp8_weight_reference(x, qweight, scales, None)
    return linear_fp4_weight_reference(x, qweight, scales, global_scale, None, block)


def path_of(x: torch.Tensor, weight: BlockScaledWeight) -> str:
    m = x.shape[0]
    if m <= GEMV_MAX_M and not gemv_eligible(x, weight):
        return "split_k"
    return select_path(m)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv)
    dev, smoke = args.device, args.smoke
    # under the interpreter bf16 tl.dot is not emulated correctly: smoke uses fp16 there
    dtype = torch.float16 if smoke and dev.type == "cpu" else torch.bfloat16
    table = Table(f"block-scaled weight-only linear, {dtype}", copy_bandwidth_gbs(smoke))
    for n, k in args.shapes:
        torch.manual_seed(0)
        w = torch.randn(n, k, device=dev, dtype=dtype) * 0.02
        int4 = quantized_weight(w, 4, 128, False)[:3]
        kinds = {kind: block_scaled_weight(w, kind) for kind in KINDS}
        for m in args.batches:
            shape = f"{n}x{k}"
            io_bytes = (m * k + m * n) * 2
            x = torch.randn(m, k, device=dev, dtype=dtype)
            ref = F.linear(x, w)
            base_sets = rotating((x, w), n * k * 2 + io_bytes, smoke)
            base_us = time_us(F.linear, base_sets, smoke, args.rep)
            table.add(shape, m, "F.linear (dense)", base_us, base_us, n * k * 2 + io_bytes)
            run_args = (*int4, None, 4, 128)
            nbytes = weight_bytes(*int4) + io_bytes
            sets = rotating((x, *run_args), nbytes, smoke)
            us = time_us(weight_only_linear, sets, smoke, args.rep)
            table.add(shape, m, f"{INT4} ({select_path(m)})", us, base_us, nbytes)
            for kind, weight_args in kinds.items():
                method = f"{kind} ({path_of(x, BlockScaledWeight(*weight_args))})"
                table.baselines[method] = f"{INT4} ({select_path(m)})"
                out = block_scaled_linear(x, *weight_args)
                if not (
                    table.check(shape, m, method, out, reference(x, *weight_args), 1e-2)
                    and table.check(shape, m, f"{method} vs bf16", out, ref, 0.5)  # gross errors
                ):
                    continue
                nbytes = weight_bytes(*weight_args[:3]) + io_bytes
                sets = rotating((x, *weight_args), nbytes, smoke)
                us = time_us(block_scaled_linear, sets, smoke, args.rep)
                table.add(shape, m, method, us, base_us, nbytes)
    table.finish("smoke ok: block-scaled weight-only kernels match their references", smoke)


if __name__ == "__main__":
    main(sys.argv[1:])
