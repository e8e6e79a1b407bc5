"""RMSNorm as one op: its exact reference, the one-kernel CUDA path and a fake for compile.

Hugging Face's RMSNorm modules run as 7-8 aten ops in eager PyTorch (to float32, pow,
mean, add eps, rsqrt, mul, to dtype, mul weight), one kernel each on CUDA; a decode step
of a 32-layer model holds 65 of them.  ``torchquant::rms_norm`` is the same maths in one
Triton kernel (``triton_kernels.rms_norm``).  The reference is the formula as the model
families write it, so the op's CPU path returns exactly what the module it stands for
returns:

* ``weight_after_cast`` (Llama, Mistral, Qwen2/3, Phi-3, ...):
  ``weight * (x32 * rsqrt(mean(x32^2) + eps)).to(x.dtype)``, in the dtype PyTorch's
  promotion of ``weight`` and ``x`` gives.
* otherwise (``torch.nn.RMSNorm``, OLMo-2, and Gemma with ``weight_offset=1``):
  ``((x32 * rsqrt(mean(x32^2) + eps)) * (weight32 + weight_offset)).to(x.dtype)``.

The CUDA kernel has one launch config per row width and never tunes, so a CUDA-graph
capture records it like any other kernel once the shape was seen in a warm-up.
"""

from __future__ import annotations

import torch

from torchquant.ops import common


def rms_norm_dtype(x: torch.Tensor, weight: torch.Tensor, weight_after_cast: bool) -> torch.dtype:
    """The dtype the reference returns: promoted with the weight's only after the cast."""
    return torch.promote_types(x.dtype, weight.dtype) if weight_after_cast else x.dtype


def rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float,
    weight_after_cast: bool,
) -> torch.Tensor:  # fmt: skip
    """The exact maths over the last dimension (see the module docstring's two formulas)."""
    x32 = x.to(torch.float32)
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if weight_after_cast:
        if weight_offset != 0.0:
            raise ValueError("weight_offset must be 0 when the weight multiplies after the cast")
        return weight * y.to(x.dtype)
    return (y * (weight.to(torch.float32) + weight_offset)).to(x.dtype)


def rms_norm_cuda(x, weight, eps, weight_offset, weight_after_cast):
    """One Triton kernel over the rows of ``x``."""
    from torchquant.triton_kernels.rms_norm import rms_norm_rows

    if x.shape[-1] != weight.numel():
        raise ValueError(
            f"x's last dimension ({x.shape[-1]}) must match weight ({tuple(weight.shape)})"
        )
    out_dtype = rms_norm_dtype(x, weight, weight_after_cast)
    out = rms_norm_rows(
        common.rows(x), weight.reshape(-1), eps, weight_offset, weight_after_cast, out_dtype
    )
    return out.reshape(x.shape)


@torch.library.custom_op("torchquant::rms_norm", mutates_args=())
def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float,
    weight_after_cast: bool,
) -> torch.Tensor:  # fmt: skip
    """RMSNorm over the last dimension of ``x``; see the module docstring for the formulas."""
    return rms_norm_reference(x, weight, eps, weight_offset, weight_after_cast)


@rms_norm.register_fake
def _rms_norm_fake(x, weight, eps, weight_offset, weight_after_cast):
    return x.new_empty(x.shape, dtype=rms_norm_dtype(x, weight, weight_after_cast))


common.register_cpu(rms_norm, rms_norm_reference)
common.register_cuda("torchquant::rms_norm", rms_norm_cuda)
