"""Every supported Hugging Face architecture: convert, run, generate, save, load, same logits.

Tiny models with random weights are built offline from configs, one per family;
each goes through the native format and, where every quantized layer is an
``nn.Linear``, the compressed-tensors format too.
"""

import pytest
import torch
from tiny_models import TINY_ARCHITECTURES, tiny_hf_model

from torchquant import CheckpointError, QuantConfig, convert_model, scheme_from_name
from torchquant.formats.dispatch import detect_format, load_checkpoint, save_checkpoint
from torchquant.modules import QuantLinear

transformers = pytest.importorskip("transformers")

CAUSAL = [name for name in TINY_ARCHITECTURES if name != "bert"]
SCHEME = scheme_from_name("w4a16", group_size=16)


pytestmark = pytest.mark.usefixtures("one_thread")


def converted(arch: str) -> torch.nn.Module:
    model, summary = convert_model(tiny_hf_model(arch), QuantConfig(default=SCHEME), progress=False)
    assert summary.converted, arch
    return model


def outputs(model, ids):
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("arch", list(TINY_ARCHITECTURES))
def test_convert_run_save_load_identical(tmp_path, arch):
    model = converted(arch)
    ids = torch.randint(0, 64, (2, 7))
    reference = tiny_hf_model(arch)
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


@pytest.mark.parametrize(
    "arch, fmt, known, unknown, match",
    [
        pytest.param(
            "qwen2",
            "compressed-tensors",
            '"compressed-tensors"',
            '"bitsandbytes"',
            "quant_method='bitsandbytes' is not a format",
            id="quant-method",
        ),
        pytest.param(
            "gpt2",
            "gptq",
            "GPT2LMHeadModel",
            "GPT9LMHeadModel",
            "'GPT9LMHeadModel' is not a transformers model",
            id="architecture",
        ),
    ],
)
def test_unknown_name_in_config_json_is_refused(tmp_path, arch, fmt, known, unknown, match):
    save_checkpoint(converted(arch), tmp_path / "q", fmt)
    path = tmp_path / "q" / "config.json"
    path.write_text(path.read_text().replace(known, unknown))
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(tmp_path / "q")
