"""The weight-format seam: every scheme has one format, and each format's buffers and codes.

Also checks, with ``ast``, that ``modules/`` and ``formats/`` decide nothing by the
weight's type themselves: they ask the layer's format.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from torchquant import QuantizationError, QuantLinear, QuantScheme, WeightQuant
from torchquant.config import ACTIVATION_TYPES, GROUP_SIZES, WEIGHT_TYPES, scheme_from_name
from torchquant.config.scheme import MICROSCALED_BLOCKS
from torchquant.numerics import (
    dequantize_fp8_weight,
    dequantize_int_weight,
    num_groups,
    quantize_fp8_weight,
    quantize_int_weight,
)
from torchquant.weights import (
    WEIGHT_FORMATS,
    Fp8BlockFormat,
    Fp8Format,
    Int8Format,
    PackedIntFormat,
    weight_format,
)
from torchquant.weights.activation import W8A8_OPS

ROOT = Path(__file__).resolve().parents[2]

INT_WEIGHTS = [
    WeightQuant("int", bits, group, sym)
    for bits in range(2, 9)
    for group in GROUP_SIZES
    for sym in (True, False)
]
FP8_WEIGHTS = [WeightQuant("fp8", 8, group, True) for group in (-1, 0)]
FP4_WEIGHTS = [WeightQuant("nvfp4"), WeightQuant("mxfp4")]
FP8_BLOCK_WEIGHTS = [WeightQuant("fp8", block=b) for b in ((128, 128), (64, 256))]
NAMED = ["w8a16", "w4a16", "w3a16", "w2a16", "w8a16-fp8", "w8a8", "fp8"]


@pytest.mark.parametrize(
    "weight", INT_WEIGHTS + FP8_WEIGHTS + FP4_WEIGHTS + FP8_BLOCK_WEIGHTS, ids=repr
)
def test_every_weight_scheme_has_exactly_one_format(weight):
    holders = [fmt for fmt in WEIGHT_FORMATS if fmt.holds(weight)]
    assert len(holders) == 1
    assert weight_format(QuantScheme(weight)) is holders[0]


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("w8a16", Int8Format),
        ("w8a8", Int8Format),
        ("w4a16", PackedIntFormat),
        ("w2a16", PackedIntFormat),
        ("w8a16-fp8", Fp8Format),
        ("fp8", Fp8Format),
        ("fp8-block", Fp8BlockFormat),
        ("w8a16-fp8-block", Fp8BlockFormat),
    ],
)
def test_named_schemes_get_their_storage_kind(name, kind):
    assert isinstance(weight_format(scheme_from_name(name)), kind)


def test_asymmetric_int8_is_packed():
    scheme = QuantScheme(WeightQuant("int", 8, 128, False))
    assert isinstance(weight_format(scheme), PackedIntFormat)


def test_a_weight_no_format_holds_is_refused_by_name():
    weight = WeightQuant("fp8", 8, -1, True)
    object.__setattr__(weight, "type", "fp6")  # past validation, as a new kind would be
    with pytest.raises(QuantizationError, match="no weight format stores.*fp6.*packed INT"):
        weight_format(QuantScheme(weight))


N, K = 6, 80  # K not a multiple of 32, nor of the group size: a packed tail, a short group


def _expected_buffers(weight: WeightQuant, dtype: torch.dtype) -> dict[str, tuple]:
    """(shape, dtype) of each buffer, written out from the storage layouts the docs give."""
    if weight.type == "fp8":
        rows = N if weight.group_size == -1 else 1
        return {
            "qweight": ((N, K), torch.float8_e4m3fn),
            "scales": ((rows, 1), torch.float32),
            "zeros": None,
        }
    g = num_groups(K, weight.group_size)
    sdt = dtype if weight.group_size > 0 else torch.float32
    if weight.bits == 8 and weight.symmetric:
        return {"qweight": ((N, K), torch.int8), "scales": ((N, g), sdt), "zeros": None}
    zeros = None if weight.symmetric else ((N, g), torch.uint8)
    width = -(-K // 32) * weight.bits  # whole 32-code blocks, bits words each
    return {"qweight": ((N, width), torch.int32), "scales": ((N, g), sdt), "zeros": zeros}


@pytest.mark.parametrize("weight", INT_WEIGHTS[::3] + FP8_WEIGHTS, ids=repr)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_allocate_gives_each_kind_its_buffers(weight, dtype):
    scheme = QuantScheme(weight)
    buffers = weight_format(scheme).allocate(N, K, scheme, dtype, "meta")
    got = {
        name: None if t is None else (tuple(t.shape), t.dtype)
        for name, t in buffers.items()
        if name != "g_idx"
    }
    assert got == _expected_buffers(weight, dtype)
    assert buffers["g_idx"] is None


@pytest.mark.parametrize(
    ("weight", "takes"),
    [
        (WeightQuant("int", 4, 32, False), True),
        (WeightQuant("int", 4, 32, True), True),
        (WeightQuant("int", 4, -1, False), False),
        (WeightQuant("int", 8, 32, True), False),
        (WeightQuant("fp8", 8, -1, True), False),
    ],
    ids=repr,
)
def test_only_grouped_packed_weights_take_a_g_idx(weight, takes):
    scheme = QuantScheme(weight)
    fmt = weight_format(scheme)
    assert fmt.takes_g_idx(weight) is takes
    if takes:
        g_idx = fmt.allocate(N, K, scheme, torch.float32, "meta", g_idx=True)["g_idx"]
        assert (tuple(g_idx.shape), g_idx.dtype) == ((K,), torch.int32)
    else:
        with pytest.raises(QuantizationError, match="g_idx needs grouped packed INT weights"):
            fmt.allocate(N, K, scheme, torch.float32, "meta", g_idx=True)


@pytest.mark.parametrize("weight", INT_WEIGHTS[::2], ids=repr)
def test_int_quantize_matches_the_numerics_and_codes_round_trip(weight):
    torch.manual_seed(0)
    w = torch.randn(N, K)
    layer = QuantLinear.from_weight(w, None, QuantScheme(weight))
    fmt = layer.weight_format
    assert fmt.is_int
    ref = quantize_int_weight(w, weight.bits, weight.group_size, weight.symmetric, torch.float32)
    assert torch.equal(fmt.int_codes(layer), ref.codes)
    assert torch.equal(layer.scales, ref.scales.to(layer.scales.dtype).reshape(layer.scales.shape))
    w_ref = dequantize_int_weight(
        ref.codes, ref.scales, ref.zeros, weight.bits, weight.group_size, torch.float32
    )
    torch.testing.assert_close(fmt.dequantize(layer), w_ref, rtol=0, atol=0)
    # -- any codes in range come back as they went in
    codes = torch.randint(0, 1 << weight.bits, (N, K), dtype=torch.uint8)
    fmt.set_int_codes(layer, codes, layer.scales.clone(), layer.zeros)
    assert torch.equal(fmt.int_codes(layer), codes)


@pytest.mark.parametrize("weight", FP8_WEIGHTS, ids=repr)
def test_fp8_quantize_matches_the_numerics_and_holds_no_int_codes(weight):
    torch.manual_seed(0)
    w = torch.randn(N, K)
    layer = QuantLinear.from_weight(w, None, QuantScheme(weight))
    fmt = layer.weight_format
    q, s = quantize_fp8_weight(w, per_channel=weight.group_size == -1)
    assert torch.equal(layer.qweight.view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(layer.scales, s.reshape(layer.scales.shape))
    expected = dequantize_fp8_weight(q, s.reshape(layer.scales.shape), torch.float32)
    torch.testing.assert_close(fmt.dequantize(layer), expected, rtol=0, atol=0)
    assert not fmt.is_int
    with pytest.raises(QuantizationError, match="FP8 weights hold no INT codes"):
        fmt.int_codes(layer)
    with pytest.raises(QuantizationError, match="FP8 weights hold no INT codes"):
        layer.set_int_codes(torch.zeros(N, K, dtype=torch.uint8), layer.scales, None)


def test_packed_codes_are_stored_bit_for_bit_or_unpacked():
    torch.manual_seed(0)
    for weight in (WeightQuant("int", 4, 32, False), WeightQuant("int", 8, 32, True)):
        layer = QuantLinear(K, N, QuantScheme(weight), bias=False)
        fmt = layer.weight_format
        codes = torch.randint(0, 1 << weight.bits, (N, K), dtype=torch.uint8)
        zeros = (
            None if weight.symmetric else torch.randint(0, 16, layer.zeros.shape).to(torch.uint8)
        )
        packed = PackedIntFormat().encode(codes, weight)
        fmt.set_packed_codes(layer, packed, torch.rand(layer.scales.shape) + 0.1, zeros)
        assert torch.equal(fmt.int_codes(layer), codes)


def test_every_activation_type_has_a_w8a8_op_or_is_microscaled():
    # -- microscaled activations run their weight format's op (weights/microscaled_input.py)
    assert sorted(W8A8_OPS) == sorted(set(ACTIVATION_TYPES) - set(MICROSCALED_BLOCKS))


# -- no storage-kind branches outside torchquant/weights

CHECKED = [
    path
    for folder in ("modules", "formats")
    for path in sorted((ROOT / "torchquant" / folder).glob("*.py"))
]
GONE = {"uses_int8_storage"}  # -- the helper the formats replaced


def storage_kind_branches(source: str) -> list[str]:
    """``x.type == "int"``-style tests of a weight type (``device.type`` aside) and uses
    of the helpers the formats replaced, as ``"line: code"`` in line order."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            typed = any(
                isinstance(s, ast.Attribute)
                and s.attr == "type"
                and not (isinstance(s.value, ast.Attribute) and s.value.attr == "device")
                for s in sides
            )
            if typed and any(
                isinstance(s, ast.Constant) and s.value in WEIGHT_TYPES for s in sides
            ):
                found.append((node.lineno, ast.unparse(node)))
        name = (
            getattr(node, "id", None) or getattr(node, "attr", None) or getattr(node, "name", None)
        )
        if name in GONE and isinstance(node, ast.Name | ast.Attribute | ast.alias):
            found.append((node.lineno, name))
    return [f"{line}: {code}" for line, code in sorted(found)]


def test_the_branch_finder_finds_branches():
    source = (
        "from torchquant.modules.quant_linear import uses_int8_storage\n"
        "if w.type == 'fp8': pass\n"
        "if scheme.weight.type != 'int': pass\n"
        "if x.device.type == 'cpu': pass\n"
        "if act.type == 'int8': pass\n"
    )
    assert storage_kind_branches(source) == [
        "1: uses_int8_storage",
        "2: w.type == 'fp8'",
        "3: scheme.weight.type != 'int'",
    ]


@pytest.mark.parametrize("path", CHECKED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_modules_and_formats_ask_the_weight_format(path):
    assert storage_kind_branches(path.read_text(encoding="utf-8")) == []
