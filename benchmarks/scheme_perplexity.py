"""Perplexity and checkpoint size of every round-to-nearest scheme on a real model.

    python benchmarks/scheme_perplexity.py --text ../shared/data/text/austen/prideprejudice.txt

Prints one table: scheme, perplexity, change vs the float model, checkpoint bytes and
the size predicted from bits, scales/zeros and unquantized tensors.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch

from torchquant import QuantConfig, convert_model, scheme_from_name
from torchquant.evaluation import perplexity, tokenize_text
from torchquant.models import load_model
from torchquant.serialization import load_quantized, save_quantized

SCHEMES = ("w8a16", "w4a16", "w3a16", "w8a8", "fp8", "w8a16-fp8")


def predicted_bytes(model: torch.nn.Module) -> int:
    """bits x weights / 8 + scales/zeros/bias + every tensor that stays unquantized."""
    from torchquant.modules import QuantLinear

    total = 0
    seen = set()
    for module in model.modules():
        if isinstance(module, QuantLinear):
            w = module.scheme.weight
            total += module.in_features * module.out_features * w.bits // 8
            for name in ("scales", "zeros", "bias", "input_scale", "smooth_scale"):
                t = getattr(module, name)
                total += 0 if t is None else t.numel() * t.element_size()
            continue
        for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--text", required=True)
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--schemes", nargs="*", default=list(SCHEMES))
    args = parser.parse_args()

    base, tokenizer = load_model(args.model)
    ids = tokenize_text(tokenizer, Path(args.text).read_text(encoding="utf-8"), args.max_tokens)
    ref = perplexity(base, ids, args.seq_len, progress=False).perplexity
    rows = [("fp32", ref, 0.0, None, None, None)]
    for name in args.schemes:
        gs = args.group_size if name[1] in "234567" else None
        config = QuantConfig(scheme_from_name(name, group_size=gs))
        model, _ = convert_model(copy.deepcopy(base), config, progress=False)
        with tempfile.TemporaryDirectory() as tmp:
            save_quantized(model, tmp + "/ck", config=config, tokenizer=tokenizer)
            disk = sum(f.stat().st_size for f in Path(tmp, "ck").glob("*.safetensors"))
            loaded = load_quantized(tmp + "/ck")
        probe = ids[: min(256, ids.numel())].unsqueeze(0)
        identical = torch.equal(model(probe).logits, loaded(probe).logits)
        ppl = perplexity(loaded, ids, args.seq_len, progress=False).perplexity
        rows.append((name, ppl, 100 * (ppl / ref - 1), disk, predicted_bytes(model), identical))
        print(f"done {name}: {ppl:.3f}", flush=True)

    print(f"\n{ids.numel()} tokens, {args.seq_len}-token windows, g{args.group_size} for wNa16")
    print(
        f"{'scheme':<12}{'ppl':>9}{'delta %':>9}{'disk MB':>10}{'predicted':>11}{'ratio':>7}"
        f"{'save->load identical':>22}"
    )
    for name, ppl, delta, disk, pred, same in rows:
        if disk is None:
            print(f"{name:<12}{ppl:>9.3f}{delta:>9.2f}")
            continue
        print(
            f"{name:<12}{ppl:>9.3f}{delta:>9.2f}{disk / 1e6:>10.2f}{pred / 1e6:>11.2f}"
            f"{disk / pred:>7.3f}{str(same):>22}"
        )


if __name__ == "__main__":
    main()
