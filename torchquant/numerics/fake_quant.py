"""Reference fake quantization for training: quantize -> dequantize forward, straight-through back.

One formula per tensor kind, and every fast path (the fused INTn op and its Triton
kernels, the autograd functions of ``torchquant.qat``) computes exactly this.

INTn weights: ``w (N, K)`` float; ``scales (N, G)``; ``zeros (N, G)`` float holding
integers, or ``None`` for symmetric schemes (implied zero ``2**(bits-1)``);
``G = ceil(K / group_size)``.  Forward: ``(clamp(round(w / s) + z, 0, qmax) - z) * s``
in float32, cast to ``w.dtype``: the same bits as
``dequantize_int_weight(quantize_codes(w, ...))``.

FP8 weights: ``fp8(clamp(w / s, +-448)) * s`` with a per-row ``(N, 1)`` or ``(1, 1)``
scale.  Activations: ``dequantize_activation(quantize_activation(x, ...))``; asymmetric
INT8 ones ``(clamp(round(x / s) + z, -128, 127) - z) * s`` with an integer zero point.

Microscaled tensors (NVFP4, MXFP4, MXFP8 weights and activations ``(M, K)``):
``dequantize_microscaled(quantize_microscaled(x, fmt, global_scale))``, block scales from
each block's max; NVFP4's global scale given (learned) or computed from ``x``.

Backward, with ``x`` the tensor divided by its scale and *inside* meaning "quantized
without clipping": the tensor's gradient passes inside and is blocked outside
(straight-through estimator); the scale gradient is LSQ's ``level - x`` inside and the
clipped level outside; an INT zero point's gradient is ``0`` inside and ``-s`` outside.
Scale and zero gradients are summed over the elements each one scales.  NVFP4's global
scale ``g`` divides every block multiplier ``s / g``; with the E4M3 block scales ``s`` held
(they are codes), its LSQ gradient is the multiplier's ``(level - x) * d(s/g)/dg``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from torchquant.numerics.activation import (
    ACTIVATION_RANGES,
    INT8_MAX,
    INT8_MIN,
    INT_ACT_DTYPES,
    dequantize_activation,
    dequantize_activation_asymmetric,
    quantize_activation,
    quantize_activation_asymmetric,
)
from torchquant.numerics.fp4 import FP4_MAX, decode_e2m1, expand_blocks
from torchquant.numerics.microscaling import (
    block_multipliers,
    dequantize_microscaled,
    quantize_microscaled,
)
from torchquant.numerics.qparams import FP8_E4M3_MAX, fp8_e4m3_values
from torchquant.numerics.weight import expand_qparams


def _int_grid(w, scales, zeros, bits, group_size):
    s, z = expand_qparams(scales, zeros, bits, group_size, w.shape[1])
    x = w.float() / s
    r = torch.round(x)
    return s, z, x, r, r + z


def _sum_groups(t: torch.Tensor, group_size: int, groups: int) -> torch.Tensor:
    """``(N, K)`` -> ``(N, G)`` sums over each group (the last one may be shorter)."""
    n, k = t.shape
    g = k if group_size == -1 else group_size
    return torch.nn.functional.pad(t, (0, groups * g - k)).view(n, groups, g).sum(dim=2)


def fake_quantize_int_reference(
    w: Tensor, scales: Tensor, zeros: Tensor | None, bits: int, group_size: int
) -> Tensor:
    """Fake-quantized weight ``(N, K)``: quantize to INTn codes and dequantize again."""
    s, z, _, _, c = _int_grid(w, scales, zeros, bits, group_size)
    return ((torch.clamp(c, 0, (1 << bits) - 1) - z) * s).to(w.dtype)


def fake_quantize_int_backward_reference(
    grad: Tensor, w: Tensor, scales: Tensor, zeros: Tensor | None, bits: int, group_size: int
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(grad_w, grad_scales, grad_zeros)``; ``grad_zeros`` is ``None`` when ``zeros`` is."""
    qmax = float((1 << bits) - 1)
    s, z, x, r, c = _int_grid(w, scales, zeros, bits, group_size)
    g = grad.float()
    inside = (c >= 0) & (c <= qmax)
    grad_w = torch.where(inside, g, 0.0).to(w.dtype)
    d_scale = torch.where(inside, r - x, torch.where(c < 0, -z, qmax - z))
    grad_s = _sum_groups(g * d_scale, group_size, scales.shape[1]).to(scales.dtype)
    grad_z = None
    if zeros is not None:
        d_zero = torch.where(inside, 0.0, -s)
        grad_z = _sum_groups(g * d_zero, group_size, zeros.shape[1]).to(zeros.dtype)
    return grad_w, grad_s, grad_z


def _sum_to(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum a broadcast gradient back to ``shape`` (per-row ``(N, 1)`` or per-tensor)."""
    if t.shape == shape:
        return t
    if len(shape) == 2 and shape[0] == t.shape[0]:
        return t.sum(dim=1, keepdim=True)
    return t.sum().reshape(shape)


def fake_quantize_fp8_reference(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """E4M3 fake-quantized ``w (N, K)`` as ``w.dtype``, for a ``(N, 1)`` or ``(1, 1)`` scale."""
    q = fp8_e4m3_values(w.float() / scale.float())
    return (q * scale.float()).to(w.dtype)


def fake_quantize_fp8_backward_reference(
    grad: torch.Tensor, w: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_w, grad_scale)``; outside +-448 the scale gradient is the saturated level."""
    x = w.float() / scale.float()
    q = fp8_e4m3_values(x)
    inside = x.abs() <= FP8_E4M3_MAX
    g = grad.float()
    grad_w = torch.where(inside, g, 0.0).to(grad.dtype)
    d_scale = torch.where(inside, q - x, q)
    return grad_w, _sum_to(g * d_scale, scale.shape).to(scale.dtype)


def fake_quantize_activation_reference(
    x: Tensor, dtype: str, per_token: bool, percentile: float, static_scale: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Fake-quantized ``x (rows, K)`` as ``x.dtype``, and the float32 scale it used."""
    q, scale = quantize_activation(x, dtype, per_token, percentile, static_scale)
    return dequantize_activation(q, scale, x.dtype), scale


def fake_quantize_activation_backward_reference(
    grad: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, dtype: str, scale_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(grad_x, grad_scale)`` for the ``scale`` the forward used (LSQ, summed over all of x).

    ``grad_scale`` is ``None`` unless ``scale_grad``: a dynamic scale follows the input.
    """
    lo, hi = ACTIVATION_RANGES[dtype]
    xs = x.float() / scale
    if dtype in INT_ACT_DTYPES:
        level = torch.round(xs)
        inside = (level >= lo) & (level <= hi)
    else:
        level = fp8_e4m3_values(xs)
        inside = xs.abs() <= hi
    g = grad.float()
    grad_x = torch.where(inside, g, 0.0).to(grad.dtype)
    if not scale_grad:
        return grad_x, None
    d_scale = torch.where(inside, level - xs, torch.where(xs < 0, lo, hi))
    return grad_x, (g * d_scale).sum()


def fake_quantize_activation_asym_reference(
    x: Tensor,
    per_token: bool,
    static_scale: Tensor | None,
    static_zero_point: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric INT8 fake-quantized ``x (rows, K)`` as ``x.dtype``, with the float32 scale
    and int32 zero point it used (the static pair, or each input's min-max choice)."""
    q, scale, zero = quantize_activation_asymmetric(x, per_token, static_scale, static_zero_point)
    return dequantize_activation_asymmetric(q, scale, zero, x.dtype), scale, zero


def fake_quantize_activation_asym_backward_reference(
    grad: Tensor, x: Tensor, scale: Tensor, zero: Tensor, qparam_grad: bool
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(grad_x, grad_scale, grad_zero)`` for the pair the forward used (LSQ, summed).

    Inside the code range the scale gets ``round(x / s) - x / s`` and the zero point 0;
    a clipped element gives the scale its clipped level ``q - z`` and the zero point
    ``-s``.  Both are ``None`` unless ``qparam_grad``.
    """
    xs = x.float() / scale
    level = torch.round(xs)
    codes = level + zero.float()
    inside = (codes >= INT8_MIN) & (codes <= INT8_MAX)
    g = grad.float()
    grad_x = torch.where(inside, g, 0.0).to(grad.dtype)
    if not qparam_grad:
        return grad_x, None, None
    clipped = torch.clamp(codes, INT8_MIN, INT8_MAX) - zero.float()
    d_scale = torch.where(inside, level - xs, clipped)
    d_zero = torch.where(inside, 0.0, -scale.expand_as(xs))
    return grad_x, (g * d_scale).sum(), (g * d_zero).sum()


# -- each microscaled format's largest element value: a scaled value past it saturates
MICROSCALED_ELEMENT_MAX = {"nvfp4": FP4_MAX, "mxfp4": FP4_MAX, "mxfp8": FP8_E4M3_MAX}


def fake_quantize_microscaled_reference(
    x: Tensor, fmt: str, global_scale: Tensor | None = None, scale_rounding: str = "ocp"
) -> Tensor:
    """``x (M, K)`` quantized to ``fmt`` and dequantized (float32, exact), as ``x.dtype``
    (``scale_rounding``: MXFP4's E8M0 rule, ``numerics.fp4.e8m0_scales_for_amax``)."""
    q = quantize_microscaled(x, fmt, global_scale, scale_rounding)
    return dequantize_microscaled(q, x.dtype)


def fake_quantize_microscaled_backward_reference(
    grad: Tensor,
    x: Tensor,
    fmt: str,
    global_scale: Tensor | None,
    scale_grad: bool,
    scale_rounding: str = "ocp",
) -> tuple[Tensor, Tensor | None]:
    """``(grad_x, grad_global_scale)``; the second is ``None`` unless ``scale_grad`` (NVFP4
    with a given global scale: a computed one follows ``x``).  A value whose scaled
    magnitude passes the element type's max saturated, so its gradient is blocked."""
    q = quantize_microscaled(x, fmt, global_scale, scale_rounding)
    element = expand_blocks(block_multipliers(q), q.block, x.shape[1])
    level = q.values.float() if fmt == "mxfp8" else decode_e2m1(q.values)
    xs = x.float() / element
    inside = xs.abs() <= MICROSCALED_ELEMENT_MAX[fmt]
    g = grad.float()
    grad_x = torch.where(inside, g, 0.0).to(grad.dtype)
    if not scale_grad:
        return grad_x, None
    # -- out = level * s / g: d out / dg = -(level - x inside, level outside) * (s / g) / g
    d_global = -torch.where(inside, level - xs, level) * element / q.global_scale
    return grad_x, (g * d_global).sum().reshape(global_scale.shape).to(global_scale.dtype)
