"""Perplexity of low-bit and asymmetric activation schemes on a real model, in one table.

    nice -n 10 python benchmarks/act_quant_ppl.py --threads 2 \\
        --calib ../shared/data/text/wikipedia_excerpt.txt \\
        --text ../shared/data/text/austen/prideprejudice.txt --rotation

Rows: INT8 activations dynamic (symmetric per token, asymmetric per token) and static
per tensor, symmetric (min-max, KL) beside asymmetric (min-max, percentile, KL, MSE),
all with INT8 per-channel weights; INT4 activations (``w8a4``, with SmoothQuant, and
``w4a4`` where the scheme exists).  Each row quantizes a fresh copy of the float model
(calibrated on ``--calib`` where it needs it) and is scored on the first ``--max-tokens``
tokens of ``--text`` in ``--seq-len`` windows, no BOS.

``--static-errors`` prints, over every linear, the output error of static per-tensor INT8
activations (min-max on the calibration windows) symmetric vs asymmetric on real inputs.
``--rotation`` estimates what an orthogonal rotation (QuaRot-style ``x Q``, ``W Q``)
would do for INT4 activations: on real inputs of a few linears it compares the relative
output error of per-token INT4 activations (INT8 weights) with and without a block
Hadamard rotation and a random orthogonal one.  ``x W^T = (x Q)(W Q)^T``, so the float
output is unchanged and only the quantization error moves.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from calibration_setup import add_run_args, load_average, load_run

from torchquant import (
    ActivationQuant,
    ConfigError,
    QuantConfig,
    QuantScheme,
    SmoothQuantConfig,
    WeightQuant,
    convert_model,
    scheme_from_name,
)
from torchquant.evaluation import perplexity
from torchquant.numerics import (
    asymmetric_activation_qparams,
    dequantize_activation,
    dequantize_activation_asymmetric,
    quantize_activation,
    quantize_activation_asymmetric,
)
from torchquant.numerics.weight import dequantize_int_weight, quantize_int_weight

W8 = WeightQuant(bits=8, group_size=-1)


def _static(observer: str, symmetric: bool) -> QuantScheme:
    act = ActivationQuant("int8", "tensor", dynamic=False, observer=observer, symmetric=symmetric)
    return QuantScheme(W8, act)


def _w4a4() -> QuantScheme:
    return scheme_from_name("w4a4")


SCHEMES = {
    "w8a8 dyn sym token": lambda: scheme_from_name("w8a8"),
    "w8a8 dyn asym token": lambda: scheme_from_name("w8a8-asym"),
    "w8a8 static sym minmax": lambda: _static("minmax", True),
    "w8a8 static sym kl": lambda: _static("kl", True),
    "w8a8 static asym minmax": lambda: _static("minmax", False),
    "w8a8 static asym percentile": lambda: _static("percentile", False),
    "w8a8 static asym kl": lambda: _static("kl", False),
    "w8a8 static asym mse": lambda: _static("mse", False),
    "w8a4 dyn token": lambda: scheme_from_name("w8a4"),
    "w8a4 smoothquant": lambda: QuantScheme(
        W8, ActivationQuant("int4"), "smoothquant", smoothquant=SmoothQuantConfig(alpha=0.8)
    ),
    "w4a4 g128 dyn token": _w4a4,
}
ROTATION_LAYERS = ("layers.2.self_attn.q_proj", "layers.2.mlp.down_proj", "layers.20.mlp.down_proj")


def block_hadamard(k: int, generator: torch.Generator) -> torch.Tensor:
    """An orthogonal ``(k, k)``: Sylvester Hadamard blocks of the largest power of two
    dividing ``k`` (512 for 1536, 64 for 576) with random signs on the rows."""
    size = k & -k
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < size:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    signs = torch.randint(0, 2, (k,), generator=generator).double() * 2 - 1
    return signs[:, None] * torch.block_diag(*[h / size**0.5] * (k // size))


def int4_output_error(x: torch.Tensor, w: torch.Tensor, rotation: torch.Tensor | None) -> float:
    """``||Q4(x Q) Q8(W Q)^T - x W^T|| / ||x W^T||`` (per-token INT4, per-channel INT8)."""
    ref = x.double() @ w.double().t()
    if rotation is not None:
        x, w = (x.double() @ rotation).float(), (w.double() @ rotation).float()
    q, s = quantize_activation(x, "int4", per_token=True)
    iw = quantize_int_weight(w, 8, -1, True)
    wq = dequantize_int_weight(iw.codes, iw.scales, None, 8, -1)
    out = dequantize_activation(q, s).double() @ wq.double().t()
    return float((out - ref).norm() / ref.norm())


def capture_inputs(
    model: torch.nn.Module, tokens: torch.Tensor, keep_layer, rows: int = 2048
) -> dict[str, torch.Tensor]:
    """The first ``rows`` input rows (float32) of every linear ``keep_layer(name)`` accepts,
    from running ``tokens`` through ``model``."""
    inputs: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and keep_layer(name):

            def keep(mod, args, _out, name=name):
                inputs[name] = args[0].detach().reshape(-1, args[0].shape[-1])[:rows].float()

            hooks.append(module.register_forward_hook(keep))
    with torch.no_grad():
        model(tokens)
    for h in hooks:
        h.remove()
    return inputs


def rotation_table(model: torch.nn.Module, calib: torch.Tensor) -> None:
    """Capture real inputs of ``ROTATION_LAYERS`` and print the INT4 error with each rotation."""
    inputs = capture_inputs(model, calib[:4], lambda n: n.endswith(ROTATION_LAYERS))
    gen = torch.Generator().manual_seed(0)
    print("\n| layer input | K | INT4 error, none | block Hadamard | random orthogonal |")
    print("|---|---|---|---|---|")
    modules = dict(model.named_modules())
    for name, x in inputs.items():
        w = modules[name].weight.detach().float()
        k = x.shape[1]
        orth, _ = torch.linalg.qr(torch.randn(k, k, generator=gen, dtype=torch.float64))
        errors = [int4_output_error(x, w, r) for r in (None, block_hadamard(k, gen), orth)]
        print(f"| {name} | {k} | " + " | ".join(f"{e:.4f}" for e in errors) + " |")


def _in_blocks(name: str) -> bool:
    return ".layers." in name


def static_error_table(model: torch.nn.Module, calib: torch.Tensor, ids: torch.Tensor) -> None:
    """Per linear: the output error of static per-tensor INT8 activations (min-max over
    ``calib``, applied to the first 1,024 evaluation tokens) symmetric vs asymmetric, with
    float weights, so only the activation grid differs."""
    seen = [capture_inputs(model, calib[i : i + 1], _in_blocks) for i in range(calib.shape[0])]
    evaluated = capture_inputs(model, ids.reshape(1, -1)[:, :1024], _in_blocks, rows=1024)
    modules = dict(model.named_modules())
    errors = []
    for name, x in evaluated.items():
        lo = min(float(batch[name].min()) for batch in seen)
        hi = max(float(batch[name].max()) for batch in seen)
        w = modules[name].weight.detach().float()
        ref = x @ w.t()
        q, s = quantize_activation(x, "int8", False, static_scale=torch.tensor(max(-lo, hi) / 127))
        sym = dequantize_activation(q, s)
        scale, zero = asymmetric_activation_qparams(torch.tensor([[lo]]), torch.tensor([[hi]]))
        asym = dequantize_activation_asymmetric(
            *quantize_activation_asymmetric(x, False, scale, zero)
        )
        errors.append([float((a @ w.t() - ref).norm() / ref.norm()) for a in (sym, asym)])
    err = torch.tensor(errors)
    better = int((err[:, 1] < err[:, 0]).sum())
    print(f"\nstatic INT8 min-max, {len(errors)} linears: output error median sym "
          f"{err[:, 0].median():.4f} / asym {err[:, 1].median():.4f}, mean {err[:, 0].mean():.4f}"
          f" / {err[:, 1].mean():.4f}; asymmetric lower in {better}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_args(parser, calib_samples=32, group_size=128)
    parser.add_argument("--schemes", nargs="*", default=list(SCHEMES), choices=list(SCHEMES))
    parser.add_argument("--reference", type=float, help="fp32 perplexity, to skip measuring it")
    parser.add_argument("--rotation", action="store_true", help="print the rotation estimate")
    parser.add_argument(
        "--static-errors", action="store_true", help="print static sym vs asym layer errors"
    )
    args = parser.parse_args()
    base, _, ids, calib = load_run(args)
    if args.rotation:
        rotation_table(base, calib)
    if args.static_errors:
        static_error_table(base, calib, ids)
    ref = args.reference or perplexity(base, ids, args.seq_len, progress=False).perplexity
    print(f"fp32: {ref:.3f} ({torch.get_num_threads()} threads, load {load_average()})")
    table = [("fp32", ref, None)]
    for name in args.schemes:
        try:
            scheme = SCHEMES[name]()
        except ConfigError as err:
            print(f"{name}: skipped ({err})", flush=True)
            continue
        model = copy.deepcopy(base)
        start = time.perf_counter()
        data = calib if scheme.needs_calibration else None
        convert_model(model, QuantConfig(scheme), calibration_data=data, progress=False)
        seconds = time.perf_counter() - start
        table.append((name, perplexity(model, ids, args.seq_len, progress=False).perplexity,
                      seconds))  # fmt: skip
        print(f"{name}: ppl {table[-1][1]:.3f} (load {load_average()})", flush=True)
        del model
    print(f"\n{ids.numel()} tokens of {args.text}, {args.seq_len}-token windows, no BOS\n")
    print("| scheme | ppl | vs fp32 | quantize s |\n|---|---|---|---|")
    for name, ppl, seconds in table:
        took = "-" if seconds is None else f"{seconds:.1f}"
        print(f"| {name} | {ppl:.3f} | {100 * (ppl / ref - 1):+.2f}% | {took} |")


if __name__ == "__main__":
    main()
