"""The one-kernel RMSNorm against the modules it stands for (Hugging Face's, torch's).

Under ``TRITON_INTERPRET=1`` the kernel runs on CPU tensors; there a float32 -> bfloat16
cast truncates instead of rounding (see ``kernel_utils``), so bf16 outputs may sit one
or two bf16 ulps (the weight-after-cast form rounds twice) from the module's.  The GPU
test holds the compiled kernel to the module's outputs bit for bit on almost every
element (only the order of the float32 sum differs).
"""

from __future__ import annotations

import importlib

import pytest
import torch
from kernel_utils import KERNEL_DEVICE, ON_GPU, TOLERANCES, requires_kernels
from torch import nn

from torchquant.modules.rms_norms import RMSNORM_FORMS, rms_norm_form
from torchquant.ops.rms_norm import rms_norm_cuda, rms_norm_dtype, rms_norm_reference

pytestmark = requires_kernels

# -- the package of each class of RMSNORM_FORMS in transformers.models
PACKAGES = {
    "LlamaRMSNorm": "llama",
    "MistralRMSNorm": "mistral",
    "MinistralRMSNorm": "ministral",
    "MixtralRMSNorm": "mixtral",
    "Qwen2RMSNorm": "qwen2",
    "Qwen2MoeRMSNorm": "qwen2_moe",
    "Qwen3RMSNorm": "qwen3",
    "Qwen3MoeRMSNorm": "qwen3_moe",
    "Phi3RMSNorm": "phi3",
    "GraniteRMSNorm": "granite",
    "SmolLM3RMSNorm": "smollm3",
    "DeepseekV3RMSNorm": "deepseek_v3",
    "GemmaRMSNorm": "gemma",
    "Gemma2RMSNorm": "gemma2",
    "Gemma3RMSNorm": "gemma3",
    "Olmo2RMSNorm": "olmo2",
}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def hf_norm(name: str, hidden: int, eps: float) -> nn.Module:
    """An instance of the transformers class ``name``, weight drawn around its init."""
    transformers = pytest.importorskip("transformers")
    package = PACKAGES[name]
    module = importlib.import_module(f"{transformers.__name__}.models.{package}.modeling_{package}")
    norm = getattr(module, name)(hidden, eps=eps)
    with torch.no_grad():
        norm.weight.normal_(0.0, 0.5).add_(0.0 if "Gemma" in name else 1.0)
    return norm


def fused(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The kernel's output for ``norm`` on ``x`` (the op's CUDA implementation, called directly)."""
    form = rms_norm_form(norm)
    eps = getattr(norm, form.eps_attribute)
    eps = torch.finfo(torch.float32).eps if eps is None else eps
    return rms_norm_cuda(x, norm.weight.detach(), eps, form.weight_offset, form.weight_after_cast)


def assert_like_module(
    out: torch.Tensor, ref: torch.Tensor, equal_nan: bool = False, rounded: torch.dtype = None
) -> None:
    """Close at the tolerance of the output's dtype, or of ``rounded`` where the normalized
    row was rounded to that coarser dtype first (the weight-after-cast form)."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    rtol, atol = max(TOLERANCES[ref.dtype], TOLERANCES[rounded or ref.dtype])
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol, equal_nan=equal_nan)


def test_every_listed_class_is_a_transformers_class_and_matched():
    assert set(PACKAGES) == set(RMSNORM_FORMS)
    for name in RMSNORM_FORMS:
        assert rms_norm_form(hf_norm(name, 16, 1e-6)) is RMSNORM_FORMS[name]


@pytest.mark.parametrize("name", sorted(RMSNORM_FORMS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_matches_each_listed_module(name, dtype):
    norm = hf_norm(name, 100, 1e-6).to(dtype)
    x = torch.randn(5, 100).to(dtype)
    with torch.no_grad():
        ref = norm(x)
        assert_like_module(fused(norm, x.to(KERNEL_DEVICE)).cpu(), ref)
        # -- the op's reference is the module's own maths: equal, not close
        form = rms_norm_form(norm)
        own = rms_norm_reference(
            x, norm.weight, norm.__dict__.get(form.eps_attribute), form.weight_offset,
            form.weight_after_cast,
        )  # fmt: skip
        assert torch.equal(own, ref)


@pytest.mark.parametrize("hidden", [1, 7, 96, 576, 1000, 4096, 20000])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_matches_llama_and_torch_norms_at_ragged_sizes(hidden, dtype):
    x = (3 * torch.randn(2, 3, hidden)).to(dtype)
    llama = hf_norm("LlamaRMSNorm", hidden, 1e-5).to(dtype)
    torch_norm = nn.RMSNorm(hidden).to(dtype)  # -- eps None: float32's machine epsilon
    with torch.no_grad():
        torch_norm.weight.normal_(1.0, 0.5)
        for norm in (llama, torch_norm):
            assert_like_module(fused(norm, x.to(KERNEL_DEVICE)).cpu(), norm(x))


@pytest.mark.parametrize("eps", [1e-12, 1e-6, 1e-5, 0.1])
def test_kernel_follows_epsilon(eps):
    x = torch.randn(4, 64) * 1e-3  # -- small rows, where eps dominates the mean
    norm = hf_norm("LlamaRMSNorm", 64, eps)
    with torch.no_grad():
        assert_like_module(fused(norm, x.to(KERNEL_DEVICE)).cpu(), norm(x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_mixed_weight_dtypes_promote_as_the_module_does(dtype):
    x = torch.randn(3, 48).to(dtype)
    for weight_dtype in DTYPES:
        llama = hf_norm("LlamaRMSNorm", 48, 1e-6).to(weight_dtype)
        gemma = hf_norm("GemmaRMSNorm", 48, 1e-6).to(weight_dtype)
        with torch.no_grad():
            for norm in (llama, gemma):
                ref = norm(x)
                form = rms_norm_form(norm)
                assert ref.dtype == rms_norm_dtype(x, norm.weight, form.weight_after_cast)
                assert_like_module(fused(norm, x.to(KERNEL_DEVICE)).cpu(), ref, rounded=dtype)


@pytest.mark.parametrize("name", ["LlamaRMSNorm", "GemmaRMSNorm", "Olmo2RMSNorm"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_finite_rows_come_out_as_the_module_gives_them(name, dtype):
    x = torch.randn(6, 40)
    x[1, 3] = float("inf")
    x[2, 5] = float("nan")
    x[3, :] = 0.0  # -- an all-zero row: eps alone keeps it finite
    x[4, 7] = -float("inf")
    x[5, 0] = 1e18 if dtype == torch.float32 else 6e4  # -- large, but squares stay finite
    x = x.to(dtype)
    norm = hf_norm(name, 40, 1e-6).to(dtype)
    with torch.no_grad():
        ref = norm(x)
        out = fused(norm, x.to(KERNEL_DEVICE)).cpu()
    assert torch.equal(out.isnan(), ref.isnan())
    assert_like_module(out, ref, equal_nan=True)
    assert ref[1].isnan().sum() == 1 and ref[2].isnan().all()  # -- what the module does


def test_rows_with_a_squared_sum_past_float32_give_zeros_as_the_module():
    x = torch.randn(2, 32)
    x[0, 0] = 3e38  # -- its square overflows float32: mean inf, rsqrt 0
    norm = hf_norm("LlamaRMSNorm", 32, 1e-6)
    with torch.no_grad():
        ref = norm(x)
        out = fused(norm, x.to(KERNEL_DEVICE)).cpu()
    assert torch.equal(out.isnan(), ref.isnan())
    assert_like_module(out, ref, equal_nan=True)


def test_strided_rows_and_leading_dimensions():
    x = torch.randn(4, 3, 128)[:, 1, :]  # -- rows 384 elements apart
    norm = hf_norm("Qwen3RMSNorm", 128, 1e-6)
    with torch.no_grad():
        assert_like_module(fused(norm, x.to(KERNEL_DEVICE)).cpu(), norm(x))
        y = torch.randn(2, 3, 5, 128)
        assert_like_module(fused(norm, y.to(KERNEL_DEVICE)).cpu(), norm(y))
        empty = torch.randn(0, 128)
        assert fused(norm, empty.to(KERNEL_DEVICE)).shape == (0, 128)


def test_bad_inputs_name_the_tensor():
    from torchquant.triton_kernels.rms_norm import rms_norm_rows

    x = torch.randn(2, 8, device=KERNEL_DEVICE)
    w = torch.ones(8, device=KERNEL_DEVICE)
    with pytest.raises(ValueError, match="weight must have shape"):
        rms_norm_rows(x, torch.ones(7, device=KERNEL_DEVICE), 1e-6, 0.0, True, x.dtype)
    with pytest.raises(ValueError, match="x must be float32"):
        rms_norm_rows(x.double(), w, 1e-6, 0.0, True, torch.float32)
    with pytest.raises(ValueError, match="weight_offset"):
        rms_norm_rows(x, w, 1e-6, 1.0, True, x.dtype)
    with pytest.raises(ValueError, match="must match weight"):
        rms_norm_cuda(x, torch.ones(4, device=KERNEL_DEVICE), 1e-6, 0.0, True)
    with pytest.raises(ValueError, match="no columns"):
        rms_norm_rows(x[:, :0], w[:0], 1e-6, 0.0, True, x.dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="the compiled kernel needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [576, 4096, 5120, 20000])
def test_compiled_kernel_matches_the_modules_on_cuda(dtype, hidden):
    x = torch.randn(7, hidden, device="cuda").to(dtype)
    for name in ("LlamaRMSNorm", "GemmaRMSNorm"):
        norm = hf_norm(name, hidden, 1e-5).to(device="cuda", dtype=dtype)
        with torch.no_grad():
            ref, out = norm(x), fused(norm, x)
        assert_like_module(out, ref)
        if dtype != torch.float32:  # -- only the sum's order differs: rarely seen after rounding
            assert (out == ref).float().mean() > 0.99


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a CUDA device")
def test_compiled_kernel_replays_in_a_cuda_graph():
    norm = hf_norm("LlamaRMSNorm", 4096, 1e-5).to(device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        fused(norm, x)  # -- warm-up: compiles (nothing is tuned)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = fused(norm, x)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, fused(norm, x))
