"""FP8 W8A8 linear (E4M3 activation quantization + FP8 GEMM) vs bf16 cuBLAS and _scaled_mm.

    python benchmarks/bench_fp8.py
    TRITON_INTERPRET=1 python benchmarks/bench_fp8.py --smoke

Same table as ``bench_w8a8.py``: bf16 ``F.linear``; ours end to end (per-token E4M3
quantization kernel + FP8 GEMM with the fused epilogue) and GEMM only;
``torch._scaled_mm`` with row-wise scales, end to end (quantization in torch) and
GEMM only (rows padded to a multiple of 16 for it).  Needs compute capability 8.9+.
Where ``_scaled_mm``'s GEMM beats ours on a call it takes as it is, a closing line
``scaled_mm faster: (device, N, K, M bucket),`` gives the entry for
``torchquant.ops.fp8_gemm_choice.SCALED_MM_FASTER`` (``gpu_check.sh`` collects them).
"""

from __future__ import annotations

import sys

from bench_w8a8 import run


def main(argv: list[str] | None = None) -> None:
    run("fp8", argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    main(sys.argv[1:])
