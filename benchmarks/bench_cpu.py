"""CPU speed and memory of every scheme against float32 (and bf16), torchao's beside them.

    python benchmarks/bench_cpu.py              # per-op and bytes tables, then SmolLM2-135M
    python benchmarks/bench_cpu.py --ops-only   # or --e2e-only
    python benchmarks/bench_cpu.py --ops-only --shapes 4096x4096 --rows 1,256
    python benchmarks/bench_cpu.py --e2e-only --labels "fp32,w4a16 g128" --eval-tokens 2048
    python benchmarks/bench_cpu.py --smoke      # tiny shapes, a few seconds
    python benchmarks/bench_cpu.py --float32    # float32 quantized layers and models

PyTorch's quantized CPU kernels take bf16 activations, so quantized layers and models
are bf16 (converted from a bf16 copy) and are compared with the float32 original a
user starts from, and with its bf16 copy.  ``--float32`` quantizes the float32 layers
and model instead (what ``torchquant quantize`` writes by default) and runs them as
``torchquant eval`` does, inside ``float32_in_bf16`` (torchao's rows stay bf16).

Per op: ``QuantLinear`` forward at SmolLM2-135M's shapes (K -> N: 576 -> 576, 576 ->
1536, 1536 -> 576, 576 -> 192) and 4096 -> 4096 for M = 1, 16, 256, 1024 rows, median
wall time; every column but the first is the float32 ``F.linear`` time over its own
(above 1 is faster).  Bytes per decoder layer: what SmolLM2-135M's seven linears of one
layer hold, the module's buffers (what the checkpoint stores) and the CPU layout cached
beside them.

End to end: SmolLM2-135M (the GGUF in ``$TORCHQUANT_DATA``, default ``../shared/data``
beside the repository) converted by ``convert_model`` (``lm_head`` is not quantized, the
default; the row labelled ``w4a16 g128 +lm_head`` opts in to quantizing it, its tied
embedding kept float) and saved; each row then runs in a fresh process that loads its model as
``torchquant eval`` does (``load_model``: the checkpoint, or the GGUF for fp32 and
bf16) and measures batch-1 greedy decode with the KV cache (64 new tokens after a
128-token prompt, ``torchquant.benchmark.measure_throughput``) and the ``torchquant
eval`` time: ``perplexity`` over the first 16,384 tokens of Pride and Prejudice in
1,024-token windows.  "RSS MiB" is that process's resident memory once the model is
loaded, "peak" its highest until then (the float rows pass through transformers' GGUF
reader, torchao's through the bf16 model it quantizes), "run" its highest by the end
(the eval's float32 logits over the 49,152-token vocabulary dominate it).

torchao's CPU configurations run in the same tables when ``import torchao`` works in
this interpreter (it is never a dependency of torchquant: ``pip install
'torchquant[bench-torchao]'`` or a separate venv, see the README): int8 weight-only,
int4 weight-only in its CPU layout (``PrototypeInt4WeightOnlyConfig``, torchao's
``Int4OpaqueTensor`` on ``_weight_int4pack_mm_for_cpu``, which replaced
``Int4CPULayout``) at groups 128 and 32, and int8 dynamic activation + int8 weight.
torchao leaves a linear whose K its group does not divide in bf16 ("kept bf16") and
refuses an N that is not a multiple of 16 ("fails").  All ratios come from one run.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchquant import QuantConfig, QuantLinear, convert_model, scheme_from_name
from torchquant.benchmark import measure_throughput
from torchquant.formats.native import save_quantized
from torchquant.ops.cpu_kernels import float32_in_bf16
from torchquant.tools import models
from torchquant.tools.evaluation import perplexity, tokenize_text

OP_SHAPES = [(576, 576), (576, 1536), (1536, 576), (576, 192), (4096, 4096)]  # (K, N)
OP_ROWS = [1, 16, 256, 1024]
# (label, scheme name, group size)
SCHEMES = [
    ("w8a16", "w8a16", None),
    ("w4a16 g128", "w4a16", 128),
    ("w4a16 g32", "w4a16", 32),
    ("w3a16 g128", "w3a16", 128),
    ("w8a8", "w8a8", None),
    ("w4a8 g128", "w4a8", 128),
    ("w4a8-fp8 g128", "w4a8-fp8", 128),
    ("fp8", "fp8", None),
    ("w8a16-fp8", "w8a16-fp8", None),
]
# -- one SmolLM2-135M decoder layer: linear -> (K, N)
LAYER_LINEARS = {
    "q": (576, 576),
    "k": (576, 192),
    "v": (576, 192),
    "o": (576, 576),
    "gate": (576, 1536),
    "up": (576, 1536),
    "down": (1536, 576),
}
DATA = Path(os.environ.get("TORCHQUANT_DATA", Path(__file__).resolve().parents[2] / "shared/data"))
GGUF = DATA / "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = DATA / "text/austen/prideprejudice.txt"
# -- a row label ending in this quantizes lm_head too (opt-in: QuantConfig(ignore=()));
# -- the tied embedding stays float
WITH_LM_HEAD = " +lm_head"
E2E = [
    "fp32", "bf16", "w8a16", "w4a16 g128", "w4a16 g32", "w3a16 g128", "w8a8", "fp8",
    f"w4a16 g128{WITH_LM_HEAD}",
]  # fmt: skip
TORCHAO_ROWS = ["ao w8a16", "ao w4a16 g128", "ao w4a16 g32", "ao w8a8"]
KEPT, FAILS = "kept bf16", "fails"


def median_seconds(fn: Callable[[], object], min_time: float = 0.3, max_runs: int = 25) -> float:
    fn()  # warm-up
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < min_time and len(times) < max_runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def scheme_of(label: str):
    """The torchquant scheme a row label names (``"w4a16 g128"``: w4a16 at group 128)."""
    name, _, group = label.removesuffix(WITH_LM_HEAD).partition(" g")
    return scheme_from_name(name, int(group) if group else None)


def config_of(label: str) -> QuantConfig:
    """The row's config: the default (``lm_head`` left float), or with ``lm_head`` quantized
    for a label ending in ``WITH_LM_HEAD``."""
    if label.endswith(WITH_LM_HEAD):
        return QuantConfig(scheme_of(label), ignore=())
    return QuantConfig(scheme_of(label))


# -- torchao, when this interpreter has it


def load_torchao() -> tuple[dict[str, Any], str]:
    """torchao's CPU configurations by row label (none when it cannot be imported here),
    and a line that says which."""
    try:
        import torchao
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
        from torchao.quantization import (
            Int8DynamicActivationInt8WeightConfig,
            Int8WeightOnlyConfig,
        )
    except Exception as exc:  # a torchao built for another torch fails beyond ImportError
        reason = str(exc).strip().splitlines()
        return {}, (
            f"torchao: not importable here ({type(exc).__name__}: "
            f"{reason[0] if reason else 'no details'}); its rows are left out (install it "
            "into a separate venv or with the bench-torchao extra to add them)"
        )
    keep_inductor = {"set_inductor_config": False}  # the other rows run in this process too
    configs = [
        Int8WeightOnlyConfig(**keep_inductor),
        PrototypeInt4WeightOnlyConfig(group_size=128, **keep_inductor),
        PrototypeInt4WeightOnlyConfig(group_size=32, **keep_inductor),
        Int8DynamicActivationInt8WeightConfig(**keep_inductor),
    ]
    return (
        dict(zip(TORCHAO_ROWS, configs, strict=True)),
        f"torchao {torchao.__version__}: rows {', '.join(TORCHAO_ROWS)}",
    )


def quantize_with_torchao(model: nn.Module, config: Any) -> None:
    """torchao's ``quantize_`` on every linear but ``lm_head`` (which torchquant keeps too)."""
    from torchao.quantization import quantize_

    def is_body_linear(module: nn.Module, name: str) -> bool:
        return isinstance(module, nn.Linear) and name.rpartition(".")[2] != "lm_head"

    quantize_(model, config, filter_fn=is_body_linear)


def torchao_linear(linear: nn.Linear, config: Any) -> nn.Module | str:
    """A torchao copy of ``linear``, or ``KEPT`` / ``FAILS`` where torchao does not quantize it."""
    holder = nn.Sequential(copy.deepcopy(linear))
    try:
        quantize_with_torchao(holder, config)
    except RuntimeError:  # its int4 CPU packing needs N % 16 == 0
        return FAILS
    return holder[0] if is_torchao_quantized(holder[0].weight) else KEPT


def is_torchao_quantized(weight: torch.Tensor) -> bool:
    return type(weight) not in (torch.Tensor, nn.Parameter)


def tensor_nbytes(t: torch.Tensor) -> int:
    """Bytes ``t`` holds; a tensor subclass (torchao's) counts its inner tensors."""
    if type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_nbytes(getattr(t, name)) for name in names)
    return t.numel() * t.element_size()


# -- per op


def float_pair(k: int, n: int, bias: bool = True) -> tuple[nn.Linear, nn.Linear]:
    """A seeded float32 linear ``K -> N`` and its bf16 copy."""
    torch.manual_seed(0)
    linear = nn.Linear(k, n, bias=bias)
    half = nn.Linear(k, n, bias=bias).bfloat16()
    half.load_state_dict(linear.state_dict())
    return linear, half


def _cell(value: float | str) -> str:
    return f"{value:>14.2f}" if isinstance(value, float) else f"{value:>14}"


@torch.no_grad()
def op_table(
    shapes: list[tuple[int, int]],
    rows: list[int],
    torchao: dict[str, Any],
    float32: bool = False,
    op_labels: list[str] | None = None,
) -> str:
    """Per-op ratios; ``float32``: torchquant's layers quantized from the float32 linear and
    fed float32 inputs inside ``float32_in_bf16``; ``op_labels``: only those columns."""
    schemes = [row for row in SCHEMES if op_labels is None or row[0] in op_labels]
    torchao = {k: v for k, v in torchao.items() if op_labels is None or k in op_labels}
    labels = [label for label, _, _ in schemes] + list(torchao)
    head = f"{'K->N':>11}{'M':>6}{'fp32 ms':>9}{'bf16':>7}" + "".join(f"{x:>14}" for x in labels)
    inputs = "float32 layers and inputs" if float32 else "bf16 layers and inputs"
    lines = [
        f"per op: ms of float32 F.linear; the other columns: x fp32 (above 1 = faster); "
        f"torchquant: {inputs}"
    ]
    lines.append(head)
    for k, n in shapes:
        linear, half = float_pair(k, n)
        source = linear if float32 else half
        layers = [QuantLinear.from_linear(source, scheme_from_name(s, g)) for _, s, g in schemes]
        own = len(layers)
        layers += [torchao_linear(half, config) for config in torchao.values()]
        for m in rows:
            x = torch.randn(m, k)
            fp32 = median_seconds(lambda x=x, f=linear: f(x))
            xb = x.bfloat16()
            bf16 = median_seconds(lambda x=xb, f=half: f(x))
            with float32_in_bf16():
                cells = [
                    layer
                    if isinstance(layer, str)
                    else fp32
                    / median_seconds(lambda f=layer, x=x if i < own and float32 else xb: f(x))
                    for i, layer in enumerate(layers)
                ]
            lines.append(
                f"{f'{k}->{n}':>11}{m:>6}{fp32 * 1e3:>9.3f}{fp32 / bf16:>7.2f}"
                + "".join(_cell(c) for c in cells)
            )
    return "\n".join(lines)


# -- bytes per layer


@torch.no_grad()
def layer_bytes_table(linears: dict[str, tuple[int, int]], torchao: dict[str, Any]) -> str:
    """KiB each scheme holds for ``linears`` (one decoder layer): buffers, cached CPU layout."""
    halves = {name: float_pair(k, n, bias=False)[1] for name, (k, n) in linears.items()}
    fp32 = {name: 4 * layer.weight.numel() for name, layer in halves.items()}
    rows: list[tuple[str, dict[str, int], int, str]] = [
        ("fp32", fp32, 0, ""),
        ("bf16", {name: b // 2 for name, b in fp32.items()}, 0, ""),
    ]
    for label, name, group in SCHEMES:
        layers = {
            n: QuantLinear.from_linear(h, scheme_from_name(name, group)) for n, h in halves.items()
        }
        held = {n: layer.nbytes() + layer.cpu_layout_nbytes() for n, layer in layers.items()}
        rows.append((label, held, sum(layer.cpu_layout_nbytes() for layer in layers.values()), ""))
    for label, config in torchao.items():
        layers = {n: torchao_linear(h, config) for n, h in halves.items()}
        held = {
            n: tensor_nbytes(layer.weight) if isinstance(layer, nn.Module) else fp32[n] // 2
            for n, layer in layers.items()
        }
        left = [f"{n} {layer}" for n, layer in layers.items() if isinstance(layer, str)]
        rows.append((label, held, 0, ", ".join(left)))
    total_fp32 = sum(fp32.values())
    lines = [
        "bytes per decoder layer: KiB held per linear (buffers + cached CPU layout; torchao: "
        "its weight tensor)",
        f"{'model':<14}{'buffers':>9}{'layout':>9}{'held':>9}{'x fp32':>8}"
        + "".join(f"{name:>8}" for name in linears),
    ]
    for label, held, layout, note in rows:
        total = sum(held.values())
        lines.append(
            f"{label:<14}{(total - layout) / 1024:>9.1f}{layout / 1024:>9.1f}{total / 1024:>9.1f}"
            f"{total / total_fp32:>8.3f}"
            + "".join(f"{held[name] / 1024:>8.1f}" for name in linears)
            + (f"  ({note})" if note else "")
        )
    return "\n".join(lines)


# -- end to end: one process to save each checkpoint, one to measure each row


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def save_row_checkpoint(label: str, model_spec: str, checkpoint: str, float32: bool) -> None:
    """Convert the bf16 (``float32``: float32) model by ``label`` and save it where the row's
    process will load it."""
    model, tokenizer = models.load_model(model_spec, torch.float32 if float32 else torch.bfloat16)
    config = config_of(label)
    model, _ = convert_model(model, config, progress=False)
    save_quantized(model, checkpoint, config=config, tokenizer=tokenizer, overwrite=True)


def load_row_model(label: str, model_spec: str, checkpoint: str | None) -> tuple[nn.Module, Any]:
    """The row's model as ``torchquant eval`` would load it (torchao's: quantized here)."""
    if checkpoint is not None:
        return models.load_model(checkpoint)
    model, tokenizer = models.load_model(
        model_spec, torch.float32 if label == "fp32" else torch.bfloat16
    )
    if label in TORCHAO_ROWS:
        configs, note = load_torchao()
        if label not in configs:
            raise SystemExit(f"{label}: {note}")
        quantize_with_torchao(model, configs[label])
    return model, tokenizer


@torch.no_grad()
def measure_row(
    label: str,
    model: nn.Module,
    eval_ids: torch.Tensor,
    *,
    seq_len: int,
    prompt: int,
    new_tokens: int,
    repeats: int,
) -> dict[str, Any]:
    """Decode, prefill and eval time of a loaded ``model``, with the bytes it holds."""
    body = {n: m for n, m in model.named_modules() if n.rpartition(".")[2] != "lm_head"}
    kept_float = sum(
        isinstance(m, nn.Linear) and not is_torchao_quantized(m.weight) for m in body.values()
    )
    tensors = [*model.parameters(), *model.buffers()]  # each shared (tied) tensor once
    held = sum(tensor_nbytes(t) for t in tensors)
    layout = sum(m.cpu_layout_nbytes() for m in body.values() if isinstance(m, QuantLinear))
    with float32_in_bf16():  # -- as torchquant eval runs float32 quantized models
        speed = measure_throughput(
            model, label, prompt_len=prompt, new_tokens=new_tokens, repeats=repeats
        )
        evaluation = perplexity(model, eval_ids, seq_len, progress=False)
    return {
        "label": label,
        "decode_tok_s": speed.decode_tokens_per_s,
        "prefill_tok_s": speed.prefill_tokens_per_s,
        "eval_s": evaluation.seconds,
        "eval_tokens": evaluation.tokens,
        "perplexity": evaluation.perplexity,
        "held_mib": held / 2**20,
        "layout_mib": layout / 2**20,
        "linears_kept_float": kept_float,
        "run_peak_rss_mib": _peak_rss_mib(),
    }


# -- a row process that hangs ends the run with a message instead of blocking it
WORKER_TIMEOUT_S = 3600


def _worker(args: list[str], what: str) -> dict[str, Any] | None:
    cmd = [sys.executable, __file__, *args]
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, check=False, timeout=WORKER_TIMEOUT_S
        )
    except subprocess.TimeoutExpired as exc:
        raise SystemExit(f"{what} did not finish in {exc.timeout:.0f} s") from None
    if done.returncode != 0:
        raise SystemExit(f"{what} failed\n{done.stderr[-3000:]}")
    lines = done.stdout.strip().splitlines()
    return json.loads(lines[-1]) if lines else None


def e2e_rows(labels: list[str], model_spec: str, text: str, options: dict[str, int]) -> list[dict]:
    """Every row measured in its own process; quantized rows load a checkpoint saved first."""
    shared = ["--model", model_spec, "--text", text]
    shared += [f"--{k.replace('_', '-')}={v}" for k, v in options.items() if k != "float32"]
    shared += ["--float32"] if options.get("float32") else []
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-cpu-") as tmp:
        for i, label in enumerate(labels):
            checkpoint = []
            if label not in ("fp32", "bf16") and label not in TORCHAO_ROWS:
                folder = str(Path(tmp) / f"row{i}")
                _worker(["--save-row", label, "--checkpoint", folder, *shared], f"{label}: save")
                checkpoint = ["--checkpoint", folder]
            rows.append(_worker(["--measure-row", label, *checkpoint, *shared], f"{label}: run"))
    return rows


def e2e_table(rows: list[dict], options: dict[str, int]) -> str:
    base = rows[0]
    lines = [
        f"end to end, batch 1, {options['prompt']}-token prompt, {options['new_tokens']} new "
        f"tokens (median of {options['repeats']}); eval: {base['eval_tokens']} tokens in "
        f"{options['seq_len']}-token windows; {options['threads']} threads; "
        f"{'float32' if options.get('float32') else 'bf16'} quantized models; "
        f"x {base['label']}: speed ratio (above 1 = faster), peak RSS ratio (below 1 = smaller)",
        f"{'model':<14}{'decode tok/s':>13}{'x':>6}{'prefill tok/s':>14}{'x':>6}{'eval s':>8}"
        f"{'x':>6}{'ppl':>8}{'held MiB':>9}{'layout':>8}{'RSS MiB':>8}{'peak':>7}{'x':>6}"
        f"{'run':>6}",
    ]
    for r in rows:
        lines.append(
            f"{r['label']:<14}{r['decode_tok_s']:>13.1f}"
            f"{r['decode_tok_s'] / base['decode_tok_s']:>6.2f}{r['prefill_tok_s']:>14.1f}"
            f"{r['prefill_tok_s'] / base['prefill_tok_s']:>6.2f}{r['eval_s']:>8.1f}"
            f"{base['eval_s'] / r['eval_s']:>6.2f}{r['perplexity']:>8.2f}{r['held_mib']:>9.1f}"
            f"{r['layout_mib']:>8.1f}{r['rss_mib']:>8.0f}{r['load_peak_rss_mib']:>7.0f}"
            f"{r['load_peak_rss_mib'] / base['load_peak_rss_mib']:>6.2f}"
            f"{r['run_peak_rss_mib']:>6.0f}"
        )
    for r in rows:
        if r["label"] in TORCHAO_ROWS and r["linears_kept_float"]:
            lines.append(f"{r['label']}: torchao left {r['linears_kept_float']} linears in bf16")
    return "\n".join(lines)


def _shapes(text: str) -> list[tuple[int, int]]:
    return [(int(k), int(n)) for k, _, n in (item.partition("x") for item in text.split(","))]


def _ints(text: str) -> list[int]:
    return [int(item) for item in text.split(",")]


def _labels(text: str) -> list[str]:
    return [item.strip() for item in text.split(",")]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops-only", action="store_true")
    p.add_argument("--e2e-only", action="store_true")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, no model")
    p.add_argument(
        "--float32",
        action="store_true",
        help="quantize the float32 layers and model (run inside float32_in_bf16)",
    )
    p.add_argument("--shapes", type=_shapes, default=OP_SHAPES, help="per op: KxN,KxN,...")
    p.add_argument("--rows", type=_ints, default=OP_ROWS, help="per op: M,M,...")
    p.add_argument("--labels", type=_labels, help="end-to-end rows, e.g. 'fp32,w4a16 g128'")
    p.add_argument(
        "--op-labels", type=_labels, help="per-op columns only these, e.g. 'w8a8,w4a8 g128'"
    )
    p.add_argument("--model", default=str(GGUF), help="the model: a .gguf file or a folder")
    p.add_argument("--text", default=str(TEXT), help="the text `torchquant eval` scores")
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--threads",
        type=int,
        default=torch.get_num_threads(),
        help="torch threads (1 on a loaded machine: idle threads wait on descheduled ones)",
    )
    p.add_argument("--save-row", help=argparse.SUPPRESS)
    p.add_argument("--measure-row", help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    options = {
        "eval_tokens": args.eval_tokens,
        "seq_len": args.seq_len,
        "prompt": args.prompt,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "threads": args.threads,
        "float32": args.float32,
    }
    torch.set_num_threads(args.threads)
    if args.save_row:
        save_row_checkpoint(args.save_row, args.model, args.checkpoint, args.float32)
        return
    if args.measure_row:
        model, tokenizer = load_row_model(args.measure_row, args.model, args.checkpoint)
        loaded = {"rss_mib": _rss_mib(), "load_peak_rss_mib": _peak_rss_mib()}
        ids = tokenize_text(
            tokenizer, Path(args.text).read_text(encoding="utf-8"), args.eval_tokens
        )
        kw = {k: v for k, v in options.items() if k not in ("eval_tokens", "threads", "float32")}
        print(json.dumps({**measure_row(args.measure_row, model, ids, **kw), **loaded}))
        return
    torchao, note = load_torchao()
    print(note, flush=True)
    if args.smoke:
        print(op_table([(96, 40)], [1, 300], torchao, args.float32))
        print(layer_bytes_table({"narrow": (96, 40), "wide": (40, 96)}, torchao))
        return
    if not args.e2e_only:
        print(op_table(args.shapes, args.rows, torchao, args.float32, args.op_labels), flush=True)
        print()
        print(layer_bytes_table(LAYER_LINEARS, torchao), flush=True)
    if not args.ops_only:
        labels = args.labels or E2E + list(torchao)
        print()
        print(e2e_table(e2e_rows(labels, args.model, args.text, options), options))


if __name__ == "__main__":
    main()
