"""Dynamic activation quantization to INT8, INT4 or FP8 E4M3 (per token or per tensor).

``x (rows, K)`` fp32/bf16/fp16 -> ``q (rows, K)`` int8 or float8_e4m3fn and a float32
``scale`` ``(rows, 1)`` per token or ``(1, 1)`` per tensor, ``x ~= q * scale``.  The
scale is ``max|x| / qmax`` (qmax 127 or 448; an all-zero row gets 1).  An optional
SmoothQuant divisor ``smooth (K,)`` divides ``x`` column-wise first, fused in.
Numerics follow the reference exactly: IEEE division, round half to even, int8
clamped to [-128, 127], FP8 saturated at +-448 and rounded to nearest even on the
E4M3 grid; compiled, the rounding is the hardware's (``cvt.rni``, the native E4M3
conversion of sm_89+), see :mod:`._exact`.  The row maximum propagates NaN, so a
row's NaN/Inf is found by the same max that sets its scale.

Non-finite input is never quantized into plausible numbers: a row holding NaN/Inf
gets a NaN scale (per tensor: every row does), so a scaled GEMM turns exactly the
rows a float linear would spoil into NaN.  Its codes are defined (NaN quantizes to 0)
but meaningless.  ``row_scales=True`` returns one scale per row in every mode (the
static or per-tensor scale repeated, NaN in non-finite rows), which is what the
W8A8 GEMMs take.

Per token, a program holds whole rows in registers (one read of ``x``, one write
of ``q``); rows longer than ``MAX_ROW_BLOCK`` are read twice (the second time mostly
from L2).  Per tensor needs the global maximum first: one reduction kernel with an
atomic max, then the quantize kernel (two reads of ``x``).

INT4 (``act_dtype="int4"``, scale ``max|x| / 7``, codes in [-7, 7]) comes out of the
same kernel as int8 codes, which the INT8 GEMMs multiply (INT4 tensor cores are gone
from Hopper on).  ``quantize_activation_int4_packed`` stores them two per byte instead
(``(rows, ceil(K / 2))`` uint8, column ``2j`` in the low nibble of byte ``j``, 4-bit two's
complement, as ``numerics.pack_int4_activation``): half the bytes of INT8 codes for a
kernel that unpacks them in registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._exact import divide_rows, divide_rows_bounded, round_to_e4m3, round_to_int32
from ._launch import autotuned, check_device, check_fp8_support, m_bucket, output, run_kernel

INT8_MAX = 127.0
INT4_MAX = 7.0
FP8_MAX = 448.0
QMAX = {"int8": INT8_MAX, "int4": INT4_MAX, "fp8": FP8_MAX}
MAX_ROW_BLOCK = 16384


@triton.jit
def _quantize_values(v, scale, IS_FP8: tl.constexpr, OWN_SCALE: tl.constexpr):
    """Codes of ``v / scale``.  ``OWN_SCALE``: each row's scale is its own ``max |v| / qmax``,
    so no quotient passes ``qmax`` by more than an ulp (the division needs no guard) and
    NaN quotients lie exactly in the rows whose scale is NaN, which :func:`_store_codes`
    writes as zeros (no per-element NaN test); otherwise a NaN quotient becomes code 0 here."""
    if OWN_SCALE:
        q = divide_rows_bounded(v, scale)
    else:
        q = divide_rows(v, scale)
        q = tl.where(q == q, q, 0.0)  # NaN (only in rows whose scale is NaN) -> code 0
    if IS_FP8:
        return round_to_e4m3(tl.minimum(tl.maximum(q, -448.0), 448.0))
    else:
        return round_to_int32(tl.minimum(tl.maximum(q, -128.0), 127.0)).to(tl.int8)


@triton.jit
def _store_codes(q_ptrs, q, mask, scale, OWN_SCALE: tl.constexpr):
    """Store a tile of :func:`_quantize_values` codes; with ``OWN_SCALE``, rows whose scale
    is NaN (they hold NaN/Inf) get code 0 throughout, as the reference quantizes NaN."""
    if OWN_SCALE:
        finite = (scale == scale)[:, None]
        tl.store(q_ptrs, q, mask=mask & finite)
        tl.store(q_ptrs, tl.zeros_like(q), mask=mask & ~finite)
    else:
        tl.store(q_ptrs, q, mask=mask)


@triton.jit
def _load_smoothed(x_ptr, sm_ptr, rows, offs_k, mask, K, stride_xm, HAS_SMOOTH: tl.constexpr):
    """float32 ``x / smooth`` for a (rows, K-slice) tile; zero where masked."""
    x_rows = x_ptr + rows[:, None].to(tl.int64) * stride_xm  # rows * K may pass 2**31
    x = tl.load(x_rows + offs_k[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    if HAS_SMOOTH:
        sm = tl.load(sm_ptr + offs_k, mask=offs_k < K, other=1.0)
        x = tl.math.div_rn(x, sm.to(tl.float32)[None, :])
    return x


@triton.jit
def _max_keeping_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _row_absmax(x):
    """Per row: max |x|, NaN when the row holds a NaN (one ``FMNMX.NAN`` per element)."""
    return tl.reduce(tl.abs(x), 1, _max_keeping_nan)


@triton.jit
def _row_poison(x):
    """Per row: 0.0, or NaN when the row holds a NaN or an Inf."""
    return tl.where(_row_absmax(x) <= 3.4028234663852886e38, 0.0, float("nan"))


@triton.jit
def _quantize_rows_kernel(
    x_ptr,
    sm_ptr,
    q_ptr,
    scale_ptr,
    row_scale_ptr,
    M,
    K,
    stride_xm,
    stride_qm,
    M_BUCKET,
    QMAX: tl.constexpr,
    IS_FP8: tl.constexpr,
    HAS_SMOOTH: tl.constexpr,
    PER_TOKEN: tl.constexpr,
    K_BOUND: tl.constexpr,
    ROW_SCALES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Per token: scales from each row's max; per tensor: ``scale_ptr`` holds the scale.

    With ``ROW_SCALES`` a per-tensor (or static) scale is also written per row to
    ``row_scale_ptr``, NaN in rows holding NaN/Inf.
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    q_rows = q_ptr + rows[:, None].to(tl.int64) * stride_qm
    if PER_TOKEN and BLOCK_K >= K_BOUND:
        # -- one pass: whole rows in registers, max |x|, scale, quantize, store
        offs_k = tl.arange(0, BLOCK_K)
        mask = row_mask[:, None] & (offs_k[None, :] < K)
        x = _load_smoothed(x_ptr, sm_ptr, rows, offs_k, mask, K, stride_xm, HAS_SMOOTH)
        scale = _scale_from_absmax(_row_absmax(x), QMAX)  # NaN for rows with NaN or Inf
        tl.store(scale_ptr + rows, scale, mask=row_mask)
        q = _quantize_values(x, scale[:, None], IS_FP8, True)
        _store_codes(q_rows + offs_k[None, :], q, mask, scale, True)
    else:
        bad = tl.zeros((BLOCK_M,), dtype=tl.float32)
        if PER_TOKEN:
            # -- long rows: max |x| block by block, then a second (mostly L2) read
            amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                mask = row_mask[:, None] & (offs_k[None, :] < K)
                x = _load_smoothed(x_ptr, sm_ptr, rows, offs_k, mask, K, stride_xm, HAS_SMOOTH)
                amax = _max_keeping_nan(amax, _row_absmax(x))
            scale = _scale_from_absmax(amax, QMAX)
            tl.store(scale_ptr + rows, scale, mask=row_mask)
        else:
            scale = tl.load(scale_ptr + rows * 0)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask = row_mask[:, None] & (offs_k[None, :] < K)
            x = _load_smoothed(x_ptr, sm_ptr, rows, offs_k, mask, K, stride_xm, HAS_SMOOTH)
            q = _quantize_values(x, scale[:, None], IS_FP8, PER_TOKEN)
            _store_codes(q_rows + offs_k[None, :], q, mask, scale, PER_TOKEN)
            if ROW_SCALES and not PER_TOKEN:
                bad += _row_poison(x)
        if ROW_SCALES and not PER_TOKEN:
            tl.store(row_scale_ptr + rows, scale + bad, mask=row_mask)


@triton.jit
def _scale_from_absmax(amax, QMAX: tl.constexpr):
    """``amax / QMAX``; 1 for an all-zero row, NaN for an infinite (or NaN) maximum."""
    scale = tl.math.div_rn(amax, QMAX)
    scale = tl.where(scale > 0.0, scale, 1.0)
    return tl.where(amax <= 3.4028234663852886e38, scale, float("nan"))


@triton.jit
def _absmax_kernel(
    x_ptr,
    sm_ptr,
    amax_ptr,
    M,
    K,
    stride_xm,
    HAS_SMOOTH: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Per-tensor max |x / smooth|, combined across programs with an atomic max.

    A block holding NaN/Inf contributes +Inf (an atomic max of NaN is not defined).
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < M) & (offs_k[None, :] < K)
    x = _load_smoothed(x_ptr, sm_ptr, rows, offs_k, mask, K, stride_xm, HAS_SMOOTH)
    amax = tl.reduce(_row_absmax(x), 0, _max_keeping_nan)
    amax = tl.where(amax <= 3.4028234663852886e38, amax, float("inf"))
    tl.atomic_max(amax_ptr, amax, sem="relaxed")


@triton.jit
def _scale_from_absmax_kernel(amax_ptr, scale_ptr, QMAX: tl.constexpr):
    tl.store(scale_ptr, _scale_from_absmax(tl.load(amax_ptr), QMAX))


def _per_tensor_scale(
    x: torch.Tensor, sm: torch.Tensor, has_smooth: bool, qmax: float, block_k: int
) -> torch.Tensor:
    """``(1, 1)`` float32 ``max|x / smooth| / qmax``: one reduction kernel with an atomic
    max, then the scale (1 for an empty or all-zero ``x``, NaN for a non-finite one)."""
    m, k = x.shape
    scale = torch.ones(1, 1, dtype=torch.float32, device=x.device)
    if m * k > 0:
        amax = torch.zeros(1, dtype=torch.float32, device=x.device)
        am_m, am_k = max(1, 8192 // block_k), min(block_k, 8192)
        grid = (triton.cdiv(m, am_m), triton.cdiv(k, am_k))
        _absmax_kernel[grid](
            x, sm, amax, m, k, x.stride(0),
            HAS_SMOOTH=has_smooth, BLOCK_M=am_m, BLOCK_K=am_k, num_warps=8,
        )  # fmt: skip
        _scale_from_absmax_kernel[(1,)](amax, scale, QMAX=qmax)
    return scale


def _row_configs() -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": bm}, num_warps=w) for bm in (8, 4, 2, 1) for w in (4, 8, 16)]


def _prune_rows(configs, named_args, **kwargs):
    """Keep tiles of 1K..16K values with 4..64 values per thread.

    At least 1K values keeps enough bytes in flight; at most 64 float32 values per
    thread keeps the tile in registers (ptxas spills at 128 on sm_90, see
    ``benchmarks/kernel_resources.py``).
    """
    block_k = {**named_args, **kwargs}["BLOCK_K"]
    kept = [
        c
        for c in configs
        if 1024 <= c.kwargs["BLOCK_M"] * block_k <= MAX_ROW_BLOCK
        and 4 * 32 * c.num_warps <= c.kwargs["BLOCK_M"] * block_k <= 64 * 32 * c.num_warps
    ]
    return kept or configs[:1]


_quantize_rows_tuned = autotuned(
    _quantize_rows_kernel,
    _row_configs(),
    ["M_BUCKET", "K", "IS_FP8", "PER_TOKEN", "HAS_SMOOTH"],
    prune=_prune_rows,
)


def quantize_activation_rows(
    x: torch.Tensor,
    act_dtype: str = "int8",
    per_token: bool = True,
    smooth: torch.Tensor | None = None,
    static_scale: torch.Tensor | None = None,
    config: triton.Config | None = None,
    out: torch.Tensor | None = None,
    row_scales: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x (rows, K)``; returns ``(q, scale)`` (see the module docstring).

    ``static_scale`` (one float32 value) replaces the dynamic scale; ``config`` runs
    one explicit ``BLOCK_M`` config of the row kernel instead of autotuning; ``out``
    is an optional preallocated ``q``; ``row_scales`` returns ``scale`` as ``(rows, 1)``
    in every mode.
    """
    if act_dtype not in QMAX:
        raise ValueError(f"act_dtype must be one of {tuple(QMAX)}, got {act_dtype!r}")
    if act_dtype == "int4" and static_scale is not None:
        raise ValueError("int4 activations are dynamic: static_scale must be None")
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"x must be a 2-D float tensor (rows, K), got {x.dtype} {tuple(x.shape)}")
    check_device(x, smooth, static_scale)
    if act_dtype == "fp8":
        check_fp8_support(x.device)
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    if smooth is not None and tuple(smooth.shape) != (k,):
        raise ValueError(f"smooth must be ({k},), got {tuple(smooth.shape)}")
    is_fp8 = act_dtype == "fp8"
    qmax = QMAX[act_dtype]
    q = output(out, (m, k), torch.float8_e4m3fn if is_fp8 else torch.int8, x.device)
    dynamic_rows = per_token and static_scale is None
    block_k = min(triton.next_power_of_2(max(k, 1)), MAX_ROW_BLOCK)
    sm = smooth if smooth is not None else x
    if dynamic_rows:
        scale = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    elif static_scale is not None:
        scale = static_scale.to(device=x.device, dtype=torch.float32).reshape(1, 1).clone()
    else:
        scale = _per_tensor_scale(x, sm, smooth is not None, qmax, block_k)
    if m * k == 0:
        scale = scale.fill_(1.0) if dynamic_rows else scale
        return q, scale.expand(m, 1).clone() if row_scales and not dynamic_rows else scale
    per_row = (
        torch.empty(m, 1, dtype=torch.float32, device=x.device)
        if row_scales and not dynamic_rows
        else scale
    )
    run_kernel(
        _quantize_rows_tuned,
        lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),),
        config,
        x_ptr=x,
        sm_ptr=sm,
        q_ptr=q,
        scale_ptr=scale,
        row_scale_ptr=per_row,
        M=m,
        K=k,
        stride_xm=x.stride(0),
        stride_qm=q.stride(0),
        M_BUCKET=m_bucket(m),
        QMAX=qmax,
        IS_FP8=is_fp8,
        HAS_SMOOTH=smooth is not None,
        PER_TOKEN=dynamic_rows,
        K_BOUND=triton.next_power_of_2(max(k, 1)),
        ROW_SCALES=row_scales and not dynamic_rows,
        BLOCK_K=block_k,
    )
    return q, per_row


@triton.jit
def _int4_codes(x, scale):
    """int32 codes in [-7, 7] of a float32 tile (NaN, only in rows with a NaN scale: 0)."""
    q = divide_rows(x, scale[:, None])
    q = tl.where(q == q, q, 0.0)
    return round_to_int32(tl.minimum(tl.maximum(q, -7.0), 7.0))


@triton.jit
def _quantize_int4_packed_kernel(
    x_ptr,
    q_ptr,
    scale_ptr,
    M,
    K,
    stride_xm,
    stride_qm,
    M_BUCKET,
    PER_TOKEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Codes of columns ``2j`` and ``2j + 1`` packed into byte ``j`` of each row, ``BLOCK_K``
    columns (``BLOCK_K // 2`` bytes) a step."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    x_rows = x_ptr + rows[:, None].to(tl.int64) * stride_xm
    if PER_TOKEN:
        # -- max |x| of each row (NaN propagates into the scale)
        amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask = row_mask[:, None] & (offs_k[None, :] < K)
            x = tl.load(x_rows + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
            amax = _max_keeping_nan(amax, _row_absmax(x))
        scale = _scale_from_absmax(amax, 7.0)
        tl.store(scale_ptr + rows, scale, mask=row_mask)
    else:
        scale = tl.load(scale_ptr + rows * 0)
    # -- even and odd columns, quantized and packed low nibble first
    num_bytes = tl.cdiv(K, 2)
    for p0 in range(0, num_bytes, BLOCK_K // 2):
        offs_p = p0 + tl.arange(0, BLOCK_K // 2)
        even, odd = 2 * offs_p, 2 * offs_p + 1
        m_even = row_mask[:, None] & (even[None, :] < K)
        m_odd = row_mask[:, None] & (odd[None, :] < K)
        lo = _int4_codes(
            tl.load(x_rows + even[None, :], mask=m_even, other=0.0).to(tl.float32), scale
        )
        hi = _int4_codes(
            tl.load(x_rows + odd[None, :], mask=m_odd, other=0.0).to(tl.float32), scale
        )
        packed = ((lo & 0xF) | ((hi & 0xF) << 4)).to(tl.uint8)
        q_rows = q_ptr + rows[:, None].to(tl.int64) * stride_qm
        tl.store(
            q_rows + offs_p[None, :], packed, mask=row_mask[:, None] & (offs_p[None, :] < num_bytes)
        )


def _int4_configs() -> list[triton.Config]:
    """Row blocks of 1..8 rows, 128..512 values (64..256 bytes) wide per step."""
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=4)
        for bm in (8, 4, 2, 1)
        for bk in (512, 256, 128)
    ]


_quantize_int4_tuned = autotuned(
    _quantize_int4_packed_kernel, _int4_configs(), ["M_BUCKET", "K", "PER_TOKEN"]
)


def quantize_activation_int4_packed(
    x: torch.Tensor, per_token: bool = True, config: triton.Config | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric INT4 of ``x (rows, K)``: ``(packed (rows, ceil(K / 2)) uint8, scale)``.

    ``scale`` float32 ``(rows, 1)`` per token or ``(1, 1)`` per tensor, ``max|x| / 7``
    (1 for an all-zero row, NaN for rows with NaN/Inf, whose codes are 0); ``config``
    runs one explicit ``BLOCK_M`` / ``BLOCK_K`` config instead of autotuning.
    """
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"x must be a 2-D float tensor (rows, K), got {x.dtype} {tuple(x.shape)}")
    check_device(x)
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    packed = torch.empty(m, (k + 1) // 2, dtype=torch.uint8, device=x.device)
    if per_token:  # -- every row's scale is written by the kernel (1 when K is 0)
        scale = torch.empty(m, 1, dtype=torch.float32, device=x.device)
        if k == 0:
            scale.fill_(1.0)
    else:
        block_k = min(triton.next_power_of_2(max(k, 1)), MAX_ROW_BLOCK)
        scale = _per_tensor_scale(x, x, False, INT4_MAX, block_k)
    if m * k == 0:
        return packed, scale
    strides = {"stride_xm": x.stride(0), "stride_qm": packed.stride(0)}
    run_kernel(
        _quantize_int4_tuned, lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),), config,
        x_ptr=x, q_ptr=packed, scale_ptr=scale, M=m, K=k, M_BUCKET=m_bucket(m),
        PER_TOKEN=per_token, **strides,
    )  # fmt: skip
    return packed, scale
