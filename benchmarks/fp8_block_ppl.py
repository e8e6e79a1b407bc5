"""Perplexity of FP8 block-wise (128x128 weight blocks, 1x128 activation groups) beside fp32
and per-channel FP8, on a real model.

    nice -n 10 python benchmarks/fp8_block_ppl.py --threads 2 \\
        --calib ../shared/data/text/wikipedia_excerpt.txt \\
        --text ../shared/data/text/austen/prideprejudice.txt

Every scheme is round-to-nearest (no calibration: ``--calib`` only fixes the shared
setup of ``calibration_setup.py``) on a fresh copy of the float model, scored on the
first ``--max-tokens`` tokens of ``--text`` in ``--seq-len`` windows (no BOS).  SmolLM2's
hidden size 576 is 4.5 x 128, so its q/k/v/gate/up inputs end in a partial 64-wide block.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from calibration_setup import add_run_args, load_run

from torchquant import QuantConfig, convert_model
from torchquant.evaluation import perplexity

SCHEMES = ("fp8", "w8a16-fp8", "fp8-block", "w8a16-fp8-block")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_args(parser, calib_samples=1, group_size=128)
    parser.add_argument("--schemes", nargs="*", default=list(SCHEMES), choices=SCHEMES)
    args = parser.parse_args()
    base, _, ids, _ = load_run(args)
    ref = perplexity(base, ids, args.seq_len, progress=False).perplexity
    print(f"fp32: {ref:.3f} ({torch.get_num_threads()} threads)", flush=True)
    table = []
    for name in args.schemes:
        model = copy.deepcopy(base)
        start = time.perf_counter()
        convert_model(model, QuantConfig(name), progress=False)
        seconds = time.perf_counter() - start
        start = time.perf_counter()
        ppl = perplexity(model, ids, args.seq_len, progress=False).perplexity
        table.append((name, ppl, seconds, time.perf_counter() - start))
        print(f"{name}: ppl {ppl:.3f}", flush=True)
        del model
    print(f"\n{ids.numel()} tokens of {args.text} in {args.seq_len}-token windows")
    print(f"{'scheme':<18}{'ppl':>9}{'delta %':>9}{'quantize s':>12}{'eval s':>9}")
    print(f"{'fp32':<18}{ref:>9.3f}{0:>+9.2f}{'-':>12}{'-':>9}")
    for name, ppl, quantize_s, eval_s in table:
        delta = 100 * (ppl / ref - 1)
        print(f"{name:<18}{ppl:>9.3f}{delta:>+9.2f}{quantize_s:>12.1f}{eval_s:>9.1f}")


if __name__ == "__main__":
    main()
