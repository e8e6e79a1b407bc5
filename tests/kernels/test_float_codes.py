"""The bit-move decoders of ``triton_kernels.float_codes`` against the numerics' E2M1 values.

Words hold every byte value in every byte position (so every code in every nibble), plus
random words; each decoded half must be the code's value times its placement's power of
two, bit for bit (on the GPU through the inline-PTX bit select, in the interpreter
through its Triton twin).
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from kernel_utils import KERNEL_DEVICE, ON_GPU, requires_kernels
from torchquant.triton_kernels.float_codes import e2m1_pairs

from torchquant.numerics.fp4 import decode_e2m1

pytestmark = requires_kernels


@triton.jit
def _pairs_kernel(w_ptr, out_ptr, n, BF16: tl.constexpr, ASM: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    w = tl.load(w_ptr + offs, mask=mask, other=0).to(tl.uint32, bitcast=True)
    p0, p1, p2, p3 = e2m1_pairs(w, BF16, ASM)
    tl.store(out_ptr + offs * 4, p0.to(tl.int32, bitcast=True), mask=mask)
    tl.store(out_ptr + offs * 4 + 1, p1.to(tl.int32, bitcast=True), mask=mask)
    tl.store(out_ptr + offs * 4 + 2, p2.to(tl.int32, bitcast=True), mask=mask)
    tl.store(out_ptr + offs * 4 + 3, p3.to(tl.int32, bitcast=True), mask=mask)


def _words() -> torch.Tensor:
    """Every byte value in each of the four byte positions, then random words."""
    byte = torch.arange(256, dtype=torch.int64)
    rest = torch.randint(0, 256, (256, 4), generator=torch.Generator().manual_seed(0))
    placed = [rest.clone() for _ in range(4)]
    for position, b in enumerate(placed):
        b[:, position] = byte
    every = torch.cat(placed)
    random = torch.randint(0, 256, (512, 4), generator=torch.Generator().manual_seed(1))
    b = torch.cat([every, random])
    word = b[:, 0] | b[:, 1] << 8 | b[:, 2] << 16 | b[:, 3] << 24
    return word.to(torch.uint32).view(torch.int32)


@pytest.mark.parametrize("bf16", [False, True])
def test_e2m1_pairs_are_each_codes_value(bf16):
    words = _words()
    n = words.numel()
    out = torch.empty(n, 4, dtype=torch.int32, device=KERNEL_DEVICE)
    grid = (triton.cdiv(n, 256),)
    _pairs_kernel[grid](words.to(KERNEL_DEVICE), out, n, BF16=bf16, ASM=ON_GPU, BLOCK=256)
    got = out.cpu()
    # -- halves of pair J: codes J (low) and J + 4 (high) of the word, nibble i at bits 4i
    codes = torch.stack(
        [(words.view(torch.uint32).to(torch.int64) >> (4 * i)) & 15 for i in range(8)], 1
    )
    halves = torch.stack([got.to(torch.int64) & 0xFFFF, (got.to(torch.int64) >> 16) & 0xFFFF], 2)
    halves = halves.to(torch.int16)  # (n, pair J, half)
    dtype, power = (torch.bfloat16, 2.0**-126) if bf16 else (torch.float16, 2.0**-14)
    values = halves.view(dtype).float()
    expected = decode_e2m1(codes.to(torch.uint8)).float() * power  # (n, 8)
    assert torch.equal(values[:, :, 0], expected[:, :4])
    assert torch.equal(values[:, :, 1], expected[:, 4:])
    # -- negative zero keeps its sign bit, as the bit moves do
    assert torch.equal(halves[:, :, 0] < 0, codes[:, :4] >= 8)
