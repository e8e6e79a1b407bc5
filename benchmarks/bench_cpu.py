"""CPU speed of every scheme against float32 (and bf16) ``F.linear``, and end to end.

    python benchmarks/bench_cpu.py              # per-op table, then SmolLM2-135M decode
    python benchmarks/bench_cpu.py --ops-only   # or --e2e-only
    python benchmarks/bench_cpu.py --smoke      # tiny shapes, a few seconds

PyTorch's quantized CPU kernels take bf16 activations, so quantized layers and models
are bf16 (converted from a bf16 copy) and are compared with the float32 original a
user starts from, and with its bf16 copy.

Per op: ``QuantLinear`` forward at SmolLM2-135M's shapes (K -> N: 576 -> 576, 576 ->
1536, 1536 -> 576, 576 -> 192) and 4096 -> 4096 for M = 1, 16, 256, 1024 rows, median
wall time; every column but the first is the float32 ``F.linear`` time over its own
(above 1 is faster).  End to end: SmolLM2-135M (the GGUF in ``$TORCHQUANT_DATA``)
converted by ``convert_model`` (``lm_head`` is not quantized, the default), batch-1
greedy decode with the KV cache, 64 new tokens after a 128-token prompt; each model
runs in its own process, so "RSS MiB" is that process's resident memory after
conversion and decoding (the float32 model was loaded first and freed).  All ratios
come from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from torchquant import QuantConfig, QuantLinear, convert_model, scheme_from_name

OP_SHAPES = [(576, 576), (576, 1536), (1536, 576), (576, 192), (4096, 4096)]  # (K, N)
OP_ROWS = [1, 16, 256, 1024]
# (label, scheme name, group size)
SCHEMES = [
    ("w8a16", "w8a16", None),
    ("w4a16 g128", "w4a16", 128),
    ("w4a16 g32", "w4a16", 32),
    ("w3a16 g128", "w3a16", 128),
    ("w8a8", "w8a8", None),
    ("fp8", "fp8", None),
    ("w8a16-fp8", "w8a16-fp8", None),
]
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
E2E = ["fp32", "bf16", "w8a16", "w4a16 g128", "w4a16 g32", "w3a16 g128", "w8a8", "fp8"]


def median_seconds(fn: Callable[[], object], min_time: float = 0.3, max_runs: int = 25) -> float:
    fn()  # warm-up
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < min_time and len(times) < max_runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@torch.no_grad()
def op_table(shapes: list[tuple[int, int]], rows: list[int]) -> str:
    labels = [label for label, _, _ in SCHEMES]
    head = f"{'K->N':>11}{'M':>6}{'fp32 ms':>9}{'bf16':>7}" + "".join(f"{x:>12}" for x in labels)
    lines = ["per op: ms of float32 F.linear; the other columns: x fp32 (above 1 = faster)"]
    lines.append(head)
    for k, n in shapes:
        torch.manual_seed(0)
        linear = torch.nn.Linear(k, n)
        half = torch.nn.Linear(k, n).bfloat16()
        half.load_state_dict(linear.state_dict())
        layers = [QuantLinear.from_linear(half, scheme_from_name(s, g)) for _, s, g in SCHEMES]
        for m in rows:
            x = torch.randn(m, k)
            fp32 = median_seconds(lambda x=x, f=linear: f(x))
            xb = x.bfloat16()
            bf16 = median_seconds(lambda x=xb, f=half: f(x))
            ratios = [fp32 / median_seconds(lambda f=layer, x=xb: f(x)) for layer in layers]
            lines.append(
                f"{f'{k}->{n}':>11}{m:>6}{fp32 * 1e3:>9.3f}{fp32 / bf16:>7.2f}"
                + "".join(f"{r:>12.2f}" for r in ratios)
            )
    return "\n".join(lines)


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@torch.no_grad()
def decode_one(label: str, prompt: int, new_tokens: int, repeats: int) -> dict:
    """Load SmolLM2-135M, convert it by ``label``, time greedy decode; runs in a subprocess."""
    from transformers import AutoModelForCausalLM

    folder = os.environ.get("TORCHQUANT_DATA", "../shared/data")
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32)
    model.eval()
    if label != "fp32":
        model = model.bfloat16()
    if label not in ("fp32", "bf16"):
        name, _, group = label.partition(" g")
        scheme = scheme_from_name(name, int(group) if group else None)
        model, _ = convert_model(model, QuantConfig(scheme), progress=False)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    layout_bytes = sum(m.cpu_layout_nbytes() for m in layers)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt), generator=torch.Generator())

    def decode_seconds() -> float:
        out = model(ids, use_cache=True)  # the prefill that fills the cache is not timed
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(new_tokens):
            out = model(token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        return time.perf_counter() - start

    prefill = median_seconds(lambda: model(ids, use_cache=True), min_time=0, max_runs=repeats)
    decode_seconds()  # warm-up
    decode = statistics.median(decode_seconds() for _ in range(repeats))
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return {
        "label": label,
        "decode_tok_s": new_tokens / decode,
        "prefill_tok_s": prompt / prefill,
        "weights_mib": weights / 2**20,
        "layout_mib": layout_bytes / 2**20,
        "rss_mib": _rss_mib(),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def e2e_table(labels: list[str], prompt: int, new_tokens: int, repeats: int) -> str:
    rows = []
    for label in labels:
        cmd = [sys.executable, __file__, "--decode-one", label, "--prompt", str(prompt)]
        cmd += ["--new-tokens", str(new_tokens), "--repeats", str(repeats)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"{label}: decode failed\n{done.stderr[-2000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    base = rows[0]
    lines = [
        f"SmolLM2-135M, batch 1, {prompt}-token prompt, {new_tokens} new tokens "
        f"(median of {repeats}), {torch.get_num_threads()} threads",
        f"{'model':<12}{'decode tok/s':>13}{'x fp32':>8}{'prefill tok/s':>15}{'x fp32':>8}"
        f"{'weights MiB':>12}{'layout MiB':>11}{'RSS MiB':>9}{'peak RSS':>9}",
    ]
    for r in rows:
        lines.append(
            f"{r['label']:<12}{r['decode_tok_s']:>13.1f}"
            f"{r['decode_tok_s'] / base['decode_tok_s']:>8.2f}{r['prefill_tok_s']:>15.1f}"
            f"{r['prefill_tok_s'] / base['prefill_tok_s']:>8.2f}{r['weights_mib']:>12.1f}"
            f"{r['layout_mib']:>11.1f}{r['rss_mib']:>9.0f}{r['peak_rss_mib']:>9.0f}"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops-only", action="store_true")
    p.add_argument("--e2e-only", action="store_true")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, no model")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--decode-one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.decode_one:
        print(json.dumps(decode_one(args.decode_one, args.prompt, args.new_tokens, args.repeats)))
        return
    if args.smoke:
        print(op_table([(96, 40)], [1, 300]))
        return
    if not args.e2e_only:
        print(op_table(OP_SHAPES, OP_ROWS), flush=True)
    if not args.ops_only:
        print()
        print(e2e_table(E2E, args.prompt, args.new_tokens, args.repeats))


if __name__ == "__main__":
    main()
