"""Weight-only quantized linear (W4 g128, W3 g128, W8 per channel) vs bf16 cuBLAS and tinygemm.

    python benchmarks/bench_weight_only.py            # H100 table
    TRITON_INTERPRET=1 python benchmarks/bench_weight_only.py --smoke   # correctness only

For every N x K shape and batch M: bf16 ``F.linear`` (cuBLAS), our dequant-matmul
(the path it picks is named), and for W4 g128 ``torch._weight_int4pack_mm``
(tinygemm, with its own packing and bf16 scale/zero pairs).  GB/s counts the bytes
that must move: packed weight, scales, zeros, activations and output.  The "vs
baseline" column compares W4 g128 with tinygemm on the same shape and M.

H100 targets (speedup over bf16 at 8192 x 8192): W4 g128 M=1 >= 3.0x, M=16 >= 2.3x,
M=64 >= 1.5x, M >= 256 >= 0.9x; W8 per channel M=1 >= 1.8x.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from bench_utils import Table, copy_bandwidth_gbs, parse_args, rotating, time_us
from torchquant.triton_kernels.dequant_matmul import dequant_matmul, select_path
from torchquant.triton_kernels.weight import QuantWeight

from torchquant import ops
from torchquant.numerics import pack_codes, quantize_int_weight

# name -> (bits, group_size, symmetric); 8-bit symmetric is stored as int8 (N, K)
SCHEMES = {"w4 g128": (4, 128, False), "w3 g128": (3, 128, False), "w8 per-ch": (8, -1, True)}


def quantized_weight(w: torch.Tensor, bits: int, group: int, symmetric: bool):
    sdt = w.dtype if group != -1 else torch.float32
    iw = quantize_int_weight(w, bits, group, symmetric, sdt)
    if bits == 8 and symmetric:
        qweight = (iw.codes.to(torch.int16) - 128).to(torch.int8)
    else:
        qweight = pack_codes(iw.codes, bits)
    return qweight, iw.scales, iw.zeros, iw.codes


def reference(x, qweight, scales, zeros, bias, bits: int, group: int) -> torch.Tensor:
    """The op's exact reference for the stored format (plain PyTorch, on any device)."""
    if qweight.dtype == torch.int8:
        return ops.linear_int8_weight_reference(x, qweight, scales, bias, group)
    return ops.linear_intn_reference(x, qweight, scales, zeros, bias, bits, group)


def weight_only_linear(x, qweight, scales, zeros, bias, bits: int, group: int) -> torch.Tensor:
    """The Triton dispatch on loose tensors (so the rotating copies reach every operand)."""
    return dequant_matmul(x, QuantWeight(qweight, scales, zeros, bits, group), bias)


def tinygemm_weight(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor):
    """tinygemm's layout for the same W4 g128 weight: w = (q - 8) * s + (8 - z) * s."""
    nibbles = codes.to(torch.int32)
    packed = torch._convert_weight_to_int4pack(
        (nibbles[:, ::2] << 4 | nibbles[:, 1::2]).to(torch.uint8), 8
    )
    s = scales.float()
    pairs = torch.stack([s.t(), ((8 - zeros.float()) * s).t()], dim=2)
    return packed, pairs.to(torch.bfloat16).contiguous()


def weight_bytes(qweight, scales, zeros) -> int:
    return sum(t.numel() * t.element_size() for t in (qweight, scales, zeros) if t is not None)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv)
    dev, smoke = args.device, args.smoke
    # under the interpreter bf16 tl.dot is not emulated correctly: smoke uses fp16 there
    dtype = torch.float16 if smoke and dev.type == "cpu" else torch.bfloat16
    table = Table(f"weight-only linear, {dtype}", copy_bandwidth_gbs(smoke))
    table.baselines = {f"w4 g128 ({select_path(m)})": "w4 g128 tinygemm" for m in args.batches}
    for n, k in args.shapes:
        torch.manual_seed(0)
        w = torch.randn(n, k, device=dev, dtype=dtype) * 0.02
        weights = {name: quantized_weight(w, *spec) for name, spec in SCHEMES.items()}
        for m in args.batches:
            shape = f"{n}x{k}"
            io_bytes = (m * k + m * n) * 2
            x = torch.randn(m, k, device=dev, dtype=dtype)
            ref = F.linear(x, w)
            base_sets = rotating((x, w), n * k * 2 + io_bytes, smoke)
            base_us = time_us(F.linear, base_sets, smoke, args.rep)
            table.add(shape, m, "F.linear (dense)", base_us, base_us, n * k * 2 + io_bytes)
            for name, (qweight, scales, zeros, codes) in weights.items():
                bits, group, _ = SCHEMES[name]
                run_args = (qweight, scales, zeros, None, bits, group)
                method = f"{name} ({select_path(m)})"
                out = weight_only_linear(x, *run_args)
                want = reference(x, *run_args)
                if not (
                    table.check(shape, m, method, out, want, 1e-2)
                    and table.check(shape, m, f"{method} vs bf16", out, ref, 0.5)  # gross errors
                ):
                    continue
                nbytes = weight_bytes(qweight, scales, zeros) + io_bytes
                sets = rotating((x, *run_args), nbytes, smoke)
                us = time_us(weight_only_linear, sets, smoke, args.rep)
                table.add(shape, m, method, us, base_us, nbytes)
                if name == "w4 g128" and dev.type == "cuda" and dtype == torch.bfloat16:
                    try:  # tinygemm takes K % 128 == 0 and N % 8 == 0 only
                        packed, pairs = tinygemm_weight(codes, scales, zeros)
                        tiny = torch._weight_int4pack_mm(x, packed, group, pairs)
                    except RuntimeError as error:
                        table.unavailable(shape, m, "w4 g128 tinygemm", error)
                    else:
                        if table.check(shape, m, "w4 g128 tinygemm", tiny, want, 2e-2):
                            sets = rotating((x, packed, group, pairs), nbytes, smoke)
                            us = time_us(torch._weight_int4pack_mm, sets, smoke, args.rep)
                            table.add(shape, m, "w4 g128 tinygemm", us, base_us, nbytes)
    table.finish("smoke ok: weight-only kernels match their references", smoke)


if __name__ == "__main__":
    main(sys.argv[1:])
