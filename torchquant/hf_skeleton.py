"""Build the Hugging Face model a checkpoint's ``config.json`` describes, without trusting it.

No code from the checkpoint runs: the class must be one transformers ships, and the
model is built from the parsed JSON on the meta device so that tensors can be
assigned from the safetensors files afterwards.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from torchquant.checkpoint_checks import read_json_file
from torchquant.code_guard import check_config_data
from torchquant.errors import CheckpointError
from torchquant.safetensors_check import physical_memory_bytes


def build_hf_skeleton(directory: Path, class_name: str, num_tensors: int) -> nn.Module:
    """The model ``config.json`` describes, on the meta device, after bounding what it declares.

    The file is untrusted: its sizes are checked on a meta-device probe first (buffers
    such as rotary tables or causal masks are allocated for real when the model is
    built), a layer count larger than the tensors on disk is refused, and any error
    the model's own constructor raises is reported as a :class:`CheckpointError`.
    """
    try:
        import transformers
        from accelerate import init_empty_weights
    except ImportError as exc:
        raise CheckpointError(
            f"loading a Hugging Face checkpoint needs transformers ({exc})"
        ) from None
    try:
        cls = getattr(transformers, class_name, None)
    except Exception:  # a lazy attribute can fail to import; the name came from the file
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise CheckpointError(f"model class {class_name!r} is not a transformers model class")
    config_data = read_json_file(directory / "config.json", "config.json")
    if not isinstance(config_data, dict):
        raise CheckpointError("config.json: expected a JSON object")
    check_config_data(config_data, "config.json")
    config_data.pop("quantization_config", None)
    model_type = config_data.pop("model_type", None)
    # -- third-party constructors validate untrusted values with many exception types
    try:
        config = transformers.AutoConfig.for_model(model_type, **config_data)
    except Exception as exc:
        raise CheckpointError(
            f"config.json: unknown or bad model_type {model_type!r} ({type(exc).__name__}: {exc})"
        ) from None
    layers = getattr(config, "num_hidden_layers", None)
    if isinstance(layers, int) and not 0 <= layers <= num_tensors:
        raise CheckpointError(
            f"config.json: num_hidden_layers={layers} but the checkpoint holds only "
            f"{num_tensors} tensors"
        )
    try:
        with torch.device("meta"):
            probe = cls._from_config(config)
        buffer_bytes = sum(b.numel() * b.element_size() for b in probe.buffers())
        del probe
        budget = physical_memory_bytes() // 2
        if buffer_bytes > budget:
            raise CheckpointError(
                f"config.json: the model's buffers would take {buffer_bytes} bytes, more than "
                f"the budget of {budget}"
            )
        with init_empty_weights(include_buffers=False):
            return cls._from_config(config)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(
            f"config.json: cannot build {class_name} from it ({type(exc).__name__}: {exc})"
        ) from None
