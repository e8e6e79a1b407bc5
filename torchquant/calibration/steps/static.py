"""Static activation scales: a per-tensor input scale observed on the transformed float block.

Asymmetric (INT8) activations also get a zero point: the observer's ``(lo, hi)`` range,
not only its max ``|x|``, sets both.

It runs after the rescaling steps, so the observed inputs are the ones the quantized
layer will see (divided by a run-time smoothing scale where there is one).
"""

from __future__ import annotations

import torch

from torchquant.calibration.block import CalibrationStep
from torchquant.calibration.stats import LayerStats
from torchquant.config import QuantScheme
from torchquant.errors import CalibrationError
from torchquant.numerics.activation import activation_qmax, asymmetric_activation_qparams
from torchquant.numerics.fp4 import choose_nvfp4_global_scale
from torchquant.numerics.observers import Observer


def input_observer(scheme: QuantScheme, name: str) -> Observer:
    """The scheme's activation observer (a percentile of 100 means 99.99)."""
    act = scheme.activation
    pct = act.percentile if act.percentile < 100.0 else 99.99
    kind, sym = act.observer, act.symmetric
    return Observer(kind, "tensor", bits=8, symmetric=sym, percentile=pct, name=name)


def static_input_qparams(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor asymmetric INT8 ``(scale (1,) float32, zero_point (1,) int8)``, ``[lo, hi]``."""
    scale, zero = asymmetric_activation_qparams(lo.reshape(1), hi.reshape(1))
    return scale, zero.to(torch.int8)


def static_input_scale(absmax: torch.Tensor, act_type: str) -> torch.Tensor:
    """Per-tensor static activation scale ``(1,)`` float32 from an observed ``|x|`` bound
    (for NVFP4 activations their global scale ``448 * 6 / bound``)."""
    if act_type == "nvfp4":
        return choose_nvfp4_global_scale(absmax.float().reshape(1))
    scale = absmax.float().reshape(1) / activation_qmax(act_type)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


class StaticScaleStep(CalibrationStep):
    def apply(self) -> None:
        block = self.block
        stats = {}
        for rel, scheme in block.schemes.items():
            if scheme.static_activation:
                st = LayerStats(block.full(rel), observer=input_observer(scheme, block.full(rel)))
                st.divisor = block.smooth.get(rel)
                stats[rel] = st
        if not stats:
            return
        block.run(stats)
        for rel, st in stats.items():
            if st.tokens == 0:
                raise CalibrationError(
                    f"{st.name}: received no calibration tokens, so no static activation scale "
                    "can be observed; give it a dynamic scheme or more varied data"
                )
            act = block.schemes[rel].activation
            if act.symmetric:
                block.input_scales[rel] = static_input_scale(st.observer.absmax(), act.type)
            else:
                scale, zero = static_input_qparams(*st.observer.range())
                block.input_scales[rel], block.input_zero_points[rel] = scale, zero
