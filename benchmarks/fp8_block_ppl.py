"""Perplexity of FP8 block-wise (128x128 weight blocks, 1x128 activation groups) beside fp32
and per-channel FP8, on a real model.

    nice -n 10 python benchmarks/fp8_block_ppl.py --threads 2 \\
        --calib ../shared/data/text/wikipedia_excerpt.txt \\
        --text ../shared/data/text/austen/prideprejudice.txt

Every row quantizes a fresh copy of the float model and is scored on the first
``--max-tokens`` tokens of ``--text`` in ``--seq-len`` windows (no BOS): round-to-nearest,
the per-block scale search (``-mse``), or GPTQ onto the E4M3 grid (``gptq``, block scales
fixed first; calibrated on ``--calib-samples`` windows of ``--calib-seq-len`` tokens of
``--calib``).  ``fp8-block 128x64`` has 128x64 weight blocks and 1x64 activation groups
(what llm-compressor can run on this model: its 1x128 groups need K divisible by 128).
The ``... only`` rows quantize one kind of linear and leave the rest float, to show where
the error comes from.  SmolLM2's hidden size 576 is 4.5 x 128, so its q/k/v/gate/up
inputs end in a partial 64-wide block.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time

import torch
from calibration_setup import add_run_args, load_average, load_run

from torchquant import (
    ActivationQuant,
    QuantConfig,
    QuantScheme,
    WeightQuant,
    convert_model,
    scheme_from_name,
)
from torchquant.evaluation import perplexity

BLOCK = scheme_from_name("fp8-block")
# -- the linears of a Llama block by kind, for the rows quantizing one kind only
KINDS = {
    "q/k/v": ("*.q_proj", "*.k_proj", "*.v_proj"),
    "o_proj": ("*.o_proj",),
    "gate/up": ("*.gate_proj", "*.up_proj"),
    "down_proj": ("*.down_proj",),
}


def _only(kind: str) -> QuantConfig:
    return QuantConfig(default=None, overrides={p: BLOCK for p in KINDS[kind]})


def rows() -> dict[str, QuantConfig]:
    """Row name -> config, in the order they run by default."""
    gptq = {
        f"{name} gptq": QuantConfig(dataclasses.replace(scheme_from_name(name), algorithm="gptq"))
        for name in ("fp8-block", "w8a16-fp8-block")
    }
    narrow = QuantScheme(
        WeightQuant(type="fp8", block=(128, 64)), ActivationQuant("fp8", "group", group_size=64)
    )
    plain = {
        name: QuantConfig(name)
        for name in (
            "fp8",
            "w8a16-fp8",
            "fp8-block",
            "w8a16-fp8-block",
            "fp8-block-mse",
            "w8a16-fp8-block-mse",
        )
    }
    only = {f"fp8-block {kind} only": _only(kind) for kind in KINDS}
    return {**gptq, **plain, "fp8-block 128x64": QuantConfig(narrow), **only}


def needs_calibration(config: QuantConfig) -> bool:
    schemes = [config.default, *(s for _, s in config.overrides)]
    return any(s is not None and s.needs_calibration for s in schemes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_args(parser, calib_samples=32, group_size=128)
    table_rows = rows()
    parser.add_argument("--schemes", nargs="*", default=list(table_rows), choices=list(table_rows))
    parser.add_argument("--reference", type=float, help="fp32 perplexity, to skip measuring it")
    args = parser.parse_args()
    base, _, ids, calib = load_run(args)
    ref = args.reference or perplexity(base, ids, args.seq_len, progress=False).perplexity
    print(f"fp32: {ref:.3f} ({torch.get_num_threads()} threads)", flush=True)
    table = []
    for name in args.schemes:
        config = table_rows[name]
        model = copy.deepcopy(base)
        start = time.perf_counter()
        data = calib if needs_calibration(config) else None
        convert_model(model, config, calibration_data=data, progress=False)
        seconds = time.perf_counter() - start
        start = time.perf_counter()
        ppl = perplexity(model, ids, args.seq_len, progress=False).perplexity
        table.append((name, ppl, seconds, time.perf_counter() - start))
        print(f"{name}: ppl {ppl:.3f}, load average {load_average()}", flush=True)
        del model
    print(f"\n{ids.numel()} tokens of {args.text} in {args.seq_len}-token windows")
    print("| scheme | ppl | vs fp32 | quantize s | eval s |\n|---|---|---|---|---|")
    print(f"| fp32 | {ref:.3f} | - | - | - |")
    for name, ppl, quantize_s, eval_s in table:
        delta = 100 * (ppl / ref - 1)
        print(f"| {name} | {ppl:.3f} | {delta:+.2f}% | {quantize_s:.1f} | {eval_s:.1f} |")


if __name__ == "__main__":
    main()
