"""Float codes decoded by bit arithmetic: E2M1 (FP4), E4M3 (FP8) and E8M0 block scales.

No FP4/FP8 conversion instructions are used, so every GPU Triton runs on decodes them.
A code's magnitude bits placed in a float16's exponent and mantissa are its value times a
fixed power of two, subnormals included: ``2**-14`` for E2M1, ``2**-8`` for E4M3.  The
kernels fold that power into the block scale, so each code costs its bit moves and one
float16 -> float32 conversion.  Two codes share a 32-bit word as a float16 pair:

* E2M1, codes ``j`` and ``j + 4`` of a word of 8 (nibble ``i`` at bits ``4i .. 4i+3``,
  sign in bit 3): the magnitudes shifted to bits 9-11 / 25-27 and the signs to 15 / 31;
* E4M3, bytes ``j`` and ``j + 2`` of a word of 4: bits 0-6 to 7-13 / 23-29, the sign kept.
"""

from __future__ import annotations

import triton
import triton.language as tl

# -- constexpr: the compiled kernels read them as constants
E2M1_TO_FP16 = tl.constexpr(16384.0)  # 2**14: an E2M1 code's bits in a float16, to its value
E4M3_TO_FP16 = tl.constexpr(256.0)  # 2**8: the same for an E4M3 byte's exponent and mantissa
E8M0_SMALLEST = tl.constexpr(2.0**-127)  # exponent byte 0: no float32 normal's bit pattern


@triton.jit
def e2m1_to_float(code):
    """float32 values of E2M1 codes (int16/int32): in a float16 by bits, the sign to bit 15,
    exponent and mantissa to bits 9-11, are the value times ``2**-14``."""
    bits = (((code & 8) << 12) | ((code & 7) << 9)).to(tl.int16)
    return bits.to(tl.float16, bitcast=True).to(tl.float32) * E2M1_TO_FP16


@triton.jit
def e4m3_bits_to_float(byte):
    """float32 values of E4M3 bytes (int32; no NaN byte: values are saturated): the 7 low
    bits in a float16's exponent and mantissa are the value times ``2**-8``."""
    half = (((byte & 0x80) << 8) | ((byte & 0x7F) << 7)).to(tl.int16).to(tl.float16, bitcast=True)
    return half.to(tl.float32) * E4M3_TO_FP16


@triton.jit
def _shift_left(w, BITS: tl.constexpr):
    """``w`` (uint32) shifted left by ``BITS`` (right when negative)."""
    if BITS >= 0:
        return w << BITS
    else:
        return w >> -BITS


@triton.jit
def e2m1_pair(w, J: tl.constexpr):
    """Codes ``J`` and ``J + 4`` (``J`` in 0..3) of E2M1 words ``w`` (uint32) as float16
    bit pairs (low half: code ``J``): each the value times ``2**-14``."""
    magnitude = _shift_left(w, 9 - 4 * J) & 0x0E000E00
    return magnitude | (_shift_left(w, 12 - 4 * J) & 0x80008000)


@triton.jit
def e4m3_pair(w, J: tl.constexpr):
    """Bytes ``J`` and ``J + 2`` (``J`` in 0..1) of E4M3 words ``w`` (uint32) as float16 bit
    pairs (low half: byte ``J``): each the value times ``2**-8``."""
    if J == 0:
        return ((w << 7) & 0x3F803F80) | ((w << 8) & 0x80008000)
    else:
        return ((w >> 1) & 0x3F803F80) | (w & 0x80008000)


@triton.jit
def halves(pair, ASM: tl.constexpr):
    """The two float16 of ``pair`` (uint32 bit pairs, low half first) as float32.

    ``ASM`` (compiled kernels): one PTX conversion per half of the 32-bit register, where
    LLVM would repack the halves of neighbouring pairs first; the interpreter (no inline
    assembly) truncates and shifts to the same two float16."""
    if ASM:
        return tl.inline_asm_elementwise(
            "{ .reg .b16 lo, hi; mov.b32 {lo, hi}, $2; cvt.f32.f16 $0, lo; cvt.f32.f16 $1, hi; }",
            "=f,=f,r",
            [pair],
            dtype=(tl.float32, tl.float32),
            is_pure=True,
            pack=1,
        )
    else:
        lo = (pair & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        hi = (pair >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        return lo, hi


def _scaled_pair_asm(log2_power: int) -> tl.constexpr:
    """PTX: the float16 pair ``$2`` times ``2**log2_power`` (one packed multiply), then each
    half to float32 (``$0`` low, ``$1`` high)."""
    half = (log2_power + 15) << 10
    return tl.constexpr(
        "{ .reg .b16 lo, hi; .reg .b32 p, t; "
        f"mov.b32 p, {half | half << 16}; mul.rn.f16x2 t, $2, p; "
        "mov.b32 {lo, hi}, t; cvt.f32.f16 $0, lo; cvt.f32.f16 $1, hi; }"
    )


_E2M1_PAIR_ASM = _scaled_pair_asm(14)
_E4M3_PAIR_ASM = _scaled_pair_asm(8)


@triton.jit
def exact_halves(pair, VALUE_BITS: tl.constexpr, ASM: tl.constexpr):
    """The codes' own values of an E2M1 (``VALUE_BITS`` 4) or E4M3 (8) float16 pair, as
    float32: :func:`halves` times ``2**14`` / ``2**8``, applied to the pair in one packed
    float16 multiply (exact: every product is a float16 normal)."""
    if ASM:
        if VALUE_BITS == 4:
            asm: tl.constexpr = _E2M1_PAIR_ASM
        else:
            asm: tl.constexpr = _E4M3_PAIR_ASM
        return tl.inline_asm_elementwise(
            asm, "=f,=f,r", [pair], dtype=(tl.float32, tl.float32), is_pure=True, pack=1
        )
    else:
        lo, hi = halves(pair, False)
        power: tl.constexpr = E2M1_TO_FP16 if VALUE_BITS == 4 else E4M3_TO_FP16
        return lo * power, hi * power


@triton.jit
def e8m0_folded(e, LOG2_FOLD: tl.constexpr):
    """``(multiplier, post)`` float32 with ``multiplier * post == 2**(e - 127 + LOG2_FOLD)``
    exactly for E8M0 exponents ``e`` (int32; ``LOG2_FOLD`` 14 or 8 folds a float16
    placement's power of two, 0 none): the multiplier is the product where it is a float32
    normal (``post`` 1), else ``2**(e - 127)`` (``post`` the fold, largest exponents only)."""
    if LOG2_FOLD == 0:
        power = (e << 23).to(tl.float32, bitcast=True)
        return tl.where(e == 0, E8M0_SMALLEST, power), tl.full(e.shape, 1.0, tl.float32)
    else:
        small = e <= 254 - LOG2_FOLD
        folded = ((e + LOG2_FOLD) << 23).to(tl.float32, bitcast=True)
        plain = (e << 23).to(tl.float32, bitcast=True)
        return tl.where(small, folded, plain), tl.where(small, 1.0, 2.0**LOG2_FOLD)
