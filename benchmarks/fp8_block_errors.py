"""Where FP8 block-wise loses accuracy: each linear's output error from its weight blocks,
from its activation groups, and from both, on real inputs.

    nice -n 10 python benchmarks/fp8_block_errors.py --threads 2 \\
        --calib ../shared/data/text/wikipedia_excerpt.txt \\
        --text ../shared/data/text/austen/prideprejudice.txt

The float model runs ``--calib-samples`` windows of ``--calib-seq-len`` tokens of
``--calib``; each linear's inputs ``X`` are kept and its output ``X W^T`` compared with
``X Wq^T`` (128x128 weight blocks, round-to-nearest, or the scale search with ``--mse``),
``Xq W^T`` (1x128 activation groups) and ``Xq Wq^T``: relative errors
``||Y' - Y|| / ||Y||``, averaged over the layers of each kind, then the worst layers.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from calibration_setup import add_run_args, load_run

from torchquant.numerics import (
    dequantize_activation_groups,
    dequantize_fp8_block_weight,
    quantize_activation_groups,
    quantize_fp8_block_weight,
    search_fp8_block_weight,
)

BLOCK = (128, 128)
KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def capture_inputs(model: torch.nn.Module, calib: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every linear's inputs over ``calib`` ``(rows, K)``, keyed by the linear's name."""
    inputs: dict[str, list[torch.Tensor]] = defaultdict(list)
    handles = [
        module.register_forward_pre_hook(
            lambda m, args, name=name: inputs[name].append(args[0].reshape(-1, args[0].shape[-1]))
        )
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in KINDS
    ]
    try:
        with torch.no_grad():
            for window in calib:
                model(window.unsqueeze(0))
    finally:
        for h in handles:
            h.remove()
    return {name: torch.cat(xs) for name, xs in inputs.items()}


def relative(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).norm() / ref.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_args(parser, calib_samples=4, group_size=128)
    parser.add_argument("--mse", action="store_true", help="searched block scales")
    parser.add_argument("--worst", type=int, default=8, help="layers listed by weight+act error")
    args = parser.parse_args()
    model, _, _, calib = load_run(args)
    inputs = capture_inputs(model, calib)
    rounding = search_fp8_block_weight if args.mse else quantize_fp8_block_weight
    rows = []
    with torch.no_grad():
        for name, module in model.named_modules():
            if name not in inputs:
                continue
            x, w = inputs[name].float(), module.weight.float()
            wq = dequantize_fp8_block_weight(*rounding(w, BLOCK), BLOCK)
            xq = dequantize_activation_groups(*quantize_activation_groups(x, BLOCK[1]), BLOCK[1])
            ref = x @ w.t()
            errors = (relative(x @ wq.t(), ref), relative(xq @ w.t(), ref))
            rows.append((name, *errors, relative(xq @ wq.t(), ref)))
    print(f"{calib.shape[0]} x {calib.shape[1]} tokens of {args.calib}\n")
    print("| kind | weights only | activations only | both |\n|---|---|---|---|")
    for kind in KINDS:
        mine = [r for r in rows if r[0].endswith(kind)]
        means = [sum(r[i] for r in mine) / len(mine) for i in (1, 2, 3)]
        print(f"| {kind} | " + " | ".join(f"{m:.4f}" for m in means) + " |")
    print("\n| layer | weights only | activations only | both |\n|---|---|---|---|")
    for name, *errors in sorted(rows, key=lambda r: -r[3])[: args.worst]:
        print(f"| {name} | " + " | ".join(f"{e:.4f}" for e in errors) + " |")


if __name__ == "__main__":
    main()
