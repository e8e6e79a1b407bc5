"""What calibration_ppl.py and llmcompressor_ppl.py share, so both tables measure alike:
the same command-line knobs, model, evaluation tokens and calibration windows."""

from __future__ import annotations

import argparse
import os
import threading
from pathlib import Path

import torch

from torchquant.calibration import calibration_tokens
from torchquant.evaluation import tokenize_text
from torchquant.models import load_model


def add_run_args(parser: argparse.ArgumentParser, calib_samples: int, group_size: int) -> None:
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--calib", required=True)
    parser.add_argument("--text", required=True)
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument(
        "--skip-tokens", type=int, default=0, help="leading tokens of --text left unscored"
    )
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--calib-samples", type=int, default=calib_samples)
    parser.add_argument("--calib-seq-len", type=int, default=512)
    parser.add_argument("--group-size", type=int, default=group_size)
    parser.add_argument("--alpha", type=float, default=0.8, help="SmoothQuant alpha")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")


def add_w4a8_alphas(parser: argparse.ArgumentParser) -> None:
    """``--w4a8-alphas``, which ours and llm-compressor's tables read alike."""
    parser.add_argument(
        "--w4a8-alphas",
        type=float,
        nargs="*",
        default=None,
        help="SmoothQuant alphas of the W4A8 SmoothQuant+GPTQ rows (default: --alpha)",
    )


def load_run(args: argparse.Namespace) -> tuple:
    """``(model, tokenizer, eval_ids, calibration_ids)`` for the parsed ``args``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    text = Path(args.text).read_text(encoding="utf-8")
    ids = tokenize_text(tokenizer, text, args.skip_tokens + args.max_tokens)[args.skip_tokens :]
    calib = calibration_tokens(args.calib, tokenizer, args.calib_samples, args.calib_seq_len)
    return model, tokenizer, ids, calib


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 50 ms)."""

    def __enter__(self) -> PeakRSS:
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while not self._stop.is_set():
            with open("/proc/self/statm") as f:
                self.peak = max(self.peak, int(f.read().split()[1]) * page)
            self._stop.wait(0.05)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def load_average() -> str:
    """The 1, 5 and 15 minute load averages: what else ran while a row was timed."""
    return " / ".join(f"{v:.1f}" for v in os.getloadavg())
