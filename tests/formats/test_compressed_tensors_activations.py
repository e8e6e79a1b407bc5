"""compressed-tensors export and import of asymmetric INT8 and INT4 activations.

The library judges: its ``QuantizationConfig`` parses our config, and its own ``quantize``
turns an input into the codes ours do with the exported ``input_scale`` and
``input_zero_point`` (the same zero-point convention).  GPTQ and AWQ cannot hold
activation schemes and refuse them.
"""

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_llama

from torchquant import CheckpointError, QuantConfig, convert_model, scheme_from_name
from torchquant.formats.awq import save_awq
from torchquant.formats.compressed_tensors import load_compressed_tensors, save_compressed_tensors
from torchquant.formats.gptq import save_gptq
from torchquant.numerics import quantize_activation_asymmetric

pytestmark = pytest.mark.usefixtures("one_thread")
ct = pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed")

LAYER = "model.layers.0.mlp.down_proj"


def _model(name: str):
    model = tiny_llama(vocab=128, layers=1, heads=4, kv_heads=2, tie_word_embeddings=True)
    calib = torch.randint(0, 128, (4, 32)) if scheme_from_name(name).needs_calibration else None
    config = QuantConfig(default=scheme_from_name(name))
    return convert_model(model, config, calibration_data=calib, progress=False)[0]


def _input_args(folder) -> dict:
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    (args,) = {json.dumps(g["input_activations"]) for g in qc["config_groups"].values()}
    return qc, json.loads(args)  # -- every group (weight layout) has the same activations


@pytest.mark.parametrize("name", ["w8a8-static-asym", "w8a8-asym", "w8a4", "w4a4"])
def test_roundtrip_is_exact_and_the_library_parses_it(tmp_path, name):
    from compressed_tensors.quantization import QuantizationConfig

    model = _model(name)
    save_compressed_tensors(model, tmp_path / "ct")
    qc, args = _input_args(tmp_path / "ct")
    act = scheme_from_name(name).activation
    assert args["symmetric"] is act.symmetric and args["dynamic"] is act.dynamic
    assert args["num_bits"] == (4 if act.type == "int4" else 8) and args["type"] == "int"
    QuantizationConfig.model_validate(qc)
    loaded = load_compressed_tensors(tmp_path / "ct")
    assert loaded.get_submodule(LAYER).scheme == model.get_submodule(LAYER).scheme
    ids = torch.randint(0, 128, (2, 9))
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_static_zero_point_is_stored_as_the_library_reads_it(tmp_path):
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize

    model = _model("w8a8-static-asym")
    save_compressed_tensors(model, tmp_path / "ct")
    state = load_file(tmp_path / "ct" / "model.safetensors")
    scale, zero = state[f"{LAYER}.input_scale"], state[f"{LAYER}.input_zero_point"]
    assert zero.dtype == torch.int8 and zero.shape == scale.shape == (1,)
    _, args = _input_args(tmp_path / "ct")
    x = torch.randn(6, 96) * 3 + 1
    theirs = quantize(x, scale, zero, QuantizationArgs(**args), dtype=torch.int8)
    ours = quantize_activation_asymmetric(x, False, scale, zero)[0]
    assert (theirs.int() - ours.int()).abs().max() <= 1  # -- they round after adding z
    assert (theirs != ours).float().mean() < 0.02


def test_bad_zero_point_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_compressed_tensors(_model("w8a8-static-asym"), tmp_path / "ct")
    path = tmp_path / "ct" / "model.safetensors"
    state = load_file(path)
    state[f"{LAYER}.input_zero_point"] = torch.tensor([0.5])
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="input_zero_point"):
        load_compressed_tensors(tmp_path / "ct")


@pytest.mark.parametrize("save", [save_gptq, save_awq])
@pytest.mark.parametrize("name", ["w8a8-asym", "w4a4"])
def test_weight_only_formats_refuse_activation_schemes(tmp_path, save, name):
    with pytest.raises(CheckpointError, match="activations"):
        save(_model(name), tmp_path / "out")
