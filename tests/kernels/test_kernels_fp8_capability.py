"""FP8 on GPUs older than sm_89: a clear error from the kernels, a warned fallback in the ops.

The GPU is simulated by mocking ``torch.cuda`` and leaving interpreter mode, so this runs
(and checks the fallback numerics) on CPU; nothing is launched while mocked.
"""

from __future__ import annotations

import pytest
import torch
from kernel_utils import requires_kernels
from torchquant.triton_kernels import _launch
from torchquant.triton_kernels.fp8_gemm import FP8Unsupported, fp8_gemm, fp8_supported

from torchquant import QuantLinear, scheme_from_name
from torchquant.ops import cuda as cuda_ops

pytestmark = requires_kernels


@pytest.fixture
def gpu_with_capability(monkeypatch):
    """Pretend to be compiled for a CUDA GPU of the given compute capability."""

    def pretend(capability: tuple[int, int]) -> None:
        monkeypatch.setattr(_launch, "_INTERPRET", False)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)

    return pretend


@pytest.mark.parametrize("capability,supported", [((8, 0), False), ((8, 6), False),
                                                  ((8, 9), True), ((9, 0), True)])  # fmt: skip
def test_fp8_support_follows_compute_capability(gpu_with_capability, capability, supported):
    gpu_with_capability(capability)
    assert fp8_supported() is supported


def test_fp8_gemm_refuses_an_a100_by_name(gpu_with_capability):
    a = torch.randn(4, 64).to(torch.float8_e4m3fn)
    b = torch.randn(8, 64).to(torch.float8_e4m3fn)
    ones = torch.ones(1, 1)
    gpu_with_capability((8, 0))
    with pytest.raises(FP8Unsupported, match=r"compute capability >= 8\.9.*\(8, 0\)"):
        fp8_gemm(a, b, ones, ones, None, torch.float32)


@pytest.mark.parametrize("scheme", ["fp8", "w8a16-fp8"])
def test_fp8_layers_fall_back_to_the_reference_with_a_warning(gpu_with_capability, scheme):
    layer = QuantLinear.from_linear(torch.nn.Linear(64, 24), scheme_from_name(scheme))
    x = torch.randn(3, 64)
    ref = layer(x)  # CPU: the reference op
    gpu_with_capability((8, 0))
    with pytest.warns(UserWarning, match="compute capability >= 8.9"):
        if scheme == "fp8":
            out = cuda_ops.linear_w8a8_fp8_cuda(
                x, layer.qweight, layer.scales, layer.bias, True, 100.0, None, None
            )
        else:
            out = cuda_ops.linear_fp8_weight_cuda(x, layer.qweight, layer.scales, layer.bias)
    torch.testing.assert_close(out, ref)


def test_fp8_activation_quantization_falls_back(gpu_with_capability):
    x = torch.randn(5, 64)
    gpu_with_capability((7, 5))
    with pytest.warns(UserWarning, match="no FP8 support"):
        q, scale = cuda_ops.quantize_activation_cuda(x, "fp8", True, 100.0, None)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (5, 1)
    torch.testing.assert_close(q.float() * scale, x, rtol=0.07, atol=1e-3)
