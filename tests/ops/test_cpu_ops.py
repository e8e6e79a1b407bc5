"""The fast CPU implementation of every op against its exact reference.

PyTorch's int4pack/int8pack kernels run bf16 activations only (``cpu_kernels``): the
weight-only ops compute bf16 inputs, and float32 ones inside ``float32_in_bf16`` (rounded
to bf16), with bf16 scales and float32 accumulation, within relative error (Frobenius)
1e-2 of the reference (``cpu_kernels.BF16_RELATIVE_ERROR``), as does FP8 weight-only.
Many rows take the blocked dequantize-and-multiply path, held to the same bound.  Other
float32 inputs keep the exact reference (float32 tolerance).  W8A8 INT8 accumulates
exactly in int32 and W8A8 FP8 products are exact in float32, so those keep the tolerance
of their input dtype.
"""

from __future__ import annotations

import copy

import pytest
import torch

from torchquant import QuantLinear, ops, scheme_from_name
from torchquant.config import ActivationQuant, QuantScheme, WeightQuant
from torchquant.ops import cpu_kernels

BF16_KERNEL_ERROR = cpu_kernels.BF16_RELATIVE_ERROR
EXACT_TOLERANCE = {torch.float32: (2e-5, 1e-5), torch.bfloat16: (1.6e-2, 8e-3)}
# -- rows on each side of the int4pack / int8pack vs dequantize-and-multiply switch
ROWS = (1, 3, 17, 300)


def _layer(scheme: str | QuantScheme, group_size: int | None, n: int, k: int, dtype=torch.float32):
    torch.manual_seed(n * 1000 + k)
    linear = torch.nn.Linear(k, n).to(dtype)
    if isinstance(scheme, str):
        scheme = scheme_from_name(scheme, group_size)
    return QuantLinear.from_linear(linear, scheme)


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def _assert_exact(out: torch.Tensor, ref: torch.Tensor) -> None:
    rtol, atol = EXACT_TOLERANCE[out.dtype]
    scale = ref.float().abs().max().clamp(min=1.0).item()
    torch.testing.assert_close(out.float(), ref.float(), rtol=rtol, atol=atol * scale)


INT_FORMATS = [
    ("w2a16", 32),
    ("w2a16", None),
    ("w3a16", 128),
    ("w3a16", 16),
    ("w4a16", 128),
    ("w4a16", 32),
    ("w4a16", 256),
    ("w4a16", None),
    ("w5a16", 64),
    ("w6a16", None),
    ("w7a16", 512),
    ("w8a16", None),
    ("w8a16", 32),
    ("w8a16", 16),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scheme,group_size", INT_FORMATS)
def test_weight_only_int_matches_reference(scheme, group_size, dtype):
    # -- ragged N and K; SmolLM2's K with a partial group; at 300 rows the tiles follow the
    # -- input's column order (N < 300) or the input is reordered to the codes' (N = 320)
    for n, k in ((36, 100), (200, 576), (320, 100)):
        layer = _layer(scheme, group_size, n, k, dtype)
        for m in ROWS:
            x = torch.randn(m, k, dtype=dtype)
            out, ref = layer(x), layer.reference_forward(x)
            assert out.dtype == dtype and out.shape == ref.shape == (m, n)
            if dtype == torch.float32:
                _assert_exact(out, ref)
                with cpu_kernels.float32_in_bf16():
                    out = layer(x)
            assert _relative_error(out, ref) < BF16_KERNEL_ERROR, (n, k, m)
        assert layer.cpu_layout_nbytes() > 0


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_act_order_groups_match_reference(bits):
    n, k, g = 48, 160, 32
    scheme = scheme_from_name(f"w{bits}a16", g, symmetric=False)
    layer = QuantLinear(k, n, scheme, dtype=torch.bfloat16, g_idx=True)
    torch.manual_seed(bits)
    layer.set_int_codes(
        torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8),
        torch.rand(n, k // g) * 0.01 + 1e-3,
        torch.randint(0, 1 << bits, (n, k // g), dtype=torch.uint8),
    )
    layer.bias.normal_()
    layer.g_idx.copy_(torch.randperm(k) % (k // g))
    layer.cpu_layout()  # g_idx was written after the codes: the layout follows it
    for m in ROWS:
        x = torch.randn(2, m, k, dtype=torch.bfloat16)
        assert _relative_error(layer(x), layer.reference_forward(x)) < BF16_KERNEL_ERROR


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scheme", ["w8a8", "fp8", "w8a8-tensor", "w8a16-fp8"])
def test_w8a8_and_fp8_weight_match_reference(scheme, dtype):
    if scheme == "w8a8-tensor":
        per_tensor = QuantScheme(
            WeightQuant(bits=8, group_size=-1), ActivationQuant("int8", "tensor")
        )
        layer = _layer(per_tensor, None, 40, 72, dtype)
    else:
        layer = _layer(scheme, None, 40, 72, dtype)
    for m in ROWS:
        x = torch.randn(m, 72, dtype=dtype)
        out, ref = layer(x), layer.reference_forward(x)
        if scheme == "w8a16-fp8" and dtype == torch.bfloat16:
            assert _relative_error(out, ref) < BF16_KERNEL_ERROR
        else:
            _assert_exact(out, ref)


@pytest.mark.parametrize("static", [False, True])
def test_bf16_w8a8_on_the_int8pack_kernel_matches_reference(static):
    """bf16, few rows, a scale per row (or a static one): the codes run _weight_int8pack_mm."""
    scheme = "w8a8"
    if static:
        act = ActivationQuant(granularity="tensor", dynamic=False)
        scheme = QuantScheme(WeightQuant(bits=8, group_size=-1), act)
    layer = _layer(scheme, None, 40, 100, torch.bfloat16)  # K = 100: the padded int8 weight
    if static:
        layer.input_scale.fill_(0.02)
    for m in ROWS:
        x = torch.randn(m, 100, dtype=torch.bfloat16)
        _assert_exact(layer(x), layer.reference_forward(x))
        x[m // 2, 3] = float("nan")
        out, ref = layer(x), layer.reference_forward(x)
        assert torch.equal(out.isnan(), ref.isnan())
        _assert_exact(out.nan_to_num(), ref.nan_to_num())


def test_bf16_w8a8_rows_whose_int8pack_sums_overflow_are_recomputed():
    """Huge weights, tiny inputs: the kernel's sums times the weight scale overflow bf16
    before the input scale brings them back to ~3e7."""
    w = torch.full((4, 32), 1e36, dtype=torch.bfloat16)
    layer = QuantLinear.from_weight(w, None, scheme_from_name("w8a8"))
    x = torch.full((2, 32), 1e-30, dtype=torch.bfloat16)
    out = layer(x)
    assert torch.isfinite(out).all()
    _assert_exact(out, layer.reference_forward(x))


def test_w8a8_with_one_input_feature_matches_reference():
    """``torch._int_mm`` on CPU is wrong for K = 1 (a fuzzer case): the op avoids it there."""
    layer = _layer("w8a8", None, 3, 1)
    x = torch.randn(2, 1)
    _assert_exact(layer(x), layer.reference_forward(x))


@pytest.mark.parametrize(
    "m,k,n", [(1, 5, 3), (1, 576, 192), (2, 13, 7), (17, 100, 36), (64, 64, 8)]
)
def test_int_mm_accumulates_exactly_on_ragged_shapes(m, k, n):
    """``torch._int_mm`` on CPU takes any M (including 1), K and N; the sum is exact."""
    x = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    assert torch.equal(torch._int_mm(x, w.t()), x.int() @ w.int().t())


def test_smoothquant_divisor_and_static_scale_match_reference():
    layer = _layer("w8a8", None, 24, 64)
    layer.smooth_scale = torch.rand(64) + 0.5
    x = torch.randn(5, 64)
    _assert_exact(layer(x), layer.reference_forward(x))
    static = QuantScheme(
        WeightQuant(bits=8, group_size=-1), ActivationQuant(granularity="tensor", dynamic=False)
    )
    layer = _layer(static, None, 24, 64)
    layer.input_scale.fill_(0.02)
    _assert_exact(layer(x), layer.reference_forward(x))
    weight_only = _layer("w4a16", 32, 24, 64, torch.bfloat16)
    weight_only.smooth_scale = torch.rand(64) + 0.5
    out, ref = weight_only(x.bfloat16()), weight_only.reference_forward(x.bfloat16())
    assert _relative_error(out, ref) < BF16_KERNEL_ERROR


@pytest.mark.parametrize("scheme,group_size", [("w4a16", 128), ("w6a16", 32), ("w8a16", None)])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_rows_stay_nonfinite(scheme, group_size, bad):
    layer = _layer(scheme, group_size, 32, 576, torch.bfloat16)
    for m in (4, 300):
        x = torch.randn(m, 576, dtype=torch.bfloat16)
        x[1, 7] = bad
        out = layer(x)
        assert not torch.isfinite(out[1]).any()
        keep = torch.ones(m, dtype=torch.bool)
        keep[1] = False
        assert torch.isfinite(out[keep]).all()


@pytest.mark.parametrize("scheme", ["w8a8", "fp8"])
def test_w8a8_nonfinite_rows_as_reference(scheme):
    layer = _layer(scheme, None, 16, 64)
    x = torch.randn(6, 64)
    x[2, 3] = float("nan")
    torch.testing.assert_close(layer(x), layer.reference_forward(x), equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_token", [True, False])
@pytest.mark.parametrize("bad", [None, float("inf"), float("nan")])
@pytest.mark.parametrize("act_type", ["int8", "fp8"])
def test_cpu_activation_quantization_gives_the_reference_codes(dtype, per_token, bad, act_type):
    from torchquant.numerics import quantize_activation
    from torchquant.ops.w8a8 import quantize_dynamic

    torch.manual_seed(per_token)
    x = (torch.randn(7, 96) * torch.logspace(-3, 3, 7)[:, None]).to(dtype)
    x[2] = 0.0
    if bad is not None:
        x[4, 5] = bad
    q, scale = quantize_dynamic(x, act_type, per_token)
    ref_q, ref_scale = quantize_activation(x, act_type, per_token)
    finite = torch.isfinite(x).all(dim=1)
    if not per_token:  # -- one scale: NaN (poisoning every row) when any input is not finite
        assert scale.isnan().all() == (not finite.all())
        finite[:] = finite.all()
    # -- FP8 codes come as their float32 values (PyTorch's CPU float8 casts are slow)
    assert q.dtype == (torch.float32 if act_type == "fp8" else ref_q.dtype)
    assert torch.equal(q[finite].float(), ref_q[finite].float())
    if per_token:
        assert torch.equal(scale[finite], ref_scale[finite]) and scale[~finite].isnan().all()
    elif finite.all():
        assert torch.equal(scale, ref_scale)


def test_fp8_layers_keep_their_codes_as_bf16_on_cpu():
    for scheme in ("w8a16-fp8", "fp8"):
        layer = _layer(scheme, None, 40, 64, torch.bfloat16)
        assert layer.cpu_layout_nbytes() == 40 * 64 * 2  # 2 bytes a weight, beside qweight
        assert torch.equal(layer.cpu_layout().packed.float(), layer.qweight.float())
    # -- float32 weight-only layers keep them only inside float32_in_bf16 (and drop them on
    # -- leaving it); W8A8 ones need none
    layer = _layer("w8a16-fp8", None, 40, 64)
    assert layer.cpu_layout_nbytes() == 0
    with cpu_kernels.float32_in_bf16():
        layer(torch.randn(2, 64))
        assert layer.cpu_layout_nbytes() == 40 * 64 * 2
    layer(torch.randn(2, 64))
    assert layer.cpu_layout_nbytes() == 0
    float32_w8a8 = _layer("fp8", None, 40, 64)
    assert float32_w8a8.cpu_layout_nbytes() == 0  # float32 W8A8 outside it: the reference
    with cpu_kernels.float32_in_bf16():
        float32_w8a8(torch.randn(2, 64))
        assert float32_w8a8.cpu_layout_nbytes() == 40 * 64 * 2


@pytest.mark.parametrize("scheme", ["w4a16", "w8a16", "w8a8", "fp8", "w8a16-fp8"])
def test_bound_op_follows_replaced_and_rewritten_buffers(scheme):
    layer = _layer(scheme, None, 24, 64, torch.bfloat16)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    layer(x)  # binds the op to the buffers
    other = _layer(scheme, None, 24, 64, torch.bfloat16)
    layer.qweight.copy_(other.qweight)  # written in place
    layer.scales.copy_(other.scales)
    layer.bias = torch.randn(24, dtype=torch.bfloat16)  # replaced
    layer.smooth_scale = torch.rand(64) + 0.5
    out, ref = layer(x), layer.reference_forward(x)
    assert _relative_error(out, ref) < BF16_KERNEL_ERROR
    layer.smooth_scale = None
    assert _relative_error(layer(x), layer.reference_forward(x)) < BF16_KERNEL_ERROR


@pytest.mark.parametrize("scheme,group_size", [("w8a16", 16), ("w6a16", None)])
def test_two_plane_layouts_recompute_rows_whose_planes_overflow(scheme, group_size):
    """Codes of 5..8 bits are two int4pack planes whose offsets cancel; with a weight near
    bf16's maximum each plane's sum overflows although the product is 0 (a fuzzer case)."""
    w = torch.tensor([[9.9692e37, -0.0]], dtype=torch.bfloat16)
    layer = QuantLinear.from_weight(w, None, scheme_from_name(scheme, group_size))
    assert layer.cpu_layout().packed.shape[0] == 2
    x = torch.tensor([[0.0, 65504.0]], dtype=torch.bfloat16)
    recomputed = []

    def exact(rows: torch.Tensor) -> torch.Tensor:
        recomputed.append(rows)
        return layer.reference_forward(rows)

    cpu_kernels.int4pack_linear(x, layer.cpu_layout(), 1, exact)
    assert len(recomputed) == 1  # -- the planes' sums overflowed
    out = layer(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, layer.reference_forward(x))


def test_partial_last_group_splits_into_smaller_blocks():
    groups = cpu_kernels.column_groups(576, 128, None)
    block, columns, owners = cpu_kernels.plan_blocks(groups, 576)
    assert block == 64 and torch.equal(columns, torch.arange(576))
    assert owners.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4]
    block, columns, _ = cpu_kernels.plan_blocks(cpu_kernels.column_groups(100, 48, None), 100)
    assert block == 32 and columns.numel() == 160  # groups of 48, 48 and 4 columns
    assert (columns == 100).sum() == 60  # padding points at the zero column


@pytest.mark.parametrize("scheme,group_size", [("w4a16", 128), ("w8a16", None), ("w3a16", 64)])
def test_layout_is_cached_never_saved_and_follows_the_buffers(scheme, group_size):
    layer = _layer(scheme, group_size, 64, 576, torch.bfloat16)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layout = layer.cpu_layout()
    assert layer.cpu_layout() is layout  # derived once
    x = torch.randn(2, 576, dtype=torch.bfloat16)
    layer(x)
    after = layer.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[key], before[key]) for key in before)
    assert all(t is not None and "layout" not in name for name, t in layer.named_buffers())
    # -- no float copy of the weight at rest: only bytes and bf16 scales
    float_elements = sum(t.numel() for t in layout if t is not None and t.is_floating_point())
    assert float_elements < 64 * 576 / 8
    assert 0 < layer.cpu_layout_nbytes() <= layer.qweight.numel() * layer.qweight.element_size() * 2

    other = _layer(scheme, group_size, 64, 576, torch.bfloat16)
    other.bias.normal_()
    layer.load_state_dict(other.state_dict())
    assert layer.cpu_layout() is not layout  # loading rewrote the codes: derived again
    assert _relative_error(layer(x), other.reference_forward(x)) < BF16_KERNEL_ERROR
    clone = copy.deepcopy(layer)
    assert _relative_error(clone(x), other.reference_forward(x)) < BF16_KERNEL_ERROR


def test_ops_called_without_a_layout_derive_one():
    layer = _layer("w4a16", 64, 32, 128, torch.bfloat16)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    out = ops.linear_intn(x, layer.qweight, layer.scales, layer.zeros, layer.bias, 4, 64)
    assert _relative_error(out, layer.reference_forward(x)) < BF16_KERNEL_ERROR
    int8 = _layer("w8a16", None, 32, 100, torch.bfloat16)
    out = ops.linear_int8_weight(x.new_ones(1, 100), int8.qweight, int8.scales, int8.bias, -1)
    ref = int8.reference_forward(x.new_ones(1, 100))
    assert _relative_error(out, ref) < BF16_KERNEL_ERROR


def test_empty_input_gives_empty_output():
    for scheme in ("w4a16", "w8a16", "w8a8", "w8a16-fp8"):
        layer = _layer(scheme, None, 16, 64, torch.bfloat16)
        assert layer(torch.randn(0, 64, dtype=torch.bfloat16)).shape == (0, 16)


@pytest.mark.parametrize("scheme", ["w4a16", "w8a16", "w3a16"])
def test_bf16_model_compiles_fullgraph_with_cached_layouts(scheme):
    from torchquant import QuantConfig, convert_model

    mlp = torch.nn.Sequential(torch.nn.Linear(96, 160), torch.nn.SiLU(), torch.nn.Linear(160, 48))
    model, _ = convert_model(mlp.bfloat16(), QuantConfig(scheme, ignore=()), progress=False)
    assert all(m.cpu_layout_nbytes() > 0 for m in model.modules() if isinstance(m, QuantLinear))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        for m in (1, 5, 300):
            x = torch.randn(m, 96, dtype=torch.bfloat16)
            torch.testing.assert_close(compiled(x), model(x))


WEIGHT_ONLY = [("w8a16", None), ("w8a16", 64), ("w4a16", 128), ("w4a16", 32), ("w3a16", 128)]


@pytest.fixture(params=["native bf16", "float32 tiles"])
def gemm_kind(request, monkeypatch):
    """Both kinds of CPU the many-row paths meet: one with a native bf16 GEMM (tiles in
    bf16) and one without (tiles in float32), whichever this machine is."""
    native = request.param == "native bf16"
    monkeypatch.setattr(cpu_kernels, "native_bf16_gemm", lambda: native)
    return request.param


@pytest.mark.parametrize("scheme,group_size", [*WEIGHT_ONLY, ("w8a16-fp8", None)])
def test_float32_inputs_run_the_bf16_paths_within_their_tolerance(scheme, group_size, gemm_kind):
    """Inside ``float32_in_bf16`` float32 layers compute in bf16 (for speed) and come back
    float32: on fresh random inputs, at SmolLM2's K = 576 (a partial group of 128), decode
    and prefill row counts, within ``BF16_RELATIVE_ERROR`` of the exact float32 reference
    (and not exact: the bf16 paths ran); outside it, the exact reference.  Without a
    native bf16 GEMM the prefill rows multiply float32 tiles: the reference's weights, so
    only the GEMM's order of summation differs (~1e-7)."""
    layer = _layer(scheme, group_size, 96, 576)
    for m in (1, 300):
        x = torch.randn(m, 576)
        ref = layer.reference_forward(x)
        with cpu_kernels.float32_in_bf16():
            out = layer(x)
            assert layer.cpu_layout_nbytes() > 0
        assert out.dtype == torch.float32 and out.shape == (m, 96)
        error = _relative_error(out, ref)
        assert error < BF16_KERNEL_ERROR
        if m == 1 or gemm_kind == "native bf16":
            assert error > 1e-5  # -- the reference would be ~1e-7
        else:
            assert error < 1e-5
        _assert_exact(layer(x), ref)


@pytest.mark.parametrize("scheme,group_size", [*WEIGHT_ONLY, ("w8a16-fp8", None)])
def test_bf16_prefill_rows_within_tolerance_on_both_gemm_kinds(scheme, group_size, gemm_kind):
    """bf16 layers past the decode kernels' row limits (tiles dequantized in bf16, or in
    float32 without a native bf16 GEMM) come back bf16 within ``BF16_RELATIVE_ERROR``; a
    ragged N (not a multiple of the tile) and K (a partial group) included."""
    layer = _layer(scheme, group_size, 1100, 200, torch.bfloat16)
    x = torch.randn(257, 200, dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16 and out.shape == (257, 1100)
    assert _relative_error(out, layer.reference_forward(x)) < BF16_KERNEL_ERROR


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("k", [1, 33, 1024, 2500])
def test_exact_int_sums_equal_the_integer_maths(native, k, monkeypatch):
    """Integer code products, ``torch._int_mm`` or float32 GEMMs over chunks of K (where
    the CPU has no int8 instructions), are the exact integer sums, even with every code at
    the end of its range (the float32 chunks' worst case) and a ragged N."""
    monkeypatch.setattr(cpu_kernels, "native_int8_gemm", lambda: native)
    gen = torch.Generator().manual_seed(k)
    xq = torch.randint(-128, 128, (7, k), generator=gen, dtype=torch.int8)
    qweight = torch.randint(-128, 128, (1100, k), generator=gen, dtype=torch.int8)
    xq[0], qweight[0], qweight[1] = -128, -128, 127
    exact = (xq.long() @ qweight.long().t()).double()
    assert torch.equal(cpu_kernels.exact_int_sums(xq, qweight), exact)
    assert torch.equal(cpu_kernels.exact_int_sums(xq.float(), qweight), exact)


@pytest.mark.parametrize("scheme", ["w8a8", "fp8"])
def test_float32_w8a8_inside_float32_in_bf16_runs_the_bf16_paths(scheme):
    """W8A8 float32 layers inside ``float32_in_bf16``: INT8 decode rows take int8pack and
    FP8 rows the bf16 product of the codes, within ``BF16_RELATIVE_ERROR`` of the exact
    reference; the exact reference outside it."""
    layer = _layer(scheme, None, 96, 576)
    for m in (1, 300):
        x = torch.randn(m, 576)
        ref = layer.reference_forward(x)
        with cpu_kernels.float32_in_bf16():
            out = layer(x)
        assert out.dtype == torch.float32 and out.shape == (m, 96)
        error = _relative_error(out, ref)
        assert error < BF16_KERNEL_ERROR
        if m == 1:
            assert error > 1e-6  # -- a bf16 path ran (the reference agrees to ~1e-7)
        _assert_exact(layer(x), ref)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("k", [1, 31, 32, 100, 576])
def test_codes_read_in_order_are_the_unpacked_codes(bits, k):
    from torchquant.numerics import pack_codes, unpack_codes

    torch.manual_seed(bits * 1000 + k)
    codes = torch.randint(0, 1 << bits, (5, k), dtype=torch.uint8)
    codes[0] = (1 << bits) - 1  # -- every bit set: no code spills into its neighbour
    packed = pack_codes(codes, bits)
    got = cpu_kernels.read_codes_in_order(packed, bits)
    width = packed.shape[1] * 32 // bits
    assert got.dtype == torch.uint8 and got.shape == (5, width)
    assert torch.equal(got[:, :k], unpack_codes(packed, bits, k).to(torch.uint8))
    assert (got[:, k:] == 0).all()  # -- padding codes
    rows = cpu_kernels.read_codes_in_order(packed[1:3], bits)  # -- a slice of rows
    assert torch.equal(rows, got[1:3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scheme,group_size", [*WEIGHT_ONLY, ("w2a16", 64), ("w6a16", 32)])
def test_blocked_path_over_many_tiles_matches_reference(scheme, group_size, dtype, monkeypatch):
    """Many rows dequantize tiles of weight rows into one reused buffer: tiles of 16 rows
    over N = 40 (a short last tile), K = 200 (a partial last group)."""
    monkeypatch.setattr(cpu_kernels, "DEQUANT_BLOCK_ELEMENTS", 16 * 200)
    layer = _layer(scheme, group_size, 40, 200, dtype)
    x = torch.randn(2, 150, 200, dtype=dtype)
    with cpu_kernels.float32_in_bf16():
        out = layer(x)
    ref = layer.reference_forward(x)
    assert out.shape == (2, 150, 40) and out.dtype == dtype
    assert _relative_error(out, ref) < BF16_KERNEL_ERROR


def test_dequantized_tile_is_the_reference_weight_to_bf16_rounding():
    torch.manual_seed(0)
    n, k, g = 8, 200, 64  # groups of 64, 64, 64 and 8 columns
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    scales = torch.rand(n, 4) + 0.1
    zeros = torch.randint(0, 16, (n, 4), dtype=torch.uint8)
    groups = torch.arange(k) // g
    ref = (codes.float() - zeros[:, groups].float()) * scales[:, groups]
    out = torch.empty(n, k, dtype=torch.bfloat16)
    s, z = scales.bfloat16()[:, groups], zeros.bfloat16()[:, groups]
    tile = cpu_kernels.dequantize_tile(out, codes, s, z)
    assert tile is out
    # -- one rounding from the bf16 scale: the scale's and the product's, 2**-8 each at most
    assert torch.equal(out, ((codes.float() - z.float()) * s.float()).bfloat16())
    torch.testing.assert_close(out.float(), ref, rtol=2**-7, atol=0)
    per_row = cpu_kernels.dequantize_tile(torch.empty_like(out), codes, s[:, :1], 8.0)
    assert torch.equal(per_row, ((codes.float() - 8) * s[:, :1].float()).bfloat16())


@pytest.mark.parametrize("width", [200, 192, 256, 272])  # short, cut, whole, past the groups
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantized_groups_equal_the_tile_of_per_column_qparams(width, dtype):
    """Qparams broadcast per group (columns 64 a group, 4 groups cover 200 of them) give the
    per-column tile's values; columns past the last group (padding codes) come out 0."""
    torch.manual_seed(0)
    n, columns, groups = 8, 64, 4
    codes = torch.randint(0, 16, (n, width), dtype=torch.uint8)
    scales = (torch.rand(n, groups) + 0.1).to(dtype)
    zeros = torch.randint(0, 16, (n, groups)).to(dtype)
    group_of = torch.arange(width) // columns
    inside = group_of < groups
    group_of = group_of.clamp(max=groups - 1)
    for z, z_wide in ((zeros, zeros[:, group_of]), (8.0, 8.0)):
        expected = (
            cpu_kernels.dequantize_tile(
                torch.empty(n, width, dtype=dtype), codes, scales[:, group_of], z_wide
            )
            * inside
        )
        out = torch.full((n, width), float("nan"), dtype=dtype)
        assert cpu_kernels.dequantize_groups(out, codes, scales, z, columns) is out
        assert torch.equal(out, expected)


def test_float32_layer_rows_that_round_to_infinity_in_bf16_are_recomputed():
    """A float32 input near float32's maximum rounds up to infinity in bf16; the
    exact maths gives a finite row, and so must the fast path."""
    w = torch.full((16, 64), 1e-3)
    for scheme, group_size in (("w4a16", 32), ("w8a16", None)):
        layer = QuantLinear.from_weight(w, None, scheme_from_name(scheme, group_size))
        x = torch.zeros(2, 64)
        x[0, 0] = 3.4e38
        with cpu_kernels.float32_in_bf16():
            out = layer(x)
        assert torch.isfinite(out).all()
        assert _relative_error(out, layer.reference_forward(x)) < BF16_KERNEL_ERROR


@pytest.mark.parametrize("scheme,group_size", [("w4a16", 32), ("w8a16", None), ("w8a8", None)])
def test_many_tile_forward_keeps_the_input_differentiable(scheme, group_size):
    """More weight rows than one dequantized tile holds, with an input that requires grad:
    the result is the same and autograd follows it (the tiles' ``mm(out=)`` is not
    differentiable, so such inputs take the concatenating route)."""
    k = 128
    n = cpu_kernels.tile_rows(k) + 8
    layer = _layer(scheme, group_size, n, k)
    x = torch.randn(300, k)
    expected = layer(x)
    xg = x.clone().requires_grad_()
    out = layer(xg)
    assert torch.equal(out.detach(), expected)
    out.sum().backward()
    assert xg.grad is not None and xg.grad.shape == x.shape and xg.grad.isfinite().all()
    if scheme != "w8a8":  # -- weight-only: the gradient is the weight's column sums
        weight = layer.dequantized_weight(torch.float32)
        torch.testing.assert_close(xg.grad, weight.sum(0).expand_as(x), rtol=1e-4, atol=1e-4)
