"""W4A8 linear (INT4 g128 weights x INT8 or FP8 activations) vs our W8A8 and W4A16, bf16.

    python benchmarks/bench_w4a8.py --shapes 8192x8192 --batches 16,64,256,1024,4096
    TRITON_INTERPRET=1 python benchmarks/bench_w4a8.py --smoke

Methods per N x K and M, all in one run on the same bf16 input: bf16 ``F.linear``; our
W4A16 g128 (the weight-only dispatch); our W8A8 INT8 and FP8 end to end (per-token
quantization kernel + 8-bit GEMM); our W4A8 INT8 and FP8 end to end (the same
quantization + the 4-bit GEMM on 8-bit tensor cores).  Each W4A8 row is compared with the
W8A8 row of its activation type, and a second table holds W4A16 / W4A8 time.  GB/s
counts the weight in its stored width, the bf16 input and output, and the scales.

Targets (issue 17, every benchmark shape): W4A8 >= 1.2x our W8A8 at M <= 256, and never
slower than our W4A16 at M >= 64, for both activation types.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from bench_utils import (
    Table,
    copy_bandwidth_gbs,
    parse_args,
    print_markdown_table,
    rotating,
    time_us,
)
from bench_w8a8 import ours_end_to_end as w8a8_end_to_end
from bench_w8a8 import quantized_weight as w8a8_weight
from bench_weight_only import quantized_weight as w4a16_weight
from bench_weight_only import weight_only_linear
from torchquant.triton_kernels.act_quant import quantize_activation_rows
from torchquant.triton_kernels.fp8_gemm import fp8_supported
from torchquant.triton_kernels.w4a8_gemm import w4a8_gemm

from torchquant import ops
from torchquant.numerics import pack_codes, quantize_int_weight

GROUP = 128
W4A8 = {"int8": "W4A8 INT8", "fp8": "W4A8 FP8"}
W8A8 = {"int8": "W8A8 INT8", "fp8": "W8A8 FP8"}


def w4a8_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric INT4 g128 codes packed 8 a word (the weight is ``code - 8``) and scales."""
    iw = quantize_int_weight(w, 4, GROUP, True, w.dtype)
    return pack_codes(iw.codes, 4), iw.scales


def w4a8_end_to_end(x, qweight, scales, act_dtype):
    xq, xs = quantize_activation_rows(x, act_dtype, True, row_scales=True)
    return w4a8_gemm(xq, xs, qweight, scales, GROUP, None, x.dtype)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv)
    dev, smoke = args.device, args.smoke
    acts = ["int8"] + (["fp8"] if fp8_supported(dev) else [])
    baselines = {W4A8[a]: W8A8[a] for a in acts}
    table = Table("W4A8 linear, bf16 activations", copy_bandwidth_gbs(smoke), baselines)
    over_w4a16: list[tuple] = []
    for n, k in args.shapes:
        torch.manual_seed(0)
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
        q16, s16, z16, _ = w4a16_weight(w, 4, GROUP, False)
        q4, s4 = w4a8_weight(w)
        q8 = {a: w8a8_weight(w, a) for a in acts}
        for m in args.batches:
            shape = f"{n}x{k}"
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            io_bytes = (m * k + m * n) * 2
            base_sets = rotating((x, w), n * k * 2 + io_bytes, smoke)
            base_us = time_us(F.linear, base_sets, smoke, args.rep)
            table.add(shape, m, "bf16 F.linear", base_us, base_us, n * k * 2 + io_bytes)
            nbytes = n * k // 2 + s16.numel() * 3 + io_bytes
            sets = rotating((x, q16, s16, z16, None, 4, GROUP), nbytes, smoke)
            w4a16_us = time_us(weight_only_linear, sets, smoke, args.rep)
            table.add(shape, m, "W4A16 g128", w4a16_us, base_us, nbytes)
            for act in acts:
                qweight, scales = q8[act]
                nbytes = n * k + n * 4 + io_bytes
                sets = rotating((x, qweight, scales, act), nbytes, smoke)
                table.add(
                    shape, m, W8A8[act], time_us(w8a8_end_to_end, sets, smoke, args.rep),
                    base_us, nbytes,
                )  # fmt: skip
                # -- correctness first: ours vs the exact reference, and vs the float layer
                out = w4a8_end_to_end(x, q4, s4, act)
                exact = ops.linear_w4a8_reference(
                    x.cpu(), q4.cpu(), s4.cpu(), None, GROUP, act, True, 100.0, None, None
                )
                if not (
                    table.check(shape, m, W4A8[act], out.cpu(), exact, 1e-2)
                    and table.check(shape, m, f"{W4A8[act]} vs bf16", out, F.linear(x, w), 0.25)
                ):
                    continue
                nbytes = n * k // 2 + s4.numel() * 2 + io_bytes
                sets = rotating((x, q4, s4, act), nbytes, smoke)
                us = time_us(w4a8_end_to_end, sets, smoke, args.rep)
                table.add(shape, m, W4A8[act], us, base_us, nbytes)
                over_w4a16.append((shape, m, W4A8[act], w4a16_us / us))
    print("\n## W4A8 against our W4A16 g128 (W4A16 time / W4A8 time; target >= 1.00x at M >= 64)")
    print_markdown_table("N x K | M | method | vs W4A16", "{} {} {} {:.2f}x", over_w4a16)
    table.finish("smoke ok: W4A8 kernels match their references", smoke)


if __name__ == "__main__":
    main(sys.argv[1:])
