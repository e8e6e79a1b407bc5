"""The block-scaled float weight the FP4 and MXFP8 weight-only launchers take (one value).

Formats (``N`` output features, ``K`` input features), one scale per ``block`` values
along K (a shorter last block where the block does not divide K):

* NVFP4: ``qweight (N, ceil(K/2))`` uint8, two E2M1 codes a byte (column ``2j`` in the
  low nibble of byte ``j``); ``scales (N, ceil(K/16))`` float8_e4m3fn; float32
  ``global_scale (1,)``; ``w = e2m1 * scale / global_scale``.
* MXFP4: the same codes; ``scales (N, ceil(K/32))`` uint8 E8M0 exponents,
  ``w = e2m1 * 2**(e - 127)``; no global scale.
* MXFP8: ``qweight (N, K)`` float8_e4m3fn; E8M0 ``scales (N, ceil(K/32))``.

Scales are read as raw bytes.  The kernels multiply each code by its block scale (exact:
both factors have few mantissa bits) and divide by NVFP4's global scale once per output,
in the epilogue.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._launch import check_device


@dataclass(frozen=True)
class BlockScaledWeight:
    """``qweight``, ``scales`` and ``global_scale`` (NVFP4 only) in one of the formats above."""

    qweight: torch.Tensor
    scales: torch.Tensor
    global_scale: torch.Tensor | None
    block: int

    @property
    def value_bits(self) -> int:
        """Bits a value: 8 for MXFP8 (float8_e4m3fn storage), else 4 (packed E2M1)."""
        return 8 if self.qweight.dtype == torch.float8_e4m3fn else 4

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    def check(self, k: int) -> None:
        """Shapes and dtypes of the weight for ``K = k``, named in the error."""
        check_device(self.qweight, self.scales, self.global_scale)
        fp8 = self.value_bits == 8
        allowed = (32,) if fp8 or self.global_scale is None else (16,)
        if self.block not in allowed:
            raise ValueError(f"block must be 16 (NVFP4) or 32 (MXFP4, MXFP8), got {self.block}")
        if fp8 and self.global_scale is not None:
            raise ValueError("MXFP8 weights take no global_scale (their scales are E8M0)")
        n = self.qweight.shape[0]
        scale_dtype = torch.uint8 if self.global_scale is None else torch.float8_e4m3fn
        expected = {
            "qweight": (
                self.qweight,
                torch.float8_e4m3fn if fp8 else torch.uint8,
                (n, k if fp8 else -(-k // 2)),
            ),
            "scales": (self.scales, scale_dtype, (n, -(-k // self.block))),
        }
        if self.global_scale is not None:
            expected["global_scale"] = (self.global_scale, torch.float32, (1,))
        for name, (t, dtype, shape) in expected.items():
            if t.dtype != dtype or tuple(t.shape) != shape:
                raise ValueError(f"{name} must be {dtype} {shape}, got {t.dtype} {tuple(t.shape)}")
        if self.qweight.stride(-1) != 1 or self.scales.stride(-1) != 1:
            raise ValueError("qweight and scales must be contiguous along K")

    def kernel_args(self) -> dict:
        """Kernel arguments describing the weight (values and scales read as raw bytes)."""
        q_bytes = self.qweight.view(torch.uint8)
        scale_bytes = self.scales.view(torch.uint8)
        return dict(
            q_ptr=q_bytes,
            s_ptr=scale_bytes,
            g_ptr=self.global_scale if self.global_scale is not None else scale_bytes,
            G=self.scales.shape[1],
            stride_qn=q_bytes.stride(0),
            stride_sn=scale_bytes.stride(0),
            BLOCK=self.block,
            VALUE_BITS=self.value_bits,
            HAS_GLOBAL=self.global_scale is not None,
        )
