"""Fused fake-quant kernel (forward + backward) vs the reference numerics, under the interpreter."""

from __future__ import annotations

import pytest
import torch
from kernel_utils import KERNEL_DEVICE, poisoned, requires_kernels
from torchquant.triton_kernels.fake_quant import fake_quant_int_backward, fake_quant_int_forward

from torchquant.config import WeightQuant
from torchquant.numerics.fake_quant import (
    fake_quantize_int_backward_reference,
    fake_quantize_int_reference,
)
from torchquant.qat.fake_quant import minmax_weight_qparams

pytestmark = requires_kernels


def _case(n, k, bits, group_size, symmetric, dtype):
    w = torch.randn(n, k) * torch.rand(n, 1) + 0.05 * torch.randn(1, k)
    w[0, :4] = torch.tensor([0.0, 1e-4, -1e-4, 3.0])
    spec = WeightQuant(bits=bits, group_size=group_size, symmetric=symmetric)
    scales, zeros = minmax_weight_qparams(w, spec)
    scales = scales * 0.8  # a tighter range so that some weights clip
    w = w.to(dtype).to(KERNEL_DEVICE)
    zeros = None if zeros is None else zeros.to(KERNEL_DEVICE)
    return w, scales.to(KERNEL_DEVICE), zeros


@pytest.mark.parametrize(
    "n, k, bits, group_size, symmetric",
    [(8, 64, 4, 32, False), (5, 80, 3, 32, True), (6, 48, 8, -1, True), (4, 96, 2, 64, False)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forward_and_backward_match_reference(n, k, bits, group_size, symmetric, dtype):
    w, scales, zeros = _case(n, k, bits, group_size, symmetric, dtype)
    out = fake_quant_int_forward(w, scales, zeros, bits, group_size, out=poisoned((n, k), dtype))
    ref = fake_quantize_int_reference(w, scales, zeros, bits, group_size)
    assert torch.equal(out.cpu(), ref.cpu())  # same float32 math, IEEE division: bit for bit

    grad = torch.randn(n, k).to(dtype).to(KERNEL_DEVICE)
    gw, gs, gz = fake_quant_int_backward(grad, w, scales, zeros, bits, group_size)
    rw, rs, rz = fake_quantize_int_backward_reference(grad, w, scales, zeros, bits, group_size)
    assert torch.equal(gw.cpu(), rw.cpu())
    assert set(torch.unique(gw.float() / grad.float()).tolist()) <= {0.0, 1.0}
    # group sums: summation order differs, so float32 rounding only
    torch.testing.assert_close(gs.cpu(), rs.cpu(), rtol=1e-5, atol=1e-5)
    assert (gz is None) == (rz is None)
    if gz is not None:
        torch.testing.assert_close(gz.cpu(), rz.cpu(), rtol=1e-5, atol=1e-5)


def test_cuda_op_glue_matches_the_reference_op():
    # what torch.library runs for CUDA tensors, called directly on interpreter tensors
    from torchquant.ops import cuda as cuda_ops

    w, scales, zeros = _case(6, 64, 4, 32, False, torch.float32)
    out = cuda_ops.fake_quant_int_weight_cuda(w, scales, zeros, 4, 32)
    assert torch.equal(out.cpu(), fake_quantize_int_reference(w, scales, zeros, 4, 32).cpu())
    w8, s8, _ = _case(6, 64, 8, -1, True, torch.float32)
    grad = torch.randn(6, 64, device=KERNEL_DEVICE)
    gw, gs, gz = cuda_ops.fake_quant_int_weight_backward_cuda(grad, w8, s8, None, 8, -1)
    assert gz.shape == gs.shape and not gz.any()  # symmetric: an all-zero placeholder


def test_rounding_ties_go_to_even():
    # w / s exactly on .5: torch.round semantics (half to even) in the kernel too
    w = torch.tensor([[0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 6.5]]).to(KERNEL_DEVICE)
    scales = torch.ones(1, 1, device=KERNEL_DEVICE)
    out = fake_quant_int_forward(w, scales, None, 4, -1)
    assert out.cpu().tolist() == [[0.0, 2.0, 2.0, -0.0, -2.0, -2.0, 4.0, 6.0]]


def test_bad_shapes_are_refused():
    w = torch.randn(4, 64, device=KERNEL_DEVICE)
    with pytest.raises(ValueError, match=r"scales must be \(4, 2\)"):
        fake_quant_int_forward(w, torch.ones(4, 1, device=KERNEL_DEVICE), None, 4, 32)
    with pytest.raises(ValueError, match="2-D float"):
        fake_quant_int_forward(w.view(-1), torch.ones(4, 2, device=KERNEL_DEVICE), None, 4, 32)
