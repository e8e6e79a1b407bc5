"""Float codes decoded by bit arithmetic: E2M1 (FP4), E4M3 (FP8) and E8M0 block scales.

No FP4/FP8 conversion instructions are used, so every GPU Triton runs on decodes them.
A code's magnitude bits placed in a float16's exponent and mantissa are its value times a
fixed power of two, subnormals included: ``2**-14`` for E2M1, ``2**-8`` for E4M3.  The
kernels fold that power into the block scale, so each code costs its bit moves and one
float16 -> float32 conversion.  Two codes share a 32-bit word as a float16 pair:

* E2M1, codes ``j`` and ``j + 4`` of a word of 8 (nibble ``i`` at bits ``4i .. 4i+3``,
  sign in bit 3): the magnitudes shifted to bits 9-11 / 25-27 and the signs to 15 / 31;
* E4M3, bytes ``j`` and ``j + 2`` of a word of 4: bits 0-6 to 7-13 / 23-29, the sign kept.

:func:`e2m1_pairs` makes a word's four E2M1 pairs (float16, or bfloat16 for the tensor
cores) in 11 integer instructions; :func:`scaled_k_pairs` turns two of them into
neighbours along K times a block multiplier, still 16-bit (the MMA operand's registers).
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
def select_bits(a, b, MASK: tl.constexpr, ASM: tl.constexpr):
    """Bits of ``a`` where ``MASK`` is set, of ``b`` elsewhere (uint32): one ``LOP3`` with the
    mask as its immediate (``ASM``), which ptxas otherwise splits into two."""
    if ASM:
        return tl.inline_asm_elementwise(
            f"lop3.b32 $0, $1, $2, {MASK}, 0xe4;",
            "=r,r,r",
            [a, b],
            dtype=tl.uint32,
            is_pure=True,
            pack=1,
        )
    else:
        return (a & MASK) | (b & (MASK ^ 0xFFFFFFFF))


@triton.jit
def e2m1_pairs(w, BF16: tl.constexpr, ASM: tl.constexpr):
    """The four pairs (codes ``J`` and ``J + 4``, ``J`` = 0..3; low half: code ``J``) of
    E2M1 words ``w`` (uint32) as float16 bit pairs, each the value times ``2**-14``
    (``BF16``: bfloat16, times ``2**-126``), in 11 integer instructions a word where
    moving each pair's sign and magnitude bits apart takes 15.

    A code's sign must land ``D`` bits (3; 6 in bfloat16) further up than its magnitude.
    One bit select of ``w`` and ``w`` shifted by ``D`` gives that gap to the nibbles of two
    pairs at once (their bits do not collide); each pair is then one shift and one mask."""
    if BF16:
        # -- magnitude to bits 6-8, sign to 15: pairs 0, 1 signs up, pairs 2, 3 magnitudes down
        low = select_bits(w << 6, w, 0x22002200, ASM)
        high = select_bits(w >> 6, w, 0x01DC01DC, ASM)
        mask: tl.constexpr = 0x81C081C0
        return (low << 6) & mask, (low << 2) & mask, (high << 4) & mask, high & mask
    else:
        # -- magnitude to bits 9-11, sign to 15: even pairs signs up, odd magnitudes down
        even = select_bits(w << 3, w, 0x40404040, ASM)
        odd = select_bits(w >> 3, w, 0x0E0E0E0E, ASM)
        mask: tl.constexpr = 0x8E008E00
        return (even << 9) & mask, (odd << 8) & mask, (even << 1) & mask, odd & mask


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


# -- 16-bit weight pairs for the tensor cores: the two codes of a pair times their block's
# -- multiplier in one packed multiply, rearranged into neighbours along K

FP16_2P14 = tl.constexpr(0x74007400)  # 2**14 in both float16 halves
BF16_2P126 = tl.constexpr(0x7E807E80)  # 2**126 in both bfloat16 halves


def _k_pairs_asm(bf16: bool, prescale: int) -> tl.constexpr:
    """PTX: pairs ``$2`` (codes a, a + 4) and ``$3`` (codes a + 1, a + 5) rearranged into
    (a, a + 1) -> ``$0`` and (a + 4, a + 5) -> ``$1``, each times ``prescale`` (a constant
    pair, 0: none) and then the multiplier pair ``$4``.  bfloat16 multiplies as an FMA
    with -0 added (``fma.rn.bf16x2``, from sm_80; the product itself, signed zeros kept)."""
    op = "fma.rn.bf16x2 {d}, {a}, {b}, z;" if bf16 else "mul.rn.f16x2 {d}, {a}, {b};"
    lines = [".reg .b32 t0, t1, z, c;", "mov.b32 z, 0x80008000;", f"mov.b32 c, {prescale:#x};"]
    lines += ["prmt.b32 t0, $2, $3, 0x5410;", "prmt.b32 t1, $2, $3, 0x7632;"]
    for t in ("t0", "t1"):
        if prescale:
            lines.append(op.format(d=t, a=t, b="c"))
    lines.append(op.format(d="$0", a="t0", b="$4"))
    lines.append(op.format(d="$1", a="t1", b="$4"))
    return tl.constexpr("{ " + " ".join(lines) + " }")


_BF16_NV: tl.constexpr = _k_pairs_asm(True, 0)
_BF16_MX: tl.constexpr = _k_pairs_asm(True, BF16_2P126.value)
_FP16_NV: tl.constexpr = _k_pairs_asm(False, FP16_2P14.value)


@triton.jit
def scaled_k_pairs(pa, pb, mult, BF16: tl.constexpr, PRESCALE: tl.constexpr):
    """Pairs of :func:`e2m1_pairs` for codes (a, a + 4) and (a + 1, a + 5) as 16-bit pairs
    (a, a + 1) and (a + 4, a + 5) (uint32), each half times ``PRESCALE`` (bfloat16 only:
    ``2**126`` or none; float16 always ``2**14``) and the multiplier pair ``mult``."""
    if BF16:
        if PRESCALE:
            asm: tl.constexpr = _BF16_MX
        else:
            asm: tl.constexpr = _BF16_NV
    else:
        asm: tl.constexpr = _FP16_NV
    return tl.inline_asm_elementwise(
        asm, "=r,=r,r,r,r", [pa, pb, mult], dtype=(tl.uint32, tl.uint32), is_pure=True, pack=1
    )


@triton.jit
def float_pair(v, BF16: tl.constexpr, ASM: tl.constexpr):
    """float32 ``v`` as a bfloat16 / float16 pair (uint32, ``v`` in both halves), rounded
    to nearest (the callers' values are exact)."""
    if ASM:
        if BF16:
            asm: tl.constexpr = "cvt.rn.bf16x2.f32 $0, $1, $1;"
        else:
            asm: tl.constexpr = "cvt.rn.f16x2.f32 $0, $1, $1;"
        return tl.inline_asm_elementwise(asm, "=r,r", [v], dtype=tl.uint32, is_pure=True, pack=1)
    else:
        dtype: tl.constexpr = tl.bfloat16 if BF16 else tl.float16
        half = v.to(dtype).to(tl.uint16, bitcast=True).to(tl.uint32)
        return half | (half << 16)


@triton.jit
def as_halves(pairs, BF16: tl.constexpr):
    """bfloat16 (``BF16``) / float16 tensor of 16-bit pairs in which elements ``2i`` and
    ``2i + 1`` both hold pair ``i`` (uint32): its low and high halves, no instruction
    (each asm instance takes the two copies and returns their register as is)."""
    if BF16:
        return tl.inline_asm_elementwise(
            "mov.b32 $0, $1;", "=r,r,r", [pairs], dtype=tl.bfloat16, is_pure=True, pack=2
        )
    else:
        return tl.inline_asm_elementwise(
            "mov.b32 $0, $1;", "=r,r,r", [pairs], dtype=tl.float16, is_pure=True, pack=2
        )
