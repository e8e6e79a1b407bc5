"""Perplexity of calibrated quantization (GPTQ, AWQ, SmoothQuant, static scales) vs RTN.

    nice -n 10 python benchmarks/calibration_ppl.py \\
        --calib ../shared/data/text/wikipedia_excerpt.txt \\
        --text ../shared/data/text/austen/prideprejudice.txt

Each row quantizes a fresh copy of the float model, calibrating on ``--calib`` where
the method needs it, and scores perplexity on the first ``--max-tokens`` tokens of
``--text`` (non-overlapping windows, no BOS).  Prints one table: method, perplexity,
change vs fp32, calibration seconds and peak resident memory during conversion.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time
from pathlib import Path

import torch
from calibration_setup import PeakRSS, add_run_args, add_w4a8_alphas, load_average, load_run

from torchquant import QuantConfig, convert_model
from torchquant.config import (
    ActivationQuant,
    AWQConfig,
    GPTQConfig,
    QuantScheme,
    SmoothQuantConfig,
    WeightQuant,
    scheme_from_name,
)
from torchquant.evaluation import perplexity


def _wna16(bits: int, group: int, algorithm: str = "rtn", **params) -> QuantScheme:
    return QuantScheme(
        WeightQuant(bits=bits, group_size=group, symmetric=False), None, algorithm, **params
    )


def _w8a8(algorithm: str = "rtn", act: ActivationQuant | None = None, **params) -> QuantScheme:
    return QuantScheme(WeightQuant(bits=8), act or ActivationQuant(), algorithm, **params)


def _w4a8(act_type: str, algorithm: str, group: int = 128, **params) -> QuantScheme:
    weight = WeightQuant(bits=4, group_size=group, symmetric=True)
    return QuantScheme(weight, ActivationQuant(type=act_type), algorithm, **params)


def _static(observer: str, percentile: float = 100.0) -> ActivationQuant:
    return ActivationQuant(
        granularity="tensor", dynamic=False, observer=observer, percentile=percentile
    )


def rows(
    group: int, alpha: float, awq: AWQConfig, gptq: GPTQConfig, w4a8_alphas: list[float]
) -> dict[str, QuantScheme]:
    """Every row of the table, the calibrated ones first (``--only`` picks a subset);
    the W4A8 SmoothQuant+GPTQ rows once per alpha of ``w4a8_alphas``."""
    plain = dataclasses.replace(gptq, act_order=False, static_groups=False)
    ordered = dataclasses.replace(gptq, act_order=True, static_groups=False)
    static = dataclasses.replace(gptq, act_order=True, static_groups=True)
    staged = dataclasses.replace(static, sequential=True)
    awq_gptq = dataclasses.replace(awq, rounding="gptq")
    return {
        f"w4a16 g{group} GPTQ": _wna16(4, group, "gptq", gptq=plain),
        f"w4a16 g{group} GPTQ act-order static": _wna16(4, group, "gptq", gptq=static),
        f"w4a16 g{group} GPTQ act-order static sequential": _wna16(4, group, "gptq", gptq=staged),
        f"w4a16 g{group} AWQ": _wna16(4, group, "awq", awq=awq),
        f"w4a16 g{group} AWQ+GPTQ": _wna16(4, group, "awq", awq=awq_gptq, gptq=gptq),
        f"w3a16 g{group} GPTQ": _wna16(3, group, "gptq", gptq=plain),
        f"w3a16 g{group} GPTQ act-order static": _wna16(3, group, "gptq", gptq=static),
        f"w3a16 g{group} AWQ": _wna16(3, group, "awq", awq=awq),
        f"w3a16 g{group} AWQ+GPTQ": _wna16(3, group, "awq", awq=awq_gptq, gptq=gptq),
        f"w8a8 dynamic SmoothQuant {alpha}": _w8a8(
            "smoothquant", smoothquant=SmoothQuantConfig(alpha)
        ),
        f"w4a8 g{group} GPTQ act-order static": _w4a8("int8", "gptq", group, gptq=static),
        **{  # -- W4A8: SmoothQuant smooths, GPTQ rounds the smoothed weights
            f"{name} g{group} SmoothQuant {a}+GPTQ": _w4a8(
                act,
                "smoothquant",
                group,
                smoothquant=SmoothQuantConfig(a, rounding="gptq"),
                gptq=static,
            )
            for a in w4a8_alphas
            for name, act in (("w4a8", "int8"), ("w4a8-fp8", "fp8"))
        },
        "fp8-block": scheme_from_name("fp8-block"),
        f"w4a16 g{group} GPTQ act-order": _wna16(4, group, "gptq", gptq=ordered),
        "w8a8 static minmax": _w8a8(act=_static("minmax")),
        "w8a8 static KL": _w8a8(act=_static("kl")),
        "w8a8 static percentile 99.99": _w8a8(act=_static("percentile", 99.99)),
        f"w4a16 g{group} RTN": _wna16(4, group),
        f"w3a16 g{group} RTN": _wna16(3, group),
        "w8a8 dynamic": _w8a8(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_args(parser, calib_samples=32, group_size=128)
    parser.add_argument("--awq-tokens", type=int, default=2048)
    add_w4a8_alphas(parser)
    parser.add_argument("--only", nargs="*", help="row names to run, in this order")
    parser.add_argument("--gptq-damp", type=float, default=0.01, help="GPTQ dampening")
    parser.add_argument("--gptq-observer", default="hessian_mse", help="GPTQ group ranges")
    parser.add_argument("--awq-grid", type=int, default=20)
    parser.add_argument(
        "--awq-search-rows",
        type=int,
        default=None,
        help="rows an MLP or linear is scored on in the AWQ scale search (default: all)",
    )
    parser.add_argument(
        "--awq-duo", choices=["on", "off", "both"], default="off", help="AWQ duo scaling"
    )
    parser.add_argument(
        "--reference", type=float, default=None, help="fp32 perplexity, to skip measuring it"
    )
    parser.add_argument(
        "--device", default=None, help="calibrate block by block there (the model stays on CPU)"
    )
    parser.add_argument(
        "--gpu-memory-fraction",
        type=float,
        default=None,
        help="cap this process's CUDA memory (torch.cuda.set_per_process_memory_fraction)",
    )
    args = parser.parse_args()
    on_cuda = args.device is not None and torch.device(args.device).type == "cuda"
    if args.gpu_memory_fraction is not None:
        if not on_cuda:
            parser.error("--gpu-memory-fraction needs --device cuda")
        torch.cuda.set_per_process_memory_fraction(args.gpu_memory_fraction)
    base, _, ids, calib = load_run(args)
    if args.reference is None:
        ref = perplexity(base, ids, args.seq_len, progress=False).perplexity
        print(f"fp32: {ref:.3f} (measured)", flush=True)
    else:
        ref = args.reference
        print(f"fp32: {ref:.3f} (given)", flush=True)
    table = [("fp32", ref, 0.0, 0.0, 0.0)]
    duo = {"on": True, "off": False, "both": "both"}[args.awq_duo]
    awq = AWQConfig(
        grid=args.awq_grid,
        max_tokens=args.awq_tokens,
        duo_scaling=duo,
        search_rows=args.awq_search_rows,
    )
    gptq = GPTQConfig(dampening=args.gptq_damp, observer=args.gptq_observer)
    w4a8_alphas = args.w4a8_alphas or [args.alpha]
    table_rows = rows(args.group_size, args.alpha, awq, gptq, w4a8_alphas)
    if args.only:
        unknown = [n for n in args.only if n not in table_rows]
        if unknown:
            parser.error(f"unknown rows {unknown}; rows are {list(table_rows)}")
        table_rows = {n: table_rows[n] for n in args.only}
    for name, scheme in table_rows.items():
        model = copy.deepcopy(base)
        start = time.perf_counter()
        if on_cuda:
            torch.cuda.reset_peak_memory_stats()
        with PeakRSS() as mem:
            convert_model(
                model,
                QuantConfig(scheme),
                calibration_data=calib,
                device=args.device,
                progress=False,
            )
        seconds = time.perf_counter() - start
        if on_cuda:
            print(f"{name}: peak CUDA memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
        ppl = perplexity(model, ids, args.seq_len, progress=False).perplexity
        table.append((name, ppl, 100 * (ppl / ref - 1), seconds, mem.peak / 2**30))
        print(
            f"{name}: ppl {ppl:.3f} ({100 * (ppl / ref - 1):+.2f}%), convert {seconds:.0f} s, "
            f"peak RSS {mem.peak / 2**30:.2f} GiB, load average {load_average()}",
            flush=True,
        )
        del model

    print(
        f"\n{ids.numel()} eval tokens in {args.seq_len}-token windows; calibration: "
        f"{calib.shape[0]} x {calib.shape[1]} tokens of {Path(args.calib).name}"
    )
    print(f"{'method':<36}{'ppl':>9}{'delta %':>9}{'convert s':>11}{'peak RSS GiB':>14}")
    for name, ppl, delta, secs, peak in table:
        print(f"{name:<36}{ppl:>9.3f}{delta:>+9.2f}{secs:>11.1f}{peak:>14.2f}")


if __name__ == "__main__":
    main()
