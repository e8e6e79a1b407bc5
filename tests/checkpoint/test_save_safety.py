"""A save never loses a user's files: which folders it may replace, and what overwrite allows."""

from pathlib import Path

import pytest
import torch
from checkpoint_tools import make_model
from tiny_models import tiny_llama

from torchquant import CheckpointError, QuantConfig, convert_model, scheme_from_name
from torchquant.checkpoint.save_guard import is_checkpoint_file
from torchquant.formats.dispatch import FORMATS, load_checkpoint, save_checkpoint
from torchquant.serialization import save_quantized

pytestmark = pytest.mark.usefixtures("one_thread")

SCHEME = scheme_from_name("w4a16", group_size=32, symmetric=True)


@pytest.fixture(scope="module")
def quantized_llama():
    model, _ = convert_model(tiny_llama(), QuantConfig(default=SCHEME), progress=False)
    return model


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (recursively) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def user_project(folder: Path) -> Path:
    """A folder a user cares about: notes, sources in a subfolder, and a config.json."""
    (folder / "src").mkdir(parents=True)
    (folder / "src" / "train.py").write_text("print('mine')\n")
    (folder / "notes.md").write_text("my notes\n")
    (folder / "config.json").write_text('{"mine": true}\n')
    return folder


def hidden_leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_foreign_folder_is_refused_and_left_untouched(tmp_path, quantized_llama, fmt):
    project = user_project(tmp_path / "project")
    before = snapshot(project)
    with pytest.raises(CheckpointError, match="refusing to overwrite.*overwrite=True"):
        save_checkpoint(quantized_llama, project, fmt)
    assert snapshot(project) == before
    assert hidden_leftovers(tmp_path) == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_overwrite_replaces_only_checkpoint_files(tmp_path, quantized_llama, fmt):
    project = user_project(tmp_path / "project")
    save_checkpoint(quantized_llama, project, fmt, overwrite=True)
    assert (project / "src" / "train.py").read_text() == "print('mine')\n"
    assert (project / "notes.md").read_text() == "my notes\n"
    assert (project / "config.json").read_text() != '{"mine": true}\n'  # a checkpoint file
    x = torch.randint(0, 96, (1, 8))
    torch.testing.assert_close(load_checkpoint(project)(x).logits, quantized_llama(x).logits)
    assert hidden_leftovers(tmp_path) == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_checkpoint_of_ours_is_replaced_atomically(tmp_path, quantized_llama, fmt):
    target = tmp_path / "ck"
    save_checkpoint(quantized_llama, target, fmt, max_shard_size=20_000)
    assert any(p.name.startswith("model-00001-of-") for p in target.iterdir())
    save_checkpoint(quantized_llama, target, fmt)  # now one file: the old shards go
    assert not any(p.name.startswith("model-0") for p in target.iterdir())
    assert all(is_checkpoint_file(p.name) for p in target.iterdir())
    assert hidden_leftovers(tmp_path) == []


def test_a_checkpoint_with_user_files_added_needs_overwrite(tmp_path, quantized_llama):
    target = tmp_path / "ck"
    save_checkpoint(quantized_llama, target, "native", max_shard_size=20_000)
    (target / "README.md").write_text("about this model\n")
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        save_checkpoint(quantized_llama, target, "gptq")
    save_checkpoint(quantized_llama, target, "gptq", overwrite=True)
    assert (target / "README.md").read_text() == "about this model\n"
    assert not any(p.name.startswith("model-0") for p in target.iterdir())  # stale shards
    assert load_checkpoint(target) is not None


def test_the_folder_a_model_was_loaded_from_is_never_written(tmp_path):
    float_dir = tmp_path / "float"
    tiny_llama().save_pretrained(float_dir)
    (float_dir / "README.md").write_text("the float model\n")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(float_dir)
    model, _ = convert_model(model, QuantConfig(default=SCHEME), progress=False)
    before = snapshot(float_dir)
    for fmt in FORMATS:
        for overwrite in (False, True):
            with pytest.raises(CheckpointError, match="loaded from"):
                save_checkpoint(model, float_dir, fmt, overwrite=overwrite)
    assert snapshot(float_dir) == before


def test_a_float_model_folder_is_not_taken_for_ours(tmp_path, quantized_llama):
    float_dir = tmp_path / "float"
    tiny_llama().save_pretrained(float_dir)  # config.json + model.safetensors, no marker
    before = snapshot(float_dir)
    for fmt in FORMATS:
        with pytest.raises(CheckpointError, match="not a checkpoint torchquant wrote"):
            save_checkpoint(quantized_llama, float_dir, fmt)
    assert snapshot(float_dir) == before


def test_a_damaged_checkpoint_of_ours_can_be_saved_over(tmp_path, quantized_llama):
    target = tmp_path / "ck"
    save_quantized(quantized_llama, target)
    shard = target / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    save_quantized(quantized_llama, target)
    assert load_checkpoint(target) is not None


def test_saving_through_a_symlink_follows_it_and_leaves_nothing_behind(tmp_path):
    model, _ = convert_model(make_model(), QuantConfig("w4a16", ignore=()), progress=False)
    real = tmp_path / "real"
    link = tmp_path / "links" / "ck"
    link.parent.mkdir()
    save_quantized(model, real)
    link.symlink_to(real, target_is_directory=True)
    save_quantized(model, link)
    save_quantized(model, link)
    assert link.is_symlink() and (real / "model.safetensors").is_file()
    assert hidden_leftovers(tmp_path) == [] and hidden_leftovers(link.parent) == []
    dangling = tmp_path / "links" / "nowhere"
    dangling.symlink_to(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="symlink to nothing"):
        save_quantized(model, dangling)
    assert hidden_leftovers(link.parent) == []


def test_a_file_is_never_replaced_by_a_folder(tmp_path):
    model, _ = convert_model(make_model(), QuantConfig("w4a16", ignore=()), progress=False)
    target = tmp_path / "weights.bin"
    target.write_bytes(b"precious")
    with pytest.raises(CheckpointError, match="not a directory"):
        save_quantized(model, target, overwrite=True)
    assert target.read_bytes() == b"precious"


def test_an_overwrite_never_replaces_a_foreign_file_of_a_checkpoint_name(tmp_path):
    model, _ = convert_model(make_model(), QuantConfig("w4a16", ignore=()), progress=False)
    project = tmp_path / "project"
    (project / "model.safetensors").mkdir(parents=True)  # a folder, not a checkpoint file
    (project / "model.safetensors" / "keep.txt").write_text("keep")
    with pytest.raises(CheckpointError, match="not a checkpoint file"):
        save_quantized(model, project, overwrite=True)
    assert (project / "model.safetensors" / "keep.txt").read_text() == "keep"
    assert hidden_leftovers(tmp_path) == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_nan_model_never_replaces_a_good_checkpoint(tmp_path, quantized_llama, fmt):
    target = tmp_path / "ck"
    save_checkpoint(quantized_llama, target, fmt)
    before = snapshot(target)
    broken, _ = convert_model(tiny_llama(), QuantConfig(default=SCHEME), progress=False)
    with torch.no_grad():
        broken.model.norm.weight[3] = float("nan")
    with pytest.raises(CheckpointError, match=r"model.norm.weight.*NaN"):
        save_checkpoint(broken, target, fmt)
    assert snapshot(target) == before
    assert hidden_leftovers(tmp_path) == []


def test_the_cli_refuses_unsafe_outputs_before_quantizing(tmp_path, monkeypatch, capsys):
    from torchquant.cli import main

    float_dir = tmp_path / "float"
    tiny_llama().save_pretrained(float_dir)
    (float_dir / "README.md").write_text("the float model\n")
    before = snapshot(float_dir)
    args = ["quantize", str(float_dir), "--group-size", "32", "--symmetric"]
    for extra in ([], ["--overwrite"]):
        assert main([*args, "--out", str(float_dir), *extra]) == 1
        assert "loaded from there" in capsys.readouterr().err
    assert snapshot(float_dir) == before

    project = user_project(tmp_path / "project")
    monkeypatch.chdir(project)
    mine = snapshot(project)
    assert main([*args, "--format", "gptq", "--out", "."]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert snapshot(project) == mine
    assert main([*args, "--format", "gptq", "--out", ".", "--overwrite"]) == 0
    assert (project / "src" / "train.py").read_text() == "print('mine')\n"
    assert (project / "notes.md").read_text() == "my notes\n"
    assert load_checkpoint(project) is not None
