"""SmolLM2-135M with real weights (two decoder layers kept): compressed-tensors both ways."""

import json

import pytest
import torch
from safetensors.torch import load_file

from torchquant import QuantConfig, convert_model, scheme_from_name
from torchquant.formats.dispatch import load_checkpoint, save_checkpoint
from torchquant.modules import QuantLinear


def test_smollm2_compressed_tensors_round_trip(shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHQUANT_DATA", str(shared_data))
    from torchquant.tools.models import load_model

    model, tokenizer = load_model("smollm2-135m")
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    model, summary = convert_model(
        model, QuantConfig(default=scheme_from_name("w4a16", group_size=-1)), progress=False
    )
    assert len(summary.converted) == 14 and "lm_head" in summary.skipped
    save_checkpoint(model, tmp_path / "ct", "compressed-tensors", tokenizer=tokenizer)
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized" and qc["ignore"] == ["lm_head"]

    loaded = load_checkpoint(tmp_path / "ct")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # tied, not duplicated
    ids = tokenizer("It is a truth universally acknowledged", return_tensors="pt").input_ids
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    kw = {"max_new_tokens": 4, "do_sample": False}
    assert torch.equal(loaded.generate(ids, **kw), model.generate(ids, **kw))

    compressors = pytest.importorskip("compressed_tensors.compressors")
    from compressed_tensors.quantization import QuantizationConfig

    scheme = QuantizationConfig.model_validate(qc).config_groups["group_0"]
    state = load_file(tmp_path / "ct" / "model.safetensors")
    compressor = compressors.BaseCompressor.get_value_from_registry("pack-quantized")
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        local = {k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(name + ".")}
        theirs = compressor.decompress(local, scheme)["weight"]
        layer = loaded.get_submodule(name)
        assert isinstance(layer, QuantLinear)
        assert torch.equal(theirs.to(layer.dtype), layer.dequantized_weight()), name
