"""Calibration: calibration data, architecture mappings and the sequential block-by-block engine.

Observers, which estimate ranges from what calibration shows them, are numerics
(:mod:`torchquant.numerics.observers`); they are re-exported here.
"""

from torchquant.calibration.data import calibration_tokens
from torchquant.calibration.engine import calibrate_model
from torchquant.calibration.mappings import ARCH_MAPPINGS, find_layout
from torchquant.numerics.observers import Observer, weight_qparams

__all__ = [
    "ARCH_MAPPINGS",
    "Observer",
    "calibrate_model",
    "calibration_tokens",
    "find_layout",
    "weight_qparams",
]
