"""GPTQ from the one statistics pass (the default) and stage by stage (``sequential=True``)."""

import dataclasses

import pytest
import torch
from tiny_models import tiny_llama

from torchquant import AWQConfig, GPTQConfig, QuantConfig, QuantScheme, WeightQuant, convert_model
from torchquant.algorithms import gptq
from torchquant.calibration import block as block_module
from torchquant.calibration.stats import LayerStats, attach

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 96
SOLVE = gptq.gptq_quantize


def scheme(**gptq_params) -> QuantScheme:
    weight = WeightQuant(bits=4, group_size=32, symmetric=False)
    return QuantScheme(weight, None, "gptq", gptq=GPTQConfig(**gptq_params))


def calibrated(config_scheme: QuantScheme, record: dict | None = None, monkeypatch=None):
    """A two-block tiny Llama quantized on 4 x 32 tokens; ``record`` gets every Hessian used."""
    if record is not None:

        def keep(weight, hessian, *args, name, **kw):
            record[name.removesuffix(".weight")] = hessian.clone()
            return SOLVE(weight, hessian, *args, name=name, **kw)

        monkeypatch.setattr(gptq, "gptq_quantize", keep)
    model = tiny_llama(vocab=VOCAB, hidden=64, inter=128, layers=2, heads=4, kv_heads=2)
    ids = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(1))
    convert_model(model, QuantConfig(config_scheme), calibration_data=ids, progress=False)
    return model


def logits(model) -> torch.Tensor:
    ids = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return model(ids).logits


def test_one_pass_and_sequential_agree_and_share_the_first_stage(monkeypatch):
    one_h: dict[str, torch.Tensor] = {}
    seq_h: dict[str, torch.Tensor] = {}
    one = calibrated(scheme(), one_h, monkeypatch)
    seq = calibrated(scheme(sequential=True), seq_h, monkeypatch)
    assert set(one_h) == set(seq_h) and len(one_h) == 14
    # -- block 0's q/k/v see the float block's inputs either way: the same Hessian, bit for bit
    for rel in ("q_proj", "k_proj", "v_proj"):
        name = f"model.layers.0.self_attn.{rel}"
        assert torch.equal(one_h[name], seq_h[name])
        assert torch.equal(one.get_submodule(name).qweight, seq.get_submodule(name).qweight)
    # -- down_proj's inputs differ: float block (one pass) vs quantized stages (sequential)
    down = "model.layers.0.mlp.down_proj"
    assert not torch.equal(one_h[down], seq_h[down])
    # -- both stay close to the float model and to each other
    ref = logits(tiny_llama(vocab=VOCAB, hidden=64, inter=128, layers=2, heads=4, kv_heads=2))
    err_one = float((logits(one) - ref).norm() / ref.norm())
    err_seq = float((logits(seq) - ref).norm() / ref.norm())
    assert err_one < 0.2 and err_seq < 0.2
    assert err_one == pytest.approx(err_seq, rel=0.25)


def test_awq_scaled_inputs_get_the_rescaled_hessian_without_another_pass(monkeypatch):
    """AWQ folds ``s`` into the input norm, so q/k/v see ``x / s``: one pass rescales the
    float block's H to ``H / (s s^T)``; the sequential path regathers it from the scaled
    block (q/k/v are its first stage, nothing quantized before them)."""
    awq = AWQConfig(grid=4, clip_grid=4, max_tokens=64, rounding="gptq")
    one_h: dict[str, torch.Tensor] = {}
    seq_h: dict[str, torch.Tensor] = {}
    base = dataclasses.replace(scheme(), algorithm="awq", awq=awq)
    calibrated(base, one_h, monkeypatch)
    calibrated(dataclasses.replace(base, gptq=GPTQConfig(sequential=True)), seq_h, monkeypatch)
    for rel in ("q_proj", "k_proj", "v_proj"):
        name = f"model.layers.0.self_attn.{rel}"
        torch.testing.assert_close(one_h[name], seq_h[name], rtol=1e-4, atol=1e-5)


def test_linears_fed_one_tensor_share_one_hessian():
    torch.manual_seed(0)
    q, k = torch.nn.Linear(16, 8), torch.nn.Linear(16, 4)
    o = torch.nn.Linear(8, 16)
    stats = {rel: LayerStats(rel, want_hessian=True) for rel in ("q", "k", "o")}
    handles = attach({"q": q, "k": k, "o": o}, stats)
    batches = [torch.randn(5, 16) for _ in range(3)]
    with torch.no_grad():
        for x in batches:
            o(q(x) + k(x)[:, :1])
    for h in handles:
        h.remove()
    assert stats["k"].hessian is stats["q"].hessian  # -- computed once
    x = torch.cat(batches)
    torch.testing.assert_close(stats["q"].hessian, 2 * x.t() @ x / x.shape[0])
    assert stats["k"].tokens == stats["q"].tokens == 15
    assert stats["o"].hessian is not stats["q"].hessian


def test_a_shared_hessian_is_copied_before_it_diverges():
    """A linear that took the same tensor once and another tensor later keeps its own sums."""
    torch.manual_seed(0)
    x1, x2 = torch.randn(4, 8), torch.randn(4, 8)
    lead, follow = LayerStats("a", want_hessian=True), LayerStats("b", want_hessian=True)
    lead.update(x1)
    follow.update(x1, same_input=lead)
    assert follow.hessian is lead.hessian
    lead.update(x2)
    follow.update(-x2)  # -- not the same tensor: its own accumulation from here on
    assert follow.hessian is not lead.hessian
    both = torch.cat([x1, x2])
    torch.testing.assert_close(lead.hessian, 2 * both.t() @ both / 8)
    torch.testing.assert_close(follow.hessian, 2 * both.t() @ both / 8)  # -- (-x)(-x) = x x
    lead.update(x1)
    torch.testing.assert_close(follow.hessian, 2 * both.t() @ both / 8)  # -- not touched


def test_linears_sharing_a_hessian_share_its_factor(monkeypatch):
    """Per block, one factor for q/k/v, one for o, one for gate/up, one for down."""
    made = []
    factor = gptq.factor_hessian

    def count(hessian, *args, **kw):
        made.append(hessian)
        return factor(hessian, *args, **kw)

    monkeypatch.setattr(block_module, "factor_hessian", count)
    calibrated(scheme())
    assert len(made) == 2 * 4
    assert len({id(h) for h in made}) == len(made)
