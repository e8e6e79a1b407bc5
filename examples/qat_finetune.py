"""Quantization-aware fine-tuning of a Hugging Face causal LM, end to end.

Loads a model (default: the built-in SmolLM2-135M), measures perplexity in full
precision and after round-to-nearest PTQ, prepares it for QAT, trains on a text
corpus (knowledge distillation from the full-precision model by default: KL to the
teacher's next-token distribution), converts it and measures the converted model
(``--eval-fake-quant`` also measures the fake-quantized one), and saves the quantized
checkpoint with ``save_quantized``.  ``--fp32-ppl``/``--ptq-ppl`` reuse known
baselines and ``--max-minutes`` caps the training time on slow machines.

    python examples/qat_finetune.py --scheme w3a16 --group-size 128 --steps 40 \
        --train-text austen/persuasion.txt austen/mansfieldpark.txt \
        --eval-text austen/prideprejudice.txt --out qat-w3

Prints one JSON line with every measured number at the end (and logs the loss to
``--log`` as JSON lines).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from torchquant import QuantConfig, convert_model, scheme_from_name
from torchquant.evaluation import perplexity, tokenize_text
from torchquant.models import load_model
from torchquant.qat import (
    QatLinear,
    QatOptions,
    check_loss,
    check_qat_state,
    convert_qat,
    prepare_qat,
)
from torchquant.serialization import save_quantized

log = logging.getLogger("qat_finetune")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="name, .gguf file or HF folder")
    p.add_argument("--scheme", default="w4a16", help="w8a16, wNa16 (N=2..8), w8a8, fp8, ...")
    p.add_argument("--group-size", type=int, default=None, help="group size (-1 = per channel)")
    p.add_argument("--train-text", nargs="+", required=True, help="training text file(s)")
    p.add_argument("--eval-text", required=True, help="held-out text for perplexity")
    p.add_argument("--eval-tokens", type=int, default=16384, help="evaluate the first N tokens")
    p.add_argument("--eval-seq-len", type=int, default=1024, help="perplexity window length")
    p.add_argument("--seq-len", type=int, default=256, help="training sequence length")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-5, help="learning rate of the weights")
    p.add_argument("--scale-lr", type=float, default=1e-4, help="learning rate of the scales")
    p.add_argument(
        "--train",
        choices=("qparams", "weights", "all"),
        default="all",
        help="train the quantization parameters, the quantized weights, or both",
    )
    p.add_argument("--no-distill", action="store_true", help="plain LM loss instead of KD")
    p.add_argument("--warmup", type=int, default=10, help="linear warm-up steps")
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--fp32-ppl", type=float, default=None, help="skip the fp32 eval, use this")
    p.add_argument("--ptq-ppl", type=float, default=None, help="skip the PTQ eval, use this")
    p.add_argument(
        "--eval-fake-quant",
        action="store_true",
        help="also measure the fake-quantized model before converting it",
    )
    p.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="stop training after this long (then evaluate and save as usual)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log", default=None, help="JSON-lines loss log")
    p.add_argument("--out", default=None, help="save the converted model here")
    return p


def training_ids(tokenizer, paths: list[str]) -> torch.Tensor:
    """All training texts tokenized (no special tokens) and concatenated."""
    parts = [tokenize_text(tokenizer, Path(p).read_text(encoding="utf-8")) for p in paths]
    return torch.cat(parts)


def sample_batch(ids: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, ids.numel() - seq_len, (batch,), generator=gen)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per token, averaged over tokens."""
    s = F.log_softmax(student_logits.float().flatten(0, 1), dim=-1)
    t = F.log_softmax(teacher_logits.float().flatten(0, 1), dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


def lm_loss(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten())


def param_groups(model: torch.nn.Module, args: argparse.Namespace) -> list[dict]:
    """Only QAT layers train: their qparams and/or weights; everything else is frozen."""
    qparams, weights = [], []
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        is_qparam = leaf in ("weight_scales", "weight_zeros", "input_scale")
        module = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        is_qat_weight = leaf == "weight" and isinstance(module, QatLinear)
        train_q = is_qparam and args.train in ("qparams", "all") and p.requires_grad
        train_w = is_qat_weight and args.train in ("weights", "all")
        p.requires_grad_(train_q or train_w)
        (qparams if train_q else weights if train_w else []).append(p)
    groups = []
    if qparams:
        groups.append({"params": qparams, "lr": args.scale_lr, "weight_decay": 0.0})
    if weights:
        groups.append({"params": weights, "lr": args.lr, "weight_decay": 0.0})
    return groups


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict = {"settings": vars(args).copy()}

    model, tokenizer = load_model(args.model)
    eval_ids = tokenize_text(tokenizer, Path(args.eval_text).read_text(encoding="utf-8"))
    eval_ids = eval_ids[: args.eval_tokens]
    train_ids = training_ids(tokenizer, args.train_text)
    log.info("train tokens %d, eval tokens %d", train_ids.numel(), eval_ids.numel())
    config = QuantConfig(default=scheme_from_name(args.scheme, args.group_size))

    def ppl(m) -> float:
        return perplexity(m.eval(), eval_ids, args.eval_seq_len).perplexity

    results["fp32"] = args.fp32_ppl if args.fp32_ppl else ppl(model)
    log.info("fp32 perplexity %.3f", results["fp32"])
    if args.ptq_ppl:
        results["ptq_rtn"] = args.ptq_ppl
    else:
        ptq, _ = convert_model(copy.deepcopy(model), config)
        results["ptq_rtn"] = ppl(ptq)
        del ptq
    log.info("PTQ RTN perplexity %.3f", results["ptq_rtn"])

    teacher = None
    if not args.no_distill:
        teacher = copy.deepcopy(model).eval().requires_grad_(False)
    options = QatOptions(learn_scales=args.train in ("qparams", "all"))
    model, summary = prepare_qat(model, config, options)
    log.info("prepared %d layers for QAT (%s)", len(summary.converted), args.scheme)
    optimizer = torch.optim.AdamW(param_groups(model, args), betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (
            min(1.0, (s + 1) / max(1, args.warmup))
            * 0.5
            * (1 + math.cos(math.pi * min(1.0, s / max(1, args.steps))))
        ),
    )

    gen = torch.Generator().manual_seed(args.seed)
    log_file = open(args.log, "a") if args.log else None  # noqa: SIM115
    model.train()
    start = time.perf_counter()
    running = None
    bar = tqdm(range(1, args.steps + 1), desc="QAT", unit="step")
    for step in bar:
        x = sample_batch(train_ids, args.batch_size, args.seq_len, gen)
        logits = model(x).logits
        if teacher is not None:
            with torch.no_grad():
                target = teacher(x).logits
            loss = distill_loss(logits, target)
        else:
            loss = lm_loss(logits, x)
        value = check_loss(loss, model, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(
            [p for g in optimizer.param_groups for p in g["params"]], args.clip
        )
        optimizer.step()
        schedule.step()
        running = value if running is None else 0.9 * running + 0.1 * value
        bar.set_postfix(loss=f"{running:.4f}")
        if step % args.log_every == 0 or step == args.steps:
            check_qat_state(model)
            record = {"step": step, "loss": value, "smoothed": running}
            record["seconds"] = round(time.perf_counter() - start, 1)
            log.info(json.dumps(record))
            if log_file:
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
        if args.max_minutes and time.perf_counter() - start > 60 * args.max_minutes:
            log.info("time budget of %.1f min reached after step %d", args.max_minutes, step)
            break
    results["steps_done"] = step
    results["train_seconds"] = round(time.perf_counter() - start, 1)
    del teacher

    if args.eval_fake_quant:
        results["qat_fake_quant"] = ppl(model)
        log.info("QAT (fake-quant) perplexity %.3f", results["qat_fake_quant"])
    model, _ = convert_qat(model, config)
    results["qat_converted"] = ppl(model)
    log.info("QAT (converted) perplexity %.3f", results["qat_converted"])
    gap = results["ptq_rtn"] - results["fp32"]
    if gap > 0:
        results["gap_recovered"] = (results["ptq_rtn"] - results["qat_converted"]) / gap
    if args.out:
        save_quantized(model, args.out, config=config, tokenizer=tokenizer)
        results["saved"] = args.out
    print(json.dumps(results))
    if log_file:
        log_file.close()
    return results


if __name__ == "__main__":
    main()
