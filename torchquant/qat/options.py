"""``QatOptions``: which quantization parameters train during quantization-aware training."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from torchquant.errors import ConfigError


@dataclass(frozen=True)
class QatOptions:
    """What ``prepare_qat`` makes trainable besides the weights themselves.

    ``learn_scales``: weight scales become parameters (LSQ gradients; of microscaled
    weights only NVFP4's global scale, their block scales always follow the blocks' max);
    when False they follow the weight's min-max range at every step.  ``learn_zeros``:
    asymmetric zero points become parameters too (rounded with a straight-through
    estimator).
    ``learn_input_scale``: static activation scales train.  ``min_scale`` is the floor a
    learned scale is clamped to in the forward, so a scale pushed to zero or below by a
    bad step yields clipped (finite) weights instead of NaN.
    """

    learn_scales: bool = True
    learn_zeros: bool = True
    learn_input_scale: bool = True
    min_scale: float = 1e-8

    def __post_init__(self) -> None:
        for name in ("learn_scales", "learn_zeros", "learn_input_scale"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ConfigError(f"{name}={value!r} is not allowed; expected a bool")
        ok = (
            isinstance(self.min_scale, (int, float))
            and not isinstance(self.min_scale, bool)
            and math.isfinite(self.min_scale)
            and self.min_scale > 0
        )
        if not ok:
            raise ConfigError(
                f"min_scale={self.min_scale!r} is not allowed; expected a finite number > 0"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
