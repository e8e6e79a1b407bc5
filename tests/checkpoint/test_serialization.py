import json
import subprocess
import sys
import textwrap

import pytest
import torch
from checkpoint_tools import edit_metadata, reseal
from safetensors.torch import load_file
from torch import nn

from torchquant import CheckpointError, QuantConfig, convert_model
from torchquant.serialization import (
    INDEX_FILE,
    KEY_LAYERS,
    KEY_VERSION,
    SINGLE_FILE,
    load_quantized,
    read_metadata,
    save_quantized,
)


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(96, 160), nn.GELU(), nn.Linear(160, 96), nn.Linear(96, 40))


CONFIG = QuantConfig("w4a16", overrides={"2": "w8a8", "3": "fp8"}, ignore=())


@pytest.fixture
def quantized():
    model, _ = convert_model(make_model(), CONFIG, progress=False)
    return model


def test_roundtrip_is_bit_identical(tmp_path, quantized):
    save_quantized(quantized, tmp_path / "ck", config=CONFIG)
    loaded = load_quantized(tmp_path / "ck", make_model(1).to("meta"))
    x = torch.randn(4, 96)
    assert torch.equal(loaded(x), quantized(x))
    meta = read_metadata(tmp_path / "ck")
    assert QuantConfig.from_dict(json.loads(meta["torchquant_config"])) == CONFIG


def test_sharded_save_writes_an_index(tmp_path, quantized):
    save_quantized(quantized, tmp_path / "ck", max_shard_size=20_000)
    files = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert INDEX_FILE in files and SINGLE_FILE not in files
    index = json.loads((tmp_path / "ck" / INDEX_FILE).read_text())
    assert set(index["weight_map"]) == set(quantized.state_dict())
    loaded = load_quantized(tmp_path / "ck", make_model(2))
    x = torch.randn(4, 96)
    assert torch.equal(loaded(x), quantized(x))


def test_tied_tensors_are_saved_once(tmp_path):
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64))
    model[2].weight = model[1].weight
    model, _ = convert_model(model, QuantConfig("w4a16", overrides={"re:[12]": None}, ignore=()))
    save_quantized(model, tmp_path / "ck")
    stored = load_file(tmp_path / "ck" / SINGLE_FILE)
    assert "2.weight" not in stored and len(stored) == len(model.state_dict()) - 1
    skeleton = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64))
    loaded = load_quantized(tmp_path / "ck", skeleton)
    assert loaded[2].weight is loaded[1].weight


def test_overwrite_is_atomic_and_refuses_foreign_folders(tmp_path, quantized):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        save_quantized(quantized, tmp_path / "mine")
    save_quantized(quantized, tmp_path / "ck")
    save_quantized(quantized, tmp_path / "ck")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


CRASH_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, torch
    from torch import nn
    import safetensors.torch as st
    import torchquant.checkpoint.folder as folder
    import torchquant.serialization as ser
    from torchquant import QuantConfig, convert_model
    torch.manual_seed(int(sys.argv[2]))
    model = nn.Sequential(nn.Linear(96, 160), nn.GELU(), nn.Linear(160, 96), nn.Linear(96, 40))
    model, _ = convert_model(model, QuantConfig("w4a16", ignore=()), progress=False)
    calls = []
    real = st.save_file
    def dying_save(*args, **kwargs):
        real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:  # killed after the second shard is on disk
            os.kill(os.getpid(), signal.SIGKILL)
    folder.save_file = dying_save
    ser.save_quantized(model, sys.argv[1], max_shard_size=6_000)
    """
)


def test_a_save_killed_midway_leaves_the_previous_checkpoint(tmp_path):
    target = tmp_path / "ck"
    old, _ = convert_model(make_model(), QuantConfig("w4a16", ignore=()), progress=False)
    save_quantized(old, target, max_shard_size=6_000)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    proc = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, str(target), "7"])
    assert proc.returncode == -9
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    loaded = load_quantized(target, make_model())
    x = torch.randn(2, 96)
    assert torch.equal(loaded(x), old(x))


def _corrupt_metadata(path, **changes):
    edit_metadata(path, **changes)


def test_bad_checkpoints_are_refused(tmp_path, quantized):
    ck = tmp_path / "ck"
    save_quantized(quantized, ck)
    skeleton = make_model

    with pytest.raises(CheckpointError, match="does not exist"):
        load_quantized(tmp_path / "nowhere", skeleton())

    data = (ck / SINGLE_FILE).read_bytes()
    (ck / SINGLE_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="safetensors"):
        load_quantized(ck, skeleton())

    save_quantized(quantized, ck)
    _corrupt_metadata(ck / SINGLE_FILE, **{KEY_VERSION: "99"})
    with pytest.raises(CheckpointError, match="version '99' is not supported"):
        load_quantized(ck, skeleton())

    save_quantized(quantized, ck)
    layers = json.loads(read_metadata(ck)[KEY_LAYERS])
    layers["0"]["scheme"]["weight"]["bits"] = 3
    _corrupt_metadata(ck / SINGLE_FILE, **{KEY_LAYERS: json.dumps(layers)})
    with pytest.raises(CheckpointError, match=r"tensor '0.qweight'.*expects"):
        load_quantized(ck, skeleton())

    layers["0"]["scheme"]["weight"]["bits"] = 42
    _corrupt_metadata(ck / SINGLE_FILE, **{KEY_LAYERS: json.dumps(layers)})
    with pytest.raises(CheckpointError, match="layer '0'.*weight.bits=42"):
        load_quantized(ck, skeleton())

    save_quantized(quantized, ck)
    tensors = load_file(ck / SINGLE_FILE)
    meta = read_metadata(ck)
    del tensors["2.scales"]
    reseal(ck / SINGLE_FILE, tensors, meta)
    with pytest.raises(CheckpointError, match="lacks 1 tensor"):
        load_quantized(ck, skeleton())

    tensors["2.scales"] = torch.ones(96, 1)
    tensors["2.extra"] = torch.ones(1)
    reseal(ck / SINGLE_FILE, tensors, meta)
    with pytest.raises(CheckpointError, match="unexpected"):
        load_quantized(ck, skeleton())

    with pytest.raises(CheckpointError, match="not in the model"):
        load_quantized(ck, nn.Sequential(nn.Linear(96, 160)))

    (ck / SINGLE_FILE).unlink()
    with pytest.raises(CheckpointError, match="neither"):
        load_quantized(ck, skeleton())


def test_shard_index_cannot_point_outside(tmp_path, quantized):
    ck = tmp_path / "ck"
    save_quantized(quantized, ck, max_shard_size=20_000)
    index = json.loads((ck / INDEX_FILE).read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../evil.safetensors"
    (ck / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="outside"):
        load_quantized(ck, make_model())


def test_nothing_to_save_and_nan_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no QuantLinear"):
        save_quantized(make_model(), tmp_path / "a")
    model, _ = convert_model(make_model(), QuantConfig("w4a16", overrides={"3": None}, ignore=()))
    model[3].weight.data[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="'3.weight' holds NaN"):
        save_quantized(model, tmp_path / "b")
    assert not (tmp_path / "b").exists()
