"""What bounds CPU decode speed: the float32 model's tokens/s with its linears made free.

    python benchmarks/cpu_decode_floor.py --threads 1     # SmolLM2-135M (the shared GGUF)
    python benchmarks/cpu_decode_floor.py --smoke          # a tiny random Llama, seconds

Three runs of batch-1 greedy decode with the KV cache (``measure_throughput``, 64 new
tokens after a 128-token prompt): the float32 model; the same with every body linear
(all but ``lm_head``) replaced by a stand-in that returns zeros of the right shape at the
cost of one tensor call; and with ``lm_head`` free too.  The second run's speed over the
first is the most any quantized linear kernel can buy while ``lm_head`` stays float (the
default ``ignore``); the gap between the second and third is what ``lm_head`` costs.
Zeros change the attention's values, not its work, so the floor is the model's own.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

from torchquant import models
from torchquant.benchmark import measure_throughput

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cpu import GGUF  # noqa: E402


class FreeLinear(nn.Module):
    """Zeros of a linear's output shape, as a broadcast view: one call, no arithmetic."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(()).expand(*x.shape[:-1], self.out_features)


def free_linears(model: nn.Module, *, lm_head: bool) -> int:
    """Replace the body's ``nn.Linear`` layers (and ``lm_head`` when asked); how many."""
    replaced = 0
    for name, module in list(model.named_modules()):
        is_head = name.rpartition(".")[2] == "lm_head"
        if isinstance(module, nn.Linear) and (lm_head or not is_head):
            parent, _, child = name.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            setattr(owner, child, FreeLinear(module.out_features))
            replaced += 1
    return replaced


def decode_floor(model: nn.Module, prompt: int, new_tokens: int, repeats: int) -> list[tuple]:
    """``(label, tokens/s, ms/token, x float)`` for the float model and its two floors."""
    rows = []

    def measure(label: str) -> None:
        speed = measure_throughput(
            model, label, prompt_len=prompt, new_tokens=new_tokens, repeats=repeats
        ).decode_tokens_per_s
        base = rows[0][1] if rows else speed
        rows.append((label, speed, 1e3 / speed, speed / base))

    measure("float32")
    body = free_linears(model, lm_head=False)
    measure(f"{body} body linears free")
    free_linears(model, lm_head=True)
    measure("and lm_head free")
    return rows


def tiny_model() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(GGUF), help="a .gguf file or a model folder")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="a tiny random model")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.smoke:
        model, steps = tiny_model(), {"prompt": 8, "new_tokens": 4, "repeats": 1}
    else:
        model = models.load_model(args.model, torch.float32)[0].eval()
        steps = {"prompt": args.prompt, "new_tokens": args.new_tokens, "repeats": args.repeats}
    with torch.no_grad():
        rows = decode_floor(model, **steps)
    print(f"decode floor, batch 1, {steps['prompt']}-token prompt, {steps['new_tokens']} new "
          f"tokens, {args.threads} threads")  # fmt: skip
    print("| model | tok/s | ms/token | x float32 |\n|---|---|---|---|")
    for label, speed, ms, ratio in rows:
        print(f"| {label} | {speed:.2f} | {ms:.2f} | {ratio:.2f} |")
    if args.smoke:
        print("smoke ok")


if __name__ == "__main__":
    main()
