"""Every supported Hugging Face architecture: convert, run, generate, save, load, same logits.

Tiny models with random weights are built offline from configs, one per family;
each goes through the native format and, where every quantized layer is an
``nn.Linear``, the compressed-tensors format too.
"""

import pytest
import torch

from torchquant import CheckpointError, QuantConfig, convert_model, scheme_from_name
from torchquant.formats.dispatch import detect_format, load_checkpoint, save_checkpoint
from torchquant.modules import QuantLinear

transformers = pytest.importorskip("transformers")

COMMON = {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
DECODER = {**COMMON, "intermediate_size": 64, "num_key_value_heads": 1}

ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {**DECODER, "tie_word_embeddings": True}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {**DECODER, "sliding_window": 16}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", DECODER),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**DECODER, "head_dim": 16}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {**DECODER, "head_dim": 16}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {"vocab_size": 64, "n_embd": 32, "n_layer": 1,
                                              "n_head": 2, "n_positions": 64}),
    "opt": ("OPTConfig", "OPTForCausalLM", {"vocab_size": 64, "hidden_size": 32,
                                            "num_hidden_layers": 1, "num_attention_heads": 2,
                                            "ffn_dim": 64, "word_embed_proj_dim": 32,
                                            "max_position_embeddings": 64}),
    "qwen2-moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", {
        **DECODER, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 32}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {
        **DECODER, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "bert": ("BertConfig", "BertModel", {**COMMON, "intermediate_size": 64,
                                        "max_position_embeddings": 64}),
}  # fmt: skip
CAUSAL = [name for name in ARCHITECTURES if name != "bert"]
SCHEME = scheme_from_name("w4a16", group_size=16)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(arch: str) -> torch.nn.Module:
    config_cls, model_cls, kw = ARCHITECTURES[arch]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**kw)
    return getattr(transformers, model_cls)(config).eval()


def converted(arch: str) -> torch.nn.Module:
    model, summary = convert_model(tiny(arch), QuantConfig(default=SCHEME), progress=False)
    assert summary.converted, arch
    return model


def outputs(model, ids):
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_convert_run_save_load_identical(tmp_path, arch):
    model = converted(arch)
    ids = torch.randint(0, 64, (2, 7))
    reference = tiny(arch)
    want = outputs(model, ids)
    err = (want - outputs(reference, ids)).norm() / outputs(reference, ids).norm()
    assert torch.isfinite(want).all() and 0 < err < 0.5, err  # quantized, yet close
    assert not any(isinstance(m, QuantLinear) for n, m in model.named_modules() if "lm_head" in n)
    assert not any(p.dim() == 3 for p in model.parameters())  # MoE experts too are quantized
    formats = ["native", "compressed-tensors"]
    if arch == "gpt2":  # Conv1D layers: compressed-tensors readers expect nn.Linear weights
        with pytest.raises(CheckpointError, match="Conv1D, not nn.Linear"):
            save_checkpoint(model, tmp_path / "ct", "compressed-tensors")
        formats = ["native", "gptq"]
    for fmt in formats:
        save_checkpoint(model, tmp_path / fmt, fmt)
        assert detect_format(tmp_path / fmt) == fmt
        loaded = load_checkpoint(tmp_path / fmt)
        assert type(loaded) is type(model)
        names = {n for n, m in loaded.named_modules() if isinstance(m, QuantLinear)}
        assert names == {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
        assert torch.equal(outputs(loaded, ids), want), (arch, fmt)
        if arch in CAUSAL:
            kw = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": 0}
            assert torch.equal(loaded.generate(ids, **kw), model.generate(ids, **kw))


def test_unknown_quant_method_is_refused(tmp_path):
    save_checkpoint(converted("qwen2"), tmp_path / "ct", "compressed-tensors")
    path = tmp_path / "ct" / "config.json"
    path.write_text(path.read_text().replace('"compressed-tensors"', '"bitsandbytes"'))
    with pytest.raises(CheckpointError, match="quant_method='bitsandbytes' is not a format"):
        load_checkpoint(tmp_path / "ct")


def test_unknown_architecture_is_refused(tmp_path):
    save_checkpoint(converted("gpt2"), tmp_path / "q", "gptq")
    path = tmp_path / "q" / "config.json"
    path.write_text(path.read_text().replace("GPT2LMHeadModel", "GPT9LMHeadModel"))
    with pytest.raises(CheckpointError, match="'GPT9LMHeadModel' is not a transformers model"):
        load_checkpoint(tmp_path / "q")
