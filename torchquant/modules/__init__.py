"""``nn.Module`` wrappers that hold quantized state and call one op each."""

from torchquant.modules.qat_linear import QatLinear
from torchquant.modules.quant_experts import QuantExperts
from torchquant.modules.quant_linear import QuantLinear

__all__ = ["QatLinear", "QuantExperts", "QuantLinear"]
