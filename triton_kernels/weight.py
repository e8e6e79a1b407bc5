"""The quantized weight every weight-only launcher takes: its tensors and format as one value.

Formats (``N`` output features, ``K`` input features):

* packed INTn, ``bits`` in 2..8: ``qweight (N, ceil(K/32)*bits)`` int32 -- one
  little-endian bitstream per output row, code ``k`` at bits ``[k*bits, (k+1)*bits)``,
  word 0 holding the lowest bits; 3/5/6/7-bit codes may straddle two words.  Codes
  are unsigned; ``w = (code - zero) * scale`` with ``zeros (N, G)`` uint8, or the
  implied zero ``2**(bits-1)`` when ``zeros`` is None (symmetric).
* 8-bit storage ``qweight (N, K)``: int8 (symmetric INT8, ``w = q * scale``) or
  float8_e4m3fn (``w = float(q) * scale``).
* ``scales (N, G)`` in fp32/bf16/fp16, ``G = ceil(K / group_size)`` (the last group
  may be partial), or ``(N, 1)`` per channel (``group_size == -1``) or ``(1, 1)`` per
  tensor.  Values are dequantized in float32, as the reference numerics do.

A mixture of experts stacks one such weight per expert along a leading dimension
(``qweight (E, N, ...)``, ``scales (E, N, G)``, ``zeros (E, N, G)``): :meth:`QuantWeight.expert`
is one expert's slice, :meth:`QuantWeight.expert_strides` the step from one to the next.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._launch import check_device, check_fp8_support

PACKED_DTYPES = (torch.int32,)
BYTE_DTYPES = (torch.int8, torch.float8_e4m3fn)


def kernel_group_size(group_size: int, num_groups: int) -> int:
    """Constexpr group size for the kernels: 0 for per-channel or per-tensor scales."""
    return 0 if group_size == -1 or num_groups == 1 else group_size


@dataclass(frozen=True)
class QuantWeight:
    """``qweight``, ``scales``, ``zeros`` (or None) in one of the module docstring's formats."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    bits: int
    group_size: int

    @property
    def out_features(self) -> int:
        """``N``: the weight's rows (the output features of the linear)."""
        return self.qweight.shape[-2]

    @property
    def kernel_group_size(self) -> int:
        return kernel_group_size(self.group_size, self.scales.shape[-1])

    def expert(self, e: int) -> QuantWeight:
        """Expert ``e``'s weight of a stack over a leading expert dimension."""
        zeros = self.zeros[e] if self.zeros is not None else None
        return QuantWeight(self.qweight[e], self.scales[e], zeros, self.bits, self.group_size)

    def expert_strides(self) -> dict:
        """Kernel arguments stepping a stacked weight from one expert to the next."""
        return dict(
            stride_qe=self.qweight.stride(0),
            stride_se=self.scales.stride(0),
            stride_ze=self.zeros.stride(0) if self.zeros is not None else 0,
        )

    def check(self, k: int) -> None:
        """Validate the weight against the formats above for ``K = k`` (raises ValueError)."""
        qweight, scales, zeros = self.qweight, self.scales, self.zeros
        bits, group_size = self.bits, self.group_size
        check_device(qweight, scales, zeros)
        n = qweight.shape[0]
        if qweight.dtype in PACKED_DTYPES:
            if not 2 <= bits <= 8:
                raise ValueError(f"packed qweight needs bits in 2..8, got {bits}")
            width = -(-k // 32) * bits
            if tuple(qweight.shape) != (n, width):
                raise ValueError(
                    f"qweight must be ({n}, {width}) for K={k}, got {tuple(qweight.shape)}"
                )
        elif qweight.dtype in BYTE_DTYPES:
            if bits != 8 or tuple(qweight.shape) != (n, k):
                raise ValueError(f"{qweight.dtype} qweight must be (N, {k}) with bits=8")
            if zeros is not None:
                raise ValueError("8-bit int8/fp8 storage is symmetric: zeros must be None")
            if qweight.dtype == torch.float8_e4m3fn:
                check_fp8_support(qweight.device)
        else:
            raise ValueError(f"qweight dtype {qweight.dtype} is not int32 (packed), int8 or fp8")
        if qweight.stride(-1) != 1:
            raise ValueError("qweight must be contiguous along K")
        g = 1 if group_size == -1 else -(-k // group_size)
        if group_size != -1 and group_size <= 0:
            raise ValueError(f"group_size must be -1 or positive, got {group_size}")
        if scales.dim() != 2 or scales.shape[1] != g or scales.shape[0] not in (1, n):
            raise ValueError(f"scales must be ({n}, {g}) (or (1, 1)), got {tuple(scales.shape)}")
        if zeros is not None and (zeros.dtype != torch.uint8 or tuple(zeros.shape) != (n, g)):
            raise ValueError(
                f"zeros must be uint8 ({n}, {g}), got {zeros.dtype} {tuple(zeros.shape)}"
            )

    def kernel_args(self) -> dict:
        """Kernel arguments describing the weight (pointers, strides, constexpr flags)."""
        qweight, scales, zeros = self.qweight, self.scales, self.zeros
        return dict(
            q_ptr=qweight,
            s_ptr=scales,
            z_ptr=zeros if zeros is not None else scales,
            stride_qn=qweight.stride(0),
            stride_sn=scales.stride(0) if scales.shape[0] > 1 else 0,
            stride_zn=zeros.stride(0) if zeros is not None else 0,
            BITS=self.bits,
            PACKED=qweight.dtype in PACKED_DTYPES,
            HAS_ZEROS=zeros is not None,
            GROUP_SIZE=self.kernel_group_size,
        )
