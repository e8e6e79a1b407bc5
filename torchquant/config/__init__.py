"""Quantization configuration: schemes, algorithm parameters, ``QuantConfig``, name patterns.

``scheme`` holds what one layer is quantized to (``WeightQuant``, ``ActivationQuant``,
``QuantScheme``, the shorthand names), ``algorithms`` the GPTQ/AWQ/SmoothQuant/HQQ
parameters, ``quant_config`` which layers get which scheme, and ``matching`` the name
patterns (exact, glob, ``re:``) it matches layers with.
"""

from torchquant.config.algorithms import (
    ALGORITHMS,
    GPTQ_OBSERVERS,
    OBSERVERS,
    WEIGHT_OBSERVERS,
    AWQConfig,
    GPTQConfig,
    HQQConfig,
    SmoothQuantConfig,
)
from torchquant.config.quant_config import QuantConfig
from torchquant.config.scheme import (
    ACTIVATION_GRANULARITIES,
    ACTIVATION_TYPES,
    DEFAULT_GROUP_SIZE,
    GROUP_SIZES,
    MX_SCALE_ROUNDING_TYPES,
    MX_SCALE_ROUNDINGS,
    SCHEME_NAMES,
    WEIGHT_TYPES,
    ActivationQuant,
    QuantScheme,
    WeightQuant,
    scheme_from_name,
)

__all__ = [
    "ACTIVATION_GRANULARITIES",
    "ACTIVATION_TYPES",
    "ALGORITHMS",
    "DEFAULT_GROUP_SIZE",
    "GPTQ_OBSERVERS",
    "GROUP_SIZES",
    "MX_SCALE_ROUNDING_TYPES",
    "MX_SCALE_ROUNDINGS",
    "OBSERVERS",
    "SCHEME_NAMES",
    "WEIGHT_OBSERVERS",
    "WEIGHT_TYPES",
    "AWQConfig",
    "ActivationQuant",
    "GPTQConfig",
    "HQQConfig",
    "QuantConfig",
    "QuantScheme",
    "SmoothQuantConfig",
    "WeightQuant",
    "scheme_from_name",
]
