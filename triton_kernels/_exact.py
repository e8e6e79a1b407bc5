"""Exact float32 steps the kernels share: rounding to the nearest integer with ties to even
(``torch.round``), to the FP8 E4M3 grid, and IEEE division by a per-row divisor.

Compiled for CUDA, rounding is the hardware's own conversion: ``cvt.rni`` (one ``F2I`` or
``FRND``) and the native E4M3 conversion of sm_89+ (``cvt.rn.satfinite.e4m3x2``); division
by a row's scale is Markstein's correction of ``x * (1 / s)`` (two multiplies and two FMAs
per element, the reciprocal once per row) instead of the per-element ``div.rn`` sequence
with its slow-path branch.  Triton's CPU interpreter has neither libdevice nor inline PTX,
and emulates ``fma`` with two roundings, so under it the same results come from plain
float32 arithmetic (``floor``, bit manipulation, ``div_rn``).  The choice is made once,
when the kernels are imported, as Triton decides between compiling and interpreting.
"""

import triton
import triton.language as tl
from triton.language.extra.cuda import libdevice

from ._launch import interpreting


@triton.jit
def _rint_native(v):
    return libdevice.rint(v)


@triton.jit
def _rint_to_int32_native(v):
    return tl.inline_asm_elementwise(
        "cvt.rni.s32.f32 $0, $1;", "=r,r", [v], dtype=tl.int32, is_pure=True, pack=1
    )


@triton.jit
def _to_e4m3_native(v):
    return v.to(tl.float8e4nv)


@triton.jit
def _markstein_quotient(x, s):
    """``(q0, q)``: the first guess ``x * (1 / s)`` and Markstein's correction of it, ``s
    (rows, 1)`` positive.

    ``s`` is first moved by ``2**+-64`` (with ``x``: exact) away from the ends of the
    exponent range, so that ``r = 1 / s`` is a normal float and the remainder
    ``q0 * s - x`` of ``q0 = x * r`` is exact (one FMA); ``q0 - remainder * r`` is then the
    correctly rounded quotient for quotients below 2**20 in magnitude.
    """
    k = tl.where(s < 2.168404344971009e-19, 1.8446744073709552e19, 1.0)  # 2**-62, 2**64
    k = tl.where(s > 4.611686018427388e18, 5.421010862427522e-20, k)  # 2**62, 2**-64
    s = s * k
    r = tl.math.div_rn(1.0, s)
    x = x * k
    q0 = x * r
    remainder = tl.fma(q0, s, -x)
    return q0, tl.fma(-remainder, r, q0)


@triton.jit
def _divide_rows_native(x, s):
    """``x / s`` correctly rounded, ``s (rows, 1)`` positive (one scale per row).

    Quotients of 2**20 and more, and Inf/NaN, keep the first guess: every caller clamps
    them to the same code.
    """
    q0, q = _markstein_quotient(x, s)
    return tl.where(tl.abs(q0) < 1048576.0, q, q0)


@triton.jit
def _divide_rows_bounded_native(x, s):
    """``x / s`` correctly rounded where every quotient is known to stay below 2**20 in
    magnitude -- a row divided by its own ``max |x| / qmax`` -- (or is NaN): no guard, two
    instructions an element fewer than :func:`_divide_rows_native`."""
    return _markstein_quotient(x, s)[1]


@triton.jit
def _divide_rows_exact(x, s):
    return tl.math.div_rn(x, s)


@triton.jit
def _rint_exact(v):
    """Nearest integer, ties to even, by ``floor`` (exact for |v| < 2**22)."""
    f = tl.floor(v)
    d = v - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return tl.where(up, f + 1.0, f)


@triton.jit
def _rint_to_int32_exact(v):
    return _rint_exact(v).to(tl.int32)


@triton.jit
def _to_e4m3_exact(v):
    """Round float32 ``v`` (already clamped to +-448) to the nearest E4M3 value, ties to even,
    in float32; the conversion that follows is then exact."""
    exponent = ((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    exponent = tl.maximum(exponent, -6)  # subnormals share the step of the smallest normal
    step = ((exponent - 3 + 127) << 23).to(tl.float32, bitcast=True)
    inv_step = ((3 - exponent + 127) << 23).to(tl.float32, bitcast=True)
    magnitude = _rint_exact(tl.abs(v) * inv_step) * step
    return tl.where(v < 0.0, -magnitude, magnitude).to(tl.float8e4nv)  # keeps -0's sign


# -- ``divide_rows(x, s)``: x / s for a per-row ``s (rows, 1)`` (``divide_rows_bounded``: the
# -- same for quotients below 2**20 in magnitude); ``round_half_even(v)``: float32
# -- integers; ``round_to_int32(v)``: int32 (``v`` in range); ``round_to_e4m3(v)``: float8e4nv
# -- (``v`` clamped to +-448)
if interpreting():
    divide_rows = divide_rows_bounded = _divide_rows_exact
    round_half_even = _rint_exact
    round_to_int32 = _rint_to_int32_exact
    round_to_e4m3 = _to_e4m3_exact
else:
    divide_rows = _divide_rows_native
    divide_rows_bounded = _divide_rows_bounded_native
    round_half_even = _rint_native
    round_to_int32 = _rint_to_int32_native
    round_to_e4m3 = _to_e4m3_native
