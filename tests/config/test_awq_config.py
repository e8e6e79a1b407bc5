"""AWQConfig's search_rows: validated, and written only where it is set."""

import json

import pytest

from torchquant.config import AWQConfig, QuantConfig, QuantScheme, WeightQuant
from torchquant.errors import ConfigError

W4 = WeightQuant(bits=4, group_size=32, symmetric=False)


@pytest.mark.parametrize("bad", [0, -3, 1.5, "1024", True])
def test_search_rows_must_be_a_positive_int(bad):
    with pytest.raises(ConfigError, match="awq.search_rows"):
        AWQConfig(search_rows=bad)


def test_default_search_rows_serializes_as_before():
    assert AWQConfig().search_rows is None
    data = QuantScheme(W4, algorithm="awq").to_dict()
    assert "search_rows" not in data["awq"]
    assert "max_tokens" in data["awq"]


def test_search_rows_round_trips():
    config = QuantConfig(QuantScheme(W4, algorithm="awq", awq=AWQConfig(search_rows=256)))
    again = QuantConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again.default.awq.search_rows == 256 and again == config
