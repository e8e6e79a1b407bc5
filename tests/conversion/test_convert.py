import pytest
import torch
from torch import nn

from torchquant import ConfigError, QuantConfig, QuantizationError, QuantLinear, convert_model


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(64, 128)
        self.down = nn.Linear(128, 64)
        self.lm_head = nn.Linear(64, 10, bias=False)

    def forward(self, x):
        return self.lm_head(self.down(torch.relu(self.up(x))))


def test_convert_replaces_and_reports():
    model = Tiny()
    x = torch.randn(3, 64)
    ref = model(x)
    model, summary = convert_model(model, QuantConfig("w8a16"), progress=False)
    assert isinstance(model.up, QuantLinear) and isinstance(model.down, QuantLinear)
    assert isinstance(model.lm_head, nn.Linear)
    assert summary.skipped == {"lm_head": "ignored by 'lm_head'"}
    assert set(summary.converted) == {"up", "down"}
    assert summary.bytes_after < summary.bytes_before / 3
    assert ((model(x) - ref).norm() / ref.norm()) < 0.02
    assert "converted 2 layer(s)" in summary.table()


def test_overrides_and_mixed_schemes():
    config = QuantConfig("w4a16", overrides={"down": "w8a8", "up": None}, ignore=())
    model, summary = convert_model(Tiny(), config, progress=False)
    assert isinstance(model.up, nn.Linear)
    assert model.down.scheme.activation is not None
    assert model.lm_head.scheme.weight.bits == 4
    assert summary.skipped == {"up": "skipped by 'up'"}


def test_unknown_override_target_is_an_error():
    with pytest.raises(ConfigError, match="'mlp.gate' matches no linear layer"):
        convert_model(Tiny(), QuantConfig("w4a16", overrides={"mlp.gate": "w8a16"}))


def test_meta_weights_are_refused():
    with pytest.raises(QuantizationError, match="meta"):
        convert_model(Tiny().to("meta"), QuantConfig("w4a16"), progress=False)


def test_config_type_is_checked():
    with pytest.raises(ConfigError, match="QuantConfig"):
        convert_model(Tiny(), "w4a16")
