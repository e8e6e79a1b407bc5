"""Builders for the small random Hugging Face models the tests share, Llama first."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torchquant import GPTQConfig, QuantConfig, QuantScheme, WeightQuant, convert_model


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


def act_order_llama(
    *, bits: int = 4, group: int = 32, symmetric: bool = False, **llama
) -> nn.Module:
    """A ``tiny_llama(**llama)`` quantized by GPTQ with act-order and no static groups, so its
    layers hold permuted ``g_idx``; calibrated on four fixed random sequences."""
    model = tiny_llama(**llama)
    weight = WeightQuant("int", bits, group, symmetric)
    act_order = GPTQConfig(act_order=True, static_groups=False)
    config = QuantConfig(default=QuantScheme(weight, algorithm="gptq", gptq=act_order))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=gen)
    model, _ = convert_model(model, config, calibration_data=ids, progress=False)
    return model


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


# -- one tiny random model per Hugging Face family: (config class, model class, config fields)
_COMMON = {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
# -- the fields every tiny decoder shares (tests that build other families start from it)
TINY_DECODER = {**_COMMON, "intermediate_size": 64, "num_key_value_heads": 1}
TINY_ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {**TINY_DECODER, "tie_word_embeddings": True}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {**TINY_DECODER, "sliding_window": 16}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", TINY_DECODER),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**TINY_DECODER, "head_dim": 16}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {**TINY_DECODER, "head_dim": 16}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {"vocab_size": 64, "n_embd": 32, "n_layer": 1,
                                              "n_head": 2, "n_positions": 64}),
    "opt": ("OPTConfig", "OPTForCausalLM", {**_COMMON, "ffn_dim": 64, "word_embed_proj_dim": 32,
                                            "max_position_embeddings": 64}),
    "qwen2-moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", {
        **TINY_DECODER, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 32}),
    "qwen3-moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {
        **TINY_DECODER, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
        "head_dim": 16}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {
        **TINY_DECODER, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "bert": ("BertConfig", "BertModel", {**_COMMON, "intermediate_size": 64,
                                        "max_position_embeddings": 64}),
}  # fmt: skip


def tiny_hf_model(arch: str, *, model_kwargs: dict | None = None, **config) -> nn.Module:
    """The :data:`TINY_ARCHITECTURES` model of ``arch`` in eval mode, weights drawn after
    ``torch.manual_seed(0)``; ``config`` overrides its config fields, ``model_kwargs`` go to
    the model class (e.g. BERT's ``add_pooling_layer``)."""
    transformers = pytest.importorskip("transformers")
    config_cls, model_cls, fields = TINY_ARCHITECTURES[arch]
    torch.manual_seed(0)
    hf_config = getattr(transformers, config_cls)(**{**fields, **config})
    return getattr(transformers, model_cls)(hf_config, **(model_kwargs or {})).eval()


# -- the tiny mixture-of-experts decoders, each with its fused experts module at MOE_EXPERTS
MOE_EXPERTS = "model.layers.0.mlp.experts"
MOE_ARCHITECTURES = ("mixtral", "qwen3-moe")
