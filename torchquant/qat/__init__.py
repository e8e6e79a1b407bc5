"""Quantization-aware training: ``prepare_qat`` -> train -> ``convert_qat``.

The layer that trains is :class:`QatLinear` (``qat_linear``), its fake quantization is
``fake_quant`` (autograd around the reference ``torchquant.numerics.fake_quant``) and
what trains is :class:`QatOptions` (``options``); the workflow lives in ``prepare`` and
the divergence checks in ``guards``.
"""

from torchquant.qat.guards import check_loss, check_qat_state
from torchquant.qat.options import QatOptions
from torchquant.qat.prepare import calibrate_input_scales, convert_qat, prepare_qat
from torchquant.qat.qat_linear import QatLinear

__all__ = [
    "QatLinear",
    "QatOptions",
    "calibrate_input_scales",
    "check_loss",
    "check_qat_state",
    "convert_qat",
    "prepare_qat",
]
