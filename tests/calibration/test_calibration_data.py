import pytest
import torch

from torchquant.calibration import calibration_tokens
from torchquant.errors import CalibrationError


class CharTokenizer:
    """One token per character: enough to test windowing without a real vocabulary."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 256 for c in text]}


def test_windows_are_deterministic_and_shaped(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("abcdefghij" * 100, encoding="utf-8")
    a = calibration_tokens(path, CharTokenizer(), num_samples=8, seq_len=16)
    b = calibration_tokens(str(path), CharTokenizer(), num_samples=8, seq_len=16)
    assert a.shape == (8, 16) and a.dtype == torch.int64
    assert torch.equal(a, b)
    c = calibration_tokens(path, CharTokenizer(), num_samples=8, seq_len=16, seed=1)
    assert not torch.equal(a, c)


def test_list_of_strings_is_joined():
    out = calibration_tokens(["x" * 40, "y" * 40], CharTokenizer(), num_samples=4, seq_len=20)
    assert out.shape == (4, 20)


def test_fewer_windows_than_asked_warns_and_uses_all():
    with pytest.warns(UserWarning, match="fewer than num_samples"):
        out = calibration_tokens(["z" * 50], CharTokenizer(), num_samples=10, seq_len=16)
    assert out.shape == (3, 16)


@pytest.mark.parametrize(
    "source, kwargs, match",
    [
        ([], {}, "empty"),
        (["   \n"], {}, "empty"),
        (["short text\n"], {"seq_len": 64}, "fewer than one sequence"),
        (["abc\n" * 40], {"num_samples": 0}, "num_samples"),
        (["abc\n" * 40], {"seq_len": 1}, "seq_len"),
        ("/no/such/file.txt", {}, "does not exist"),
    ],
)
def test_bad_calibration_data(source, kwargs, match):
    with pytest.raises(CalibrationError, match=match):
        calibration_tokens(source, CharTokenizer(), **kwargs)
