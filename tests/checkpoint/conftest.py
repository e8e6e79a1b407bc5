import pytest
from checkpoint_tools import SmallCheckpoint


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> dict[str, SmallCheckpoint]:
    """The two native checkpoints, one file and three shards, that a module damages copies of."""
    root = tmp_path_factory.mktemp("pristine")
    return {kind: SmallCheckpoint(root, kind) for kind in ("single", "sharded")}


@pytest.fixture(scope="module")
def pristine_hf(tmp_path_factory) -> SmallCheckpoint:
    """A tiny Llama checkpoint with ``config.json``, for the damage a Hugging Face folder allows."""
    return SmallCheckpoint(tmp_path_factory.mktemp("pristine_hf"), "hf")
