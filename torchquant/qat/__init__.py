"""Quantization-aware training: ``prepare_qat`` -> train -> ``convert_qat``.

The workflow lives here (``prepare``, ``guards``); the layer it trains is
:class:`torchquant.modules.QatLinear` (with its fake quantization,
``modules.qat_fake_quant``) and its options are :class:`torchquant.config.qat.QatOptions`.
"""

from torchquant.config.qat import QatOptions
from torchquant.qat.guards import check_loss, check_qat_state
from torchquant.qat.prepare import calibrate_input_scales, convert_qat, prepare_qat

__all__ = [
    "QatOptions",
    "calibrate_input_scales",
    "check_loss",
    "check_qat_state",
    "convert_qat",
    "prepare_qat",
]
