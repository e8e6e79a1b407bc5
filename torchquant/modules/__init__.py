"""``nn.Module`` wrappers that hold quantized state and call one op each."""

from torchquant.modules.quant_experts import QuantExperts
from torchquant.modules.quant_linear import QuantLinear
from torchquant.modules.rms_norms import fuse_rms_norms, unfuse_rms_norms
from torchquant.modules.sibling_linears import SiblingProjections, fuse_sibling_linears

__all__ = [
    "QuantExperts",
    "QuantLinear",
    "SiblingProjections",
    "fuse_rms_norms",
    "fuse_sibling_linears",
    "unfuse_rms_norms",
]
