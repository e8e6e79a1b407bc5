"""Quantization-aware training: ``prepare_qat`` -> train -> ``convert_qat``.

Names are resolved lazily so that ``torchquant.modules`` (which uses the fake-quant
functions of this package) and ``prepare`` (which uses the modules) import cleanly.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "QatOptions": "torchquant.qat.options",
    "prepare_qat": "torchquant.qat.prepare",
    "convert_qat": "torchquant.qat.prepare",
    "calibrate_input_scales": "torchquant.qat.prepare",
    "check_qat_state": "torchquant.qat.guards",
    "check_loss": "torchquant.qat.guards",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'torchquant.qat' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
