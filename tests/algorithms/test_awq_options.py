"""AWQ's closed alpha grid and float propagation, the defaults of MXFP4 with
compressed-tensors scale rounding (no clip search, duo scaling on the closed grid, float
propagation) and the earlier ones every other format (spec-rounded MXFP4 too) keeps."""

import json

import pytest
import torch
from tiny_models import tiny_llama

from torchquant import AWQConfig, ConfigError, QuantConfig, QuantScheme, WeightQuant, convert_model
from torchquant.algorithms.awq import closed_scale_candidates, scale_candidates
from torchquant.calibration.engine import propagates_float

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 128
CT_MX = WeightQuant(type="mxfp4", scale_rounding="compressed-tensors")
MX_AWQ = QuantScheme(CT_MX, algorithm="awq")
INT_AWQ = QuantScheme(WeightQuant(bits=4, group_size=32, symmetric=False), algorithm="awq")


@pytest.mark.parametrize(
    "weight",
    [WeightQuant(bits=4, group_size=32), WeightQuant(type="nvfp4"), WeightQuant(type="mxfp4")],
)
def test_other_formats_keep_the_earlier_defaults(weight):
    cfg = QuantScheme(weight, algorithm="awq").awq
    assert (cfg.clip, cfg.duo_scaling, cfg.alpha_grid, cfg.propagate) == (
        True,
        False,
        "open",
        "quantized",
    )


def test_int_awq_serializes_as_before():
    data = INT_AWQ.to_dict()["awq"]
    assert "alpha_grid" not in data and "propagate" not in data
    assert data["clip"] is True and data["duo_scaling"] is False


def test_mxfp4_awq_defaults():
    cfg = MX_AWQ.awq
    assert (cfg.clip, cfg.duo_scaling, cfg.alpha_grid, cfg.propagate) == (
        False,
        True,
        "closed",
        "float",
    )


def test_mxfp4_awq_round_trips():
    config = QuantConfig(MX_AWQ)
    data = json.loads(json.dumps(config.to_dict()))
    assert data["default"]["awq"]["propagate"] == "float"
    assert QuantConfig.from_dict(data) == config


def test_explicit_fields_override_the_mxfp4_defaults():
    cfg = AWQConfig(clip=True, duo_scaling=False, alpha_grid="open", propagate="quantized")
    got = QuantScheme(CT_MX, algorithm="awq", awq=cfg).awq
    assert got == cfg


def test_a_non_awq_mxfp4_scheme_keeps_the_earlier_awq_fields():
    rtn = QuantScheme(CT_MX)
    assert rtn.awq == INT_AWQ.awq
    assert "propagate" not in rtn.to_dict()["awq"]


@pytest.mark.parametrize(
    ("field", "value"), [("alpha_grid", "half"), ("propagate", "fp16"), ("clip", "yes")]
)
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ConfigError, match=f"awq.{field}"):
        AWQConfig(**{field: value})


@pytest.mark.parametrize(("duo", "least"), [(False, 2), (True, 3), ("both", 4)])
def test_a_closed_grid_needs_enough_points(duo, least):
    with pytest.raises(ConfigError, match="awq.grid"):
        AWQConfig(grid=least - 1, duo_scaling=duo, alpha_grid="closed")
    with pytest.raises(ConfigError, match="awq.grid"):  # -- MXFP4's closed grid, resolved
        QuantScheme(CT_MX, algorithm="awq", awq=AWQConfig(grid=least - 1, duo_scaling=duo))
    AWQConfig(grid=least, duo_scaling=duo, alpha_grid="closed")


def test_closed_grid_with_duo_scaling_leads_with_the_unscaled_weights():
    act, wm = torch.tensor([4.0, 1.0, 2.0, 0.5]), torch.tensor([0.5, 1.0, 0.25, 0.8])
    cands = closed_scale_candidates(act, 20, True, wm)
    assert len(cands) == 20
    assert torch.equal(cands[0][1], torch.ones(4))
    alphas = [alpha for alpha, _ in cands[1:]]
    assert alphas[0] == 0.0 and alphas[-1] == 1.0 and len(set(alphas)) == 19
    raw = act / (wm.pow(0.0) + 1e-4)  # -- alpha 1: the whole activation term
    torch.testing.assert_close(cands[-1][1], raw / (raw.max() * raw.min()).sqrt())
    for _, s in cands:
        assert float(s.max() * s.min()) == pytest.approx(1.0, rel=1e-4)


def test_closed_grid_reaches_alpha_one_where_the_open_one_stops_short():
    act = torch.rand(16) + 0.1
    closed = [alpha for alpha, _ in closed_scale_candidates(act, 10, False)]
    assert closed[0] == 0.0 and closed[-1] == 1.0 and len(closed) == 10
    assert max(alpha for alpha, _ in scale_candidates(act, 10)) == 0.9
    both = closed_scale_candidates(act, 10, "both", torch.rand(16) + 0.1)
    assert [alpha for alpha, _ in both[::2]] == [alpha for alpha, _ in both[1::2]]
    assert len(both) == 10 and both[-1][0] == 1.0


def test_propagates_float_only_for_a_block_of_float_propagating_awq():
    assert propagates_float({"q": MX_AWQ, "k": MX_AWQ})
    assert not propagates_float({"q": INT_AWQ})
    assert not propagates_float({"q": MX_AWQ, "k": QuantScheme(CT_MX)})
    assert not propagates_float({})


def _block_inputs_seen(scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """What the second block receives while calibrating (its statistics pass)."""
    model = tiny_llama(vocab=VOCAB, hidden=64, inter=128, layers=2, heads=4, kv_heads=2)
    seen = []
    hook = model.model.layers[1].register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(args[0] if args else kwargs["hidden_states"]),
        with_kwargs=True,
    )
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    awq = AWQConfig(grid=4, max_tokens=64, propagate=scheme.awq.propagate)
    awq_scheme = QuantScheme(scheme.weight, algorithm="awq", awq=awq)
    convert_model(model, QuantConfig(awq_scheme), calibration_data=tokens, progress=False)
    hook.remove()
    return seen[0], tokens


def test_float_propagation_feeds_the_next_block_the_float_models_activations():
    seen, tokens = _block_inputs_seen(MX_AWQ)
    model = tiny_llama(vocab=VOCAB, hidden=64, inter=128, layers=2, heads=4, kv_heads=2)
    want = []
    model.model.layers[1].register_forward_pre_hook(
        lambda m, args, kwargs: want.append(args[0] if args else kwargs["hidden_states"]),
        with_kwargs=True,
    )
    with torch.no_grad():
        model(tokens[:1])
    torch.testing.assert_close(seen, want[0], rtol=1e-4, atol=1e-5)
    quantized = QuantScheme(CT_MX, algorithm="awq",
                            awq=AWQConfig(propagate="quantized"))  # fmt: skip
    seen_q, _ = _block_inputs_seen(quantized)
    assert not torch.allclose(seen_q, want[0], rtol=1e-4, atol=1e-5)
