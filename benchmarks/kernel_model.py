"""Cost model of the weight-only linear, read from the kernels' own SASS: no GPU needed.

    python benchmarks/kernel_model.py                  # sm_90 on the H200, every tuning config
    python benchmarks/kernel_model.py --quick          # default configs, 8192 x 8192 only
    python benchmarks/kernel_model.py --arch 80,89,90 --json
    python benchmarks/kernel_model.py --quick --moe    # with the mixture-of-experts rows
    python benchmarks/kernel_model.py --quick --w4a8   # with the W4A8 (and W8A8) rows
    python benchmarks/kernel_model.py --quick --w8a8   # W8A8 INT8/FP8 with act-quant, wgmma depth

For every weight-only scheme, benchmark shape ``N x K`` and batch ``M``, the linear runs
through the dispatch (``dequant_matmul``) exactly as a layer calls it, on meta tensors.
Each Triton launch compiles its kernel for ``--arch`` (every config the autotuner may
pick, or only the default one the launcher runs untuned with ``--quick``) through the
compile-only driver of ``kernel_resources.py``; ``nvdisasm`` (shipped with Triton)
disassembles the cubin and the hot loop -- the innermost loop that loads from global
memory -- is counted by instruction class; ``cuobjdump -res-usage`` gives registers and
local (spill) memory.  The rest of the call's device work (zero-fills, cast copies,
cuBLAS) is counted from the aten ops it dispatches.

Each launch is bounded below by the largest of

* bytes / copy bandwidth -- every tensor the launch touches, read or written once, and a
  split-K launch's partial tiles, written and read back (:func:`split_workspace_bytes`);
* warp-instructions / issue rate -- the hot loop times its trip count, over the SMs
  the grid occupies (four schedulers per SM, each issuing one warp-instruction a clock);
* flops / dense tensor-core peak, for launches that issue MMAs (or cuBLAS);

and every launch after the first adds ``LAUNCH_GAP_US``.  The prediction is compared
with bf16 cuBLAS at its own floor, ``max(2NK + 2MK + 2MN bytes / bandwidth, 2MNK / peak)``.

This is a necessary condition, not a proof.  Latency, stalls, bank conflicts, wave tails
and L2 misses only add time, so a kernel whose bound misses a target cannot meet it on
the GPU; one whose bound meets it still has to be measured (``benchmarks/gpu_check.sh``).
Constants the table marks as estimates should be replaced by measured copy bandwidth.
Must run without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
import triton
from kernel_resources import compile_only
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


@dataclass(frozen=True)
class Machine:
    name: str
    arch: int
    sms: int
    clock_ghz: float  # the clock held under sustained load, not the boost clock
    issue_per_sm: int  # warp-instructions per clock per SM (one per scheduler)
    bandwidth_gbs: float  # device copy bandwidth, (read + write) / time
    bandwidth_note: str
    tensor_tflops: float  # dense bf16 tensor-core peak


# fmt: off
MACHINES = {
    "h200": Machine("H200 SXM", 90, 132, 1.755, 4, 4300.0,
                    "estimate: 4.8 TB/s HBM3e x 0.9 (the H100's copy/spec ratio)", 989.0),
    "h100": Machine("H100 SXM", 90, 132, 1.755, 4, 3000.0,
                    "measured copy, benchmarks/bench_utils.copy_bandwidth_gbs", 989.0),
    "l40s": Machine("L40S", 89, 142, 2.25, 4, 780.0, "estimate: 864 GB/s GDDR6 x 0.9", 362.0),
    "a100": Machine("A100 SXM", 80, 108, 1.41, 4, 1800.0, "estimate: 2.04 TB/s HBM2e x 0.9",
                    312.0),
}
# fmt: on
DEFAULT_MACHINE = {90: "h200", 89: "l40s", 80: "a100"}
LAUNCH_GAP_US = 1.0  # the least a dependent kernel boundary costs, even inside a CUDA graph

# CLI scheme name -> (bits, group_size, storage); wNa16 is asymmetric, w8a16 symmetric INT8
SCHEMES = {
    "w2a16": (2, 128, "packed"),
    "w3a16": (3, 128, "packed"),
    "w4a16": (4, 128, "packed"),
    "w8a16": (8, -1, "int8"),
    "w8a16-fp8": (8, -1, "fp8"),
}
DEFAULT_SCHEMES = ("w4a16", "w3a16", "w8a16", "w8a16-fp8")
SHAPES = [(4096, 4096), (8192, 8192), (14336, 4096), (4096, 14336)]  # (N, K), as benchmarked
BATCHES = [1, 16, 64, 256, 4096]
# (scheme, least M) -> speedup over bf16 the issue sets, at every benchmark shape
TARGETS = {
    ("w4a16", 1): 3.0,
    ("w4a16", 2): 2.3,
    ("w4a16", 17): 1.5,
    ("w4a16", 256): 0.9,
    ("w8a16", 1): 1.8,
    ("w8a16", 2): None,  # the issue sets W8A16 at M = 1 only
}

# -- SASS: hot loop and instruction classes

CLASSES = {
    "global_load": ("LDG", "LDGSTS", "UTMALDG", "UBLKCP"),
    "shared_store": ("STS", "STSM"),
    "shared_load": ("LDS", "LDSM"),
    "shuffle": ("SHFL",),
    "barrier": ("BAR", "SYNCS"),
    "mma": ("HMMA", "IMMA", "HGMMA", "IGMMA", "QGMMA", "WGMMA", "BMMA", "DMMA"),
    "convert": ("I2F", "I2FP", "F2F", "F2I", "F2FP", "FRND", "I2I", "I2IP"),
    "float": ("FFMA", "FADD", "FMUL", "FMNMX", "FSETP", "FSEL", "HFMA2", "HADD2", "HMUL2", "FCHK"),
    "integer": (
        "LOP3",
        "SHF",
        "IADD3",
        "IMAD",
        "LEA",
        "PRMT",
        "ISETP",
        "SEL",
        "MOV",
        "IMNMX",
        "BMSK",
        "SGXT",
        "IABS",
        "VIADD",
        "VIMNMX",
        "CS2R",
        "S2R",
        "S2UR",
        "ULDC",
        "UMOV",
        "UIADD3",
        "ULOP3",
        "USHF",
        "UISETP",
        "ULEA",
        "UIMAD",
        "USEL",
        "UPRMT",
        "R2UR",
        "PLOP3",
        "P2R",
        "R2P",
    ),
    "atomic": ("RED", "ATOM", "ATOMG", "REDG"),
    "spill": ("STL", "LDL"),
    "branch": ("BRA", "BSSY", "BSYNC", "WARPSYNC", "EXIT", "CALL", "RET"),
}
_CLASS_OF = {op: name for name, ops in CLASSES.items() for op in ops}
_INSTR = re.compile(
    r"/\*[0-9a-f]+\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)(\.[^ ;]*)?\s*([^;]*);"
)
_LABEL = re.compile(r"^\.(L_x_\d+):")
_TARGET = re.compile(r"`\(\.(L_x_\d+)\)")
_RES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def _tool(name: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def tools_available() -> bool:
    return all(os.access(_tool(t), os.X_OK) for t in ("nvdisasm", "cuobjdump"))


@dataclass
class Sass:
    """What one compiled kernel issues: its hot loop by instruction class, and its resources."""

    loop: Counter  # warp-instructions per loop iteration, by class
    has_loop: bool
    registers: int
    spill_bytes: int  # local memory per thread (ptxas spills)
    smem: int
    warps: int
    mma_in_flight: int | None = None  # see mma_in_flight()

    @property
    def loop_instructions(self) -> int:
        return sum(self.loop.values())

    def dominant(self) -> str:
        return self.loop.most_common(1)[0][0] if self.loop else "-"


def hot_loop(lines: list[str]) -> tuple[list[str], bool]:
    """Opcodes of the innermost loop that loads from global memory (or of the whole kernel)."""
    ops, has_loop, _ = hot_loop_text(lines)
    return ops, has_loop


def hot_loop_text(lines: list[str]) -> tuple[list[str], bool, list[str]]:
    """:func:`hot_loop`'s opcodes, whether a loop was found, and the loop's instructions."""
    ops: list[str] = []
    text: list[str] = []
    labels: dict[str, int] = {}
    branches: list[tuple[int, str]] = []
    for line in lines:
        if label := _LABEL.match(line.strip()):
            labels[label.group(1)] = len(ops)
            continue
        if not (ins := _INSTR.search(line)) or ins.group(1) == "NOP":
            continue
        if ins.group(1) == "BRA" and (target := _TARGET.search(ins.group(3))):
            branches.append((len(ops), target.group(1)))
        ops.append(ins.group(1))
        text.append(line.strip())
    loops = [(labels[t], i + 1) for i, t in branches if t in labels and labels[t] <= i]
    loads = [(a, b) for a, b in loops if any(_CLASS_OF.get(op) == "global_load" for op in ops[a:b])]
    innermost = [
        (a, b)
        for a, b in loads
        if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loads)
    ]
    if not innermost:
        return ops, False, text
    a, b = max(innermost, key=lambda span: span[1] - span[0])
    return ops[a:b], True, text[a:b]


_WGMMA_WAIT = re.compile(r"WARPGROUP\.DEPBAR\.LE\s+gsb0,\s*0x([0-9a-f]+)")


def mma_in_flight(loop_text: list[str]) -> int | None:
    """wgmma groups left pending by the loop's tightest wait (None: no wgmma wait in it).

    0 means the tensor cores drain every K step: the next step's MMAs cannot start
    before the last one's results are back, so nothing overlaps across steps.
    """
    waits = [int(m.group(1), 16) for line in loop_text if (m := _WGMMA_WAIT.search(line))]
    return min(waits) if waits else None


def _disassemble(cubin: bytes) -> tuple[str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        sass = subprocess.run(
            [_tool("nvdisasm"), "-c", str(path)], capture_output=True, text=True, check=True
        ).stdout
        res = subprocess.run(
            [_tool("cuobjdump"), "-res-usage", str(path)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    return sass, res


def analyze(compiled) -> Sass:
    """Count the hot loop of a compiled Triton kernel (``fn.warmup`` result)."""
    return _analyze(compiled.asm["cubin"], compiled.metadata.shared, compiled.metadata.num_warps)


@functools.cache
def _analyze(cubin: bytes, shared: int, warps: int) -> Sass:
    sass, res = _disassemble(cubin)
    ops, has_loop, loop_text = hot_loop_text(sass.splitlines())
    usage = _RES.search(res)
    regs, stack, static_smem, local = (int(v) for v in usage.groups()) if usage else (0, 0, 0, 0)
    return Sass(
        loop=Counter(_CLASS_OF.get(op, "other") for op in ops),
        has_loop=has_loop,
        registers=regs,
        spill_bytes=local + stack,
        smem=max(static_smem, shared),
        warps=warps,
        mma_in_flight=mma_in_flight(loop_text) if has_loop else None,
    )


# -- recording what one linear call launches


@dataclass
class Candidate:
    """One config a launch may run with: its compiled kernel's counts, its grid and the
    bytes it moves through a split-K workspace (:func:`split_workspace_bytes`)."""

    config: str
    sass: Sass
    grid: tuple[int, ...]
    meta: dict
    workspace_bytes: int = 0


@dataclass
class Launch:
    kernel: str
    nbytes: int
    flops: int = 0
    candidates: list[Candidate] = field(default_factory=list)


# -- a split-K launch's workspace and tile counters: what they move depends on the config
WORKSPACE_ARGS = ("ws_ptr", "lock_ptr")


def split_workspace_bytes(meta: dict, grid: tuple[int, ...]) -> int:
    """Bytes a launch that reduces its splits in the last program of a tile (or GEMV row
    block) moves through its workspace: every split writes its ``(M, N)`` partial plane,
    the last split reads all of them back, and each tile's int32 counter is read and
    written by one atomic per split plus the reset.  0 for unsplit launches.

    Counted at copy bandwidth like every other byte, though partials written and read
    back within one launch may be served from L2: this term can overstate, never hide.
    """
    splits = int(meta.get("SPLIT_K", 1))
    if "ws_ptr" not in meta or splits == 1 or not meta.get("SPLIT_TILES", True):
        return 0
    plane = int(meta["M"]) * int(meta["N"]) * meta["ws_ptr"].element_size()
    counters = math.prod(grid) // splits
    return 2 * splits * plane + counters * (splits + 1) * 2 * meta["lock_ptr"].element_size()


def _tensor_bytes(*trees) -> int:
    seen: dict[int, int] = {}
    for leaf in tree_leaves(trees):
        if isinstance(leaf, torch.Tensor):
            seen[id(leaf)] = leaf.numel() * leaf.element_size()
    return sum(seen.values())


# aten ops that launch nothing on the device
_FREE_OPS = {
    "empty",
    "empty_like",
    "empty_strided",
    "view",
    "_unsafe_view",
    "t",
    "transpose",
    "permute",
    "expand",
    "as_strided",
    "alias",
    "detach",
    "slice",
    "select",
    "unsqueeze",
    "squeeze",
    "_reshape_alias",
    "lift_fresh",
    "reshape",
    "contiguous",
    "resize_",
    "set_",
    "sym_size",
    "sym_stride",
    "sym_numel",
    "sym_storage_offset",
    "is_contiguous",
}


class DeviceWork(TorchDispatchMode):
    """Records the aten ops of a call that would launch device kernels (bytes, flops)."""

    def __init__(self, launches: list[Launch]) -> None:
        super().__init__()
        self.launches = launches

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name not in _FREE_OPS:
            flops = 0
            if name in ("mm", "addmm"):
                a, b = args[-2], args[-1]
                flops = 2 * a.shape[0] * a.shape[1] * b.shape[1]
            self.launches.append(Launch(f"aten.{name}", _tensor_bytes(args, kwargs, out), flops))
        return out


class Recorder:
    """Stands in for ``run_kernel``: compiles each config a launch may use, nothing runs."""

    def __init__(self, all_configs: bool) -> None:
        self.all_configs = all_configs
        self.launches: list[Launch] = []
        self._compiled: dict[tuple, Sass] = {}

    def run_kernel(self, kernel, grid, config, **args) -> None:
        kernel.nargs = {}
        configs = [config] if config is not None else kernel.prune_configs(args)
        with torch.utils._python_dispatch._disable_current_modes():
            tensors = {k: v for k, v in args.items() if k not in WORKSPACE_ARGS}
            launch = Launch(kernel.fn.__name__, _tensor_bytes(tensors))
            if launch.kernel.startswith("_gemm"):
                x = args["x_ptr"]
                launch.flops = 2 * x.shape[0] * x.shape[1] * args["N"]
            for cfg in configs if self.all_configs else configs[:1]:
                meta = {**args, **cfg.all_kwargs()}
                cells = tuple(grid(meta))
                sass = self._sass(kernel.fn, meta)
                workspace = split_workspace_bytes(meta, cells)
                launch.candidates.append(Candidate(_describe(cfg), sass, cells, meta, workspace))
            self.launches.append(launch)

    def _sass(self, fn, meta) -> Sass:
        with contextlib.redirect_stdout(sys.stderr):
            compiled = fn.warmup(grid=(1,), **meta)  # Triton's caches skip known binaries
        return analyze(compiled)


def _describe(config: triton.Config) -> str:
    meta = " ".join(f"{k.replace('BLOCK_', '')}={v}" for k, v in config.kwargs.items())
    return f"{meta} w{config.num_warps} s{config.num_stages}"


# -- the bound


def _occupancy(sass: Sass) -> int:
    """CTAs one SM can hold (registers, shared memory, 64 warps), at least 1."""
    regs = max(8, -(-sass.registers // 8) * 8) * 32 * sass.warps
    by_regs = 65536 // regs
    by_smem = (227 * 1024) // sass.smem if sass.smem else 32
    return max(1, min(by_regs, by_smem, 64 // sass.warps, 32))


def iterations(cand: Candidate) -> int:
    """Hot-loop trips summed over the grid: one per BLOCK_K tile of every program's K run."""
    ctas = math.prod(cand.grid)
    if not cand.sass.has_loop:
        return ctas
    split = int(cand.meta.get("SPLIT_K", 1))
    # -- a loop trip may unroll several K tiles (W4A8: the tiles of one group)
    step = cand.meta["BLOCK_K"] * max(1, int(cand.meta.get("GROUP_TILES", 1)))
    return ctas // split * triton.cdiv(cand.meta["K"], step)


def launch_bound(launch: Launch, cand: Candidate | None, machine: Machine) -> dict:
    """Lower bound in microseconds for one launch and what sets it, with the bytes it
    moves (its tensors once, and the candidate's split-K workspace traffic)."""
    nbytes = launch.nbytes + (cand.workspace_bytes if cand is not None else 0)
    bound = {"bytes": nbytes / (machine.bandwidth_gbs * 1e3)}
    mma = launch.kernel.startswith("aten.") or (cand is not None and cand.sass.loop["mma"] > 0)
    if launch.flops and mma:
        bound["flops"] = launch.flops / (machine.tensor_tflops * 1e6)
    instr = 0
    if cand is not None:
        ctas = math.prod(cand.grid)
        instr = cand.sass.loop_instructions * cand.sass.warps * iterations(cand)
        busiest = -(-ctas // machine.sms)
        resident = min(busiest, _occupancy(cand.sass))
        width = min(machine.issue_per_sm, resident * cand.sass.warps)
        per_cta = instr / ctas
        bound["issue"] = busiest * per_cta / width / (machine.clock_ghz * 1e3)
    limit = max(bound, key=bound.get)
    return {"us": bound[limit], "limit": limit, "instructions": instr, "bytes": nbytes}


def bf16_floor_us(m: int, n: int, k: int, machine: Machine) -> float:
    nbytes = 2 * (n * k + m * k + m * n)
    return max(
        nbytes / (machine.bandwidth_gbs * 1e3), 2 * m * n * k / (machine.tensor_tflops * 1e6)
    )


def target_for(scheme: str, m: int) -> float | None:
    found = [(least, t) for (s, least), t in TARGETS.items() if s == scheme and m >= least]
    return max(found)[1] if found else None


# -- one linear call


def weight(scheme: str, n: int, k: int, device: str = "meta") -> tuple:
    bits, group, storage = SCHEMES[scheme]
    if storage == "packed":
        g = -(-k // group)
        return (
            torch.empty(n, -(-k // 32) * bits, dtype=torch.int32, device=device),
            torch.empty(n, g, dtype=torch.bfloat16, device=device),
            torch.empty(n, g, dtype=torch.uint8, device=device),
            bits,
            group,
        )
    dtype = torch.int8 if storage == "int8" else torch.float8_e4m3fn
    q = torch.empty(n, k, dtype=dtype, device=device)
    return q, torch.empty(n, 1, device=device), None, 8, -1


def model_call(recorder: Recorder, scheme: str, m: int, n: int, k: int) -> list[Launch]:
    """Every launch of one ``dequant_matmul`` call after a first one (each with its config
    candidates): buffers a launcher creates once and keeps are not counted."""
    from torchquant.triton_kernels.dequant_matmul import dequant_matmul
    from torchquant.triton_kernels.weight import QuantWeight

    quant_weight = QuantWeight(*weight(scheme, n, k))
    x = torch.empty(m, k, dtype=torch.bfloat16, device="meta")
    dequant_matmul(x, quant_weight, None)  # one-time setup is not counted
    recorder.launches = []
    with DeviceWork(recorder.launches):
        dequant_matmul(x, quant_weight, None)
    return recorder.launches


def row(
    scheme: str, m: int, n: int, k: int, arch: int, machine: Machine, launches: list[Launch]
) -> dict:
    """The table row of one call: each launch at its best config, summed."""
    from torchquant.triton_kernels.dequant_matmul import select_path

    total_us, instr, nbytes, kernels, chosen = 0.0, 0, 0, [], []
    for launch in launches:
        options = launch.candidates or [None]
        scored = [(launch_bound(launch, c, machine), i, c) for i, c in enumerate(options)]
        best, _, cand = min(scored, key=lambda s: (s[0]["us"], s[1]))
        total_us += best["us"]
        instr += best["instructions"]
        nbytes += best["bytes"]
        kernels.append(launch.kernel)
        if cand is not None:
            chosen.append((launch, cand, best["limit"]))
    total_us += LAUNCH_GAP_US * max(0, len(launches) - 1)
    bf16 = bf16_floor_us(m, n, k, machine)
    main = max(chosen, key=lambda c: c[0].nbytes, default=None)
    sass = main[1].sass if main else None
    per_iter = dict(sass.loop) if sass else {}
    bits, group, _ = SCHEMES[scheme]
    return {
        "scheme": scheme,
        "group_size": group,
        "M": m,
        "N": n,
        "K": k,
        "arch": arch,
        "machine": machine.name,
        "path": select_path(m),
        "kernel": "+".join(kernels),
        "config": main[1].config if main else "-",
        "instr_per_weight": round(instr / (n * k), 4),
        "loop_per_iteration": per_iter,
        "dominant_class": sass.dominant() if sass else "-",
        "global_loads": per_iter.get("global_load", 0),
        "shared_stores": per_iter.get("shared_store", 0),
        "shuffles": per_iter.get("shuffle", 0),
        "barriers": per_iter.get("barrier", 0),
        "mma": per_iter.get("mma", 0),
        "mma_in_flight": sass.mma_in_flight if sass else None,
        "registers": sass.registers if sass else 0,
        "spill_bytes": max((c[1].sass.spill_bytes for c in chosen), default=0),
        "smem": sass.smem if sass else 0,
        "launches": len(launches),
        "bytes": nbytes,
        "workspace_bytes": sum(c[1].workspace_bytes for c in chosen),
        "limit": main[2] if main else "-",
        "predicted_us": round(total_us, 2),
        "bf16_floor_us": round(bf16, 2),
        "predicted_speedup": round(bf16 / total_us, 3),
        "target": target_for(scheme, m),
    }


ACT_QUANT_SHAPES = [(16, 4096), (4096, 8192), (8192, 8192)]  # (rows, K) of x, bf16
ACT_QUANT_TARGET = 0.8  # fraction of copy bandwidth (issue 14), at 8192 x 8192


def act_quant_rows(recorder: Recorder, arch: int, machines) -> list[dict]:
    """Per-token dynamic activation quantization of bf16 ``x``: one row per shape and dtype.

    ``predicted_fraction_of_copy`` is the time a copy of the same bytes takes (read ``x``,
    write ``q`` and the scales) over the predicted time; ``predicted_speedup`` compares
    with a bf16 copy of ``x`` (read and write 2 bytes an element).
    """
    from torchquant.triton_kernels.act_quant import (
        quantize_activation_int4_packed,
        quantize_activation_rows,
    )

    rows = []
    for act in ("int8", "int4-packed", "fp8") if arch >= 89 else ("int8", "int4-packed"):
        for m, k in ACT_QUANT_SHAPES:
            x = torch.empty(m, k, dtype=torch.bfloat16, device="meta")
            recorder.launches = []
            with DeviceWork(recorder.launches):
                if act == "int4-packed":  # -- two codes a byte: half of INT8's writes
                    quantize_activation_int4_packed(x, True)
                else:
                    quantize_activation_rows(x, act, True)
            print(f"modelled: sm_{arch} act-quant {act} {m}x{k}", file=sys.stderr)
            for name in machines.get(arch, [DEFAULT_MACHINE[arch]]):
                rows.append(_act_quant_row(act, m, k, arch, MACHINES[name], recorder.launches))
    return rows


def _act_quant_row(act, m, k, arch, machine: Machine, launches: list[Launch]) -> dict:
    total_us, instr, chosen = 0.0, 0, []
    for launch in launches:
        scored = [(launch_bound(launch, c, machine), i, c) for i, c in enumerate(launch.candidates)]
        best, _, cand = min(scored, key=lambda s: (s[0]["us"], s[1]))
        total_us += best["us"]
        instr += best["instructions"]
        chosen.append((launch, cand, best["limit"]))
    total_us += LAUNCH_GAP_US * max(0, len(launches) - 1)
    nbytes = sum(launch.nbytes for launch in launches)
    copy_us = nbytes / (machine.bandwidth_gbs * 1e3)
    bf16_copy_us = 4 * m * k / (machine.bandwidth_gbs * 1e3)
    launch, cand, limit = max(chosen, key=lambda c: c[0].nbytes)
    per_iter = dict(cand.sass.loop)
    return {
        "scheme": "act-quant",
        "act_dtype": act,
        "group_size": None,
        "M": m,
        "N": k,
        "K": k,
        "arch": arch,
        "machine": machine.name,
        "path": "per-token",
        "kernel": "+".join(launch.kernel for launch, _, _ in chosen),
        "config": cand.config,
        "instr_per_weight": round(instr / (m * k), 4),  # warp-instructions per element
        "instr_per_element_per_thread": round(32 * instr / (m * k), 2),
        "loop_per_iteration": per_iter,
        "dominant_class": cand.sass.dominant(),
        "registers": cand.sass.registers,
        "spill_bytes": cand.sass.spill_bytes,
        "launches": len(launches),
        "bytes": nbytes,
        "limit": limit,
        "predicted_us": round(total_us, 2),
        "bf16_floor_us": round(bf16_copy_us, 2),
        "predicted_speedup": round(bf16_copy_us / total_us, 3),
        "predicted_fraction_of_copy": round(copy_us / total_us, 3),
        # -- issue 14's copy target is INT8's and FP8's; packed INT4 has none yet
        "target": ACT_QUANT_TARGET if (m, k) == (8192, 8192) and act != "int4-packed" else None,
    }


def print_act_quant_table(rows: list[dict]) -> None:
    print("\n## activation quantization, per token, bf16 x (predicted lower bounds)")
    print(
        "| dtype | rows x K | sm | machine | config | instr/elem/thread | regs | spill | "
        "launches | limit | pred us | copy fraction | target |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        target = (
            "-"
            if r["target"] is None
            else (
                f"{r['target']} "
                f"{'ok' if r['predicted_fraction_of_copy'] >= r['target'] else 'MISS'}"
            )
        )
        print(
            f"| {r['act_dtype']} | {r['M']}x{r['K']} | {r['arch']} | {r['machine']} | "
            f"{r['config']} | {r['instr_per_element_per_thread']:.1f} | {r['registers']} | "
            f"{r['spill_bytes']} | {r['launches']} | {r['limit']} | {r['predicted_us']:.1f} | "
            f"{r['predicted_fraction_of_copy']:.2f} | {target} |"
        )


# -- mixture of experts: a Mixtral-shaped projection, the grouped kernel vs the per-expert loop

MOE_EXPERTS, MOE_TOP_K = 8, 2
MOE_PROJECTIONS = {"gate_up": (2 * 14336, 4096), "down": (4096, 14336)}  # (N, K) of Mixtral
MOE_SCHEMES = ("w4a16", "w8a16", "w8a16-fp8")
MOE_TOKENS = (1, 16)


def moe_routing(tokens: int) -> torch.Tensor:
    """``(tokens, top_k)`` expert indices: slot ``s`` to expert ``s % E`` (balanced; one token
    uses two experts, sixteen use all eight, four slots each)."""
    slots = torch.arange(tokens * MOE_TOP_K) % MOE_EXPERTS
    return slots.reshape(tokens, MOE_TOP_K)


def moe_call(recorder: Recorder, scheme: str, tokens: int, n: int, k: int, x_rows: int):
    """Every launch of one grouped MoE projection (the slot alignment included)."""
    from torchquant.ops.moe import moe_linear_cuda

    qweight, scales, zeros, bits, group = weight(scheme, n, k)
    stacked = [
        None if t is None else torch.empty(MOE_EXPERTS, *t.shape, dtype=t.dtype, device="meta")
        for t in (qweight, scales, zeros)
    ]
    index = moe_routing(tokens)
    x = torch.empty(x_rows, k, dtype=torch.bfloat16, device="meta")
    routing = torch.rand(tokens, MOE_TOP_K) if x_rows != tokens else None
    args = (x, *stacked, None, index, routing, bits, group)
    moe_linear_cuda(*args)
    launches = recorder.launches = []
    with DeviceWork(launches):
        moe_linear_cuda(*args)
    recorder.launches = []
    expert_bytes = sum(t[0].numel() * t.element_size() for t in stacked if t is not None)
    return launches, expert_bytes


def moe_rows(recorder: Recorder, arch: int, machines, schemes) -> list[dict]:
    """One row per scheme, projection, token count and path (grouped, per-expert loop).

    Only the active experts' weights are read: the grouped launch's bytes count theirs, and
    its hot-loop trips only the blocks the routing fills.  The grouped call's launches
    include the slot alignment (one token runs the grouped GEMV instead: no alignment).
    bf16 is one cuBLAS call per active expert at its floor.
    """
    from torchquant.triton_kernels import moe_gemm
    from torchquant.triton_kernels.moe_gemm import max_padded_slots, moe_block_m

    moe_gemm.run_kernel = recorder.run_kernel  # compile_only patches the linear kernels only
    rows = []
    for scheme in schemes:
        if SCHEMES[scheme][2] == "fp8" and arch < 89:
            continue
        for proj, (n, k) in MOE_PROJECTIONS.items():
            for tokens in MOE_TOKENS:
                x_rows = tokens if proj == "gate_up" else tokens * MOE_TOP_K
                counts = torch.bincount(moe_routing(tokens).reshape(-1), minlength=MOE_EXPERTS)
                active = [int(c) for c in counts if c > 0]
                grouped, expert_bytes = moe_call(recorder, scheme, tokens, n, k, x_rows)
                block_m = moe_block_m(tokens * MOE_TOP_K, MOE_EXPERTS)
                blocks = max_padded_slots(tokens * MOE_TOP_K, MOE_EXPERTS, block_m) // block_m
                used_blocks = sum(-(-c // block_m) for c in active)  # nothing runs here
                for launch in grouped:
                    if launch.kernel == "_align_kernel":
                        launch.candidates = []  # one program over the slots: its bytes bound it
                    if launch.kernel.startswith(("_moe", "_gemv")):
                        launch.nbytes += expert_bytes * (len(active) - 1)  # one is counted
                    if launch.kernel.startswith("_moe"):
                        launch.flops = 2 * tokens * MOE_TOP_K * n * k
                        for cand in launch.candidates:
                            tiles = math.prod(cand.grid) // blocks
                            cand.grid = (used_blocks * tiles,)
                loop = [launch for m in active for launch in model_call(recorder, scheme, m, n, k)]
                print(f"modelled: sm_{arch} moe {scheme} {proj} tokens={tokens}", file=sys.stderr)
                for name in machines.get(arch, [DEFAULT_MACHINE[arch]]):
                    machine = MACHINES[name]
                    bf16 = sum(bf16_floor_us(m, n, k, machine) for m in active)
                    for path, launches in (("grouped", grouped), ("per-expert", loop)):
                        r = row(scheme, tokens, n, k, arch, machine, launches)
                        r.update(
                            scheme=f"moe-{scheme}",
                            path=path,
                            projection=proj,
                            experts=MOE_EXPERTS,
                            top_k=MOE_TOP_K,
                            active_experts=len(active),
                            instr_per_weight=round(
                                r["instr_per_weight"] / len(active), 4
                            ),  # per active weight
                            bf16_floor_us=round(bf16, 2),
                            predicted_speedup=round(bf16 / r["predicted_us"], 3),
                            target=None,
                        )
                        rows.append(r)
    return rows


def print_moe_table(rows: list[dict]) -> None:
    print(
        f"\n## mixture of experts, {MOE_EXPERTS} experts top-{MOE_TOP_K}, Mixtral projections "
        "(predicted lower bounds; bf16 = one cuBLAS per active expert)"
    )
    head = "| scheme | proj | N x K | tokens | active | path | config | instr/w | regs | spill |"
    print(head + " launches | MB | limit | pred us | bf16 us | pred x |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['scheme']} | {r['projection']} | {r['N']}x{r['K']} | {r['M']} | "
            f"{r['active_experts']} | {r['path']} | {r['config']} | {r['instr_per_weight']:.3f} | "
            f"{r['registers']} | {r['spill_bytes']} | {r['launches']} | "
            f"{r['bytes'] / 1e6:.1f} | {r['limit']} | {r['predicted_us']:.1f} | "
            f"{r['bf16_floor_us']:.1f} | {r['predicted_speedup']:.2f}x |"
        )


# -- FP8 block-wise W8A8: per-group activation quantization + the block GEMM, bf16 x

FP8_BLOCK_BATCHES = (16, 256, 4096)


def fp8_block_rows(recorder: Recorder, arch: int, machines, shapes) -> list[dict]:
    """One row per shape and M for ``linear_fp8_block``'s CUDA path (both of its launches).

    The GEMM's flops are counted for the tensor-core bound; bf16 is cuBLAS at its floor.
    """
    from torchquant.triton_kernels import fp8_block_gemm

    from torchquant.ops.fp8_block import linear_fp8_block_cuda

    fp8_block_gemm.run_kernel = recorder.run_kernel  # compile_only patches the older kernels
    rows = []
    for n, k in shapes:
        qweight = torch.empty(n, k, dtype=torch.float8_e4m3fn, device="meta")
        scales = torch.empty(-(-n // 128), -(-k // 128), device="meta")
        for m in FP8_BLOCK_BATCHES:
            x = torch.empty(m, k, dtype=torch.bfloat16, device="meta")
            launches = recorder.launches = []
            with DeviceWork(launches):
                linear_fp8_block_cuda(x, qweight, scales, None, 128, 128)
            recorder.launches = []
            for launch in launches:
                if launch.kernel.startswith("fp8_block_gemm"):
                    launch.flops = 2 * m * n * k
            print(f"modelled: sm_{arch} fp8-block {n}x{k} M={m}", file=sys.stderr)
            for name in machines.get(arch, [DEFAULT_MACHINE[arch]]):
                r = row("w8a16-fp8", m, n, k, arch, MACHINES[name], launches)
                r.update(scheme="fp8-block", group_size=128, path="block-gemm", target=None)
                rows.append(r)
    return rows


def gemm_rows(
    recorder: Recorder, call, args: tuple, m: int, n: int, k: int, arch: int, machines,
    label: str, mma_rate: int = 1, **fields,
) -> list[dict]:  # fmt: skip
    """The rows of ``call(x, *args)`` on a bf16 ``x (m, k)`` (meta), one per machine, the
    GEMM launches' ``2mnk`` flops counted for the tensor-core bound (over ``mma_rate``, the
    tensor cores' rate against bf16's: 2 for 8-bit operands); ``fields`` (the scheme, its
    group, path, target) replace the weight-only row's."""
    x = torch.empty(m, k, dtype=torch.bfloat16, device="meta")
    call(x, *args)  # one-time setup (split-K counters) is not counted
    launches = recorder.launches = []
    with DeviceWork(launches):
        call(x, *args)
    recorder.launches = []
    for launch in launches:
        if "gemm" in launch.kernel:
            launch.flops = 2 * m * n * k // mma_rate
    print(f"modelled: sm_{arch} {label} {n}x{k} M={m}", file=sys.stderr)
    rows = []
    for name in machines.get(arch, [DEFAULT_MACHINE[arch]]):
        r = row("w4a16", m, n, k, arch, MACHINES[name], launches)
        r.update({"target": None, **fields})
        rows.append(r)
    return rows


# -- W4A8: per-token activation quantization + the 4-bit GEMM on 8-bit tensor cores, bf16 x;
# -- W8A8 rows of the same activation type beside them (the same two launches, 8-bit weights)
W4A8_SCHEMES = {"w4a8": "int8", "w4a8-fp8": "fp8", "w8a8": "int8", "fp8": "fp8"}
W4A8_GROUP = 128
# -- issue 17: W4A8 >= 1.2x our W8A8 (same activation type) at M <= 256, and never slower
# -- than our W4A16 at M >= 64, at every benchmark shape
W4A8_OVER_W8A8 = (256, 1.2)
W4A8_OVER_W4A16 = (64, 1.0)
W4A8_BASELINE = {"w4a8": "w8a8", "w4a8-fp8": "fp8"}


def w4a8_rows(recorder: Recorder, arch: int, machines, shapes, batches) -> list[dict]:
    """One row per scheme (:data:`W4A8_SCHEMES`; FP8 from sm_89), shape and M for the CUDA
    path of ``linear_w4a8_*`` (and ``linear_w8a8_*``): both launches, the GEMM's flops
    counted at the 8-bit tensor-core rate; bf16 is cuBLAS at its floor.  The GEMM's config
    is chosen among those of the tuning the launcher dispatches to for that M (split-K or
    tiled)."""
    from torchquant.triton_kernels import w4a8_gemm

    from torchquant.ops.w4a8 import linear_w4a8_fp8_cuda, linear_w4a8_int8_cuda
    from torchquant.ops.w8a8 import linear_w8a8_fp8_cuda, linear_w8a8_int8_cuda

    w4a8_gemm.run_kernel = recorder.run_kernel  # compile_only patches the older kernels
    # -- the split tuning covers the SMs of the machine modelled (meta tensors have none)
    w4a8_gemm.device_sms = lambda device: MACHINES[DEFAULT_MACHINE[arch]].sms
    w4a8_calls = {"int8": linear_w4a8_int8_cuda, "fp8": linear_w4a8_fp8_cuda}
    w8a8_calls = {"int8": linear_w8a8_int8_cuda, "fp8": linear_w8a8_fp8_cuda}
    rows = []
    for scheme, act_type in W4A8_SCHEMES.items():
        if act_type == "fp8" and arch < 89:
            continue
        for n, k in shapes:
            if scheme in W4A8_BASELINE:
                qweight = torch.empty(n, -(-k // 32) * 4, dtype=torch.int32, device="meta")
                scales = torch.empty(n, -(-k // W4A8_GROUP), dtype=torch.bfloat16, device="meta")
                args = (qweight, scales, None, W4A8_GROUP, True, 100.0, None, None)
                group, call = W4A8_GROUP, w4a8_calls[act_type]
            else:
                qdtype = torch.int8 if act_type == "int8" else torch.float8_e4m3fn
                qweight = torch.empty(n, k, dtype=qdtype, device="meta")
                scales = torch.empty(n, 1, device="meta")
                args, group = (qweight, scales, None, True, 100.0, None, None), -1
                call = w8a8_calls[act_type]
            fields = dict(scheme=scheme, group_size=group, path="act-quant+gemm")
            for m in batches:
                rows += gemm_rows(
                    recorder, call, args, m, n, k, arch, machines, scheme, 2, **fields
                )
    return rows


def compare_w4a8(rows: list[dict]) -> list[dict]:
    """Each W4A8 row's speedup over the W8A8 row of its activation type and over the W4A16
    row (same shape, M, arch and machine), with the issue's targets: ``vs_w8a8``,
    ``vs_w4a16``, ``target_vs_w8a8`` and ``target_vs_w4a16`` (None where none applies)."""
    index = {(r["scheme"], r["N"], r["K"], r["M"], r["arch"], r["machine"]): r for r in rows}
    for r in rows:
        if r["scheme"] not in W4A8_BASELINE:
            continue
        where = (r["N"], r["K"], r["M"], r["arch"], r["machine"])
        for name, baseline, (bound, target) in (
            ("w8a8", W4A8_BASELINE[r["scheme"]], W4A8_OVER_W8A8),
            ("w4a16", "w4a16", W4A8_OVER_W4A16),
        ):
            other = index.get((baseline, *where))
            ratio = None if other is None else other["predicted_us"] / r["predicted_us"]
            r[f"vs_{name}"] = None if ratio is None else round(ratio, 3)
            applies = r["M"] <= bound if name == "w8a8" else r["M"] >= bound
            r[f"target_vs_{name}"] = target if applies and ratio is not None else None
    return rows


def print_w4a8_table(rows: list[dict]) -> None:
    print("\n## W4A8 against our W8A8 (same activation type) and W4A16 g128 (predicted)")
    print(
        "| scheme | N x K | M | machine | config | limit | split-K workspace MB | pred us | "
        "vs W8A8 | vs W4A16 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")

    def judged(r: dict, name: str) -> str:
        ratio, target = r[f"vs_{name}"], r[f"target_vs_{name}"]
        if ratio is None:
            return "-"
        if target is None:
            return f"{ratio:.2f}x"
        return f"{ratio:.2f}x ({target}x {'ok' if ratio >= target else 'MISS'})"

    for r in rows:
        print(
            f"| {r['scheme']} | {r['N']}x{r['K']} | {r['M']} | {r['machine']} | {r['config']} | "
            f"{r['limit']} | {r['workspace_bytes'] / 1e6:.2f} | {r['predicted_us']:.1f} | "
            f"{judged(r, 'w8a8')} | "
            f"{judged(r, 'w4a16')} |"
        )


# -- block-scaled float weight-only kinds: (block, scale dtype); held to INT4 W4A16 at the same
# -- shape and M.  mxfp8a16 is WeightQuant("mxfp8") without activations (no CLI name)
FP4_KINDS = {
    "nvfp4a16": (16, torch.float8_e4m3fn),
    "mxfp4a16": (32, torch.uint8),
    "mxfp8a16": (32, torch.uint8),
}


def fp4_rows(recorder: Recorder, arch: int, machines, shapes, batches) -> list[dict]:
    """One row per kind, shape and M for ``linear_fp4_weight``'s (``linear_mxfp8_weight``'s)
    CUDA path: the GEMV, split-K, tiled or dequantize + cuBLAS launches it picks."""
    from torchquant.triton_kernels import block_scaled_gemv, fp4_gemm

    from torchquant.ops.microscaled import linear_mxfp8_weight_cuda
    from torchquant.ops.weight_fp4 import linear_fp4_weight_cuda

    # -- compile_only patches the older kernels
    fp4_gemm.run_kernel = block_scaled_gemv.run_kernel = recorder.run_kernel
    rows = []
    for kind, (block, scale_dtype) in FP4_KINDS.items():
        if kind == "mxfp8a16" and arch < 89:
            continue
        for n, k in shapes:
            scales = torch.empty(n, -(-k // block), dtype=scale_dtype, device="meta")
            if kind == "mxfp8a16":
                qweight = torch.empty(n, k, dtype=torch.float8_e4m3fn, device="meta")
                call, args = linear_mxfp8_weight_cuda, (qweight, scales, None)
            else:
                qweight = torch.empty(n, k // 2, dtype=torch.uint8, device="meta")
                global_scale = torch.empty(1, device="meta") if block == 16 else None
                call, args = linear_fp4_weight_cuda, (qweight, scales, global_scale, None, block)
            fields = dict(scheme=kind, group_size=block)
            for m in batches:
                rows += gemm_rows(recorder, call, args, m, n, k, arch, machines, kind, **fields)
    return rows


# -- microscaled W4A4 / W8A8: (weight bytes per value, block, scale dtype) of each format
MICROSCALED_KINDS = {
    "nvfp4": (0.5, 16, torch.float8_e4m3fn),
    "mxfp4": (0.5, 32, torch.uint8),
    "mxfp8": (1.0, 32, torch.uint8),
}


def microscaled_rows(recorder: Recorder, arch: int, machines, shapes, batches) -> list[dict]:
    """One row per microscaled format, shape and M for ``linear_microscaled``'s CUDA path:
    the activation quantization and the GEMM (NVFP4 with a calibrated global scale, so no
    per-tensor max; the dynamic one adds a reduction over ``x``)."""
    from torchquant.triton_kernels import microscaled_gemm, microscaled_quant

    from torchquant.ops.microscaled import linear_microscaled_cuda

    microscaled_gemm.run_kernel = microscaled_quant.run_kernel = recorder.run_kernel
    rows = []
    for kind, (width, block, scale_dtype) in MICROSCALED_KINDS.items():
        value_dtype = torch.float8_e4m3fn if kind == "mxfp8" else torch.uint8
        for n, k in shapes:
            qweight = torch.empty(n, int(k * width), dtype=value_dtype, device="meta")
            scales = torch.empty(n, -(-k // block), dtype=scale_dtype, device="meta")
            global_scale = torch.empty(1, device="meta") if kind == "nvfp4" else None
            for m in batches:
                x = torch.empty(m, k, dtype=torch.bfloat16, device="meta")
                launches = recorder.launches = []
                with DeviceWork(launches):
                    linear_microscaled_cuda(
                        x, qweight, scales, global_scale, None, global_scale, kind
                    )
                recorder.launches = []
                for launch in launches:
                    if launch.kernel.startswith("_microscaled_gemm"):
                        launch.flops = 2 * m * n * k
                print(f"modelled: sm_{arch} {kind} {n}x{k} M={m}", file=sys.stderr)
                for name in machines.get(arch, [DEFAULT_MACHINE[arch]]):
                    r = row(
                        "w4a16" if width < 1 else "w8a16", m, n, k, arch, MACHINES[name], launches
                    )
                    r.update(scheme=kind, group_size=block, path="microscaled-gemm", target=None)
                    rows.append(r)
    return rows


# -- W8A8 INT8 / FP8 (issue 14): per-token activation quantization + the scaled 8-bit GEMM
W8A8_BATCHES = (16, 256, 4096)
W8A8_TARGETS = {("w8a8", 4096): 1.5, ("fp8", 4096): 1.7}  # over bf16, act-quant included


def w8a8_rows(recorder: Recorder, arch: int, machines, shapes) -> list[dict]:
    """One row per activation dtype (FP8 from sm_89), shape and M for ``linear_w8a8_cuda``
    with dynamic per-token scales: every launch, the 8-bit GEMM's flops at twice the bf16
    rate.  The row's ``mma_in_flight`` is the GEMM loop's wgmma wait depth: 0 means the
    tensor cores drain every K step, a stall this bound does not see (Triton keeps a wgmma
    pending only for float32 accumulators, so the INT8 loop always drains)."""
    from torchquant.ops.w8a8 import ActivationQuant, linear_w8a8_cuda

    rows = []
    for scheme, act, qdtype in (("w8a8", "int8", torch.int8), ("fp8", "fp8", torch.float8_e4m3fn)):
        if act == "fp8" and arch < 89:
            continue
        quant = ActivationQuant(act, True, 100.0, None, None)
        for n, k in shapes:
            qweight = torch.empty(n, k, dtype=qdtype, device="meta")
            args = (qweight, torch.empty(n, 1, device="meta"), None, quant)
            for m in W8A8_BATCHES:
                fields = dict(scheme=scheme, group_size=-1, path="act-quant+gemm")
                fields["target"] = W8A8_TARGETS.get((scheme, m))
                rows += gemm_rows(
                    recorder, linear_w8a8_cuda, args, m, n, k, arch, machines, scheme, 2, **fields
                )
    return rows


def model(
    schemes, shapes, batches, arches, machines, all_configs: bool, moe: bool = False,
    fp8_block: bool = False, fp4: bool = False, w4a8: bool = False,
    microscaled: bool = False, w8a8: bool = False,
) -> list[dict]:  # fmt: skip
    rows = []
    for arch in arches:
        recorder = Recorder(all_configs)
        compile_only(arch, recorder.run_kernel)
        rows += act_quant_rows(recorder, arch, machines)
        if w8a8:
            rows += w8a8_rows(recorder, arch, machines, shapes)
        if fp8_block and arch >= 89:
            rows += fp8_block_rows(recorder, arch, machines, shapes)
        if fp4:
            rows += fp4_rows(recorder, arch, machines, shapes, batches)
        if w4a8:
            rows += w4a8_rows(recorder, arch, machines, shapes, batches)
        if microscaled:
            rows += microscaled_rows(recorder, arch, machines, shapes, batches)
        for scheme in schemes:
            if SCHEMES[scheme][2] == "fp8" and arch < 89:
                continue  # the launchers refuse FP8 below sm_89
            for n, k in shapes:
                for m in batches:
                    launches = model_call(recorder, scheme, m, n, k)
                    print(f"modelled: sm_{arch} {scheme} {n}x{k} M={m}", file=sys.stderr)
                    for name in machines.get(arch, [DEFAULT_MACHINE[arch]]):
                        rows.append(row(scheme, m, n, k, arch, MACHINES[name], launches))
        if moe:
            rows += moe_rows(recorder, arch, machines, [s for s in schemes if s in MOE_SCHEMES])
    return compare_w4a8(rows) if w4a8 else rows


def print_table(rows: list[dict]) -> None:
    print("\n## machine constants")
    print("| machine | arch | SMs | clock GHz | issue / SM / clk | copy GB/s | bf16 TFLOPS |")
    print("|---|---|---|---|---|---|---|")
    for mach in MACHINES.values():
        print(
            f"| {mach.name} | sm_{mach.arch} | {mach.sms} | {mach.clock_ghz} | "
            f"{mach.issue_per_sm} | {mach.bandwidth_gbs:.0f} ({mach.bandwidth_note}) | "
            f"{mach.tensor_tflops:.0f} |"
        )
    print(
        f"\nlaunch gap: {LAUNCH_GAP_US} us per launch after the first; loop counts are "
        "warp-instructions per iteration of the kernel with the most bytes"
    )
    print_act_quant_table([r for r in rows if r["scheme"] == "act-quant"])
    if moe := [r for r in rows if r["scheme"].startswith("moe-")]:
        print_moe_table(moe)
    if w4a8 := [r for r in rows if r["scheme"] in W4A8_BASELINE]:
        print_w4a8_table(w4a8)
    print("\n## predicted lower bounds (a necessary condition, not a measurement)")
    head = (
        "scheme",
        "N x K",
        "M",
        "sm",
        "machine",
        "path",
        "config",
        "instr/w",
        "dominant",
        "ldg",
        "sts",
        "shfl",
        "bar",
        "mma",
        "in flight",
        "regs",
        "spill",
        "smem",
        "launches",
        "limit",
        "pred us",
        "bf16 us",
        "pred x",
        "target",
    )
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        if r["scheme"] == "act-quant" or r["scheme"].startswith("moe-"):
            continue
        target = (
            "-"
            if r["target"] is None
            else (f"{r['target']}x {'ok' if r['predicted_speedup'] >= r['target'] else 'MISS'}")
        )
        print(
            f"| {r['scheme']} | {r['N']}x{r['K']} | {r['M']} | {r['arch']} | {r['machine']} | "
            f"{r['path']} | {r['config']} | {r['instr_per_weight']:.3f} | "
            f"{r['dominant_class']} | {r['global_loads']} | {r['shared_stores']} | "
            f"{r['shuffles']} | {r['barriers']} | {r['mma']} | "
            f"{'-' if r['mma_in_flight'] is None else r['mma_in_flight']} | {r['registers']} | "
            f"{r['spill_bytes']} | {r['smem']} | {r['launches']} | {r['limit']} | "
            f"{r['predicted_us']:.1f} | {r['bf16_floor_us']:.1f} | "
            f"{r['predicted_speedup']:.2f}x | {target} |"
        )


BENCH_NAMES = {"w4a16": "w4 g128", "w3a16": "w3 g128", "w8a16": "w8 per-ch"}  # bench_weight_only


def compare(model_json: str, table_md: str) -> None:
    """The model's rows beside bench_weight_only.py's measured ones (same shape and M)."""
    measured: dict[tuple, tuple[float, str]] = {}
    for line in Path(table_md).read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 5 and "x" in cells[0] and cells[1].isdigit():
            with contextlib.suppress(ValueError):
                measured[cells[0], int(cells[1]), cells[2].split(" (")[0]] = (
                    float(cells[3]),
                    cells[4],
                )
    print("\n## predicted lower bound beside the measured time (bench_weight_only.py)")
    print(
        "| scheme | N x K | M | machine | path | pred us | pred x | measured us | measured x "
        "| bf16 us | target |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in json.loads(Path(model_json).read_text()):
        shape = f"{r['N']}x{r['K']}"
        us, ratio = measured.get((shape, r["M"], BENCH_NAMES.get(r["scheme"], "")), (math.nan, "-"))
        bf16 = measured.get((shape, r["M"], "F.linear"), (math.nan, ""))[0]
        print(
            f"| {r['scheme']} | {shape} | {r['M']} | {r['machine']} | {r['path']} | "
            f"{r['predicted_us']:.1f} | {r['predicted_speedup']:.2f}x | {us:.1f} | {ratio} | "
            f"{bf16:.1f} | {r['target'] or '-'} |"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="90", help="compute capabilities, e.g. 80,89,90")
    parser.add_argument(
        "--machine",
        default="",
        help=f"machines to predict for, from {', '.join(MACHINES)} "
        "(default: h200 for sm_90, l40s for sm_89, a100 for sm_80)",
    )
    parser.add_argument(
        "--schemes", default=",".join(DEFAULT_SCHEMES), help=f"comma list from {', '.join(SCHEMES)}"
    )
    parser.add_argument("--shapes", default="", help="N x K list, e.g. 8192x8192,4096x14336")
    parser.add_argument("--batches", default="", help="M list, e.g. 1,16,64")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="default configs only, 8192x8192, M = 1, 16, 64 (unless given)",
    )
    parser.add_argument("--json", action="store_true", help="print the rows as a JSON list")
    parser.add_argument(
        "--moe",
        action="store_true",
        help=f"add the mixture-of-experts rows ({', '.join(MOE_SCHEMES)} among --schemes; "
        f"Mixtral projections, tokens {', '.join(map(str, MOE_TOKENS))})",
    )
    parser.add_argument(
        "--fp8-block",
        action="store_true",
        help=f"add the FP8 block-wise W8A8 rows (sm_89+, M = {FP8_BLOCK_BATCHES})",
    )
    parser.add_argument(
        "--w8a8",
        action="store_true",
        help=f"add the W8A8 INT8 and FP8 rows (activation quantization + GEMM, M = {W8A8_BATCHES})",
    )
    parser.add_argument(
        "--fp4",
        action="store_true",
        help=f"add the block-scaled float weight-only rows ({', '.join(FP4_KINDS)})",
    )
    parser.add_argument(
        "--w4a8",
        action="store_true",
        help=f"add the W4A8 rows ({', '.join(W4A8_SCHEMES)}: INT4 g{W4A8_GROUP} x 8-bit "
        "activations, W8A8 of each activation type beside them; with w4a16 among --schemes, "
        "a table of W4A8 against both)",
    )
    parser.add_argument(
        "--microscaled",
        action="store_true",
        help=f"add the microscaled rows ({', '.join(MICROSCALED_KINDS)}: weights and activations)",
    )
    parser.add_argument(
        "--compare",
        nargs=2,
        metavar=("MODEL_JSON", "TABLE_MD"),
        help="print a --json output beside bench_weight_only.py's table",
    )
    args = parser.parse_args(argv)
    if args.compare:
        compare(*args.compare)
        return
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("compiling needs the kernels built without TRITON_INTERPRET")
    if not tools_available():
        parser.error("nvdisasm/cuobjdump not found in Triton's NVIDIA backend")
    arches = [int(a) for a in args.arch.split(",")]
    machines: dict[int, list[str]] = {}
    for name in filter(None, args.machine.split(",")):
        if name not in MACHINES:
            parser.error(f"unknown machine {name!r}; known: {', '.join(MACHINES)}")
        machines.setdefault(MACHINES[name].arch, []).append(name)
    schemes = [s for s in args.schemes.split(",") if s]
    if unknown := [s for s in schemes if s not in SCHEMES]:
        parser.error(f"unknown schemes {unknown}; known: {', '.join(SCHEMES)}")
    shapes = (
        [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
        if args.shapes
        else [(8192, 8192)]
        if args.quick
        else SHAPES
    )
    batches = (
        [int(v) for v in args.batches.split(",")]
        if args.batches
        else [1, 16, 64]
        if args.quick
        else BATCHES
    )
    rows = model(
        schemes, shapes, batches, arches, machines, all_configs=not args.quick, moe=args.moe,
        fp8_block=args.fp8_block, fp4=args.fp4, w4a8=args.w4a8, microscaled=args.microscaled,
        w8a8=args.w8a8,
    )  # fmt: skip
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print_table(rows)


if __name__ == "__main__":
    main(sys.argv[1:])
