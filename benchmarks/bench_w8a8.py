"""W8A8 INT8 linear (activation quantization + int8 GEMM) vs bf16 cuBLAS and torch._int_mm.

    python benchmarks/bench_w8a8.py
    TRITON_INTERPRET=1 python benchmarks/bench_w8a8.py --smoke

Methods per N x K and M: bf16 ``F.linear``; ours end to end (dynamic per-token
quantization kernel + int8 GEMM with the fused epilogue, what ``QuantLinear`` runs);
ours GEMM only (activations already quantized); ``torch._int_mm`` with the scaling
done in torch, end to end (torch quantization) and GEMM only.  ``_int_mm`` needs
more than 16 rows, so smaller batches are padded to 32 rows for it.  GB/s counts
the int8 weight, the bf16 input and output, and the scales.  "vs baseline" compares
ours end to end with torch quantization + the torch GEMM, and GEMM only with GEMM only.

H100 targets (speedup over bf16 at 8192 x 8192, quantization included): INT8 M=4096
>= 1.5x and faster than ``_int_mm`` + torch scaling at every M; FP8 M=4096 >= 1.7x.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from bench_utils import Table, copy_bandwidth_gbs, parse_args, rotating, time_us
from torchquant.triton_kernels.act_quant import quantize_activation_rows
from torchquant.triton_kernels.fp8_gemm import fp8_gemm, fp8_supported
from torchquant.triton_kernels.w8a8_gemm import int8_gemm

from torchquant import ops
from torchquant.numerics import quantize_activation as reference_quantize
from torchquant.numerics import quantize_fp8_weight, quantize_int_weight
from torchquant.ops.fp8_gemm_choice import m_bucket, takes_scaled_mm


def quantized_weight(w: torch.Tensor, act_dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    if act_dtype == "fp8":
        q, s = quantize_fp8_weight(w, per_channel=True)
        return q, s.reshape(-1, 1)
    iw = quantize_int_weight(w, 8, -1, True, torch.float32)
    return (iw.codes.to(torch.int16) - 128).to(torch.int8), iw.scales


def ours_end_to_end(x, qweight, scales, act_dtype):
    xq, xs = quantize_activation_rows(x, act_dtype, True)
    gemm = int8_gemm if act_dtype == "int8" else fp8_gemm
    return gemm(xq, qweight, xs, scales, None, x.dtype)


def ours_gemm(xq, xs, qweight, scales, act_dtype):
    gemm = int8_gemm if act_dtype == "int8" else fp8_gemm
    return gemm(xq, qweight, xs, scales, None, torch.bfloat16)


def _pad_rows(t: torch.Tensor, multiple: int, minimum: int) -> torch.Tensor:
    rows = max(minimum, -(-t.shape[0] // multiple) * multiple)
    return F.pad(t, (0, 0, 0, rows - t.shape[0])) if rows != t.shape[0] else t


def torch_gemm(xq, xs, qweight, scales, act_dtype):
    """The torch baseline: ``_int_mm`` + scaling in torch, or ``_scaled_mm`` with row scales."""
    m = xq.shape[0]
    if act_dtype == "int8":
        xq_p = _pad_rows(xq, 8, 17)
        acc = torch._int_mm(xq_p, qweight.t())[:m]
        return (acc.float() * xs * scales.reshape(1, -1)).to(torch.bfloat16)
    xq_p, xs_p = _pad_rows(xq, 16, 16), _pad_rows(xs, 16, 16)
    out = torch._scaled_mm(
        xq_p, qweight.t(), scale_a=xs_p, scale_b=scales.reshape(1, -1), out_dtype=torch.bfloat16
    )
    return out[:m]


def torch_end_to_end(x, qweight, scales, act_dtype):
    xq, xs = reference_quantize(x, act_dtype, True)
    return torch_gemm(xq, xs, qweight, scales, act_dtype)


def run(act_dtype: str, argv: list[str] | None, description: str) -> None:
    args = parse_args(description, argv)
    dev, smoke = args.device, args.smoke
    if act_dtype == "fp8" and not fp8_supported(dev):
        print("FP8 GEMM needs compute capability >= 8.9; nothing to measure on this GPU")
        return
    name = "W8A8 INT8" if act_dtype == "int8" else "W8A8 FP8 E4M3"
    baseline = "_int_mm" if act_dtype == "int8" else "_scaled_mm"
    baselines = {
        "ours (quant + GEMM)": f"torch quant + {baseline}",
        "ours GEMM only": f"{baseline} only",
    }
    table = Table(f"{name} linear, bf16 activations", copy_bandwidth_gbs(smoke), baselines)
    faster: list[tuple[str, int, int, int]] = []  # -- FP8: where _scaled_mm's GEMM wins
    for n, k in args.shapes:
        torch.manual_seed(0)
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
        qweight, scales = quantized_weight(w, act_dtype)
        for m in args.batches:
            shape = f"{n}x{k}"
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            io_bytes = (m * k + m * n) * 2 + m * 4 + n * 4
            base_sets = rotating((x, w), n * k * 2 + io_bytes, smoke)
            base_us = time_us(F.linear, base_sets, smoke, args.rep)
            table.add(shape, m, "bf16 F.linear", base_us, base_us, n * k * 2 + io_bytes)
            # -- correctness first: ours vs the exact reference, and vs the float layer
            xq, xs = quantize_activation_rows(x, act_dtype, True)
            out = ours_end_to_end(x, qweight, scales, act_dtype)
            exact = ops.linear_w8a8_reference(
                x, qweight, scales, None, act_dtype, True, 100.0, None, None
            )
            if not (
                table.check(shape, m, "ours (quant + GEMM)", out, exact, 1e-2)
                and table.check(shape, m, "ours vs bf16", out, F.linear(x, w), 0.2)
            ):
                continue
            nbytes = n * k + io_bytes
            sets = rotating((x, qweight, scales, act_dtype), nbytes, smoke)
            us = time_us(ours_end_to_end, sets, smoke, args.rep)
            table.add(shape, m, "ours (quant + GEMM)", us, base_us, nbytes)
            sets = rotating((xq, xs, qweight, scales, act_dtype), nbytes, smoke)
            ours_gemm_us = time_us(ours_gemm, sets, smoke, args.rep)
            table.add(shape, m, "ours GEMM only", ours_gemm_us, base_us, nbytes)
            if dev.type != "cuda":
                continue  # the torch baselines are CUDA kernels
            try:  # _int_mm / _scaled_mm take only some shapes (multiples of 8 or 16)
                torch_out = torch_gemm(xq, xs, qweight, scales, act_dtype)
            except RuntimeError as error:
                table.unavailable(shape, m, baseline, error)
                continue
            if not table.check(shape, m, baseline, torch_out, exact, 1e-2):
                continue
            sets = rotating((x, qweight, scales, act_dtype), nbytes, smoke)
            us = time_us(torch_end_to_end, sets, smoke, args.rep)
            table.add(shape, m, f"torch quant + {baseline}", us, base_us, nbytes)
            sets = rotating((xq, xs, qweight, scales, act_dtype), nbytes, smoke)
            us = time_us(torch_gemm, sets, smoke, args.rep)
            table.add(shape, m, f"{baseline} only", us, base_us, nbytes)
            if act_dtype == "fp8" and us < ours_gemm_us and takes_scaled_mm(m, n, k, x.dtype):
                faster.append((torch.cuda.get_device_name(dev), n, k, m_bucket(m)))
    table.finish(f"smoke ok: {name} kernels match their references", smoke)
    # -- the rows of torchquant.ops.fp8_gemm_choice.SCALED_MM_FASTER this run measured
    for entry in faster:
        print(f"scaled_mm faster: {entry!r},")


def main(argv: list[str] | None = None) -> None:
    run("int8", argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    main(sys.argv[1:])
