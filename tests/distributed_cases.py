"""Tiny calibration runs that the distributed tests repeat on 2 gloo ranks and in one process.

Each case is a config for a two-block tiny Llama; :func:`calibrate` runs one case the
same way in a rank process and in the test process (calibration samples and model seeded).
"""

from __future__ import annotations

import torch
from tiny_models import tiny_llama
from torch import nn

from torchquant import (
    ActivationQuant,
    AWQConfig,
    GPTQConfig,
    QuantConfig,
    QuantScheme,
    WeightQuant,
    convert_model,
)

VOCAB = 96
INT4 = WeightQuant(bits=4, group_size=32)
INT8 = WeightQuant(bits=8, group_size=-1, symmetric=True)
STATIC = ActivationQuant(
    granularity="tensor", dynamic=False, observer="percentile", percentile=99.9
)
CASES = {
    "gptq": QuantScheme(INT4, None, "gptq"),
    "gptq-sequential": QuantScheme(INT4, None, "gptq", gptq=GPTQConfig(sequential=True)),
    "awq": QuantScheme(INT4, None, "awq", awq=AWQConfig(grid=4, clip_grid=4, max_tokens=96)),
    "smoothquant": QuantScheme(INT8, ActivationQuant(), "smoothquant"),
    "static": QuantScheme(INT8, STATIC, "rtn"),
}


def model() -> nn.Module:
    return tiny_llama(vocab=VOCAB, layers=2, heads=4, kv_heads=2)


def tokens() -> torch.Tensor:
    """Eight samples of 24 tokens: 4 per rank, so the AWQ inspect inputs span both ranks."""
    return torch.randint(0, VOCAB, (8, 24), generator=torch.Generator().manual_seed(0))


def calibrate(case: str, shards: int | None = None, scheme: QuantScheme | None = None):
    config = QuantConfig(scheme or CASES[case])
    quantized, _ = convert_model(
        model(), config, calibration_data=tokens(), progress=False, calibration_shards=shards
    )
    return quantized
