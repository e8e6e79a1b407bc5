"""Dynamic activation quantization (INT8/FP8, per token/tensor, SmoothQuant) vs torch and copy.

    python benchmarks/bench_act_quant.py
    TRITON_INTERPRET=1 python benchmarks/bench_act_quant.py --smoke

Rows are ``M x K`` activations (K from the N x K shapes' input sizes).  GB/s counts
one bf16 read, one 8-bit write and the scales; "% copy" compares with the measured
device copy bandwidth (target: >= 80% at 8192 x 8192).  Baselines: the reference
numerics in eager PyTorch, and a plain bf16 copy of the same tensor.
"""

from __future__ import annotations

import sys

import torch
from bench_utils import Table, copy_bandwidth_gbs, parse_args, rotating, time_us
from torchquant.triton_kernels.act_quant import quantize_activation_rows
from torchquant.triton_kernels.fp8_gemm import fp8_supported

from torchquant.numerics import quantize_activation as reference_quantize

# name -> (act dtype, per token, smooth)
VARIANTS = {
    "int8 per-token": ("int8", True, False),
    "int8 per-token smooth": ("int8", True, True),
    "int8 per-tensor": ("int8", False, False),
    "fp8 per-token": ("fp8", True, False),
}


def _reference(x, act_dtype, per_token, smooth):
    return reference_quantize(x, act_dtype, per_token, 100.0, None, smooth)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv)
    dev, smoke = args.device, args.smoke
    table = Table("dynamic activation quantization, bf16 input", copy_bandwidth_gbs(smoke))
    widths = sorted({k for _, k in args.shapes} | ({8192} if not smoke else set()))
    for k in widths:
        for m in sorted(set(args.batches) | ({8192} if k == 8192 else set())):
            torch.manual_seed(0)
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16) * 3
            smooth = torch.rand(k, device=dev) + 0.5
            shape, moved = f"{m}x{k}", m * k * 3 + m * 4
            copy_sets = rotating((x,), m * k * 4, smoke)
            copy_us = time_us(torch.clone, copy_sets, smoke, args.rep)
            table.add(shape, m, "bf16 copy (clone)", copy_us, copy_us, m * k * 4)
            for name, (act_dtype, per_token, use_smooth) in VARIANTS.items():
                if act_dtype == "fp8" and not fp8_supported(dev):
                    continue
                sm = smooth if use_smooth else None
                q, s = quantize_activation_rows(x, act_dtype, per_token, sm)
                q_ref, s_ref = _reference(x, act_dtype, per_token, sm)
                if not (
                    torch.equal(q.view(torch.int8), q_ref.view(torch.int8))
                    and torch.equal(s, s_ref)
                ):
                    table.failures.append(f"{name} {shape}: differs from the reference numerics")
                    table.rows.append((shape, m, f"{name} WRONG, not timed", *[float("nan")] * 4))
                    continue
                sets = rotating((x, act_dtype, per_token, sm), m * k * 3, smoke)
                us = time_us(quantize_activation_rows, sets, smoke, args.rep)
                table.add(shape, m, name, us, copy_us, moved)
                ref_us = time_us(_reference, sets, smoke, args.rep)
                table.add(shape, m, f"{name} (torch)", ref_us, copy_us, moved)
    table.title += " (the 'vs bf16' column is speed relative to the copy)"
    table.finish("smoke ok: activation quantization matches the reference bit for bit", smoke)


if __name__ == "__main__":
    main(sys.argv[1:])
