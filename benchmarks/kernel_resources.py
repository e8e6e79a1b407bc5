"""Compile every kernel config for a GPU architecture, no GPU needed: registers, spills, smem.

    python benchmarks/kernel_resources.py                    # sm_90, every autotune config
    python benchmarks/kernel_resources.py --arch 80 --first  # sm_80, first config of each

The launchers run as usual on CPU tensors (shape checks, allocation, grid), but each
launch only compiles the kernel (Triton ``warmup``) for ``--arch`` through the full
pipeline down to ``ptxas``, whose report gives registers per thread, spilled bytes and
shared memory per config.  A kernel that would not compile on that GPU (a typing or
layout error the interpreter does not see, too much shared memory) shows up here
before any GPU run.  FP8 kernels are skipped below sm_89, where the launchers refuse
them.  Must run without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
from collections.abc import Callable

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver


class CompileOnlyDriver:
    """Just enough of a Triton driver to compile for ``capability`` without a device."""

    def __init__(self, capability: int) -> None:
        self.target = GPUTarget("cuda", capability, 32)

    def get_current_device(self) -> int:
        return self.target.arch  # Triton caches binaries per device: one per architecture

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


PTXAS_USAGE = re.compile(r"Used (\d+) registers")
PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


class Recorder:
    """Replaces ``run_kernel``: compiles each config the autotuner would try, records ptxas."""

    def __init__(self, first_only: bool) -> None:
        self.first_only = first_only
        self.rows: list[tuple[str, str, str, int, int, int]] = []
        self.failures: list[str] = []
        self.case = ""

    def compile(self, fn, name: str, config: str, grid, **args) -> None:
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log):
                kernel = fn.warmup(grid=grid, **args)
        except Exception as error:  # report every failing config, then exit non-zero
            self.failures.append(f"{self.case} {name} {config}: {type(error).__name__}: {error}")
            return
        text = log.getvalue()
        if not PTXAS_USAGE.search(text):
            return  # the same binary as an earlier case (Triton's in-memory cache)
        regs = max(int(r) for r in PTXAS_USAGE.findall(text))
        spills = sum(int(s) + int(t) for s, t in PTXAS_SPILLS.findall(text))
        self.rows.append((self.case, name, config, regs, spills, kernel.metadata.shared))

    def run_kernel(self, kernel, grid: Callable, config, **args) -> None:
        kernel.nargs = {}
        configs = [config] if config is not None else kernel.prune_configs(args)
        for cfg in configs[:1] if self.first_only else configs:
            meta = {**args, **cfg.all_kwargs()}
            self.compile(kernel.fn, kernel.fn.__name__, _describe(cfg), (1,), **meta)

    def direct(self, kernel):
        """Stands in for ``kernel[grid](...)`` launches that bypass the autotuner."""
        recorder = self

        class Launch:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    named = dict(zip(kernel.arg_names, args, strict=False), **kwargs)
                    recorder.compile(kernel, kernel.__name__, "fixed", grid, **named)

                return launch

        return Launch()


def compile_only(arch: int, run_kernel: Callable, ptxas_log: bool = False):
    """Make every launcher compile for ``sm_<arch>`` through ``run_kernel`` instead of running.

    Sets the compile-only driver, lets the launchers accept CPU (or meta) tensors and
    replaces the ``run_kernel`` each kernel module launches through.  Returns the
    ``act_quant`` module, whose two direct launches callers may wrap as well.
    """
    triton.knobs.nvidia.dump_ptxas_log = ptxas_log
    triton.knobs.compilation.always_compile = ptxas_log  # a fresh ptxas report per config
    driver.set_active(CompileOnlyDriver(arch))

    from torchquant.triton_kernels import (
        _launch,
        act_quant,
        dequant,
        dequant_gemm,
        dequant_gemv,
        rms_norm,
        scaled_gemm,
    )

    _launch._INTERPRET = True  # lets the launchers accept CPU tensors; nothing is launched
    for module in (dequant, dequant_gemv, dequant_gemm, act_quant, scaled_gemm, rms_norm):
        module.run_kernel = run_kernel
    return act_quant


def _describe(config: triton.Config) -> str:
    meta = " ".join(f"{k.replace('BLOCK_', '')}={v}" for k, v in config.kwargs.items())
    return f"{meta} w{config.num_warps} s{config.num_stages}"


def cases(arch: int):
    """(description, launcher, args, kwargs): the shapes and formats the benchmarks use."""
    from torchquant.triton_kernels.act_quant import quantize_activation_rows as act_quant
    from torchquant.triton_kernels.dequant import dequantize_weight
    from torchquant.triton_kernels.dequant_gemm import dequant_gemm
    from torchquant.triton_kernels.dequant_gemv import dequant_gemv
    from torchquant.triton_kernels.fp8_gemm import fp8_gemm
    from torchquant.triton_kernels.rms_norm import rms_norm_rows
    from torchquant.triton_kernels.w8a8_gemm import int8_gemm
    from torchquant.triton_kernels.weight import QuantWeight

    n, k, bf16 = 4096, 4096, torch.bfloat16
    fp8 = arch >= 89

    def packed(bits: int) -> QuantWeight:
        groups = k // 128
        return QuantWeight(
            torch.zeros(n, k // 32 * bits, dtype=torch.int32),
            torch.ones(n, groups, dtype=bf16),
            torch.zeros(n, groups, dtype=torch.uint8),
            bits,
            128,
        )

    weights = {"w4 g128": packed(4), "w3 g128": packed(3)}
    weights["w8 per-ch"] = QuantWeight(
        torch.zeros(n, k, dtype=torch.int8), torch.ones(n, 1), None, 8, -1
    )
    if fp8:
        fp8_weight = torch.zeros(n, k).to(torch.float8_e4m3fn)
        weights["fp8 per-ch"] = QuantWeight(fp8_weight, torch.ones(n, 1), None, 8, -1)
    for name, weight in weights.items():
        yield f"dequantize {name}", dequantize_weight, (weight, k, bf16), {}
        x = torch.zeros(1, k, dtype=bf16)
        yield f"gemv {name}", dequant_gemv, (x, weight, None), {}
        x = torch.zeros(16, k, dtype=bf16)
        yield f"split-K gemm {name}", dequant_gemm, (x, weight, None), {"split_k": True}
        x = torch.zeros(256, k, dtype=bf16)
        yield f"tiled gemm {name}", dequant_gemm, (x, weight, None), {}
    x = torch.zeros(64, k)
    yield "tiled gemm w4 g128 fp32 (ieee)", dequant_gemm, (x, weights["w4 g128"], None), {}
    for act in ("int8", "fp8") if fp8 else ("int8",):
        for rows, width in ((16, 4096), (4096, 8192), (8, 32768)):
            x = torch.zeros(rows, width, dtype=bf16)
            yield f"act quant {act} per-token {rows}x{width}", act_quant, (x, act), {}
        x, smooth = torch.zeros(64, 4096, dtype=bf16), torch.ones(4096)
        args, kwargs = (x, act, False, smooth), {"row_scales": True}
        yield f"act quant {act} per-tensor + smooth, row scales", act_quant, args, kwargs
        gemm = int8_gemm if act == "int8" else fp8_gemm
        qdtype = torch.int8 if act == "int8" else torch.float8_e4m3fn
        w = torch.zeros(n, k, dtype=torch.int8).to(qdtype)
        for rows in (16, 4096):
            a = torch.zeros(rows, k, dtype=torch.int8).to(qdtype)
            args = (a, w, torch.ones(rows, 1), torch.ones(n, 1), torch.zeros(n, dtype=bf16), bf16)
            yield f"{act} gemm M={rows}", gemm, args, {}
    for width in (4096, 5120, 20000):  # -- one block per row (two widths), and the two-pass loop
        for after_cast in (True, False):
            x, w = torch.zeros(1, width, dtype=bf16), torch.ones(width, dtype=bf16)
            form = "llama" if after_cast else "gemma"
            args = (x, w, 1e-5, 0.0 if after_cast else 1.0, after_cast, bf16)
            yield f"rms norm {form} 1x{width}", rms_norm_rows, args, {}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 89, 90")
    parser.add_argument("--first", action="store_true", help="only the first config per tuning")
    parser.add_argument("--only", default="", help="comma list of substrings of case names")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("compiling needs the kernels built without TRITON_INTERPRET")
    recorder = Recorder(args.first)
    act_quant = compile_only(args.arch, recorder.run_kernel, ptxas_log=True)
    act_quant._absmax_kernel = recorder.direct(act_quant._absmax_kernel)
    act_quant._scale_from_absmax_kernel = recorder.direct(act_quant._scale_from_absmax_kernel)
    wanted = [w for w in args.only.split(",") if w]
    for case, launcher, launch_args, launch_kwargs in cases(args.arch):
        if wanted and not any(w in case for w in wanted):
            continue
        recorder.case = case
        launcher(*launch_args, **launch_kwargs)
        print(f"compiled: {case}", file=sys.stderr)
    print(f"\n## kernel resources on sm_{args.arch} (ptxas): registers/thread, spills, smem")
    print("| case | kernel | config | registers | spill bytes | shared bytes |")
    print("|---|---|---|---|---|---|")
    for case, name, config, regs, spills, smem in recorder.rows:
        print(f"| {case} | {name} | {config} | {regs} | {spills} | {smem} |")
    if recorder.failures:
        print("\nFAILED TO COMPILE:\n" + "\n".join(recorder.failures))
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
