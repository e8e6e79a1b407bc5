"""``nn.Module`` wrappers that hold quantized state and call one op each."""

from torchquant.modules.quant_experts import QuantExperts
from torchquant.modules.quant_linear import QuantLinear

__all__ = ["QuantExperts", "QuantLinear"]
