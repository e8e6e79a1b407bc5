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


TINY_WORDS = [f"w{i}" for i in range(60)]


def tiny_llama_folder(folder, **config):
    """A ``tiny_llama(vocab=64)`` saved as a plain Hugging Face folder with a word-level
    tokenizer of :data:`TINY_WORDS`; returns the folder."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(TINY_WORDS)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    fast.save_pretrained(folder)
    tiny_llama(vocab=64, **config).save_pretrained(folder)
    return folder


def tiny_text(path, words: int = 200):
    """A text of ``words`` words the tiny tokenizer knows; returns the path."""
    path.write_text(" ".join(TINY_WORDS[i % 37] for i in range(words)))
    return path


# -- tiny mixture-of-experts decoders (fused experts module at MOE_EXPERTS)
MOE_EXPERTS = "model.layers.0.mlp.experts"
_MOE_DECODER = {
    "vocab_size": 64,
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "intermediate_size": 64,
}
MOE_ARCHITECTURES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {**_MOE_DECODER, "num_local_experts": 4}),
    "qwen3-moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        {**_MOE_DECODER, "num_experts": 4, "moe_intermediate_size": 32, "head_dim": 16},
    ),
}


def tiny_moe(arch: str) -> nn.Module:
    """A one-layer mixture-of-experts model with random weights, seeded (Mixtral or Qwen3-MoE)."""
    transformers = pytest.importorskip("transformers")
    config_cls, model_cls, kw = MOE_ARCHITECTURES[arch]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**kw, num_experts_per_tok=2)
    return getattr(transformers, model_cls)(config).eval()
