import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from torchquant import CheckpointError, ConfigError, QuantConfig, convert_model
from torchquant.streaming import convert_from_safetensors


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.LayerNorm(96), nn.Linear(96, 32, bias=False))


def skeleton():
    with torch.device("meta"):
        return make_model()


CONFIG = QuantConfig("w4a16", overrides={"2": "w8a8"}, ignore=())


def test_streamed_conversion_matches_convert_model(tmp_path):
    float_model = make_model()
    save_file(float_model.state_dict(), str(tmp_path / "f.safetensors"))
    want, _ = convert_model(make_model(), CONFIG, progress=False)
    got, summary = convert_from_safetensors(
        skeleton(), [tmp_path / "f.safetensors"], CONFIG, progress=False
    )
    assert set(summary.converted) == {"0", "2"}
    assert want.state_dict().keys() == got.state_dict().keys()
    for k, v in want.state_dict().items():
        assert torch.equal(v, got.state_dict()[k]), k
    x = torch.randn(3, 64)
    assert torch.equal(want(x), got(x))


def test_streamed_conversion_checks_shapes_and_names(tmp_path):
    state = make_model().state_dict()
    state["0.weight"] = torch.zeros(96, 65)
    save_file(state, str(tmp_path / "f.safetensors"))
    with pytest.raises(CheckpointError, match=r"'0.weight'.*\(96, 65\).*\(96, 64\)"):
        convert_from_safetensors(skeleton(), [tmp_path / "f.safetensors"], CONFIG, progress=False)
    del state["0.weight"]
    save_file(state, str(tmp_path / "f.safetensors"))
    with pytest.raises(CheckpointError, match="'0.weight' is not in the float weights"):
        convert_from_safetensors(skeleton(), [tmp_path / "f.safetensors"], CONFIG, progress=False)


@pytest.mark.parametrize(
    "scheme",
    [
        {"weight": {"bits": 4, "group_size": 32}, "algorithm": "gptq"},
        {"weight": {"bits": 8}, "activation": {"granularity": "tensor", "dynamic": False}},
    ],
    ids=["gptq", "static-activation"],
)
def test_streamed_conversion_refuses_schemes_that_need_calibration(tmp_path, scheme):
    save_file(make_model().state_dict(), str(tmp_path / "f.safetensors"))
    config = QuantConfig(scheme, ignore=())
    with pytest.raises(ConfigError, match="need calibration"):
        convert_from_safetensors(skeleton(), [tmp_path / "f.safetensors"], config, progress=False)
