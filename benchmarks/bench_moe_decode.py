"""Decode speed of a Mixtral-shaped mixture-of-experts model with random weights: bf16 vs W4A16.

    python benchmarks/bench_moe_decode.py                 # batch 1 and 16, CUDA graphs
    python benchmarks/bench_moe_decode.py --layers 8      # more layers (more memory)
    TRITON_INTERPRET=1 python benchmarks/bench_moe_decode.py --smoke

Each layer is Mixtral's sparse MLP block: RMSNorm, a router (``hidden -> 8`` experts,
softmax, top-2, renormalised), and transformers' fused experts layout (``gate_up_proj
(8, 2 * 14336, 4096)``, ``down_proj (8, 4096, 14336)``, SiLU) that ``convert_model``
splits into per-expert ``QuantLinear`` layers; on CUDA those run the grouped op, one
launch per projection over the active experts.  Attention is left out: it is the same
for both schemes and the experts' weights are what a decode step streams.  Layers
default to 4 (a bf16 layer holds 2.8 GB of experts) and the router and norms stay in bf16.

One decode step is timed eagerly, then captured in a CUDA graph after a warm-up (which
autotunes every kernel) and replayed; tokens/s = batch / median step time of the faster.
Two bf16 baselines: ``bf16``, the per-expert loop of ``QuantExperts`` on ``nn.Linear``
views (transformers' own loop), which synchronises the host per layer and so has no
graph; ``bf16-grouped``, the fused weights through ``torch._grouped_mm`` (graph-safe).
"vs bf16" is against the faster of the two.  GB/s counts
the expert weights a step must read: those of the experts the batch routes to (each
layer's router decides), plus the routers.  The replayed graph is checked against the
eager step; the relative error vs bf16 of what the layers add to the input is reported,
not judged.  Target (issue
14): W4A16 at batch 1 >= 2.0x bf16 tokens/s with CUDA graphs.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from functools import partial

import bench_utils
import torch
from torch import nn

from torchquant import QuantConfig, convert_model, scheme_from_name

# bf16: transformers' per-expert loop (QuantExperts on nn.Linear views, host-synchronising);
# bf16-grouped: the fused weights through torch._grouped_mm (CUDA-graph safe); w4a16: ours
SCHEMES = ("bf16", "bf16-grouped", "w4a16")


@dataclass(frozen=True)
class Shape:
    layers: int = 4
    hidden: int = 4096
    intermediate: int = 14336
    experts: int = 8
    top_k: int = 2


SMOKE_SHAPE = Shape(layers=2, hidden=64, intermediate=96, experts=4, top_k=2)


class MixtralExperts(nn.Module):
    """transformers' fused Mixtral experts: the layout ``convert_model`` splits per expert."""

    is_transposed, is_concatenated, has_bias, has_gate = False, True, False, True

    def __init__(self, s: Shape) -> None:
        super().__init__()
        self.num_experts = s.experts
        self.gate_up_proj = nn.Parameter(torch.empty(s.experts, 2 * s.intermediate, s.hidden))
        self.down_proj = nn.Parameter(torch.empty(s.experts, s.hidden, s.intermediate))
        self.act_fn = nn.SiLU()

    def forward(
        self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """The bf16 grouped baseline: slots sorted by expert, ``torch._grouped_mm`` per
        projection (cuBLAS/CUTLASS grouped GEMM on sm_90), no host synchronisation."""
        tokens, top_k = top_k_index.shape
        expert_of_slot = top_k_index.reshape(-1)
        order = torch.argsort(expert_of_slot, stable=True)
        counts = torch.zeros(self.num_experts, dtype=torch.int32, device=x.device)
        counts.scatter_add_(0, expert_of_slot, torch.ones_like(expert_of_slot, dtype=torch.int32))
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        rows = x[order // top_k]
        gate_up = torch._grouped_mm(rows, self.gate_up_proj.transpose(1, 2), offs=offs)
        inter = self.down_proj.shape[2]
        h = self.act_fn(gate_up[:, :inter]) * gate_up[:, inter:]
        out = torch._grouped_mm(h, self.down_proj.transpose(1, 2), offs=offs)
        out = out * top_k_weights.reshape(-1)[order, None].to(out.dtype)
        return torch.zeros_like(x).index_add_(0, order // top_k, out)


class SparseMoeBlock(nn.Module):
    """RMSNorm, top-k router, experts, residual."""

    def __init__(self, s: Shape) -> None:
        super().__init__()
        self.top_k = s.top_k
        self.norm = nn.RMSNorm(s.hidden)
        self.gate = nn.Linear(s.hidden, s.experts, bias=False)
        self.experts = MixtralExperts(s)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = torch.softmax(self.gate(x).float(), dim=-1)
        weights, index = torch.topk(probs, self.top_k, dim=-1)
        return index, (weights / weights.sum(-1, keepdim=True)).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        index, weights = self.route(h)
        return x + self.experts(h, index, weights)


class MoeModel(nn.Module):
    def __init__(self, s: Shape) -> None:
        super().__init__()
        self.layers = nn.ModuleList(SparseMoeBlock(s) for _ in range(s.layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def build(shape: Shape, scheme: str, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """A random model (same seed for every scheme), W4A16 g128 experts unless bf16."""
    torch.manual_seed(0)
    with torch.device("meta"):
        model = MoeModel(shape)
    model = model.to_empty(device=device).to(dtype)
    for p in model.parameters():
        p.data.normal_(0.0, 0.02) if p.dim() > 1 else p.data.fill_(1.0)
    if scheme == "bf16-grouped":
        return model.eval()  # the fused experts' own forward
    if scheme != "bf16":
        group = 16 if shape.hidden < 128 else 128
        config = QuantConfig(
            scheme_from_name(scheme, group_size=group), overrides={r"*.gate": None}
        )
        model, _ = convert_model(model, config, progress=False)
    else:
        from torchquant.modules.quant_experts import QuantExperts, fused_experts_layout

        for layer in model.layers:  # the same per-expert module, in bf16 (nn.Linear views)
            layer.experts = QuantExperts.from_fused(
                layer.experts, fused_experts_layout(layer.experts)
            )
    return model.eval()


def step_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes one step reads: each layer's router and the experts its tokens route to."""
    total = 0
    with torch.inference_mode():
        for layer in model.layers:
            h = layer.norm(x)
            index, _ = layer.route(h)
            total += layer.gate.weight.nbytes
            for e in index.unique().tolist():
                if isinstance(layer.experts, MixtralExperts):
                    total += layer.experts.gate_up_proj[e].nbytes
                    total += layer.experts.down_proj[e].nbytes
                    continue
                expert = layer.experts.expert(e)
                total += sum(
                    b.nbytes for b in (*expert.parameters(), *expert.buffers()) if b is not None
                )
            x = layer(x)
    return total


@torch.inference_mode()
def eager_step(model: nn.Module, x: torch.Tensor, rep: int) -> float:
    """Median time (ms) of one eager decode step (host overhead included)."""
    import triton.testing

    return triton.testing.do_bench(lambda: model(x), rep=rep, return_mode="median")


# -- the result table: one row per (batch, scheme)
TABLE_HEADER = (
    "batch | scheme | eager ms | graph ms | tokens/s | vs bf16 | GB/s | % copy | rel. err"
)
TABLE_CELLS = "{} {} {:.3f} {:.3f} {:.0f} {:.2f}x {:.0f} {:.0f}% {:.3f}"


def main(argv: list[str] | None = None) -> None:
    parser = bench_utils.decode_parser(__doc__.splitlines()[0], SCHEMES, rep=100)
    parser.add_argument("--layers", type=int, default=Shape.layers)
    args = bench_utils.parse_decode_args(parser, argv)
    device, dtype, batches = args.device, args.dtype, args.batches
    shape = SMOKE_SHAPE if args.smoke else Shape(layers=args.layers)
    copy_gbs = bench_utils.copy_bandwidth_gbs(args.smoke)
    torch.manual_seed(1)
    inputs = torch.randn(max(batches), shape.hidden, device=device, dtype=dtype)
    rows, failures, references, base_ms = [], [], {}, {}
    for scheme in args.schemes:  # one model per scheme serves every batch size
        model = build(shape, scheme, dtype, device)
        for batch in batches:
            x = inputs[:batch]
            nbytes = step_bytes(model, x)
            with torch.inference_mode():
                out = model(x).float() - x.float()  # what the layers add to x
            err = bench_utils.relative_error(out, references.setdefault(batch, out))
            eager_ms = graph_ms = float("nan")
            if not math.isfinite(err):
                failures.append(f"{scheme} batch {batch}: non-finite output")
            elif not args.smoke:
                eager_ms = eager_step(model, x, args.rep)
                try:
                    graph_ms, replayed = bench_utils.graph_replay_ms(partial(model, x), args.rep)
                except RuntimeError as error:  # the per-expert loop synchronises the host
                    print(f"{scheme} batch {batch}: no CUDA graph ({error})", file=sys.stderr)
                else:
                    if bench_utils.relative_error(replayed - x.float(), out) > 1e-2:
                        failures.append(f"{scheme} batch {batch}: graph replay differs")
            ms = min(eager_ms, graph_ms) if math.isfinite(graph_ms) else eager_ms
            if scheme.startswith("bf16") and math.isfinite(ms):
                base_ms[batch] = min(base_ms.get(batch, ms), ms)
            rows.append((batch, scheme, eager_ms, graph_ms, ms, nbytes, err))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rows.sort(key=lambda row: row[0])
    print(
        f"\n## MoE decode step, Mixtral shapes ({shape.layers} layers, {shape.experts} experts "
        f"top-{shape.top_k}, hidden {shape.hidden}, intermediate {shape.intermediate}), "
        "CUDA graph replay (do_bench median)"
    )
    print(f"copy bandwidth (measured): {copy_gbs:.0f} GB/s")
    print(
        "tokens/s, GB/s: the faster of eager and graph (nan: no graph was captured); "
        "vs bf16: against the faster bf16 variant"
    )
    cells = []
    for batch, scheme, eager_ms, graph_ms, ms, nbytes, err in rows:
        tps, speedup = batch / ms * 1e3, base_ms.get(batch, math.nan) / ms
        gbs = nbytes / (ms * 1e-3) / 1e9
        cells.append(
            (batch, scheme, eager_ms, graph_ms, tps, speedup, gbs, 100 * gbs / copy_gbs, err)
        )
    bench_utils.print_markdown_table(TABLE_HEADER, TABLE_CELLS, cells)
    bench_utils.finish_run(
        failures, "smoke ok: every scheme builds, converts and runs its experts", args.smoke
    )


if __name__ == "__main__":
    main(sys.argv[1:])
