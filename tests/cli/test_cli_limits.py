"""Out-of-range numbers, unknown devices and non-UTF-8 files: a one-line reason, never a traceback.

Values argparse can judge alone are usage errors (exit 2, said before any model loads);
what only the run can tell (a missing CUDA device, a file's bytes) exits 1 with
``torchquant: error: ...``.
"""

import pytest
import torch
from tiny_models import tiny_llama

from torchquant.cli import build_parser, main
from torchquant.tools import models


class CharTokenizer:
    """One token per character (ids below 96, the tiny Llama's vocabulary)."""

    def __call__(self, text, add_special_tokens=False, return_tensors=None):
        ids = [ord(c) % 96 for c in text]
        if return_tensors == "pt":
            return type("Encoding", (), {"input_ids": torch.tensor([ids])})()
        return {"input_ids": ids}

    def save_pretrained(self, directory):
        return ()


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model must not be loaded before the arguments are checked")

    monkeypatch.setattr(models, "load_model", refuse)


@pytest.fixture
def tiny_model(monkeypatch):
    monkeypatch.setattr(models, "load_model", lambda spec, **_: (tiny_llama(), CharTokenizer()))


def usage_error(capsys, argv: list[str]) -> str:
    """Run ``argv``, which must exit 2; returns argparse's one-line reason."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def run_error(capsys, argv: list[str]) -> str:
    """Run ``argv``, which must return 1 with one ``torchquant: error:`` line."""
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("torchquant: error:") and "\n" not in err, err
    return err


QUANTIZE = ["quantize", "m", "--out", "never-written"]
BENCH = ["bench", "never-read"]


@pytest.mark.parametrize(
    "argv, option",
    [
        (["eval", "m", "--max-tokens", "0"], "--max-tokens"),
        (["eval", "m", "--max-tokens", "-5"], "--max-tokens"),
        (["eval", "m", "--seq-len", "0"], "--seq-len"),
        (["eval", "m", "--seq-len", "1"], "--seq-len"),
        (["demo", "--max-tokens", "0"], "--max-tokens"),
        ([*BENCH, "--new-tokens", "-3"], "--new-tokens"),
        ([*BENCH, "--repeats", "0"], "--repeats"),
        ([*BENCH, "--batch", "0"], "--batch"),
        ([*BENCH, "--prompt-len", "-3"], "--prompt-len"),
        ([*QUANTIZE, "--calib-samples", "0"], "--calib-samples"),
        ([*QUANTIZE, "--calib-seq-len", "0"], "--calib-seq-len"),
        ([*QUANTIZE, "--group-size", "0"], "--group-size"),
        ([*QUANTIZE, "--group-size", "-2"], "--group-size"),
        ([*QUANTIZE, "--group-size", "many"], "--group-size"),
        ([*QUANTIZE, "--max-shard-size", "0"], "--max-shard-size"),
        ([*QUANTIZE, "--max-shard-size", "2 parsecs"], "--max-shard-size"),
        ([*BENCH, "--device", "tpu"], "--device"),
        ([*BENCH, "--device", "cuda:x"], "--device"),
    ],
)
def test_out_of_range_values_are_usage_errors(capsys, no_model_load, argv, option):
    reason = usage_error(capsys, argv)
    assert f"argument {option}:" in reason
    assert "not allowed" in reason or "not an integer" in reason


def test_the_reasons_say_what_is_allowed(capsys, no_model_load):
    assert "expected a positive integer" in usage_error(capsys, [*BENCH, "--repeats", "0"])
    assert "an integer >= 2" in usage_error(capsys, ["eval", "m", "--seq-len", "1"])
    assert "-1 for per channel" in usage_error(capsys, [*QUANTIZE, "--group-size", "0"])
    assert "cpu, cuda or cuda:N" in usage_error(capsys, [*BENCH, "--device", "tpu"])
    reason = usage_error(capsys, [*QUANTIZE, "--max-shard-size", "2 parsecs"])
    assert "in bytes (e.g. 20000)" in reason and "2GB" in reason


@pytest.mark.parametrize(
    "text, size",
    [("20000", 20000), ("2GB", 2 * 1000**3), ("500MiB", 500 * 2**20), ("4GB", 4 * 1000**3)],
)
def test_max_shard_size_takes_bytes_or_a_unit(text, size):
    args = build_parser().parse_args(["quantize", "m", "--out", "o", "--max-shard-size", text])
    assert args.max_shard_size == size


def test_default_max_shard_size_is_parsed_too():
    assert build_parser().parse_args(["quantize", "m", "--out", "o"]).max_shard_size == 4 * 1000**3


def test_group_size_minus_one_and_positive_counts_are_accepted():
    parse = build_parser().parse_args
    assert parse([*QUANTIZE, "--group-size", "-1"]).group_size == -1
    assert parse([*QUANTIZE, "--group-size", "32"]).group_size == 32
    assert parse(["bench", "d", "--device", "cuda:1"]).device == "cuda:1"


@pytest.mark.skipif(torch.cuda.device_count() > 7, reason="needs fewer than 8 CUDA devices")
def test_bench_on_a_cuda_device_that_is_not_there_fails_in_one_line(capsys, tmp_path):
    err = run_error(capsys, ["bench", str(tmp_path), "--device", "cuda:7"])
    assert "cuda" in err and "Traceback" not in err


def test_a_byte_sized_shard_limit_reaches_the_saved_checkpoint(capsys, tmp_path, tiny_model):
    out = tmp_path / "q"
    argv = ["quantize", "m", "--out", str(out), "--group-size", "32", "--max-shard-size", "20000"]
    assert main(argv) == 0
    assert len(list(out.glob("*.safetensors"))) > 1  # -- a tiny Llama is far over 20 kB


NOT_UTF8 = b"caf\xe9 au lait\n" * 8  # Latin-1, not UTF-8


def test_eval_text_that_is_not_utf8_fails_in_one_line(capsys, tmp_path, tiny_model):
    text = tmp_path / "latin1.txt"
    text.write_bytes(NOT_UTF8)
    err = run_error(capsys, ["eval", "m", "--text", str(text)])
    assert "latin1.txt" in err and "not UTF-8" in err and "0xe9" in err


def test_calibration_text_that_is_not_utf8_fails_in_one_line(capsys, tmp_path, tiny_model):
    calib = tmp_path / "latin1.txt"
    calib.write_bytes(NOT_UTF8)
    argv = [*QUANTIZE[:3], str(tmp_path / "q"), "--algorithm", "gptq", "--calib", str(calib)]
    err = run_error(capsys, argv)
    assert "calibration text file" in err and "latin1.txt" in err and "not UTF-8" in err
    assert not (tmp_path / "q").exists()


def test_any_other_undecodable_read_is_one_line_too(capsys, monkeypatch):
    from torchquant import cli

    def undecodable(args):
        b"\xff".decode("utf-8")

    monkeypatch.setitem(cli.COMMANDS, "inspect", undecodable)
    err = run_error(capsys, ["inspect", "somewhere"])
    assert "not UTF-8" in err


def test_the_library_refuses_the_same_counts():
    from torchquant.benchmark import measure_throughput
    from torchquant.errors import TorchquantError
    from torchquant.tools.evaluation import tokenize_text

    with pytest.raises(TorchquantError, match="max_tokens=0: expected a positive int"):
        tokenize_text(CharTokenizer(), "some text", 0)
    assert tokenize_text(CharTokenizer(), "some text", 4).numel() == 4
    for field in ("batch", "prompt_len", "new_tokens", "repeats"):
        with pytest.raises(TorchquantError, match=f"{field}=-3: expected a positive int"):
            measure_throughput(tiny_llama(), "x", **{field: -3})
