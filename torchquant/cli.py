"""The ``torchquant`` command line: quantize, eval, inspect, bench, demo.

Exit codes: 0 success, 2 usage error (argparse), 1 failure with a one-line reason.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from torchquant import cli_types
from torchquant.calibration import calibration_tokens
from torchquant.calibration.distributed import (
    RankContext,
    exit_code_after_run,
    init_from_environment,
)
from torchquant.checkpoint.save_guard import resolve_save_target
from torchquant.config import (
    ALGORITHMS,
    MX_SCALE_ROUNDING_TYPES,
    MX_SCALE_ROUNDINGS,
    QuantConfig,
    QuantScheme,
    scheme_from_name,
)
from torchquant.config.algorithms import OBSERVERS, ROUNDINGS
from torchquant.convert import convert_model
from torchquant.errors import TorchquantError
from torchquant.formats.dispatch import FORMATS, save_checkpoint
from torchquant.formats.native import save_quantized
from torchquant.ops.cpu_kernels import float32_in_bf16
from torchquant.text_files import read_utf8
from torchquant.tools import models
from torchquant.tools.evaluation import perplexity, tokenize_text
from torchquant.tools.inspection import inspect_checkpoint

DEFAULT_SEQ_LEN = 1024
OVERWRITE_HELP = (
    "let --out be a folder that holds other files: only its checkpoint files (config.json, "
    "*.safetensors, the index, tokenizer files) are replaced, the rest is kept"
)
# --act-order choice -> GPTQConfig (act_order, static_groups)
ACT_ORDERS = {"static": (True, True), "group": (True, False), "off": (False, False)}


def _count_option(p: argparse.ArgumentParser, flag: str, default: int | None, help: str) -> None:
    """An integer option of at least 1 (a usage error otherwise)."""
    p.add_argument(flag, type=cli_types.positive_int, default=default, help=help)


def _length_option(p: argparse.ArgumentParser, flag: str, default: int, help: str) -> None:
    """Tokens per sequence: at least 2, so that one token predicts the next."""
    p.add_argument(flag, type=cli_types.int_at_least(2), default=default, help=help)


def _json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _checkpoint_folder(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", help="a quantized checkpoint folder (any supported format)")


def _out_options(p: argparse.ArgumentParser, default: str | None, help: str) -> None:
    """``--out`` (required when it has no default) and ``--overwrite``."""
    p.add_argument("--out", required=default is None, default=default, help=help)
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)


def _scheme_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--scheme",
        default="w4a16",
        help="w8a16, wNa16 (N=2..8), w8a16-fp8, w8a8, w4a8, w4a8-fp8, fp8; low-bit and "
        "asymmetric activations: w8a4, w4a4 (INT4), w8a8-asym (dynamic per token), "
        "w8a8-static-asym (calibrated scale and zero point) (see SCHEME_NAMES)",
    )
    p.add_argument(
        "--act-observer",
        choices=OBSERVERS,
        default=None,
        help="how calibration picks a static activation range (w8a8-static-asym): minmax "
        "(the default), percentile, kl, mse",
    )
    p.add_argument(
        "--mx-scale-rounding",
        choices=MX_SCALE_ROUNDINGS,
        default=None,
        help="how mxfp4a16 / mxfp4 / mxfp8 round each block max to its E8M0 power-of-two "
        "scale, for the weights and activations: ocp (the OCP MX reference, the default) or "
        "compressed-tensors (up where the max's significand is 1.75 or more: less saturation)",
    )
    group_help = "group size (-1 = per channel)"
    p.add_argument("--group-size", type=cli_types.group_size, default=None, help=group_help)
    p.add_argument(
        "--symmetric",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="symmetric INT weights (zero-free); default: symmetric for --format gptq (vLLM's "
        "Marlin kernel needs it), else the scheme's (wNa16: asymmetric)",
    )
    p.add_argument(
        "--ignore", nargs="*", default=["lm_head"], help="layer patterns to keep in float"
    )
    p.add_argument(
        "--algorithm",
        default="rtn",
        choices=ALGORITHMS,
        help="how weights are chosen: rtn and hqq need no data, gptq, awq and smoothquant "
        "calibrate on --calib",
    )
    p.add_argument(
        "--smoothquant-alpha",
        type=cli_types.fraction,
        default=None,
        help="SmoothQuant migration strength in [0, 1] (--algorithm smoothquant; default 0.5)",
    )
    p.add_argument(
        "--smoothquant-rounding",
        choices=ROUNDINGS,
        default=None,
        help="how --algorithm smoothquant rounds the smoothed weights: rtn (round to nearest, "
        "the default) or gptq (GPTQ on the smoothed inputs' Hessians, --act-order and "
        "--gptq-sequential apply: W4A8's accuracy recipe)",
    )
    p.add_argument(
        "--act-order",
        default=None,
        choices=tuple(ACT_ORDERS),
        help="GPTQ column order: static (by activation energy, groups fixed first: the "
        "default), group (groups follow that order, saved with a g_idx: gptq desc_act, "
        "compressed-tensors actorder group; not awq), off (input order)",
    )
    p.add_argument(
        "--gptq-sequential",
        action="store_true",
        help="GPTQ stage by stage, each stage's Hessians regathered with the stages before it "
        "quantized (one more calibration pass per stage); default: every Hessian from one pass",
    )
    p.add_argument("--calib", default=None, help="calibration text file (UTF-8)")
    _count_option(p, "--calib-samples", 128, "calibration sequences")
    _length_option(p, "--calib-seq-len", 512, "tokens per sequence")
    _count_option(
        p,
        "--calib-shards",
        None,
        "split the calibration samples into this many shards, their statistics merged in "
        "order (default: one per torchrun rank); one process given the shard count of a "
        "torchrun run writes the same checkpoint",
    )


def _eval_args(p: argparse.ArgumentParser, max_tokens: int | None) -> None:
    p.add_argument("--text", default=None, help="text file (default: the Lee news corpus)")
    _count_option(p, "--max-tokens", max_tokens, "evaluate this many tokens")
    _length_option(p, "--seq-len", DEFAULT_SEQ_LEN, "window length")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torchquant", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model and save it as safetensors")
    q.add_argument("model", help="smollm2-135m, a .gguf file, or a Hugging Face model folder")
    _scheme_args(q)
    _out_options(q, None, "output checkpoint folder")
    q.add_argument(
        "--format",
        default="native",
        choices=FORMATS,
        help="checkpoint format: native (torchquant), compressed-tensors (vLLM, llm-compressor), "
        "gptq (v1), awq (GEMM, 4-bit)",
    )
    q.add_argument(
        "--max-shard-size",
        type=cli_types.shard_size,
        default="4GB",
        help="shard size limit, e.g. 2GB",
    )
    q.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16", "float16"),
        help="dtype of the model before quantization (kept by the unquantized tensors)",
    )
    q.add_argument(
        "--dist-timeout",
        type=float,
        default=1800.0,
        help="under torchrun: seconds a rank waits for the others in one exchange before the "
        "run ends with an error",
    )

    e = sub.add_parser("eval", help="perplexity of a model or checkpoint on a text")
    e.add_argument("model", help="smollm2-135m, a .gguf file, a model folder or a checkpoint")
    _eval_args(e, max_tokens=None)
    _json_flag(e)

    i = sub.add_parser(
        "inspect", help="per-layer scheme, bits, group and size of a checkpoint; compression"
    )
    _checkpoint_folder(i)
    _json_flag(i)

    b = sub.add_parser(
        "bench",
        help="prefill/decode throughput of a checkpoint vs its 16-bit copy (and fp32 on CPU)",
    )
    _checkpoint_folder(b)
    device_help = "cuda or cpu (default: cuda when available)"
    b.add_argument("--device", type=cli_types.device_name, default=None, help=device_help)
    b.add_argument(
        "--dtype",
        default="bfloat16",
        choices=("bfloat16", "float16", "float32"),
        help="dtype of the unquantized baseline",
    )
    _count_option(b, "--batch", 1, "sequences per batch")
    _count_option(b, "--prompt-len", None, "prompt tokens (default: 512 on cuda, 32 on cpu)")
    _count_option(b, "--new-tokens", None, "generated tokens (default: 64 on cuda, 8 on cpu)")
    _count_option(b, "--repeats", 3, "timed runs (median is reported)")
    _json_flag(b)

    d = sub.add_parser("demo", help="quantize the default model, save, load, compare perplexity")
    d.add_argument("--model", default="smollm2-135m")
    _scheme_args(d)
    _eval_args(d, max_tokens=16384)
    _out_options(d, "torchquant-demo", "where to save the checkpoint")
    return parser


def _config(args: argparse.Namespace):
    symmetric = args.symmetric
    if symmetric is None and getattr(args, "format", None) == "gptq":
        symmetric = True  # the GPTQ vLLM serves with Marlin; --no-symmetric keeps zero points
    scheme = scheme_from_name(args.scheme, group_size=args.group_size, symmetric=symmetric)
    scheme = dataclasses.replace(scheme, algorithm=args.algorithm)
    scheme = _smoothquant_options(scheme, args)
    gptq_only = "applies when GPTQ rounds: --algorithm gptq, or --smoothquant-rounding gptq"
    if args.act_order is not None:
        if not scheme.rounds_with_gptq:
            raise TorchquantError(f"--act-order {gptq_only}")
        act_order, static_groups = ACT_ORDERS[args.act_order]
        gptq = dataclasses.replace(scheme.gptq, act_order=act_order, static_groups=static_groups)
        scheme = dataclasses.replace(scheme, gptq=gptq)
    if getattr(args, "gptq_sequential", False):
        if not scheme.rounds_with_gptq:
            raise TorchquantError(f"--gptq-sequential {gptq_only}")
        scheme = dataclasses.replace(scheme, gptq=dataclasses.replace(scheme.gptq, sequential=True))
    if args.act_observer is not None:
        if not scheme.static_activation:
            raise TorchquantError("--act-observer applies to static activation schemes only")
        act = dataclasses.replace(scheme.activation, observer=args.act_observer)
        scheme = dataclasses.replace(scheme, activation=act)
    if args.mx_scale_rounding is not None:
        scheme = _mx_scale_rounding(scheme, args.mx_scale_rounding)
    if scheme.needs_calibration and not args.calib:
        raise TorchquantError(f"--algorithm {args.algorithm} needs --calib FILE (a text file)")
    return QuantConfig(default=scheme, ignore=tuple(args.ignore))


def _mx_scale_rounding(scheme: QuantScheme, rounding: str) -> QuantScheme:
    """``scheme`` with its MX weight (and MX activation) scales rounded by ``rounding``."""
    if scheme.weight.type not in MX_SCALE_ROUNDING_TYPES:
        raise TorchquantError("--mx-scale-rounding applies to mxfp4a16, mxfp4 and mxfp8 only")
    weight = dataclasses.replace(scheme.weight, scale_rounding=rounding)
    act = scheme.activation
    if act is not None:
        act = dataclasses.replace(act, scale_rounding=rounding)
    return dataclasses.replace(scheme, weight=weight, activation=act)


def _smoothquant_options(scheme: QuantScheme, args: argparse.Namespace) -> QuantScheme:
    """``scheme`` with ``--smoothquant-alpha`` / ``--smoothquant-rounding`` applied."""
    given = {"alpha": args.smoothquant_alpha, "rounding": args.smoothquant_rounding}
    given = {field: value for field, value in given.items() if value is not None}
    if not given:
        return scheme
    if args.algorithm != "smoothquant":
        flags = " and ".join(f"--smoothquant-{field}" for field in given)
        raise TorchquantError(f"{flags} apply to --algorithm smoothquant only")
    smoothquant = dataclasses.replace(scheme.smoothquant, **given)
    return dataclasses.replace(scheme, smoothquant=smoothquant)


def _convert(model, tokenizer, config, args: argparse.Namespace):
    """Round-to-nearest, or calibrated on ``--calib`` when the scheme needs it."""

    if not config.default.needs_calibration:
        if args.calib:
            note = f"--calib is unused with --algorithm {args.algorithm}"
            print(f"torchquant: note: {note}", file=sys.stderr)
        return convert_model(model, config)
    ids = calibration_tokens(args.calib, tokenizer, args.calib_samples, args.calib_seq_len)
    shards = getattr(args, "calib_shards", None)
    return convert_model(model, config, calibration_data=ids, calibration_shards=shards)


def _text_ids(tokenizer, args: argparse.Namespace):
    path = Path(args.text) if args.text else models.default_text()
    if not path.is_file():
        raise TorchquantError(f"text file {path} does not exist")
    return tokenize_text(tokenizer, read_utf8(path, "text file"), args.max_tokens)


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def _check_out(args: argparse.Namespace) -> None:
    """Refuse a --out the save would refuse, before the model is loaded and quantized."""

    source = Path(args.model)
    sources = [source] if source.exists() else []
    resolve_save_target(args.out, overwrite=args.overwrite, sources=sources)


def cmd_quantize(args: argparse.Namespace) -> None:
    """Under torchrun (``WORLD_SIZE`` > 1) every rank calibrates a share of the data and
    rank 0 alone writes the checkpoint; a rank's failure ends every rank."""
    launched = init_from_environment(args.dist_timeout)
    ranks = launched or RankContext.current()
    try:
        _quantize(args, ranks)
    except BaseException as exc:
        ranks.announce_failure(exc)
        raise  # -- the group is left to exit: destroying it may wait on a silent rank
    if launched is not None:
        torch.distributed.destroy_process_group()


def _quantize(args: argparse.Namespace, ranks: RankContext) -> None:
    config = _config(args)
    if args.act_order == "group" and args.format == "awq":
        raise TorchquantError(  # said before the costly calibration
            "--act-order group weights carry a g_idx, which AWQ cannot store; use "
            "--act-order static or --format gptq, compressed-tensors or native"
        )
    _check_out(args)
    start = time.perf_counter()
    dtype = getattr(torch, args.dtype)
    need_tokenizer = bool(args.calib)
    model, tokenizer = models.load_model(args.model, dtype=dtype, require_tokenizer=need_tokenizer)
    model, summary = _convert(model, tokenizer, config, args)

    def write() -> None:
        save_checkpoint(
            model,
            args.out,
            args.format,
            config=config,
            tokenizer=tokenizer,
            max_shard_size=args.max_shard_size,
            overwrite=args.overwrite,
        )

    ranks.barrier_after(write, f"writing {args.out}")
    if ranks.rank != 0:
        return
    print(summary.table())
    print(
        f"saved {args.out} as {args.format} ({_dir_bytes(Path(args.out)) / 2**20:.1f} MiB) "
        f"in {time.perf_counter() - start:.1f} s"
    )


def cmd_eval(args: argparse.Namespace) -> None:
    model, tokenizer = models.load_model(args.model)
    with float32_in_bf16():  # -- float32 quantized layers on the CPU kernels (bf16 tolerance)
        result = perplexity(model, _text_ids(tokenizer, args), args.seq_len, progress=not args.json)
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(
            f"perplexity {result.perplexity:.3f} over {result.tokens} tokens "
            f"({result.windows} windows) in {result.seconds:.1f} s"
        )


def cmd_inspect(args: argparse.Namespace) -> None:
    report = inspect_checkpoint(args.directory)
    print(json.dumps(report.to_dict()) if args.json else report.table())


def cmd_bench(args: argparse.Namespace) -> None:
    import torch

    from torchquant.benchmark import dequantized_copy, measure_throughput, throughput_table
    from torchquant.formats.dispatch import load_checkpoint

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TorchquantError("--device cuda: no CUDA device is available")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise TorchquantError(
            f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible"
        )
    on_gpu = device.type == "cuda"
    kw = {
        "batch": args.batch,
        "prompt_len": args.prompt_len or (512 if on_gpu else 32),
        "new_tokens": args.new_tokens or (64 if on_gpu else 8),
        "repeats": args.repeats,
    }
    quantized = load_checkpoint(args.directory).to(device)
    # -- on CPU a user would run the float32 model: measure against it as well
    dtypes = ["float32", args.dtype] if not on_gpu and args.dtype != "float32" else [args.dtype]
    rows = []
    for dtype in dtypes:
        baseline = dequantized_copy(quantized, getattr(torch, dtype))
        rows.append(measure_throughput(baseline, dtype, **kw))
        del baseline
    rows.append(measure_throughput(quantized, "quantized", **kw))
    if args.json:
        table = [dataclasses.asdict(r) for r in rows]
        print(json.dumps({"device": str(device), **kw, "rows": table}))
    else:
        print(
            f"device {device}, batch {kw['batch']}, prompt {kw['prompt_len']} tokens, "
            f"{kw['new_tokens']} new tokens, median of {kw['repeats']}"
        )
        print(throughput_table(rows))


def cmd_demo(args: argparse.Namespace) -> None:
    config = _config(args)
    _check_out(args)
    model, tokenizer = models.load_model(args.model)
    ids = _text_ids(tokenizer, args)
    # -- tied tensors (embedding and lm_head) share storage: count each storage once
    unique = {t.untyped_storage().data_ptr(): t for t in model.state_dict().values()}
    fp_bytes = sum(t.numel() * t.element_size() for t in unique.values())
    base = perplexity(model, ids, args.seq_len)
    start = time.perf_counter()
    model, summary = _convert(model, tokenizer, config, args)
    save_quantized(model, args.out, config=config, tokenizer=tokenizer, overwrite=args.overwrite)
    quantize_s = time.perf_counter() - start
    del model
    start = time.perf_counter()
    loaded, _ = models.load_model(args.out)
    load_s = time.perf_counter() - start
    with float32_in_bf16():  # -- float32 quantized layers on the CPU kernels (bf16 tolerance)
        quant = perplexity(loaded, ids, args.seq_len)
    print(summary.table())
    print(f"\n{'model':<24}{'perplexity':>12}{'size MiB':>10}{'eval s':>9}")
    print(f"{'fp32':<24}{base.perplexity:>12.3f}{fp_bytes / 2**20:>10.1f}{base.seconds:>9.1f}")
    size = _dir_bytes(Path(args.out)) / 2**20
    print(f"{args.scheme:<24}{quant.perplexity:>12.3f}{size:>10.1f}{quant.seconds:>9.1f}")
    faster = "faster" if quant.seconds <= base.seconds else "slower"
    ratio = max(base.seconds, quant.seconds) / max(min(base.seconds, quant.seconds), 1e-9)
    print(f"{args.scheme} eval {ratio:.2f}x {faster} than fp32")
    print(
        f"\n{quant.tokens} tokens, {args.seq_len}-token windows; quantize+save {quantize_s:.1f} s, "
        f"load {load_s:.1f} s; checkpoint in {args.out}"
    )


COMMANDS = {
    "quantize": cmd_quantize,
    "eval": cmd_eval,
    "inspect": cmd_inspect,
    "bench": cmd_bench,
    "demo": cmd_demo,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return exit_code_after_run(_run(args))


def _run(args: argparse.Namespace) -> int:
    try:
        COMMANDS[args.command](args)
    except (TorchquantError, OSError) as exc:
        print(f"torchquant: error: {exc}", file=sys.stderr)
        return 1
    except UnicodeDecodeError as exc:  # -- a text read the checks above did not cover
        print(f"torchquant: error: a file is not UTF-8 text ({exc})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
