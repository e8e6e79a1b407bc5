"""Predicted decode speed of the models bench_decode.py and bench_moe_decode.py time: no GPU.

    python benchmarks/decode_model.py                  # Llama-3-8B and Mixtral shapes, H200
    python benchmarks/decode_model.py --quick --json   # default configs only, JSON rows

One decode step of each benchmark's own model is run on the meta device, and every
device kernel it would launch is recorded: aten ops by ``kernel_model.DeviceWork`` (bytes
and flops), each quantized linear through its launcher compiled for the target without a
GPU, as ``kernel_model.py`` does (its hot loop read from the SASS).  Each kernel is
bounded by max(bytes / copy bandwidth, flops / tensor peak, hot-loop instructions / issue
rate), and every kernel boundary costs ``kernel_model.LAUNCH_GAP_US``, as inside a CUDA
graph.  A step is the sum; tokens/s = batch / step.

Like the kernel model this is a necessary condition, not a proof: a scheme whose predicted
ratio misses its target cannot meet it on the GPU, one that meets it may still miss.  bf16
linears (and the bf16 ``lm_head``, which no scheme quantizes by default) sit at their
bandwidth floor, which cuBLAS reaches only partly (~75% for a GEMV on an H100 here), so
the predicted ratio errs low.  Kernels are counted as eager PyTorch launches them (one per
aten op, RMSNorm and attention as the meta device dispatches them); ``torch.compile``
fuses the element-wise ones, which raises the ratio.  The KV cache is ``--context``
tokens; writing one row into it counts the row, not the cache.

Every quantized scheme runs the model's RMSNorm modules as ``torchquant::rms_norm`` (one
kernel each, ``torchquant.modules.fuse_rms_norms``, as ``convert_model`` sets them up on
CUDA), compiled like the linears: its bytes (read x and the weight, write the output) and
its instructions from the SASS.  The plain bf16 model keeps its norms as the meta device
dispatches them (8 aten ops each); the row "bf16+rmsnorm" is that model with the same
fused norms, the baseline a user who fuses the norms of the bf16 model too would compare
against.  Under ``torch.compile`` the fused norms run their aten ops (Inductor fuses them
with the residual add), so the "fused" mode counts every scheme's norms that way.
(PyTorch's own ``nn.RMSNorm``, which the benchmark models use, may dispatch one fused
kernel on CUDA in recent releases; Hugging Face's norms never do.)

A quantized scheme at batch 1 runs sibling projections (q/k/v, gate/up: the sets
``torchquant.modules.fuse_sibling_linears`` fuses, called one after another on one
tensor) as one linear over their concatenated rows, as the library does on CUDA; bf16
keeps one cuBLAS call per projection.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, replace
from unittest import mock

import bench_decode
import bench_moe_decode
import kernel_model
import torch
from kernel_model import (
    DEFAULT_MACHINE,
    LAUNCH_GAP_US,
    MACHINES,
    DeviceWork,
    Launch,
    Machine,
    Recorder,
    bf16_floor_us,
    launch_bound,
    model_call,
    moe_call,
    moe_routing,
    row,
)
from kernel_resources import compile_only
from torch import nn

from torchquant.modules.rms_norms import fuse_rms_norms
from torchquant.modules.sibling_linears import sibling_sets

# (model, scheme, batch) -> least predicted speedup over bf16 (issues 13 and 14)
TARGETS = {("llama", "w4a16", 1): 2.5, ("mixtral", "w4a16", 1): 2.0}
# -- "+lm_head": that scheme with lm_head quantized too (``QuantConfig(s, ignore=())``), an
# -- opt-in row beside the default, never the target's
WITH_LM_HEAD = "+lm_head"
# -- "bf16+rmsnorm": the bf16 model with its norms fused as the quantized schemes run them
FUSED_NORMS = "+rmsnorm"
BF16_FUSED = "bf16" + FUSED_NORMS
LLAMA_SCHEMES = ("w4a16", "w8a16", "w4a16" + WITH_LM_HEAD)
MOE_SCHEMES = ("w4a16",)
BATCHES = (1, 16)
# in-place writes whose arguments hold a whole buffer but which touch one slice of it
_SLICE_WRITES = {"index_copy_": 2, "index_add_": 2, "scatter_add_": 2}


class StepWork(DeviceWork):
    """``DeviceWork`` that also notes each ``mm``'s shape, and whose slice writes and
    embedding lookups count what they touch, not the whole buffer they are given."""

    def __init__(self, launches: list[Launch]) -> None:
        super().__init__(launches)
        self.mm_shapes: dict[int, tuple[int, int, int]] = {}
        self.mm_sources: dict[int, tuple[str, torch.Tensor]] = {}
        self.linear_source: tuple[str, torch.Tensor] | None = None  # -- set by a pre-hook
        self.norm_args: dict[int, tuple] = {}  # -- each torchquant::rms_norm's arguments

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        name = func.overloadpacket.__name__
        if name == "mm":
            (m, k), n = args[0].shape, args[1].shape[1]
            self.mm_shapes[len(self.launches) - 1] = (m, n, k)
            if self.linear_source is not None:
                self.mm_sources[len(self.launches) - 1] = self.linear_source
                self.linear_source = None
        elif name in _SLICE_WRITES:
            source = args[_SLICE_WRITES[name] + 1]
            self.launches[-1].nbytes = 3 * source.numel() * source.element_size()
        elif name == "embedding":
            self.launches[-1].nbytes = 2 * out.numel() * out.element_size()
        elif func.namespace == "torchquant" and name == "rms_norm":
            self.norm_args[len(self.launches) - 1] = tuple(args)
        return out

    def calls(self) -> list[Call]:
        calls = [
            Call(launch, self.mm_shapes.get(i), *self.mm_sources.get(i, ("", None)))
            for i, launch in enumerate(self.launches)
        ]
        for i, args in self.norm_args.items():
            calls[i].norm = args
        return calls

    def note_linear_inputs(self, model: nn.Module) -> list:
        """Pre-hooks noting which linear issues the next ``mm``, and on what input."""
        handles = []
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear):

                def note(_module, args, name=name):
                    self.linear_source = (name, args[0])

                handles.append(module.register_forward_pre_hook(note))
        return handles


@dataclass
class Call:
    """One step of the recording: an aten launch, or a linear the scheme may replace."""

    launch: Launch
    linear: tuple[int, int, int] | None = None  # (M, N, K) of an ``mm``
    module: str = ""  # the linear that issued it
    source: torch.Tensor | None = None  # that linear's input
    projections: int = 1  # sibling projections one call serves
    norm: tuple | None = None  # a ``torchquant::rms_norm``'s (x, weight, eps, offset, cast)


def fuse_siblings(calls: list[Call], sets: list[tuple[str, list[str]]]) -> list[Call]:
    """``calls`` with each run of sibling projections on one input row as one linear over
    their concatenated rows (N summed), at the first one's place."""
    member = {}
    for parent, names in sets:
        for i, name in enumerate(names):
            member[f"{parent}.{name}" if parent else name] = (parent, i)
    out: list[Call] = []
    lead: dict[str, Call] = {}  # -- parent -> its fused call in ``out``
    for call in calls:
        where = member.get(call.module)
        if call.linear is None or where is None or call.linear[0] != 1:
            out.append(call)
            continue
        parent, position = where
        first = lead.get(parent)
        if position == 0 or first is None or first.source is not call.source:
            lead[parent] = Call(call.launch, call.linear, call.module, call.source)
            out.append(lead[parent])
            continue
        m, n, k = first.linear
        first.linear = (m, n + call.linear[1], k)
        first.projections += 1
    return out


def record(run: Callable[[], object]) -> list[Call]:
    """Every launch of ``run()`` on meta tensors, ``mm`` ones marked with their shape."""
    with StepWork([]) as work:
        run()
    return work.calls()


@contextmanager
def one_attention_kernel(module, launches: list[Launch]):
    """Attention as one fused kernel reading q, the whole KV cache and writing the output,
    recorded into ``launches`` in step order."""
    real = module.F.scaled_dot_product_attention

    def fused(q, k, v, **_):
        with torch.utils._python_dispatch._disable_current_modes():
            out = torch.empty_like(q)
        nbytes = sum(t.numel() * t.element_size() for t in (q, k, v, out))
        launches.append(Launch("attention", nbytes))
        return out

    with mock.patch.object(module.F, "scaled_dot_product_attention", fused):
        yield
    assert real is module.F.scaled_dot_product_attention


class Predictor:
    """Bounds of linears per scheme, compiled once per (scheme, M, N, K)."""

    def __init__(self, recorder: Recorder, arch: int, machine: Machine) -> None:
        self.recorder, self.arch, self.machine = recorder, arch, machine
        self._rows: dict[tuple, dict] = {}

    def linear(self, scheme: str, m: int, n: int, k: int) -> dict:
        key = (scheme, m, n, k)
        if key not in self._rows:
            launches = model_call(self.recorder, scheme, m, n, k)
            self._rows[key] = row(scheme, m, n, k, self.arch, self.machine, launches)
        return self._rows[key]

    def moe(self, scheme: str, tokens: int, n: int, k: int, x_rows: int) -> dict:
        """One grouped projection over the experts ``moe_routing`` activates."""
        key = ("moe", scheme, tokens, n, k)
        if key not in self._rows:
            from torchquant.triton_kernels import moe_gemm

            moe_gemm.run_kernel = self.recorder.run_kernel  # as kernel_model.moe_rows does
            launches, expert_bytes = moe_call(self.recorder, scheme, tokens, n, k, x_rows)
            counts = torch.bincount(moe_routing(tokens).reshape(-1), minlength=8)
            active = int((counts > 0).sum())
            for launch in launches:
                if launch.kernel == "_align_kernel":
                    launch.candidates = []
                if launch.kernel.startswith(("_moe", "_gemv")):
                    launch.nbytes += expert_bytes * (active - 1)
            self._rows[key] = row(scheme, tokens, n, k, self.arch, self.machine, launches)
        return self._rows[key]

    def aten(self, launch: Launch) -> float:
        return launch_bound(launch, None, self.machine)["us"]

    def norm(self, x, weight, eps: float, offset: float, after_cast: bool) -> float:
        """One ``torchquant::rms_norm`` kernel over ``x``'s rows, compiled for the target."""
        from torchquant.triton_kernels.rms_norm import rms_norm_rows

        from torchquant.ops.rms_norm import rms_norm_dtype

        rows = x.reshape(-1, x.shape[-1])
        key = ("rms_norm", tuple(rows.shape), x.dtype, weight.dtype, offset, after_cast)
        if key not in self._rows:
            self.recorder.launches = []
            with torch.utils._python_dispatch._disable_current_modes():
                out_dtype = rms_norm_dtype(x, weight, after_cast)
                rms_norm_rows(rows, weight, eps, offset, after_cast, out_dtype)
            (launch,) = self.recorder.launches
            us = min(launch_bound(launch, c, self.machine)["us"] for c in launch.candidates)
            self._rows[key] = {"predicted_us": us, "bytes": launch.nbytes}
        return self._rows[key]["predicted_us"]

    def other(self, call: Call) -> tuple[str, float]:
        """An element-wise call's part: an aten op ("other_us"), or the fused RMSNorm
        ("norm_us": a custom op, which ``torch.compile`` cannot merge with its neighbours)."""
        if call.norm is not None:
            return "norm_us", self.norm(*call.norm)
        return "other_us", self.aten(call.launch)


MODES = ("eager", "fused")  # fused: each run of element-wise ops one kernel, as torch.compile


def step_us(parts: list[tuple[str, float]], mode: str) -> dict:
    """A step's bound: the calls' bounds plus a boundary between consecutive calls."""
    if mode == "fused":
        merged: list[tuple[str, float]] = []
        for part, us in parts:
            if part == "other_us" and merged and merged[-1][0] == part:
                merged[-1] = (part, merged[-1][1] + us)
            else:
                merged.append((part, us))
        parts = merged
    by_part: dict[str, float] = {}
    for part, us in parts:
        by_part[part] = by_part.get(part, 0.0) + us
    gaps = LAUNCH_GAP_US * max(0, len(parts) - 1)
    return {"kernels": len(parts), "gaps_us": gaps, "us": sum(by_part.values()) + gaps, **by_part}


def llama_model(shape, batch: int, context: int) -> nn.Module:
    with torch.device("meta"):
        return bench_decode.DecoderModel(shape, batch, context).to(torch.bfloat16)


def llama_step(shape, batch: int, context: int, fused_norms: bool = False) -> list[Call]:
    """One step's calls; ``fused_norms``: RMSNorm as ``torchquant::rms_norm``, one call each."""
    model = llama_model(shape, batch, context)
    if fused_norms:
        fuse_rms_norms(model, devices=("meta",))
    with torch.device("meta"):
        tokens = torch.zeros(batch, dtype=torch.long)
        pos = torch.tensor([context - 1])
    work = StepWork([])
    handles = work.note_linear_inputs(model)
    with torch.no_grad(), one_attention_kernel(bench_decode, work.launches), work:  # -- as run
        model(tokens, pos)
    for handle in handles:
        handle.remove()
    attention = sum(launch.kernel == "attention" for launch in work.launches)
    if attention != shape.layers:
        raise RuntimeError(f"recorded {attention} attention kernels, expected {shape.layers}")
    return work.calls()


def llama_rows(predict: Predictor, shape, context: int, schemes, batches) -> list[dict]:
    rows = []
    sets = sibling_sets(llama_model(shape, 1, 1))
    for batch in batches:
        recorded = llama_step(shape, batch, context)
        fused_norms = llama_step(shape, batch, context, fused_norms=True)
        for scheme in ("bf16", BF16_FUSED, *schemes):
            # -- eager: the quantized model's norms fused; compiled: the norms' aten ops,
            # -- which the fused forward hands to torch.compile
            traces = {"eager": recorded if scheme == "bf16" else fused_norms, "fused": recorded}
            for mode in MODES:
                parts = llama_parts(predict, shape, scheme, traces[mode], sets)
                rows.append(
                    {"model": "llama", "mode": mode, "scheme": scheme, "batch": batch,
                     **step_us(parts, mode)}
                )  # fmt: skip
    return with_speedups(rows, predict)


def llama_parts(predict: Predictor, shape, scheme: str, calls: list[Call], sets) -> list:
    """Each call's (part, bound) for ``scheme``: bf16 linears at their floor, quantized ones
    (siblings fused) through the kernel model."""
    bf16 = scheme.startswith("bf16")
    calls = calls if bf16 else fuse_siblings(calls, sets)
    weights = scheme.removesuffix(WITH_LM_HEAD)
    parts = []
    for call in calls:
        if call.launch.kernel == "attention":
            parts.append(("attention_us", predict.aten(call.launch)))
            continue
        if call.linear is None:
            parts.append(predict.other(call))
            continue
        lm_head = call.linear[1] == shape.vocab
        name = "lm_head_us" if lm_head else "linear_us"
        if bf16 or (lm_head and weights == scheme):
            parts.append((name, bf16_floor_us(*call.linear, predict.machine)))
        else:
            parts.append((name, predict.linear(weights, *call.linear)["predicted_us"]))
    return parts


def mixtral_step(
    shape, batch: int, fused_norms: bool = False
) -> tuple[list[Call], list[list[Call]]]:
    """The launches of one step outside the experts, and each layer's experts' own."""
    with torch.device("meta"):
        model = bench_moe_decode.MoeModel(shape).to(torch.bfloat16)
        x = torch.zeros(batch, shape.hidden, dtype=torch.bfloat16)
    if fused_norms:
        fuse_rms_norms(model, devices=("meta",))
    routing = moe_routing(batch).to("meta")
    experts_calls: list[list[Call]] = []
    real_route = bench_moe_decode.SparseMoeBlock.route
    real_experts = bench_moe_decode.MixtralExperts.forward

    def route(self, h):
        _, weights = real_route(self, h)
        return routing, weights  # the balanced routing the kernel model assumes

    def experts(self, h, index, weights):
        with torch.utils._python_dispatch._disable_current_modes():  # not in ``rest`` too
            experts_calls.append(record(lambda: real_experts(self, h, index, weights)))
            return torch.empty_like(h)

    with (
        torch.no_grad(),  # -- as the benchmark runs it
        mock.patch.object(bench_moe_decode.SparseMoeBlock, "route", route),
        mock.patch.object(bench_moe_decode.MixtralExperts, "forward", experts),
    ):
        rest = record(lambda: model(x))
    return rest, experts_calls


def mixtral_rows(predict: Predictor, shape, schemes, batches) -> list[dict]:
    """The MoE benchmark's layers (norm, router, experts, residual; no attention)."""
    rows = []
    for batch in batches:
        rest, experts_calls = mixtral_step(shape, batch)
        fused_rest, _ = mixtral_step(shape, batch, fused_norms=True)
        active = int((torch.bincount(moe_routing(batch).reshape(-1), minlength=8) > 0).sum())
        for scheme in ("bf16", BF16_FUSED, *schemes):
            for mode in MODES:  # -- compiled: the norms' aten ops, as in llama_rows
                calls = rest if scheme == "bf16" or mode == "fused" else fused_rest
                parts = [predict.other(c) for c in calls]
                for layer_calls in experts_calls:
                    parts += expert_parts(predict, scheme, layer_calls, shape, batch, active)
                rows.append(
                    {"model": "mixtral", "mode": mode, "scheme": scheme, "batch": batch,
                     **step_us(parts, mode)}
                )  # fmt: skip
    return with_speedups(rows, predict)


def expert_parts(predict: Predictor, scheme: str, calls: list[Call], shape, batch, active):
    """bf16: the fused experts' own ops, each grouped GEMM reading only the active experts;
    a scheme: its two grouped launches and the element-wise ops between them."""
    experts = shape.experts
    if scheme.startswith("bf16"):
        parts = []
        for call in calls:
            launch = call.launch
            if launch.kernel == "aten._grouped_mm":
                nbytes = launch.nbytes * active // experts  # weights dominate
                parts.append(("linear_us", predict.aten(replace(launch, nbytes=nbytes))))
            else:
                parts.append(("other_us", predict.aten(launch)))
        return parts
    slots = batch * shape.top_k
    gate_up = predict.moe(scheme, batch, 2 * shape.intermediate, shape.hidden, batch)
    down = predict.moe(scheme, batch, shape.hidden, shape.intermediate, slots)
    with torch.device("meta"):
        g = torch.empty(slots, 2 * shape.intermediate, dtype=torch.bfloat16)
        between = record(
            lambda: (
                torch.nn.functional.silu(g[:, : shape.intermediate]) * g[:, shape.intermediate :]
            )
        )
        out = torch.empty(slots, shape.hidden, dtype=torch.bfloat16)
        between += record(lambda: out.view(batch, shape.top_k, -1).sum(1))
    return [
        ("linear_us", gate_up["predicted_us"]),
        *(("other_us", predict.aten(c.launch)) for c in between),
        ("linear_us", down["predicted_us"]),
    ]


def with_speedups(rows: list[dict], predict: Predictor) -> list[dict]:
    """Each row's ratio to plain bf16 (the target's baseline) and to bf16+rmsnorm."""

    def steps(scheme: str) -> dict:
        return {(r["model"], r["mode"], r["batch"]): r["us"] for r in rows if r["scheme"] == scheme}

    bf16, bf16_fused = steps("bf16"), steps(BF16_FUSED)
    for r in rows:
        key = (r["model"], r["mode"], r["batch"])
        r["machine"] = predict.machine.name
        r["arch"] = predict.arch
        r["tokens_per_s"] = round(r["batch"] * 1e6 / r["us"], 1)
        r["predicted_speedup"] = round(bf16[key] / r["us"], 3)
        r["speedup_vs_fused_norms"] = round(bf16_fused[key] / r["us"], 3)
        r["target"] = TARGETS.get((r["model"], r["scheme"], r["batch"]))
        parts = ("linear_us", "lm_head_us", "attention_us", "norm_us", "other_us")
        for key in ("us", "gaps_us", *parts):
            if key in r:
                r[key] = round(r[key], 1)
    return rows


def print_table(rows: list[dict]) -> None:
    print("\n## predicted decode step (lower bounds, kernel cost model; no GPU)")
    print(
        "| model | kernels as | machine | batch | scheme | kernels | linears us | lm_head us | "
        "attention us | norms us | other us | gaps us | step us | tokens/s | pred x bf16 | "
        f"x {BF16_FUSED} | target |"
    )
    print("|---" * 17 + "|")
    for r in rows:
        target = r["target"]
        verdict = (
            "-"
            if target is None
            else f"{target}x " + ("ok" if r["predicted_speedup"] >= target else "MISS")
        )
        print(
            f"| {r['model']} | {r['mode']} | {r['machine']} | {r['batch']} | {r['scheme']} | "
            f"{r['kernels']} | {r.get('linear_us', 0):.1f} | {r.get('lm_head_us', 0):.1f} | "
            f"{r.get('attention_us', 0):.1f} | "
            f"{r.get('norm_us', 0):.1f} | {r.get('other_us', 0):.1f} | {r['gaps_us']:.1f} | "
            f"{r['us']:.1f} | "
            f"{r['tokens_per_s']:.0f} | {r['predicted_speedup']:.2f}x | "
            f"{r['speedup_vs_fused_norms']:.2f}x | {verdict} |"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90")
    parser.add_argument("--machine", default="", help=f"one of {', '.join(MACHINES)}")
    parser.add_argument("--context", type=int, default=512, help="KV cache tokens (Llama)")
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)), help="e.g. 1,16")
    parser.add_argument("--quick", action="store_true", help="default kernel configs only")
    parser.add_argument("--smoke", action="store_true", help="the benchmarks' smoke shapes")
    parser.add_argument("--json", action="store_true", help="print the rows as a JSON list")
    args = parser.parse_args(argv)
    if not kernel_model.tools_available():
        parser.error("nvdisasm/cuobjdump not found in Triton's NVIDIA backend")
    machine = MACHINES[args.machine or DEFAULT_MACHINE[args.arch]]
    if machine.arch != args.arch:
        parser.error(f"{machine.name} is sm_{machine.arch}, not sm_{args.arch}")
    batches = [int(b) for b in args.batches.split(",")]
    llama = bench_decode.SMOKE_SHAPE if args.smoke else bench_decode.Shape()
    moe = bench_moe_decode.SMOKE_SHAPE if args.smoke else bench_moe_decode.Shape()
    recorder = Recorder(all_configs=not args.quick)
    compile_only(args.arch, recorder.run_kernel)
    predict = Predictor(recorder, args.arch, machine)
    rows = llama_rows(predict, llama, args.context, LLAMA_SCHEMES, batches)
    rows += mixtral_rows(predict, moe, MOE_SCHEMES, batches)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print_table(rows)


if __name__ == "__main__":
    main(sys.argv[1:])
