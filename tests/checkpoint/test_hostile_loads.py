"""Hostile checkpoints of every format: each is refused, promptly, with a CheckpointError.

Each case copies a tiny saved folder (compressed-tensors, GPTQ, AWQ or native), damages
it one way, and expects a :class:`CheckpointError` naming the tensor or field at fault,
raised before the model's layers are built from it.  Cases that used to hang (a FIFO
as a shard, a catastrophic regular expression) run under a deadline so that a
regression fails instead of blocking the test run.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from checkpoint_tools import (
    edit_config_json,
    edit_metadata,
    edit_quantization_config,
    read_safetensors,
    reseal,
    write_safetensors,
)
from safetensors.torch import load_file, save_file
from tiny_models import tiny_llama

from torchquant import (
    CheckpointError,
    ConfigError,
    QuantConfig,
    convert_model,
    scheme_from_name,
)
from torchquant.config import matching
from torchquant.formats.dispatch import load_checkpoint, save_checkpoint
from torchquant.serialization import KEY_CONFIG, SINGLE_FILE
from torchquant.streaming import convert_from_safetensors

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

N = K = 32  # hidden size: every attention projection is 32x32
SCHEMES = {
    "packed": scheme_from_name("w4a16", group_size=32),
    "packed-sym": scheme_from_name("w4a16", group_size=32, symmetric=True),
    "int8": scheme_from_name("w8a8"),
}


def small_llama(**config):
    shape = {"vocab": 64, "hidden": 32, "inter": 64, "layers": 2, "heads": 2, "kv_heads": 1}
    return tiny_llama(**shape, max_position_embeddings=64, **config)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Callable[[str], Path]:
    """Folder builder: ``saved(kind)`` saves each kind once per module and returns it."""
    root = tmp_path_factory.mktemp("hostile")
    made: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in made:
            fmt, _, scheme = kind.partition(":")
            scheme = SCHEMES.get(scheme, SCHEMES["packed"])
            config = QuantConfig(default=scheme)
            model, _ = convert_model(small_llama(), config, progress=False)
            kw = {"config": config} if fmt == "native" else {}
            made[kind] = save_checkpoint(model, root / kind.replace(":", "-"), fmt, **kw)
        return made[kind]

    return get


@pytest.fixture
def folder(saved, tmp_path) -> Callable[[str], Path]:
    """A fresh copy of a saved folder that a test may damage."""

    def copy(kind: str) -> Path:
        return Path(shutil.copytree(saved(kind), tmp_path / kind.replace(":", "-")))

    return copy


def edit_tensors(d: Path, change: Callable[[dict], object]) -> None:
    tensors = load_file(d / SINGLE_FILE)
    change(tensors)
    save_file(tensors, str(d / SINGLE_FILE), metadata={"format": "pt"})


def refused(d: Path, match: str, seconds: float = 30.0) -> CheckpointError:
    """``load_checkpoint(d)`` raises a CheckpointError matching ``match`` within ``seconds``."""
    outcome = within(seconds, lambda: load_checkpoint(d))
    assert isinstance(outcome, CheckpointError), f"loaded or failed otherwise: {outcome!r}"
    assert pytest.importorskip("re").search(match, str(outcome)), str(outcome)
    return outcome


def within(seconds: float, call: Callable[[], object], release: Callable[[], None] = None):
    """What ``call()`` returns or raises, failing the test if it is still running after
    ``seconds`` (``release`` then unblocks it so the thread can end)."""
    box: list[object] = []

    def run() -> None:
        try:
            box.append(call())
        except BaseException as exc:  # handed back to the test
            box.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        if release is not None:
            release()
        pytest.fail(f"still running after {seconds}s")
    return box[0]


# -- 4. regular expressions in patterns are bounded


def test_catastrophic_ignore_pattern_is_matched_promptly(folder):
    d = folder("compressed-tensors")
    edit_quantization_config(d, lambda qc: qc["ignore"].append("re:(.*.*)*X"))
    model = within(30, lambda: load_checkpoint(d))
    assert isinstance(model, torch.nn.Module), model


@pytest.mark.parametrize(
    ("where", "pattern"),
    [("ignore", "re:(a{1000}){1000}"), ("targets", "re:" + "x" * 5000), ("targets", "re:(")],
)
def test_oversized_or_invalid_ct_pattern_is_refused_naming_the_field(folder, where, pattern):
    d = folder("compressed-tensors")
    if where == "ignore":
        edit_quantization_config(d, lambda qc: qc["ignore"].append(pattern))
    else:
        edit_quantization_config(
            d, lambda qc: qc["config_groups"]["group_0"]["targets"].append(pattern)
        )
    refused(d, f"{where}.*regular expression")


def test_a_match_past_the_timeout_is_a_checkpoint_error(folder, monkeypatch):
    d = folder("compressed-tensors")
    edit_quantization_config(d, lambda qc: qc["ignore"].append("re:.*never_a_layer"))
    monkeypatch.setattr(matching, "MATCH_TIMEOUT_S", 1e-9)
    refused(d, "ignore: regular expression .* took over")


def test_quantconfig_patterns_are_bounded(monkeypatch):
    with pytest.raises(ConfigError, match=r"ignore\[0\]: invalid regular expression.*nodes"):
        QuantConfig("w4a16", ignore=["re:(a{1000}){1000}"])
    config = QuantConfig("w4a16", ignore=["re:(.*.*)*X"])
    model = within(30, lambda: convert_model(small_llama(), config, progress=False))
    assert not isinstance(model, BaseException), model
    monkeypatch.setattr(matching, "MATCH_TIMEOUT_S", 1e-9)
    with pytest.raises(ConfigError, match="took over"):
        matching.matches("re:.*mlp.*", "model.layers.0.mlp.up_proj")


def test_native_checkpoint_config_pattern_is_refused(folder):
    d = folder("native")
    meta = json.loads(_metadata(d)[KEY_CONFIG])
    meta["ignore"] = ["re:(a{1000}){1000}"]
    edit_metadata(d / SINGLE_FILE, **{KEY_CONFIG: json.dumps(meta)})
    refused(d, "not a valid QuantConfig.*nodes")


def _metadata(d: Path) -> dict[str, str]:
    header, _ = read_safetensors(d / SINGLE_FILE)
    return header["__metadata__"]


# -- 5. the config's size is checked against the files before anything is built


def _count_decoder_layers(monkeypatch) -> list[int]:
    from transformers.models.llama import modeling_llama

    built = [0]
    original = modeling_llama.LlamaDecoderLayer.__init__

    def counting(self, *args, **kwargs):
        built[0] += 1
        original(self, *args, **kwargs)

    monkeypatch.setattr(modeling_llama.LlamaDecoderLayer, "__init__", counting)
    return built


@pytest.mark.parametrize("kind", ["compressed-tensors", "gptq", "native"])
def test_many_layers_over_zero_byte_tensors_are_refused_before_building(folder, kind, monkeypatch):
    d = folder(kind)
    tensors = load_file(d / SINGLE_FILE)
    tensors.update({f"model.layers.{i}.pad": torch.zeros(0) for i in range(2000)})
    if kind == "native":
        reseal(d / SINGLE_FILE, tensors)
        edit_config_json(d, lambda c: c.update(num_hidden_layers=2000))
        from checkpoint_tools import reseal_config_json

        reseal_config_json(d)
    else:
        save_file(tensors, str(d / SINGLE_FILE), metadata={"format": "pt"})
        edit_config_json(d, lambda c: c.update(num_hidden_layers=2000))
    built = _count_decoder_layers(monkeypatch)
    start = time.monotonic()
    refused(d, "num_hidden_layers=2000 .* 2 distinct non-empty layer indices")
    assert built[0] == 0 and time.monotonic() - start < 20


def test_config_larger_than_the_bytes_on_disk_is_refused(folder, monkeypatch):
    d = folder("compressed-tensors")
    edit_config_json(d, lambda c: c.update(intermediate_size=2**20))
    built = _count_decoder_layers(monkeypatch)
    refused(d, "parameters, but the tensors on disk hold only")
    assert built[0] == 2  # the meta probe only: the model itself was never built


# -- 6. non-regular files are refused before they are opened


def _fifo_in_place_of(path: Path) -> Callable[[], None]:
    path.unlink(missing_ok=True)
    os.mkfifo(path)

    def release() -> None:  # a reader blocked on the FIFO wakes once a writer opens it
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)

    return release


@pytest.mark.parametrize(
    ("kind", "name", "match"),
    [
        ("compressed-tensors", SINGLE_FILE, "model.safetensors"),
        ("compressed-tensors", "config.json", "config.json.*not a regular file"),
        ("gptq", "config.json", "config.json.*not a regular file"),
        ("native", SINGLE_FILE, "model.safetensors"),
    ],
)
def test_fifo_in_a_checkpoint_is_refused_without_blocking(folder, kind, name, match):
    d = folder(kind)
    release = _fifo_in_place_of(d / name)
    outcome = within(20, lambda: load_checkpoint(d), release)
    assert isinstance(outcome, CheckpointError), outcome
    assert pytest.importorskip("re").search(match, str(outcome)), str(outcome)


def test_fifo_as_float_weights_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "model.safetensors"
    release = _fifo_in_place_of(fifo)
    with torch.device("meta"):
        skeleton = small_llama()
    outcome = within(
        20,
        lambda: convert_from_safetensors(skeleton, [fifo], QuantConfig("w4a16"), progress=False),
        release,
    )
    assert isinstance(outcome, CheckpointError) and "not a regular file" in str(outcome), outcome


def test_fifo_as_an_index_shard_is_refused(tmp_path):
    model, _ = convert_model(small_llama(), QuantConfig("w4a16"), progress=False)
    d = save_checkpoint(model, tmp_path / "ct", "compressed-tensors", max_shard_size=20_000)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    release = _fifo_in_place_of(d / shard)
    outcome = within(20, lambda: load_checkpoint(d), release)
    assert isinstance(outcome, CheckpointError) and shard in str(outcome), outcome


# -- 7. malformed values are CheckpointErrors naming the field


@pytest.mark.parametrize("shape", [[N, K, 1], [[N, K]]])
def test_malformed_weight_shape_is_refused(folder, shape):
    d = folder("compressed-tensors")
    key = "model.layers.0.self_attn.q_proj.weight_shape"
    edit_tensors(d, lambda t: t.__setitem__(key, torch.tensor(shape, dtype=torch.int64)))
    refused(d, r"q_proj\.weight_shape: shape")


@pytest.mark.parametrize("kind", ["compressed-tensors", "gptq", "awq", "native"])
def test_a_shape_no_tensor_can_have_is_refused(folder, kind):
    d = folder(kind)
    header, data = read_safetensors(d / SINGLE_FILE)
    header["huge"] = {"dtype": "F32", "shape": [2**63, 0], "data_offsets": [len(data)] * 2}
    write_safetensors(d / SINGLE_FILE, header, data)
    refused(d, "tensor 'huge': shape .* larger than any tensor")


@pytest.mark.parametrize("kind", ["compressed-tensors", "gptq", "awq"])
@pytest.mark.parametrize(("dtype", "label"), [(torch.int32, "int32"), (torch.float64, "float64")])
def test_float_tensor_of_a_non_float_or_f64_dtype_is_refused(folder, kind, dtype, label):
    d = folder(kind)
    key = "model.norm.weight" if dtype == torch.int32 else "model.embed_tokens.weight"
    edit_tensors(d, lambda t: t.__setitem__(key, t[key].to(dtype)))
    refused(d, f"tensor '{key}': checkpoint stores torch.{label}")


def test_config_errors_of_a_ct_checkpoint_are_checkpoint_errors(folder):
    d = folder("compressed-tensors")
    edit_quantization_config(d, lambda qc: qc.update(secret=1))
    error = refused(d, "unknown field")
    assert isinstance(error, ConfigError)  # still the config error it is
    edit_quantization_config(d, lambda qc: (qc.pop("secret"), qc.update(config_groups={})))
    refused(d, "config_groups must be a non-empty mapping")


# -- 8. scales and zero points


@pytest.mark.parametrize(
    ("kind", "key", "value", "match"),
    [
        ("compressed-tensors", "weight_scale", 0.0, "scale <= 0"),
        ("compressed-tensors", "weight_scale", -1.0, "scale <= 0"),
        ("compressed-tensors", "weight_scale", float("nan"), "NaN"),
        ("compressed-tensors:int8", "weight_scale", 0.0, "scale <= 0"),
        ("compressed-tensors:int8", "weight_scale", float("-inf"), "NaN/Inf"),
    ],
)
def test_non_positive_scales_are_refused(folder, kind, key, value, match):
    d = folder(kind)
    full = f"model.layers.1.mlp.down_proj.{key}"
    edit_tensors(d, lambda t: t[full].view(-1)[0].fill_(value))
    refused(d, match)


def test_integer_scales_are_refused(folder):
    d = folder("compressed-tensors")
    key = "model.layers.0.self_attn.k_proj.weight_scale"
    edit_tensors(d, lambda t: t.__setitem__(key, torch.ones_like(t[key], dtype=torch.int32)))
    refused(d, "k_proj.weight_scale: dtype torch.int32; scales must be floating point")


@pytest.mark.parametrize("kind", ["compressed-tensors:int8", "compressed-tensors:packed-sym"])
def test_zero_points_a_symmetric_scheme_would_drop_are_refused(folder, kind):
    d = folder(kind)
    prefix = "model.layers.0.mlp.up_proj"

    def add(t):
        rows = t[f"{prefix}.weight_scale"].shape
        t[f"{prefix}.weight_zero_point"] = torch.full(rows, 3, dtype=torch.int32)

    edit_tensors(d, add)
    refused(d, "up_proj.weight_zero_point: holds non-zero zero points")


def test_float_zero_points_are_refused(folder):
    d = folder("compressed-tensors")
    key = "model.layers.0.mlp.up_proj.weight_zero_point"
    edit_tensors(d, lambda t: t.__setitem__(key, t[key].float()))
    refused(d, "weight_zero_point: dtype torch.float32; zero points must be integers")


def test_check_scales_is_shared():
    from torchquant.checkpoint.validate import check_scales, check_zero_points

    check_scales("s", torch.tensor([0.5, 1.0]))
    for bad, match in [
        (torch.tensor([1, 2]), "floating point"),
        (torch.tensor([0.5, 0.0]), "<= 0"),
        (torch.tensor([float("inf")]), "NaN/Inf"),
    ]:
        with pytest.raises(CheckpointError, match=match):
            check_scales("layer.scales", bad)
    check_zero_points("z", torch.tensor([0, 15]), 0, 15)
    with pytest.raises(CheckpointError, match=r"span 0\.\.16, outside \[0, 15\]"):
        check_zero_points("z", torch.tensor([0, 16]), 0, 15)


# -- 9. every quantization_config field has its JSON type


@pytest.mark.parametrize(
    ("path", "value", "match"),
    [
        (("weights", "symmetric"), "false", r"weights\.symmetric='false': expected bool"),
        (("weights", "num_bits"), True, r"weights\.num_bits=True: expected int"),
        (("weights", "group_size"), "32", r"weights\.group_size='32': expected int or null"),
        (("weights", "strategy"), 1, r"weights\.strategy=1: expected string"),
        (("targets",), "Linear", r"group_0\.targets='Linear': expected list"),
        (("format",), ["pack-quantized"], r"group_0\.format=.*expected string"),
    ],
)
def test_mistyped_group_field_is_refused_naming_it(folder, path, value, match):
    d = folder("compressed-tensors")

    def change(qc):
        target = qc["config_groups"]["group_0"]
        for part in path[:-1]:
            target = target[part]
        target[path[-1]] = value

    edit_quantization_config(d, change)
    refused(d, match)


@pytest.mark.parametrize(
    ("field", "value"), [("ignore", {"lm_head": 1}), ("version", 0.2), ("format", 7)]
)
def test_mistyped_top_level_field_is_refused(folder, field, value):
    d = folder("compressed-tensors")
    edit_quantization_config(d, lambda qc: qc.update({field: value}))
    refused(d, rf"quantization_config\.{field}=")


# -- 10. layer shapes and float dtypes against config.json


def test_weight_shape_disagreeing_with_the_model_is_refused(folder):
    d = folder("compressed-tensors")
    key = "model.layers.0.self_attn.o_proj.weight_shape"
    edit_tensors(d, lambda t: t.__setitem__(key, torch.tensor([N, K - 4])))
    refused(d, r"o_proj\.weight_shape: \[32, 28\], but the model's layer is \[32, 32\]")


def test_shrunk_packed_layer_is_refused(folder):
    d = folder("compressed-tensors")
    prefix = "model.layers.1.mlp.down_proj"

    def shrink(t):
        for key in ("weight_packed", "weight_scale"):
            t[f"{prefix}.{key}"] = t[f"{prefix}.{key}"][:16].clone()
        t[f"{prefix}.weight_zero_point"] = t[f"{prefix}.weight_zero_point"][:2].clone()
        t[f"{prefix}.weight_shape"] = torch.tensor([16, 64])

    edit_tensors(d, shrink)
    refused(d, r"down_proj\.weight_packed: shape \(16, \d+\), expected 32 rows")


def test_dense_layer_of_the_wrong_shape_is_refused(folder):
    d = folder("compressed-tensors:int8")
    prefix = "model.layers.0.self_attn.o_proj"

    def widen(t):
        t[f"{prefix}.weight"] = torch.cat([t[f"{prefix}.weight"]] * 2)
        t[f"{prefix}.weight_scale"] = torch.cat([t[f"{prefix}.weight_scale"]] * 2)

    edit_tensors(d, widen)
    refused(d, r"o_proj\.weight: shape \(64, 32\), expected \(32, 32\)")


@pytest.mark.parametrize("kind", ["gptq", "awq"])
def test_gptq_awq_layer_with_twice_the_outputs_is_refused(folder, kind):
    d = folder(kind)
    prefix = "model.layers.0.self_attn.o_proj"

    def widen(t):
        for key in ("qweight", "qzeros", "scales"):
            t[f"{prefix}.{key}"] = torch.cat([t[f"{prefix}.{key}"]] * 2, dim=1)

    edit_tensors(d, widen)
    refused(d, "o_proj.*describes 64x32, the model's layer is 32x32")


def test_valid_folders_still_load_to_the_same_tensors(saved):
    for kind in ("compressed-tensors", "compressed-tensors:int8", "gptq", "awq", "native"):
        d = saved(kind)
        model = load_checkpoint(d)
        state = load_file(d / SINGLE_FILE)
        assert torch.equal(model.model.norm.weight, state["model.norm.weight"]), kind
