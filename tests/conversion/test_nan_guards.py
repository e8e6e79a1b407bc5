"""NaN/Inf tensors are refused by name before any module changes, or the model is put back.

A refusal must leave the model as it was: no layer converted before the bad one, and
after a calibration that finds NaN activations midway, the original modules, values
and devices.
"""

import dataclasses

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import tiny_llama
from torch import nn

from torchquant import QuantConfig, QuantizationError, convert_model
from torchquant.config import AWQConfig, SmoothQuantConfig, scheme_from_name
from torchquant.errors import CalibrationError
from torchquant.modules import QuantLinear
from torchquant.qat import QatLinear, convert_qat, prepare_qat
from torchquant.streaming import convert_from_safetensors

W4 = QuantConfig(scheme_from_name("w4a16", 32))
LAST = "model.layers.1.mlp.down_proj"


def two_blocks() -> nn.Module:
    return tiny_llama(layers=2, heads=4, kv_heads=2, max_position_embeddings=64)


def state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, modules: dict[str, nn.Module], state: dict) -> None:
    now = dict(model.named_modules())
    assert now.keys() == modules.keys()
    assert all(now[name] is module for name, module in modules.items())
    got = model.state_dict()
    assert got.keys() == state.keys()
    for name, value in state.items():
        assert got[name].device == value.device, name
        torch.testing.assert_close(got[name], value, rtol=0, atol=0, equal_nan=True, msg=name)


def poison(tensor: torch.Tensor, value: float = float("nan")) -> None:
    with torch.no_grad():
        tensor.view(-1)[7] = value


def tokens(n: int = 4, seq_len: int = 16) -> torch.Tensor:
    return torch.randint(0, 96, (n, seq_len), generator=torch.Generator().manual_seed(0))


# -- QAT


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_prepare_qat_refuses_a_nonfinite_weight_naming_the_layer(bad):
    model = two_blocks()
    poison(model.get_submodule(LAST).weight, bad)
    modules, state = dict(model.named_modules()), state_copy(model)
    with pytest.raises(QuantizationError, match=rf"{LAST}\.weight contains 1 NaN/Inf"):
        prepare_qat(model, W4, progress=False)
    assert_unchanged(model, modules, state)


@pytest.mark.parametrize("tensor", ["weight", "weight_scales", "bias"])
def test_convert_qat_refuses_a_layer_that_went_nonfinite_in_training(tensor):
    model = two_blocks()
    model.model.layers[1].mlp.down_proj.bias = nn.Parameter(torch.zeros(64))
    prepare_qat(model, W4, progress=False)
    poison(getattr(model.get_submodule(LAST), tensor))
    modules = dict(model.named_modules())
    with pytest.raises(QuantizationError, match=rf"{LAST}\.{tensor} contains 1 NaN/Inf"):
        convert_qat(model, progress=False)
    assert dict(model.named_modules()) == modules  # -- no layer converted
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


def test_convert_model_refuses_a_nonfinite_qat_layer_before_converting_any():
    model = two_blocks()
    prepare_qat(model, W4, progress=False)
    poison(model.get_submodule(LAST).weight)
    with pytest.raises(QuantizationError, match=rf"{LAST}\.weight contains 1 NaN/Inf"):
        convert_model(model, W4, progress=False)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    assert isinstance(model.model.layers[0].self_attn.q_proj, QatLinear)


# -- convert_model


@pytest.mark.parametrize("tensor", ["weight", "bias"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_round_to_nearest_refuses_the_last_layer_before_converting_the_first(tensor, bad):
    model = two_blocks()
    model.model.layers[1].mlp.down_proj.bias = nn.Parameter(torch.zeros(64))
    poison(getattr(model.get_submodule(LAST), tensor), bad)
    modules, state = dict(model.named_modules()), state_copy(model)
    with pytest.raises(QuantizationError, match=rf"{LAST}\.{tensor} contains 1 NaN/Inf"):
        convert_model(model, W4, progress=False)
    assert_unchanged(model, modules, state)


def test_calibrated_conversion_refuses_a_nan_weight_before_any_change():
    model = two_blocks()
    poison(model.get_submodule(LAST).weight)
    modules, state = dict(model.named_modules()), state_copy(model)
    gptq = QuantConfig(dataclasses.replace(scheme_from_name("w4a16", 32), algorithm="gptq"))
    with pytest.raises(QuantizationError, match=rf"{LAST}\.weight contains 1 NaN/Inf"):
        convert_model(model, gptq, calibration_data=tokens(), progress=False)
    assert_unchanged(model, modules, state)


def test_a_nan_norm_that_calibration_runs_through_leaves_the_model_as_it_was():
    model = two_blocks()
    poison(model.get_parameter("model.layers.1.post_attention_layernorm.weight"))
    modules, state = dict(model.named_modules()), state_copy(model)
    gptq = QuantConfig(dataclasses.replace(scheme_from_name("w4a16", 32), algorithm="gptq"))
    with pytest.raises(CalibrationError, match=r"model\.layers\.1\.mlp\..*NaN/Inf"):
        convert_model(model, gptq, calibration_data=tokens(), progress=False)
    assert_unchanged(model, modules, state)


def _scheme(algorithm: str):
    if algorithm == "smoothquant":
        w8a8 = scheme_from_name("w8a8")
        return dataclasses.replace(w8a8, algorithm="smoothquant", smoothquant=SmoothQuantConfig())
    awq = AWQConfig(grid=4, clip_grid=4, max_tokens=64)
    return dataclasses.replace(scheme_from_name("w4a16", 32), algorithm=algorithm, awq=awq)


@pytest.mark.parametrize("algorithm", ["gptq", "awq", "smoothquant"])
def test_nan_activations_midway_put_the_model_back_as_it_was(algorithm):
    model = two_blocks()

    def nan_out(module, args, output):
        return output * float("nan")

    # -- finite weights, but the second block's MLP activations turn NaN
    model.model.layers[1].mlp.act_fn.register_forward_hook(nan_out)
    modules, state = dict(model.named_modules()), state_copy(model)
    with pytest.raises(CalibrationError, match="NaN/Inf"):
        convert_model(
            model, QuantConfig(_scheme(algorithm)), calibration_data=tokens(), progress=False
        )
    assert_unchanged(model, modules, state)


# -- streaming conversion


def streamed_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.LayerNorm(96), nn.Linear(96, 32, bias=False))


@pytest.mark.parametrize("tensor", ["1.weight", "1.bias", "0.bias", "2.weight"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_streaming_refuses_every_nonfinite_float_tensor_by_name(tmp_path, tensor, bad):
    state = streamed_model().state_dict()
    poison(state[tensor], bad)
    save_file(state, str(tmp_path / "f.safetensors"))
    with torch.device("meta"):
        skeleton = streamed_model()
    modules = dict(skeleton.named_modules())
    match = rf"{tensor} contains 1 NaN/Inf value\(s\): tensor '{tensor}' in f\.safetensors"
    with pytest.raises(QuantizationError, match=match):
        convert_from_safetensors(skeleton, [tmp_path / "f.safetensors"], W4, progress=False)
    assert dict(skeleton.named_modules()) == modules  # -- nothing swapped in
