"""RMSNorm modules swapped for the one-kernel op: same outputs, same tensors, one op a norm.

On CPU nothing is fused by default; these tests ask for it (``devices=("cpu",)``), where
the op's CPU path is the module's own maths.  To run the Triton kernel inside a model
here, the op's CPU kernel is pointed at the CUDA implementation, which the interpreter
(``TRITON_INTERPRET=1``) runs on CPU tensors.  The GPU tests convert and load on CUDA,
where fusing is the default.
"""

from __future__ import annotations

import copy
from unittest import mock

import pytest
import torch
from kernel_utils import TOLERANCES, DispatchedOps, compiled_logits_and_graph, requires_kernels
from safetensors import safe_open
from tiny_models import tiny_llama
from torch import nn

from torchquant import QuantConfig, convert_model
from torchquant.modules import fuse_rms_norms, unfuse_rms_norms
from torchquant.ops import common
from torchquant.ops.rms_norm import rms_norm, rms_norm_cuda
from torchquant.serialization import load_quantized, save_quantized

LAYERS = 2
NORMS = 2 * LAYERS + 1  # -- two a layer and the final one


def _llama(dtype=torch.bfloat16):
    return tiny_llama(hidden=128, inter=256, layers=LAYERS, heads=4, kv_heads=2, dtype=dtype)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def _norm_ops(model, ids) -> tuple[int, int]:
    """(torchquant::rms_norm calls, aten ops) of one forward, through the dispatcher."""
    with mock.patch.object(common, "_skips_dispatcher", lambda x: False), DispatchedOps() as ops:
        _logits(model, ids)
    return ops.names.count("rms_norm"), len(ops.names)


def test_fused_norms_give_the_same_logits_with_one_op_each():
    model = _llama()
    ids = torch.randint(0, 96, (1, 5))
    plain = _logits(model, ids)
    norms, ops = _norm_ops(model, ids)
    assert norms == 0
    names = fuse_rms_norms(model, devices=("cpu",))
    assert len(names) == NORMS and "model.norm" in names
    assert torch.equal(_logits(model, ids), plain)  # -- the op's CPU path is the module's maths
    fused_norms, fused_ops = _norm_ops(model, ids)
    assert fused_norms == NORMS
    assert ops - fused_ops == NORMS * 7  # -- 8 aten ops a norm become one


@requires_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_kernel_in_a_model_gives_its_logits(dtype):
    model = _llama(dtype)
    ids = torch.randint(0, 96, (2, 6))
    plain = _logits(model, ids)
    fuse_rms_norms(model, devices=("cpu",))
    with mock.patch.dict(common._CPU_KERNELS, {rms_norm: rms_norm_cuda}):
        kernel = _logits(model, ids)
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(kernel, plain, rtol=8 * rtol, atol=8 * atol)


def _saved(folder):
    """The tensors and metadata of a saved checkpoint (safetensors orders the metadata keys
    of a file differently from one write to the next)."""
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_state_dict_and_parameters_are_untouched_and_saves_are_identical(tmp_path):
    model = _llama(torch.float32)  # -- the dtype its config.json names, for loading
    model, _ = convert_model(model, QuantConfig("w4a16"), progress=False)
    save_quantized(model, tmp_path / "plain")
    before = model.state_dict()
    weights = {name: p for name, p in model.named_parameters()}
    fuse_rms_norms(model, devices=("cpu",))
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(after[k] is before[k] or torch.equal(after[k], before[k]) for k in before)
    assert all(p is weights[name] for name, p in model.named_parameters())
    save_quantized(model, tmp_path / "fused")
    plain, plain_meta = _saved(tmp_path / "plain")
    fused, fused_meta = _saved(tmp_path / "fused")
    assert fused_meta == plain_meta and list(fused) == list(plain)
    assert all(torch.equal(fused[k], t) and fused[k].dtype == t.dtype for k, t in plain.items())
    for path in sorted((tmp_path / "plain").iterdir()):
        if path.name != "model.safetensors":  # -- its metadata keys' order varies by write
            assert path.read_bytes() == (tmp_path / "fused" / path.name).read_bytes(), path.name
    loaded = load_quantized(tmp_path / "fused")  # -- CPU: loads as before, not fused
    assert not any("forward" in m.__dict__ for m in loaded.modules())
    ids = torch.randint(0, 96, (1, 3))
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))


def test_unfusing_restores_the_class_forward_and_fusing_is_idempotent():
    model = _llama()
    first = fuse_rms_norms(model, devices=("cpu",))
    assert fuse_rms_norms(model, devices=("cpu",)) == first
    assert unfuse_rms_norms(model) == first
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert fuse_rms_norms(model) == []  # -- CPU models are not fused by default


def test_converting_a_cpu_model_leaves_its_norms_alone():
    model, _ = convert_model(_llama(), QuantConfig("w8a16"), progress=False)
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_norms_the_op_cannot_serve_are_skipped_or_fall_back():
    class Hooked(nn.RMSNorm):
        pass

    model = nn.Sequential(
        nn.RMSNorm(16),  # -- fused
        nn.RMSNorm(16, elementwise_affine=False),  # -- no weight
        nn.RMSNorm((4, 4)),  # -- two normalized dimensions
        Hooked(16),  # -- another class
        nn.LayerNorm(16),
    )
    wrapped = nn.RMSNorm(16)
    wrapped.forward = lambda x: x  # -- a wrapper's instance forward is left in place
    model.append(wrapped)
    assert fuse_rms_norms(model, devices=("cpu",)) == ["0"]
    x = torch.randn(3, 16, dtype=torch.float64)  # -- no float64 kernel: the class's forward
    torch.testing.assert_close(model[0](x), nn.RMSNorm.forward(model[0], x))


def test_calls_autograd_follows_run_the_module_forward():
    norm = nn.Sequential(nn.RMSNorm(32))
    fuse_rms_norms(norm, devices=("cpu",))
    x = torch.randn(2, 32, requires_grad=True)
    with mock.patch.object(common, "_skips_dispatcher", lambda x: False), DispatchedOps() as ops:
        norm(x).sum().backward()
    assert "rms_norm" not in ops.names and x.grad is not None
    assert norm[0].weight.grad is not None


def test_epsilon_is_read_at_call_time_and_copies_stay_fused():
    model = _llama(torch.float32)
    fuse_rms_norms(model, devices=("cpu",))
    twin = copy.deepcopy(model)
    ids = torch.randint(0, 96, (1, 4))
    assert torch.equal(_logits(twin, ids), _logits(model, ids))
    assert twin.model.norm.forward.args[0] is twin.model.norm  # -- bound to the copy
    plain = _llama(torch.float32)
    for m in (model, plain):
        for module in m.modules():
            if hasattr(module, "variance_epsilon"):
                module.variance_epsilon = 0.5
    assert torch.equal(_logits(model, ids), _logits(plain, ids))


def test_compiled_models_get_the_norms_aten_ops_and_the_op_traces_alone():
    model = _llama(torch.float32)
    ids = torch.randint(0, 96, (1, 3))
    eager = _logits(model, ids)
    fuse_rms_norms(model, devices=("cpu",))
    out, graph = compiled_logits_and_graph(model, ids)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    # -- Inductor would fuse each norm's ops with the residual add
    assert not any("torchquant" in str(n.target) for n in graph.graph.nodes)
    assert sum("rsqrt" in str(n.target) for n in graph.graph.nodes) == NORMS

    def norm_twice(x, weight):
        return rms_norm(rms_norm(x, weight, 1e-6, 0.0, True), weight, 1e-6, 1.0, False)

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    x, weight = torch.randn(2, 32), torch.randn(32)
    traced = torch.compile(norm_twice, fullgraph=True, backend=backend)(x, weight)
    assert torch.equal(traced, norm_twice(x, weight))
    (graph,) = graphs
    assert sum("torchquant.rms_norm" in str(n.target) for n in graph.graph.nodes) == 2


@pytest.mark.gpu
def test_cuda_converted_and_loaded_models_are_fused(tmp_path):
    model = _llama().to("cuda")
    ids = torch.randint(0, 96, (1, 1), device="cuda")
    plain = _logits(model, ids)
    model, _ = convert_model(model, QuantConfig("w8a16"), progress=False)
    assert sum("forward" in m.__dict__ for m in model.modules()) == NORMS
    fused = _logits(model, ids)
    unfuse_rms_norms(model)
    torch.testing.assert_close(fused, _logits(model, ids), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(fused, plain, rtol=0.1, atol=0.1)
    cpu_model, _ = convert_model(_llama(torch.float32), QuantConfig("w8a16"), progress=False)
    save_quantized(cpu_model, tmp_path / "ckpt")  # -- float32: the dtype config.json names
    loaded = load_quantized(tmp_path / "ckpt", device="cuda")
    assert sum("forward" in m.__dict__ for m in loaded.modules()) == NORMS


@pytest.mark.gpu
def test_cuda_fused_model_compiles_and_replays_in_a_cuda_graph():
    model, _ = convert_model(_llama().to("cuda"), QuantConfig("w4a16"), progress=False)
    ids = torch.randint(0, 96, (1, 1), device="cuda")
    with torch.no_grad():
        eager = _logits(model, ids)  # -- also the warm-up
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = model(ids, use_cache=False).logits
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(captured, eager, rtol=0, atol=0)
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True)
        torch.testing.assert_close(_logits(compiled, ids), eager, rtol=2e-2, atol=2e-2)
