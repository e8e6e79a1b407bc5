"""torchquant: quantize PyTorch models (INT8, INT2-8 per group, FP8, W8A8) and run them fast."""

from torchquant.calibration import calibration_tokens
from torchquant.config import (
    ActivationQuant,
    AWQConfig,
    GPTQConfig,
    HQQConfig,
    QuantConfig,
    QuantScheme,
    SmoothQuantConfig,
    WeightQuant,
    scheme_from_name,
)
from torchquant.convert import ConversionSummary, convert_model
from torchquant.errors import (
    CalibrationError,
    CheckpointError,
    ConfigError,
    QuantizationError,
    TorchquantError,
)
from torchquant.formats.dispatch import detect_format, load_checkpoint, save_checkpoint
from torchquant.modules import QuantExperts, QuantLinear
from torchquant.qat import QatLinear, QatOptions, convert_qat, prepare_qat

__version__ = "0.1.0"

__all__ = [
    "AWQConfig",
    "ActivationQuant",
    "CalibrationError",
    "CheckpointError",
    "ConfigError",
    "ConversionSummary",
    "GPTQConfig",
    "HQQConfig",
    "QatLinear",
    "QuantExperts",
    "QatOptions",
    "QuantConfig",
    "QuantLinear",
    "QuantScheme",
    "QuantizationError",
    "SmoothQuantConfig",
    "TorchquantError",
    "WeightQuant",
    "calibration_tokens",
    "convert_model",
    "convert_qat",
    "detect_format",
    "load_checkpoint",
    "prepare_qat",
    "save_checkpoint",
    "scheme_from_name",
]
