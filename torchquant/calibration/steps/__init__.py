"""The steps calibration runs on each block, in order (see :mod:`torchquant.calibration.block`).

SmoothQuant and AWQ rescale the float weights (keeping the block's function), static
activation scales are then observed on the rescaled block, and GPTQ rounds its linears
stage by stage last, so its Hessians see every change before it.  A new calibrated
algorithm is one module here and one entry in :data:`CALIBRATION_STEPS`.
"""

from torchquant.calibration.steps.awq import AwqStep
from torchquant.calibration.steps.gptq import GptqStep
from torchquant.calibration.steps.smoothquant import SmoothQuantStep
from torchquant.calibration.steps.static import StaticScaleStep

CALIBRATION_STEPS = (SmoothQuantStep, AwqStep, StaticScaleStep, GptqStep)

__all__ = ["CALIBRATION_STEPS", "AwqStep", "GptqStep", "SmoothQuantStep", "StaticScaleStep"]
