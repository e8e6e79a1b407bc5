"""``torch.compile(fullgraph=True)`` on converted models, for every scheme.

The custom ops have fake implementations, so a converted model traces into one graph
with no breaks on any device; on CPU the reference ops run inside the compiled graph
(``aot_eager`` keeps the test fast; the GPU tests compile with Inductor).
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_llama
from torch import nn

from torchquant import QuantConfig, QuantLinear, convert_model

SCHEMES = [f"w{bits}a16" for bits in range(2, 9)] + ["w8a16-fp8", "w8a8", "fp8"]


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(96, 160), nn.SiLU(), nn.Linear(160, 48), nn.LayerNorm(48))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_converted_sequential_compiles_fullgraph(scheme):
    model, summary = convert_model(_mlp(), QuantConfig(scheme, ignore=()), progress=False)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 2, summary
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        for rows in (1, 5):  # a decode-sized and a prefill-sized batch
            x = torch.randn(rows, 96)
            torch.testing.assert_close(compiled(x), model(x))


def test_converted_tiny_llama_compiles_fullgraph():
    model = tiny_llama(
        vocab=128, inter=96, layers=2, heads=4, kv_heads=2, max_position_embeddings=64
    )
    model, _ = convert_model(model, QuantConfig("w8a8"), progress=False)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14  # 7 per layer
    ids = torch.randint(0, 128, (2, 7))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        eager = model(ids, use_cache=False).logits
        torch.testing.assert_close(compiled(ids, use_cache=False).logits, eager)
