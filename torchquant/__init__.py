"""torchquant: quantize PyTorch models (INT8, INT2-8 per group, FP8, W8A8) and run them fast."""

from torchquant.config import ActivationQuant, QuantConfig, QuantScheme, WeightQuant
from torchquant.convert import ConversionSummary, convert_model
from torchquant.errors import CheckpointError, ConfigError, QuantizationError, TorchquantError
from torchquant.formats.dispatch import detect_format, load_checkpoint, save_checkpoint
from torchquant.modules import QatLinear, QuantLinear
from torchquant.qat import QatOptions, convert_qat, prepare_qat
from torchquant.schemes import scheme_from_name

__version__ = "0.1.0"

__all__ = [
    "ActivationQuant",
    "CheckpointError",
    "ConfigError",
    "ConversionSummary",
    "QatLinear",
    "QatOptions",
    "QuantConfig",
    "QuantLinear",
    "QuantScheme",
    "QuantizationError",
    "TorchquantError",
    "WeightQuant",
    "convert_model",
    "convert_qat",
    "detect_format",
    "load_checkpoint",
    "prepare_qat",
    "save_checkpoint",
    "scheme_from_name",
]
