"""One builder for the small random Llama models the format and checkpoint tests share."""

from __future__ import annotations

import pytest
import torch
from torch import nn


def tiny_llama(
    *,
    vocab: int = 96,
    hidden: int = 64,
    inter: int = 128,
    layers: int = 1,
    heads: int = 2,
    kv_heads: int = 1,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **config,
) -> nn.Module:
    """A ``LlamaForCausalLM`` in eval mode, weights drawn after ``torch.manual_seed(seed)``;
    ``config`` passes further ``LlamaConfig`` fields (e.g. ``tie_word_embeddings``)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    llama_config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        **config,
    )
    return transformers.LlamaForCausalLM(llama_config).to(dtype).eval()
