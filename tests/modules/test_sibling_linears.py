"""Sibling projections (q/k/v, gate/up) fused into one launch: same outputs, fewer launches.

On CPU nothing is fused by default; these tests ask for it (``devices=("cpu",)``) so that
the grouping, the views and the run-time protocol run here, each projection's fused
output checked against the same model unfused.  The GPU tests convert on CUDA, where it
is the default.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from kernel_utils import DispatchedOps, compiled_logits_and_graph
from safetensors import safe_open
from tiny_models import tiny_llama
from torch import nn

from torchquant import QuantConfig, QuantLinear, convert_model
from torchquant.modules import fuse_sibling_linears
from torchquant.modules.quant_linear import SIBLINGS_KEY
from torchquant.ops import common
from torchquant.serialization import load_quantized, save_quantized

LAYERS = 2


def _llama(scheme: str = "w4a16", dtype=torch.bfloat16, **overrides):
    model = tiny_llama(
        hidden=128, inter=256, layers=LAYERS, heads=4, kv_heads=2, dtype=dtype, vocab=96
    )
    config = QuantConfig(scheme, overrides=overrides) if overrides else QuantConfig(scheme)
    model, _ = convert_model(model, config, progress=False)
    return model


def _logits_and_launches(model, ids):
    """Logits, and the quantized ops dispatched (eager CPU calls normally skip the
    dispatcher; here they go through it so they can be counted)."""
    with mock.patch.object(common, "_skips_dispatcher", lambda x: False), DispatchedOps() as ops:
        with torch.no_grad():
            logits = model(ids, use_cache=False).logits
    return logits, sum(name.startswith("linear_") for name in ops.names)


@pytest.mark.parametrize("scheme", ["w4a16", "w8a16", "w3a16"])
def test_fused_siblings_give_the_same_logits_with_fewer_launches(scheme):
    model = _llama(scheme)
    ids = torch.randint(0, 96, (1, 1))
    separate, launches = _logits_and_launches(model, ids)
    groups = fuse_sibling_linears(model, devices=("cpu",))
    assert len(groups) == 2 * LAYERS  # -- q/k/v and gate/up of every layer
    fused, fused_launches = _logits_and_launches(model, ids)
    assert launches == 7 * LAYERS and fused_launches == 4 * LAYERS
    torch.testing.assert_close(fused, separate, rtol=1e-2, atol=1e-2)
    assert all(g.pending is None for g in groups)  # -- every slice was handed out


def _saved(model, folder):
    """The tensors and metadata ``save_quantized`` writes (safetensors orders the metadata
    keys of a file differently from one write to the next, so the bytes are not compared)."""
    save_quantized(model, folder)
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_siblings_hold_views_of_one_weight_and_save_the_same_tensors(tmp_path):
    model = _llama()
    tensors, metadata = _saved(model, tmp_path / "separate")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    nbytes = sum(m.nbytes() for m in model.modules() if isinstance(m, QuantLinear))
    groups = fuse_sibling_linears(model, devices=("cpu",))
    after = model.state_dict()
    assert after.keys() == before.keys()  # -- the fused layer is not part of the model
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert sum(m.nbytes() for m in model.modules() if isinstance(m, QuantLinear)) == nbytes
    fused_tensors, fused_metadata = _saved(model, tmp_path / "fused")
    assert fused_metadata == metadata and fused_tensors.keys() == tensors.keys()
    assert all(torch.equal(fused_tensors[k], t) for k, t in tensors.items())
    for group in groups:
        assert group.nbytes() == sum(m.nbytes() for m in group.members)
        for name, whole in group.fused.named_buffers():
            for m in group.members:
                view = getattr(m, name)
                assert view.untyped_storage().data_ptr() == whole.untyped_storage().data_ptr()


def test_sibling_called_with_another_input_computes_its_own():
    model = _llama()
    attn = model.model.layers[0].self_attn
    x, other = torch.randn(2, 1, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = [attn.k_proj(x), attn.k_proj(other), attn.v_proj(x)]
        fuse_sibling_linears(model, devices=("cpu",))
        attn.q_proj(x)
        assert torch.equal(attn.k_proj(other), expected[1])  # -- not the pending output
        assert torch.equal(attn.v_proj(x), expected[2])  # -- still served by the launch
        attn.q_proj(x)
        x.mul_(2)  # -- written between the calls: its version changed
        torch.testing.assert_close(attn.k_proj(x), 2 * expected[0], rtol=2e-2, atol=2e-2)
        x.div_(2)
        handle = attn.k_proj.register_forward_pre_hook(lambda m, args: (args[0] + 1,))
        attn.q_proj(x)
        hooked = attn.k_proj(x)
        handle.remove()
        torch.testing.assert_close(hooked, attn.k_proj(x + 1), rtol=0, atol=0)


def test_written_or_replaced_weights_are_seen():
    model = _llama()
    mlp = model.model.layers[0].mlp
    x = torch.randn(1, 128, dtype=torch.bfloat16)
    (group,) = (
        g for g in fuse_sibling_linears(model, devices=("cpu",)) if mlp.up_proj in g.members
    )
    with torch.no_grad():
        mlp.gate_proj(x)
        mlp.up_proj.scales.mul_(2)  # -- after the launch: up's slice would be stale
        up = mlp.up_proj(x)
        assert mlp.up_proj.__dict__[SIBLINGS_KEY][0] is group
        mlp.gate_proj(x)
        torch.testing.assert_close(mlp.up_proj(x), up, rtol=0, atol=0)  # -- launch saw it
        mlp.up_proj.scales = mlp.up_proj.scales.clone()  # -- no longer the group's view
        assert not group.holds_all()
        assert group.output_of(0, x) is None


def test_moving_a_model_drops_its_groups():
    model = _llama()
    fuse_sibling_linears(model, devices=("cpu",))
    model.float()
    assert not any(SIBLINGS_KEY in m.__dict__ for m in model.modules())
    assert len(fuse_sibling_linears(model, devices=("cpu",))) == 2 * LAYERS


def test_siblings_that_differ_are_not_fused():
    model = _llama(**{"*.k_proj": "w8a16", "re:.*0\\.mlp\\.up_proj": None})
    groups = fuse_sibling_linears(model, devices=("cpu",))
    assert [g.members[0].out_features for g in groups] == [256]  # -- layer 1's gate/up only
    assert groups[0].members == [
        model.model.layers[1].mlp.gate_proj,
        model.model.layers[1].mlp.up_proj,
    ]


def test_cpu_models_are_not_fused_by_default():
    model = _llama()
    assert not any(SIBLINGS_KEY in m.__dict__ for m in model.modules())
    assert fuse_sibling_linears(model) == []


def test_fused_siblings_compile_fullgraph_into_one_launch_each():
    model = _llama()
    ids = torch.randint(0, 96, (1, 1))
    with torch.no_grad():
        eager = model(ids, use_cache=False).logits
    fuse_sibling_linears(model, devices=("cpu",))
    out, graph = compiled_logits_and_graph(model, ids)
    torch.testing.assert_close(out, eager, rtol=1e-2, atol=1e-2)
    ops = [n for n in graph.graph.nodes if "torchquant" in str(n.target)]
    assert len(ops) == 4 * LAYERS


@pytest.mark.gpu
def test_cuda_fused_projections_replay_in_a_cuda_graph():
    model = _llama().cuda()  # -- moved after converting: no groups until fused again
    assert not any(SIBLINGS_KEY in m.__dict__ for m in model.modules())
    layer = model.model.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    h = torch.randn(1, 128, dtype=torch.bfloat16, device="cuda")

    def step():
        return attn.q_proj(h), attn.k_proj(h), attn.v_proj(h), mlp(h)

    with torch.no_grad():
        separate = step()
        assert len(fuse_sibling_linears(model)) == 2 * LAYERS
        fused = step()  # -- also the warm-up: tunes the fused shapes' kernels
        for out, ref in zip(fused, separate, strict=True):
            torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = step()
        h.copy_(torch.randn_like(h))
        graph.replay()
        torch.cuda.synchronize()
        for out, ref in zip(captured, step(), strict=True):
            torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.gpu
def test_cuda_converted_model_is_fused_and_compiles():
    model = tiny_llama(hidden=128, inter=256, layers=LAYERS, heads=4, kv_heads=2, vocab=96)
    model = model.to(device="cuda", dtype=torch.bfloat16)
    model, _ = convert_model(model, QuantConfig("w4a16"), progress=False)
    groups = [m.__dict__[SIBLINGS_KEY][0] for m in model.modules() if SIBLINGS_KEY in m.__dict__]
    assert len({id(g) for g in groups}) == 2 * LAYERS
    ids = torch.randint(0, 96, (1, 1), device="cuda")
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        eager = model(ids, use_cache=False).logits
        torch.testing.assert_close(
            compiled(ids, use_cache=False).logits, eager, rtol=2e-2, atol=2e-2
        )


@pytest.mark.gpu
def test_loading_onto_cuda_fuses_and_saves_the_same_tensors(tmp_path):
    model = _llama()
    tensors, _ = _saved(model, tmp_path / "cpu")
    loaded = load_quantized(tmp_path / "cpu", device="cuda")
    groups = {
        id(m.__dict__[SIBLINGS_KEY][0]) for m in loaded.modules() if SIBLINGS_KEY in m.__dict__
    }
    assert len(groups) == 2 * LAYERS
    again, _ = _saved(loaded, tmp_path / "cuda")
    assert all(torch.equal(again[k], t) for k, t in tensors.items())


class BiasedAttention(nn.Module):
    """q/k/v with biases (as Qwen2's), called one after another on one input."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(128, 128)
        self.k_proj = nn.Linear(128, 64)
        self.v_proj = nn.Linear(128, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)


def test_biases_are_concatenated_with_their_rows():
    model = BiasedAttention().to(torch.bfloat16)
    model, _ = convert_model(model, QuantConfig("w4a16", ignore=()), progress=False)
    x = torch.randn(1, 1, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        separate = model(x)
        (group,) = fuse_sibling_linears(model, devices=("cpu",))
        fused = model(x)
    assert group.fused.bias.shape == (256,) and group.pending is None
    assert model.k_proj.bias.untyped_storage().data_ptr() == group.fused.bias.data_ptr()
    torch.testing.assert_close(fused, separate, rtol=1e-2, atol=1e-2)
