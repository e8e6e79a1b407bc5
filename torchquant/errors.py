"""Exception types: every failure torchquant reports on purpose is one of these."""


class TorchquantError(Exception):
    """Base class for all errors raised by torchquant."""


class ConfigError(TorchquantError, ValueError):
    """A configuration field has a value outside what is allowed."""


class QuantizationError(TorchquantError, ValueError):
    """A tensor cannot be quantized as asked (wrong shape, dtype, NaN/Inf, ...)."""


class CheckpointError(TorchquantError, ValueError):
    """A checkpoint on disk is missing, malformed, or disagrees with its config."""


class CalibrationError(TorchquantError, ValueError):
    """Calibration cannot proceed: no data, NaN activations, a layer that saw no tokens, ..."""


class CheckpointConfigError(CheckpointError, ConfigError):
    """A checkpoint's own config has a bad field: a loader's error that is also a config error."""
