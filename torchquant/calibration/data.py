"""Calibration data: fixed-length token windows cut from real text, deterministically."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from torchquant.errors import CalibrationError
from torchquant.text_files import read_utf8


def _read_texts(source: str | Path | Sequence[str]) -> list[str]:
    if isinstance(source, Path) or (isinstance(source, str) and "\n" not in source):
        path = Path(source)
        if not path.is_file():
            raise CalibrationError(f"calibration text file {str(path)!r} does not exist")
        return [read_utf8(path, "calibration text file", CalibrationError)]
    if isinstance(source, str):
        return [source]
    texts = list(source)
    if not all(isinstance(t, str) for t in texts):
        raise CalibrationError("calibration data must be a file path or a list of strings")
    return texts


def calibration_tokens(
    source: str | Path | Sequence[str],
    tokenizer: Any,
    num_samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
) -> torch.Tensor:
    """``(num_samples, seq_len)`` int64 token windows from a text file or a list of strings.

    The texts are tokenized without special tokens and joined; the stream is cut into
    non-overlapping ``seq_len`` windows, of which ``num_samples`` are drawn with a
    generator seeded by ``seed`` (same inputs, same windows).  Fewer available windows
    than asked gives all of them with a warning; text shorter than one window is an error.
    """
    if not isinstance(num_samples, int) or num_samples < 1:
        raise CalibrationError(f"num_samples={num_samples!r}: expected a positive int")
    if not isinstance(seq_len, int) or seq_len < 2:
        raise CalibrationError(f"seq_len={seq_len!r}: expected an int >= 2")
    texts = [t for t in _read_texts(source) if t.strip()]
    if not texts:
        raise CalibrationError("calibration data is empty: no non-blank text to tokenize")
    ids = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
    available = len(ids) // seq_len
    if available == 0:
        raise CalibrationError(
            f"calibration data has {len(ids)} tokens, fewer than one sequence of seq_len={seq_len}"
        )
    if available < num_samples:
        warnings.warn(
            f"calibration data holds {available} windows of {seq_len} tokens, fewer than "
            f"num_samples={num_samples}; using all {available}",
            stacklevel=2,
        )
    stream = torch.tensor(ids[: available * seq_len], dtype=torch.int64).view(available, seq_len)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(available, generator=generator)[: min(num_samples, available)]
    return stream[order.sort().values]
