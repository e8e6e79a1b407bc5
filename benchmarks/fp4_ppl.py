"""Perplexity of FP4 weights (NVFP4, MXFP4) and microscaled W4A4 / W8A8 beside fp32 and INT4.

    nice -n 10 python benchmarks/fp4_ppl.py --threads 2 \\
        --calib ../shared/data/text/wikipedia_excerpt.txt \\
        --text ../shared/data/text/austen/prideprejudice.txt

Every row quantizes a fresh copy of the float model: round-to-nearest, the per-block
scale search (``-mse``: ``WeightQuant(observer="mse")``), the activations quantized too
(``nvfp4``, ``mxfp4``, ``mxfp8``; ``nvfp4 static``: NVFP4's activation global scale
calibrated on ``--calib``), or AWQ / GPTQ (block scales fixed first) calibrated on
``--calib`` (``--calib-samples`` windows of ``--calib-seq-len`` tokens); each is scored
on the first ``--max-tokens`` tokens of ``--text`` in ``--seq-len`` windows (no BOS).  Rows
ending in ``ct-scales`` round MXFP4's E8M0 block scales as compressed-tensors does
(``scale_rounding="compressed-tensors"``: the block max rounded up to the next power of two
where its significand is 1.75 or more), weights and activations alike.  Rows
``mxfp4a16 awq +no-clip``, ``+float``, ``+duo-closed`` and their pairs and triple change
spec-rounded MXFP4 AWQ's options one way each (no clip search, float propagation, duo
scaling on the closed grid: what compressed-tensors rounding defaults to).
``--skip-tokens`` scores text after its first tokens instead (held-out text).  Beside the
perplexity, the weight error ``||W_q - W|| / ||W||`` over all quantized linears: SmolLM2's
weights were shipped on a Q4_1 grid (4-bit asymmetric, blocks of 32, a float block minimum),
which neither the FP4 grids nor INT4 g32 with its integer zero points reproduce (rounding
the zero point moves the whole block: weight error 0.082 at g32).
"""

from __future__ import annotations

import argparse
import copy
import time
from itertools import combinations

import torch
from calibration_setup import add_run_args, load_run

from torchquant import (
    ActivationQuant,
    AWQConfig,
    QuantConfig,
    QuantScheme,
    WeightQuant,
    convert_model,
    scheme_from_name,
)
from torchquant.config.algorithms import AWQ_DEFAULTS
from torchquant.evaluation import perplexity
from torchquant.modules import QuantLinear

CT = "compressed-tensors"  # -- MXFP4's opt-in E8M0 scale rounding
SCHEMES = {
    "w4a16 g32 asym": QuantScheme(WeightQuant("int", 4, 32, False)),
    "w4a16 g128 asym": QuantScheme(WeightQuant("int", 4, 128, False)),
    "nvfp4a16": scheme_from_name("nvfp4a16"),
    "nvfp4a16-mse": scheme_from_name("nvfp4a16-mse"),
    "nvfp4a16 awq": QuantScheme(WeightQuant("nvfp4"), algorithm="awq"),
    "mxfp4a16": scheme_from_name("mxfp4a16"),
    "mxfp4a16-mse": scheme_from_name("mxfp4a16-mse"),
    "mxfp4a16 awq": QuantScheme(WeightQuant("mxfp4"), algorithm="awq"),
    "nvfp4a16 gptq": QuantScheme(WeightQuant("nvfp4"), algorithm="gptq"),
    "mxfp4a16 gptq": QuantScheme(WeightQuant("mxfp4"), algorithm="gptq"),
    "nvfp4": scheme_from_name("nvfp4"),
    "nvfp4 static": QuantScheme(WeightQuant("nvfp4"), ActivationQuant("nvfp4", dynamic=False)),
    "mxfp4": scheme_from_name("mxfp4"),
    "mxfp8": scheme_from_name("mxfp8"),
    "mxfp4a16 ct-scales": QuantScheme(WeightQuant("mxfp4", scale_rounding=CT)),
    "mxfp4a16-mse ct-scales": QuantScheme(WeightQuant("mxfp4", observer="mse", scale_rounding=CT)),
    "mxfp4a16 gptq ct-scales": QuantScheme(
        WeightQuant("mxfp4", scale_rounding=CT), algorithm="gptq"
    ),
    "mxfp4a16 awq ct-scales": QuantScheme(WeightQuant("mxfp4", scale_rounding=CT), algorithm="awq"),
    "mxfp4 ct-scales": QuantScheme(
        WeightQuant("mxfp4", scale_rounding=CT), ActivationQuant("mxfp4", scale_rounding=CT)
    ),
}
# -- the AWQ options MXFP4 with compressed-tensors rounding defaults to, each a change from
# -- the other formats' defaults, tried on the spec's rounding alone and together
AWQ_CHANGES = {
    "no-clip": {"clip": False},
    "float": {"propagate": "float"},
    "duo-closed": {"duo_scaling": True, "alpha_grid": "closed"},
}


def spec_mxfp4_awq_ablation() -> dict[str, QuantScheme]:
    """Spec-rounded MXFP4 AWQ with every one, pair and triple of ``AWQ_CHANGES``, each row's
    other options the other formats' defaults (``"mxfp4a16 awq +no-clip +float"``, ...)."""
    rows = {}
    for n in range(1, len(AWQ_CHANGES) + 1):
        for combo in combinations(AWQ_CHANGES, n):
            options = dict(AWQ_DEFAULTS[None])
            for change in combo:
                options.update(AWQ_CHANGES[change])
            name = "mxfp4a16 awq " + " ".join(f"+{change}" for change in combo)
            awq = AWQConfig(**options)
            rows[name] = QuantScheme(WeightQuant("mxfp4"), algorithm="awq", awq=awq)
    return rows


SCHEMES.update(spec_mxfp4_awq_ablation())


def weight_error(model: torch.nn.Module, floats: dict[str, torch.Tensor]) -> float:
    """``||W_q - W|| / ||W||`` over every quantized linear together."""
    num = den = 0.0
    for name, layer in model.named_modules():
        if isinstance(layer, QuantLinear):
            w = floats[name].float()
            num += float((layer.dequantized_weight(torch.float32) - w).square().sum())
            den += float(w.square().sum())
    return (num / den) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_args(parser, calib_samples=32, group_size=128)
    parser.add_argument("--schemes", nargs="*", default=list(SCHEMES), choices=list(SCHEMES))
    parser.add_argument("--reference", type=float, help="fp32 perplexity, to skip measuring it")
    args = parser.parse_args()
    base, _, ids, calib = load_run(args)
    floats = {
        name: m.weight.detach().clone()
        for name, m in base.named_modules()
        if isinstance(m, torch.nn.Linear)
    }
    ref = args.reference or perplexity(base, ids, args.seq_len, progress=False).perplexity
    print(f"fp32: {ref:.3f} ({torch.get_num_threads()} threads)", flush=True)
    table = [("fp32", ref, 0.0, None)]
    for name in args.schemes:
        model = copy.deepcopy(base)
        start = time.perf_counter()
        scheme = SCHEMES[name]
        data = calib if scheme.needs_calibration else None
        convert_model(model, QuantConfig(scheme), calibration_data=data, progress=False)
        seconds = time.perf_counter() - start
        table.append((name, perplexity(model, ids, args.seq_len, progress=False).perplexity,
                      weight_error(model, floats), seconds))  # fmt: skip
        print(f"{name}: ppl {table[-1][1]:.3f}, weight error {table[-1][2]:.4f}", flush=True)
        del model
    after = f" after the first {args.skip_tokens}" if args.skip_tokens else ""
    print(f"\n{ids.numel()} tokens of {args.text}{after}, {args.seq_len}-token windows, no BOS\n")
    print("| scheme | ppl | vs fp32 | weight error | quantize s |\n|---|---|---|---|---|")
    for name, ppl, error, seconds in table:
        took = "-" if seconds is None else f"{seconds:.1f}"
        print(f"| {name} | {ppl:.3f} | {100 * (ppl / ref - 1):+.2f}% | {error:.4f} | {took} |")


if __name__ == "__main__":
    main()
