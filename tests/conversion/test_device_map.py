"""Models loaded with accelerate's ``device_map``: convert, generate, save and load.

A tiny random Llama is saved with ``save_pretrained`` and loaded back three ways:
plainly, with ``device_map={"": "cpu"}``, and with ``device_map="auto"`` under a
``max_memory`` so small that the decoder layers go to an ``offload_folder`` (their
weights stay on the meta device behind accelerate hooks until each forward).
Every way must quantize to the same model: bit-identical logits.
"""

import dataclasses

import pytest
import torch
from tiny_models import tiny_hf_model, tiny_llama

from torchquant import QuantConfig, convert_model, scheme_from_name
from torchquant.errors import QuantizationError
from torchquant.modules import QuantExperts, QuantLinear
from torchquant.serialization import load_quantized, save_quantized

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

CONFIG = QuantConfig(scheme_from_name("w4a16", group_size=16))
TOKENS = torch.tensor([[1, 5, 9, 17, 33, 2, 40, 11]])


pytestmark = pytest.mark.usefixtures("one_thread")


def save_tiny_llama(directory, *, tied: bool):
    tiny_llama(vocab=64, layers=2, tie_word_embeddings=tied).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("float"), tied=False)


def load(directory, **kwargs):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, **kwargs
    )
    return model.eval()


def offloaded(directory, tmp_path):
    """Embeddings on the CPU, everything else offloaded to disk (meta until forward)."""
    model = load(
        directory,
        device_map="auto",
        max_memory={"cpu": 200_000},
        offload_folder=str(tmp_path / "offload"),
    )
    assert "disk" in set(model.hf_device_map.values())
    assert model.model.layers[0].self_attn.q_proj.weight.device.type == "meta"
    return model


def logits(model):
    with torch.no_grad():
        return model(TOKENS).logits


def greedy(model):
    return model.generate(TOKENS, max_new_tokens=4, do_sample=False, pad_token_id=0)


@pytest.fixture(scope="module")
def reference(float_dir):
    """The same checkpoint loaded without a device map, converted."""
    model, _ = convert_model(load(float_dir), CONFIG, progress=False)
    return model


def test_single_device_map_converts_like_a_plain_load(float_dir, reference):
    model, summary = convert_model(load(float_dir, device_map={"": "cpu"}), CONFIG, progress=False)
    assert len(summary.converted) == 14  # -- 7 per layer; lm_head is ignored by default
    assert torch.equal(logits(model), logits(reference))
    assert torch.equal(greedy(model), greedy(reference))


def test_offloaded_layers_convert_like_a_plain_load(float_dir, reference, tmp_path):
    model = offloaded(float_dir, tmp_path)
    model, summary = convert_model(model, CONFIG, progress=False)
    assert set(summary.converted) == set(
        convert_model(load(float_dir), CONFIG, progress=False)[1].converted
    )
    q_proj = model.model.layers[1].self_attn.q_proj
    assert isinstance(q_proj, QuantLinear)
    assert q_proj.qweight.device.type == "cpu"
    assert torch.equal(q_proj.qweight, reference.model.layers[1].self_attn.q_proj.qweight)
    assert torch.equal(logits(model), logits(reference))
    assert torch.equal(greedy(model), greedy(reference))
    # -- layers left in float (lm_head) are still offloaded and still work
    assert model.lm_head.weight.device.type == "meta"


def test_offloaded_model_saves_and_loads_identically(float_dir, reference, tmp_path):
    model, _ = convert_model(offloaded(float_dir, tmp_path), CONFIG, progress=False)
    save_quantized(model, tmp_path / "quantized", config=CONFIG)
    loaded = load_quantized(tmp_path / "quantized")
    assert torch.equal(loaded.lm_head.weight, load(float_dir).lm_head.weight)
    assert torch.equal(logits(loaded), logits(reference))
    assert torch.equal(greedy(loaded), greedy(reference))


def test_calibration_on_offloaded_layers_is_refused(float_dir, tmp_path):
    scheme = dataclasses.replace(scheme_from_name("w4a16", group_size=16), algorithm="gptq")
    config = QuantConfig(scheme)
    model = offloaded(float_dir, tmp_path)
    with pytest.raises(QuantizationError, match="offloaded by accelerate"):
        convert_model(model, config, calibration_data=TOKENS, progress=False)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


def test_fully_offloaded_tied_model_saves_its_tie(tmp_path):
    """Everything on disk, embeddings tied to lm_head: the checkpoint keeps them tied."""
    directory = save_tiny_llama(tmp_path / "float", tied=True)
    reference, _ = convert_model(load(directory), CONFIG, progress=False)
    model = load(
        directory, device_map="auto", max_memory={"cpu": 1}, offload_folder=str(tmp_path / "off")
    )
    assert set(model.hf_device_map.values()) == {"disk"}
    logits(model)  # -- a forward leaves accelerate's meta placeholders untied
    model, _ = convert_model(model, CONFIG, progress=False)
    assert torch.equal(logits(model), logits(reference))
    save_quantized(model, tmp_path / "quantized", config=CONFIG)
    loaded = load_quantized(tmp_path / "quantized")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(logits(loaded), logits(reference))


def test_offloaded_fused_experts_are_refused(tmp_path):
    tiny_hf_model("mixtral", num_hidden_layers=2).save_pretrained(tmp_path / "float")
    model = load(
        tmp_path / "float",
        device_map="auto",
        max_memory={"cpu": 1},
        offload_folder=str(tmp_path / "off"),
    )
    with pytest.raises(QuantizationError, match=r"model\.layers\.0\.mlp\.experts: fused expert"):
        convert_model(model, CONFIG, progress=False)
    assert not any(isinstance(m, (QuantLinear, QuantExperts)) for m in model.modules())
