"""Hypothesis strategies shared by the fuzz tests: config dicts, tensors, checkpoint mutations.

The example budget comes from ``TORCHQUANT_FUZZ_EXAMPLES``: 20 per test by default,
so that all fuzz tests together stay within seconds in CI.  A long local run::

    TORCHQUANT_FUZZ_EXAMPLES=5000 nice -n 10 python -m pytest tests/*/test_fuzz_*.py \
        --hypothesis-show-statistics

No example database is kept, so every run explores fresh examples; a failure
prints the example (and the seed to replay it with ``--hypothesis-seed``).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from checkpoint_tools import read_safetensors, write_safetensors
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

FUZZ_EXAMPLES = int(os.environ.get("TORCHQUANT_FUZZ_EXAMPLES", "20"))
fuzz_settings = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)

# -- JSON-like values, with the odd ones a hand-edited or hostile file might hold
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, -1, 1, 2, 8, 16, 128, 2**31, 2**63]),
    st.builds(pow, st.just(10), st.just(400)),  # too big for a float
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=10),
    st.sampled_from(["int", "fp8", "int8", "token", "tensor", "rtn", "minmax", "w4a16", "re:("]),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)


def _dicts(fields: dict[str, st.SearchStrategy], hostile: bool) -> st.SearchStrategy:
    """Dicts with any subset of ``fields``; hostile ones may hold anything and unknown keys."""
    if not hostile:
        return st.fixed_dictionaries({}, optional=fields)
    anything = {k: st.one_of(v, json_scalars) for k, v in fields.items()}
    extras = st.dictionaries(st.text(max_size=8), json_scalars, max_size=1)
    return st.tuples(st.fixed_dictionaries({}, optional=anything), extras).map(
        lambda p: {**p[1], **p[0]}
    )


def _weight_dicts(hostile: bool) -> st.SearchStrategy:
    return _dicts(
        {
            "type": st.sampled_from(["int", "int", "fp8"]),
            "bits": st.integers(0, 10),
            "group_size": st.sampled_from([-1, 0, 1, 16, 32, 100, 128, 1024, 2048]),
            "symmetric": st.booleans(),
        },
        hostile,
    )


def _activation_dicts(hostile: bool) -> st.SearchStrategy:
    return _dicts(
        {
            "type": st.sampled_from(["int8", "fp8"]),
            "granularity": st.sampled_from(["token", "tensor"]),
            "dynamic": st.booleans(),
            "percentile": st.floats(-1, 101) | st.just(float("nan")),
            "observer": st.just("minmax"),
        },
        hostile,
    )


scheme_names = st.sampled_from(
    ["w8a16", "w4a16", "w2a16", "w3a16", "w8a16-fp8", "w8a8", "fp8", "W3A16 ", "w9a16", "x"]
)


def _schemes(hostile: bool) -> st.SearchStrategy:
    weight = _weight_dicts(hostile)
    activation = st.one_of(st.none(), _activation_dicts(hostile))
    dicts = _dicts(
        {"weight": weight, "activation": activation, "algorithm": st.just("rtn")}, hostile
    )
    good = st.one_of(st.none(), scheme_names, dicts)
    return st.one_of(good, json_values) if hostile else good


good_patterns = st.sampled_from(
    ["0", "1", "*.up", "re:.*", "lm_head", "block.down", "re:.*_head", "*", "re:block\\.(up|down)"]
)
bad_patterns = st.one_of(
    st.sampled_from(["re:[", "", "re:(a|b", "re:a{4294967296}", "re:" + "(" * 5000]),
    st.text(max_size=8),
)
patterns = st.one_of(good_patterns, good_patterns, bad_patterns, json_scalars)


def _configs(hostile: bool) -> st.SearchStrategy:
    scheme = _schemes(hostile)
    pattern = patterns if hostile else good_patterns
    overrides = st.dictionaries(pattern if hostile else good_patterns, scheme, max_size=3)
    ignore = st.lists(pattern, max_size=3)
    if hostile:
        overrides = st.one_of(
            overrides, st.lists(st.lists(st.one_of(pattern, scheme), max_size=3), max_size=3)
        )
        ignore = st.one_of(ignore, pattern, json_values)
    return _dicts({"default": scheme, "overrides": overrides, "ignore": ignore}, hostile)


# well-typed configs (many valid, some refused by value) and hostile ones (anything goes)
scheme_like = st.one_of(_schemes(False), _schemes(True))
config_dicts = st.one_of(_configs(False), _configs(True))

# -- tensors: shapes, dtypes and values including NaN, Inf, subnormals and huge magnitudes
special_floats = st.sampled_from(
    [0.0, -0.0, 1e-45, -1e-42, 1e-39, 6e-8, 65504.0, 1e5, 1e38, -3e38, 448.0, 1e30]
    + [float("nan"), float("inf"), -float("inf")]
)
float_dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
odd_dtypes = st.sampled_from(
    [torch.float64, torch.int8, torch.int32, torch.uint8, torch.bool, torch.float8_e4m3fn]
)


@st.composite
def float_matrices(draw, max_rows: int = 6, max_cols: int = 200) -> torch.Tensor:
    """A 2-D float tensor: random values at a random scale, some special values, constant runs."""
    n = draw(st.integers(1, max_rows))
    k = draw(st.integers(1, max_cols))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1e-40, 1e-6, 0.05, 1.0, 1e4, 1e30, 1e38]))
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    w = (w * scale).clamp(-3e38, 3e38).float()
    for _ in range(draw(st.integers(0, 3))):
        w[draw(st.integers(0, n - 1)), draw(st.integers(0, k - 1))] = draw(special_floats)
    if draw(st.booleans()):
        w[:, : draw(st.integers(0, k))] = draw(st.sampled_from([0.0, 3.5, -1e-44]))
    return w.to(draw(float_dtypes))


@st.composite
def int_weight_cases(
    draw, max_rows: int, max_cols: int, min_scale: float, max_scale: float
) -> tuple[torch.Tensor, int, int, bool]:
    """A normal random weight at a drawn scale, with the ``bits``, ``group_size`` (-1: one
    group per row) and ``symmetric`` to quantize it with."""
    bits = draw(st.integers(2, 8))
    group_size = draw(st.sampled_from([-1, 16, 32, 64, 128]))
    symmetric = draw(st.booleans())
    n, k = draw(st.integers(1, max_rows)), draw(st.integers(1, max_cols))
    scale = draw(st.floats(min_scale, max_scale))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    return torch.randn(n, k, generator=gen) * scale, bits, group_size, symmetric


@st.composite
def odd_tensors(draw) -> torch.Tensor:
    """Tensors a weight can never be: wrong rank, empty, or a non-float dtype."""
    shape = draw(st.sampled_from([(), (7,), (0, 8), (8, 0), (2, 3, 4), (4, 16), (1, 1, 1, 1)]))
    t = torch.randn(shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))
    return t.to(draw(st.one_of(float_dtypes, odd_dtypes)))


# -- checkpoint bytes: raw byte edits and edits of parsed JSON documents
hostile_values = st.one_of(
    json_values,
    st.sampled_from(["../x.safetensors", "/etc/passwd", ".", "", "F8_E5M2", "I64", "BOOL"]),
    st.sampled_from([-1, 2**31, 2**40, 2**63, [0, 2**62], [2**20, 2**20], [-1]]),
)


@st.composite
def byte_edits(draw, size: int, hot_end: int) -> list[tuple[str, int, int]]:
    """A few edits ``(op, position, value)`` of a ``size``-byte file, often in ``[0, hot_end)``."""
    position = st.one_of(st.integers(0, max(0, hot_end - 1)), st.integers(0, max(0, size - 1)))
    op = st.sampled_from(["flip", "set", "insert", "delete", "truncate"])
    return draw(st.lists(st.tuples(op, position, st.integers(0, 255)), min_size=1, max_size=4))


def apply_byte_edits(raw: bytes, edits: list[tuple[str, int, int]]) -> bytes:
    out = bytearray(raw)
    for op, pos, value in edits:
        pos = min(pos, max(0, len(out) - 1))
        if op == "flip" and out:
            out[pos] ^= 1 << (value % 8)
        elif op == "set" and out:
            out[pos] = value
        elif op == "insert":
            out[pos:pos] = bytes([value]) * (1 + value % 8)
        elif op == "delete":
            del out[pos : pos + 1 + value % 8]
        elif op == "truncate":
            del out[pos:]
    return bytes(out)


def _paths(doc, prefix=()):
    yield prefix
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            yield from _paths(value, (*prefix, i))


@st.composite
def json_edits(draw, doc):
    """``doc`` (parsed JSON) with one to three nodes replaced, deleted or given a sibling."""
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(list(_paths(doc))))
        # -- drawn values are copied: sampled lists are shared objects and must stay pristine
        value = copy.deepcopy(draw(hostile_values))
        if not path:
            if draw(st.integers(0, 9)) == 0:
                doc = value
            continue
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        op = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if op == "delete" and isinstance(parent, dict):
            del parent[path[-1]]
        elif op == "add" and isinstance(parent, dict):
            parent[draw(st.text(max_size=12))] = value
        else:
            parent[path[-1]] = value
    return doc


def edit_raw_bytes(data: st.DataObject, path: Path) -> None:
    """Apply drawn byte edits to the safetensors file ``path``, many of them in its header."""
    raw = path.read_bytes()
    header_end = 8 + int.from_bytes(raw[:8], "little")
    path.write_bytes(apply_byte_edits(raw, data.draw(byte_edits(len(raw), header_end))))


def edit_header_fields(data: st.DataObject, path: Path) -> None:
    """Rewrite the safetensors file ``path`` with drawn edits of its parsed JSON header."""
    header, payload = read_safetensors(path)
    edited = data.draw(json_edits(header))
    edited = edited if isinstance(edited, dict) else {"__metadata__": edited}
    write_safetensors(path, edited, payload)
