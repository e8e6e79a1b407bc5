import os
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_llama_folder, tiny_text

SHARED_DATA = Path(
    os.environ.get("TORCHQUANT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(params=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def device(request):
    return torch.device(request.param)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "SmolLM2-135M-Instruct.Q4_1.gguf").exists():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls: thread hand-offs cost more than they save, badly so on a busy machine.

    Modules of tiny-model tests opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Llama with a word-level tokenizer and a text, as a plain HF folder."""
    folder = tiny_llama_folder(tmp_path_factory.mktemp("tiny-llama"), tie_word_embeddings=True)
    tiny_text(folder / "text.txt")
    return folder
