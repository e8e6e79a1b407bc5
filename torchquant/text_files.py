"""Reading the text files users hand in (evaluation, calibration) with a one-line refusal."""

from __future__ import annotations

from pathlib import Path

from torchquant.errors import TorchquantError


def read_utf8(
    path: str | Path, what: str = "text file", error: type[TorchquantError] = TorchquantError
) -> str:
    """The file's text; a file that is not UTF-8 raises ``error`` with the first bad byte.

    A UnicodeDecodeError would otherwise escape as a traceback naming neither the file
    nor what to do about it.
    """
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        byte = exc.object[exc.start : exc.start + 1].hex()
        raise error(
            f"{what} {str(path)!r} is not UTF-8 text (byte 0x{byte} at offset {exc.start}); "
            "convert it to UTF-8"
        ) from None
