"""End-to-end decode speed of a Llama-3-8B-shaped model: bf16 vs w4a16, w8a16, w8a8, fp8.

    python benchmarks/bench_decode.py                 # batch 1 and 16, CUDA graphs
    python benchmarks/bench_decode.py --compile       # torch.compile'd step in the graph
    TRITON_INTERPRET=1 python benchmarks/bench_decode.py --smoke

The model has Llama-3-8B's shapes (32 layers, hidden 4096, MLP 14336, 32 query and
8 key/value heads, vocabulary 128256) and random weights.  One decode step (RMSNorm,
q/k/v/o projections, attention over a static KV cache of ``--context`` tokens, SwiGLU
MLP, final norm, bf16 ``lm_head``) is captured in a CUDA graph after a warm-up (which
also runs the autotuner) and replayed; tokens/s = batch / median step time.  Rotary
embeddings are left out (element-wise, negligible next to the weight traffic).
Every layer is quantized by ``convert_model`` except ``lm_head`` (the default); on CUDA
its sibling projections (q/k/v, gate/up) run as one launch each at batch 1
(``torchquant.modules.fuse_sibling_linears``), and "quantized launches" counts the
torchquant ops of the eager step (7 per layer unfused, 4 fused).

GB/s counts the bytes one step must read: every weight (quantized: codes, scales,
zeros), the whole KV cache and ``lm_head``, plus the embedding rows used; "% copy" is
against the measured device copy bandwidth.  The weights of one step (5 to 16 GB) are
far larger than the L2, so no input rotation is needed.  The replayed graph is checked
against an eager step; the logits' relative error vs bf16 is reported, not judged.
Target on the H100: w4a16 at batch 1 >= 2.5x bf16.
"""

from __future__ import annotations

import math
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial

import bench_utils
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from torchquant import QuantConfig, convert_model

SCHEMES = ("bf16", "w4a16", "w8a16", "w8a8", "fp8")


@dataclass(frozen=True)
class Shape:
    layers: int = 32
    hidden: int = 4096
    mlp: int = 14336
    heads: int = 32
    kv_heads: int = 8
    vocab: int = 128256


SMOKE_SHAPE = Shape(layers=2, hidden=64, mlp=160, heads=4, kv_heads=2, vocab=100)


class DecoderLayer(nn.Module):
    """One Llama block; the static KV cache holds ``batch`` rows, a step uses the first ``b``."""

    def __init__(self, s: Shape, batch: int, context: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = s.heads, s.kv_heads, s.hidden // s.heads
        kv = s.kv_heads * self.head_dim
        self.input_layernorm = nn.RMSNorm(s.hidden)
        self.q_proj = nn.Linear(s.hidden, s.hidden, bias=False)
        self.k_proj = nn.Linear(s.hidden, kv, bias=False)
        self.v_proj = nn.Linear(s.hidden, kv, bias=False)
        self.o_proj = nn.Linear(s.hidden, s.hidden, bias=False)
        self.post_attention_layernorm = nn.RMSNorm(s.hidden)
        self.gate_proj = nn.Linear(s.hidden, s.mlp, bias=False)
        self.up_proj = nn.Linear(s.hidden, s.mlp, bias=False)
        self.down_proj = nn.Linear(s.mlp, s.hidden, bias=False)
        cache = torch.zeros(batch, s.kv_heads, context, self.head_dim)
        self.register_buffer("k_cache", cache, persistent=False)
        self.register_buffer("v_cache", cache.clone(), persistent=False)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        h = self.input_layernorm(x)
        q = self.q_proj(h).view(b, self.heads, 1, self.head_dim)
        k = self.k_proj(h).view(b, self.kv_heads, 1, self.head_dim)
        v = self.v_proj(h).view(b, self.kv_heads, 1, self.head_dim)
        k_cache, v_cache = self.k_cache[:b], self.v_cache[:b]
        k_cache.index_copy_(2, pos, k)
        v_cache.index_copy_(2, pos, v)
        attn = F.scaled_dot_product_attention(q, k_cache, v_cache, enable_gqa=True)
        x = x + self.o_proj(attn.reshape(b, -1))
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class DecoderModel(nn.Module):
    def __init__(self, s: Shape, batch: int, context: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(s.vocab, s.hidden)
        self.layers = nn.ModuleList(DecoderLayer(s, batch, context) for _ in range(s.layers))
        self.norm = nn.RMSNorm(s.hidden)
        self.lm_head = nn.Linear(s.hidden, s.vocab, bias=False)

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x, pos)
        return self.lm_head(self.norm(x))


def build(shape: Shape, batch: int, context: int, scheme: str, dtype, device) -> nn.Module:
    """A random model (same seed for every scheme), quantized unless ``scheme`` is bf16.

    ``batch`` is the largest batch it will decode (the KV cache rows).
    """
    torch.manual_seed(0)
    with torch.device("meta"):
        model = DecoderModel(shape, batch, context)
    model = model.to_empty(device=device).to(dtype)
    for name, p in model.named_parameters():
        p.data.normal_(0.0, 0.02) if p.dim() > 1 else p.data.fill_(1.0)
        if name.endswith("proj.weight"):  # a few outlier input channels, as real models have
            p.data[:, :: max(1, p.shape[1] // 8)] *= 4
    for b in model.buffers():
        b.normal_(0.0, 1.0)
    if scheme != "bf16":
        model, _ = convert_model(model, QuantConfig(scheme), progress=False)
    return model.eval()


def step_bytes(model: nn.Module, batch: int) -> int:
    """Bytes one step of ``batch`` sequences reads: all weights, ``batch`` rows of every
    KV cache and ``batch`` embedding rows."""
    total = 0
    for name, t in (*model.named_parameters(), *model.named_buffers()):
        if name.endswith(("k_cache", "v_cache")):
            total += t[:batch].numel() * t.element_size()
        elif name != "embed_tokens.weight":
            total += t.numel() * t.element_size()
    return total + batch * model.embed_tokens.weight[0].nbytes


class QuantizedLaunches(TorchDispatchMode):
    """Counts the torchquant ops a step dispatches: one kernel launch each on CUDA (eager
    CPU calls skip the dispatcher, so CPU runs count none)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.namespace == "torchquant"
        return func(*args, **(kwargs or {}))


# -- the result table: one row per (batch, scheme)
TABLE_HEADER = (
    "batch | scheme | quantized launches | ms/step | tokens/s | vs bf16 | GB/s | % copy | "
    "logits rel. err"
)
TABLE_CELLS = "{} {} {} {:.3f} {:.0f} {:.2f}x {:.0f} {:.0f}% {:.3f}"


def main(argv: list[str] | None = None) -> None:
    parser = bench_utils.decode_parser(__doc__.splitlines()[0], SCHEMES, rep=200)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--compile", action="store_true", help="torch.compile each model first")
    args = bench_utils.parse_decode_args(parser, argv)
    device, dtype, batches = args.device, args.dtype, args.batches
    shape = SMOKE_SHAPE if args.smoke else Shape()
    context = 16 if args.smoke else args.context
    copy_gbs = bench_utils.copy_bandwidth_gbs(args.smoke)
    torch.manual_seed(1)
    tokens = torch.randint(0, shape.vocab, (max(batches),), device=device)
    pos = torch.tensor([context // 2], device=device)
    rows, failures, references, base_ms = [], [], {}, {}
    for scheme in args.schemes:  # one model per scheme serves every batch size
        model = build(shape, max(batches), context, scheme, dtype, device)
        nbytes = {batch: step_bytes(model, batch) for batch in batches}
        if args.compile:
            model = torch.compile(model, fullgraph=True, dynamic=False)
        for batch in batches:
            launches = QuantizedLaunches()
            with torch.inference_mode(), launches if not args.compile else nullcontext():
                logits = model(tokens[:batch], pos).float()
            reference = references.setdefault(batch, logits)
            err = bench_utils.relative_error(logits, reference)
            ms = float("nan")
            if not math.isfinite(err):
                failures.append(f"{scheme} batch {batch}: non-finite logits")
            elif not args.smoke:
                ms, replayed = bench_utils.graph_replay_ms(
                    partial(model, tokens[:batch], pos), args.rep
                )
                if bench_utils.relative_error(replayed, logits) > 1e-2:
                    failures.append(f"{scheme} batch {batch}: graph replay differs from eager")
            base = base_ms.setdefault(batch, ms)
            gbs = nbytes[batch] / (ms * 1e-3) / 1e9
            pct = 100 * gbs / copy_gbs
            counted = "-" if args.compile else launches.count  # -- not under compile's frames
            row = (batch, scheme, counted, ms, batch / ms * 1e3, base / ms, gbs, pct, err)
            rows.append(row)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rows.sort(key=lambda row: row[0])  # stable: schemes stay in order within a batch
    mode = "torch.compile + CUDA graph" if args.compile else "CUDA graph"
    name = "smoke shapes" if args.smoke else "Llama-3-8B shapes"
    print(f"\n## decode step, {name}, context {context}, {mode} replay (do_bench median)")
    print(f"copy bandwidth (measured): {copy_gbs:.0f} GB/s")
    bench_utils.print_markdown_table(TABLE_HEADER, TABLE_CELLS, rows)
    bench_utils.finish_run(
        failures, "smoke ok: every scheme builds, converts and decodes", args.smoke
    )


if __name__ == "__main__":
    main(sys.argv[1:])
