"""prepare_qat -> train -> convert_qat on tiny causal LMs; training tools; bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import tiny_llama as tiny_llama_of
from torch import nn

from torchquant import (
    ConfigError,
    QuantConfig,
    QuantizationError,
    QuantLinear,
    convert_model,
    scheme_from_name,
)
from torchquant.qat import QatLinear, check_loss, check_qat_state, convert_qat, prepare_qat

pytest.importorskip("transformers")

W4 = QuantConfig(scheme_from_name("w4a16", 32))


def tiny_llama() -> nn.Module:
    """Two Llama blocks (14 linears) with grouped-query attention."""
    return tiny_llama_of(layers=2, heads=4, kv_heads=2, max_position_embeddings=64)


def _ids(batch: int = 2, seq: int = 16) -> torch.Tensor:
    return torch.randint(0, 96, (batch, seq))


def _train_steps(model: nn.Module, steps: int = 3, **forward) -> list[float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(steps):
        x = _ids()
        loss = model(x, labels=x, **forward).loss
        losses.append(check_loss(loss, model))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return losses


def test_prepare_uses_the_config_matcher_and_shares_weights():
    model = tiny_llama()
    up = model.model.layers[0].mlp.up_proj.weight
    config = QuantConfig(
        "w4a16", overrides={"*.down_proj": "w8a16", "model.layers.1.self_attn.*": None}
    )
    model, summary = prepare_qat(model, config, progress=False)
    assert model.model.layers[0].mlp.up_proj.weight is up  # no copy
    assert isinstance(model.model.layers[0].mlp.down_proj, QatLinear)
    assert model.model.layers[0].mlp.down_proj.scheme.weight.bits == 8
    assert not isinstance(model.model.layers[1].self_attn.q_proj, QatLinear)
    assert not isinstance(model.lm_head, QatLinear)
    # the same plan convert_model makes
    _, ptq_summary = convert_model(tiny_llama(), config, progress=False)
    assert summary.converted == ptq_summary.converted
    assert summary.skipped == ptq_summary.skipped


def test_prepare_train_convert_gives_the_same_function():
    model, _ = prepare_qat(tiny_llama(), W4, progress=False)
    losses = _train_steps(model, steps=4)
    assert all(torch.isfinite(torch.tensor(losses)))
    check_qat_state(model)
    x = _ids()
    with torch.no_grad():
        fake = model(x).logits
        model, summary = convert_qat(model, W4, progress=False)
        out = model(x).logits
    assert isinstance(model.model.layers[0].mlp.up_proj, QuantLinear)
    assert len(summary.converted) == 14
    rel = ((out - fake).norm() / fake.norm()).item()
    assert rel < 1e-5


def test_convert_model_on_a_prepared_model_keeps_the_learned_scales():
    model, _ = prepare_qat(tiny_llama(), W4, progress=False)
    _train_steps(model, steps=2)
    a = copy.deepcopy(model)
    x = _ids()
    with torch.no_grad():
        expected = convert_qat(a, progress=False)[0](x).logits
        out = convert_model(model, W4, progress=False)[0](x).logits
    assert torch.equal(out, expected)


def test_starting_from_ptq_scales_reproduces_the_ptq_model():
    model = tiny_llama()
    ptq, _ = convert_model(copy.deepcopy(model), W4, progress=False)
    model, _ = prepare_qat(model, W4, ptq_model=ptq, progress=False)
    x = _ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ptq(x).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="ptq_model has no QuantLinear"):
        prepare_qat(tiny_llama(), W4, ptq_model=tiny_llama(), progress=False)


def test_autocast_bf16_and_gradient_checkpointing():
    model, _ = prepare_qat(tiny_llama(), W4, progress=False)
    model.train()
    x = _ids()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x, labels=x).loss
    loss.backward()
    layer = model.model.layers[0].mlp.up_proj
    grad = layer.weight_scales.grad
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0

    # checkpointing recomputes the forward in the backward: the same gradients
    grads = {}
    for checkpointing in (False, True):
        model.zero_grad()
        if checkpointing:
            enable = getattr(model, "activation_checkpointing_enable", None)
            (enable or model.gradient_checkpointing_enable)({"use_reentrant": False})
        model(x, labels=x).loss.backward()
        grads[checkpointing] = layer.weight_scales.grad.clone()
    torch.testing.assert_close(grads[True], grads[False])


def test_torch_compile_traces_the_fake_quant_op():
    model, _ = prepare_qat(tiny_llama(), W4, progress=False)
    x = _ids()
    ref = model(x).logits
    ref.sum().backward()
    layer = model.model.layers[0].mlp.up_proj
    ref_grad = layer.weight_scales.grad.clone()
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=False)
    out = compiled(x).logits
    out.sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(layer.weight_scales.grad, ref_grad)


# -- bad input


def test_no_matching_layer_is_an_error():
    model = nn.Sequential()
    model.add_module("lm_head", nn.Linear(8, 8))
    with pytest.raises(ConfigError, match="no linear layer matches the config"):
        prepare_qat(model, W4, progress=False)


def test_convert_of_an_unprepared_model_is_an_error():
    with pytest.raises(QuantizationError, match="no QatLinear layers; call prepare_qat"):
        convert_qat(tiny_llama(), progress=False)


def test_preparing_twice_is_an_error():
    model, _ = prepare_qat(tiny_llama(), W4, progress=False)
    with pytest.raises(QuantizationError, match="already has QatLinear"):
        prepare_qat(model, W4, progress=False)


def test_mismatched_config_on_convert_names_the_layer():
    model, _ = prepare_qat(tiny_llama(), W4, progress=False)
    other = QuantConfig(scheme_from_name("w3a16", 32))
    with pytest.raises(ConfigError, match=r"model.layers.0.self_attn.q_proj: trained as w-int4"):
        convert_qat(copy.deepcopy(model), other, progress=False)
    with pytest.raises(ConfigError, match="config asks for skipping it"):
        convert_model(model, QuantConfig(W4.default, overrides={"*.q_proj": None}), progress=False)


def test_diverging_scale_gives_a_clear_error():
    model, _ = prepare_qat(tiny_llama(), W4, progress=False)
    layer = model.model.layers[1].mlp.gate_proj
    with torch.no_grad():
        layer.weight_scales[3, 0] = float("nan")
    x = _ids()
    loss = model(x, labels=x).loss
    assert not torch.isfinite(loss)
    with pytest.raises(
        QuantizationError,
        match=r"loss is nan at step 7: model.layers.1.mlp.gate_proj.weight_scales: 1 NaN",
    ):
        check_loss(loss, model, step=7)
    with pytest.raises(QuantizationError, match="gate_proj.weight_scales"):
        check_qat_state(model)
    # a scale pushed to zero or below is clamped in the forward and reported
    with torch.no_grad():
        layer.weight_scales[3, 0] = -0.5
    assert torch.isfinite(model(x, labels=x).loss)
    with pytest.raises(QuantizationError, match="at or below min_scale"):
        check_qat_state(model)


def test_distributed_data_parallel_syncs_all_qat_state(tmp_path):
    # one CPU process (gloo): DDP must see every trainable tensor as a parameter and
    # every one must get a gradient, or its reducer raises at backward time
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        model, _ = prepare_qat(tiny_llama(), W4, progress=False)
        model.lm_head.requires_grad_(False)
        model.model.embed_tokens.requires_grad_(False)
        ddp = nn.parallel.DistributedDataParallel(model)
        x = _ids()
        ddp(x, labels=x).loss.backward()
        layer = model.model.layers[0].self_attn.v_proj
        assert layer.weight_scales.grad is not None and layer.weight_zeros.grad is not None
    finally:
        dist.destroy_process_group()
