"""Perplexity of HQQ (no data) beside RTN, GPTQ and AWQ at w4 g128 and w3 g64.

    nice -n 10 python benchmarks/hqq_ppl.py --threads 2 \\
        --calib ../shared/data/text/wikipedia_excerpt.txt \\
        --text ../shared/data/text/austen/prideprejudice.txt

Each row quantizes a fresh copy of the float model and scores perplexity on the first
``--max-tokens`` tokens of ``--text`` (``--seq-len`` windows, no BOS); GPTQ and AWQ run
with their default parameters, calibrating on ``--calib`` with the schemes of
``calibration_ppl.py``; HQQ runs as ``algorithm="hqq"`` through ``convert_model``, as
``torchquant quantize --algorithm hqq`` does.  Prints one table per setting:
perplexity, change vs fp32, that change as a fraction of RTN's, and quantization seconds.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time

import torch
from calibration_ppl import rows
from calibration_setup import add_run_args, load_run

from torchquant import QuantConfig, convert_model
from torchquant.config import AWQConfig, GPTQConfig
from torchquant.evaluation import perplexity

SETTINGS = ((4, 128), (3, 64))
METHODS = ("rtn", "hqq", "gptq", "awq")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_args(parser, calib_samples=32, group_size=128)
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    parser.add_argument(
        "--reference", type=float, default=None, help="fp32 perplexity, to skip measuring it"
    )
    args = parser.parse_args()
    base, _, ids, calib = load_run(args)
    ref = args.reference or perplexity(base, ids, args.seq_len, progress=False).perplexity
    print(f"fp32: {ref:.3f} ({torch.get_num_threads()} threads)", flush=True)
    tables = []
    for bits, group in SETTINGS:
        schemes = rows(group, args.alpha, AWQConfig(), GPTQConfig(), [])
        prefix = f"w{bits}a16 g{group}"
        # -- GPTQ as its defaults run it: act-order with static groups
        names = {"rtn": "RTN", "gptq": "GPTQ act-order static", "awq": "AWQ"}
        by_method = {m: schemes[f"{prefix} {names[m]}"] for m in names}
        by_method["hqq"] = dataclasses.replace(by_method["rtn"], algorithm="hqq")
        table = []
        for method in args.methods:
            model = copy.deepcopy(base)
            start = time.perf_counter()
            data = None if by_method[method].algorithm == "hqq" else calib
            convert_model(
                model, QuantConfig(by_method[method]), calibration_data=data, progress=False
            )
            seconds = time.perf_counter() - start
            ppl = perplexity(model, ids, args.seq_len, progress=False).perplexity
            table.append((method, ppl, seconds))
            print(f"{prefix} {method}: ppl {ppl:.3f}, quantize {seconds:.1f} s", flush=True)
            del model
        tables.append((prefix, table))

    print(
        f"\n{ids.numel()} tokens of {args.text} in {args.seq_len}-token windows; "
        f"fp32 {ref:.3f}; {torch.get_num_threads()} threads"
    )
    print(f"{'setting':<14}{'method':<8}{'ppl':>9}{'delta %':>9}{'/ RTN':>8}{'quantize s':>12}")
    for prefix, table in tables:
        rtn = {m: p for m, p, _ in table}.get("rtn")
        for method, ppl, seconds in table:
            ratio = f"{(ppl - ref) / (rtn - ref):.2f}" if rtn is not None else "-"
            delta = 100 * (ppl / ref - 1)
            print(f"{prefix:<14}{method:<8}{ppl:>9.3f}{delta:>+9.2f}{ratio:>8}{seconds:>12.1f}")


if __name__ == "__main__":
    main()
