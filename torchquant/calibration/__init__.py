"""Calibration: observers, calibration data and the sequential block-by-block engine."""

from typing import Any

from torchquant.calibration.data import calibration_tokens
from torchquant.calibration.mappings import ARCH_MAPPINGS, find_layout
from torchquant.calibration.observers import Observer, weight_qparams

__all__ = [
    "ARCH_MAPPINGS",
    "Observer",
    "calibrate_model",
    "calibration_tokens",
    "find_layout",
    "weight_qparams",
]


def __getattr__(name: str) -> Any:
    # -- the engine imports the algorithms, which import the observers: load it lazily
    if name == "calibrate_model":
        from torchquant.calibration.engine import calibrate_model

        return calibrate_model
    raise AttributeError(name)
