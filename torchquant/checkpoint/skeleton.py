"""Build the Hugging Face model a checkpoint's ``config.json`` describes, without trusting it.

No code from the checkpoint runs: the class must be one transformers ships, and the
model is built from the parsed JSON on the meta device so that tensors can be
assigned from the safetensors files afterwards.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from torchquant.checkpoint.code_guard import check_config_data
from torchquant.checkpoint.files import read_json_file
from torchquant.checkpoint.safetensors_check import TensorEntry, physical_memory_bytes
from torchquant.errors import CheckpointError

# the narrowest weights torchquant stores take 2 bits; 1 bit per parameter leaves margin
MIN_BITS_PER_PARAMETER = 1


def layer_indices(declared: Mapping[str, TensorEntry]) -> set[int]:
    """The integers that name modules in the paths of the non-empty declared tensors.

    Every decoder layer ``i`` holds non-empty weights under ``...layers.<i>...``, so a
    config claiming more layers than there are such indices describes files that are not
    there (zero-byte tensors do not count: no real layer's weight is empty).
    """
    found: set[int] = set()
    for name, entry in declared.items():
        if entry.nbytes:
            found.update(int(part) for part in name.split(".") if part.isdigit())
    return found


def check_layer_count(config: object, declared: Mapping[str, TensorEntry]) -> None:
    """``num_hidden_layers`` must be a count the declared tensors can fill, checked before
    a single layer is built."""
    layers = getattr(config, "num_hidden_layers", None)
    if layers is None:
        return
    if type(layers) is not int or layers < 0:
        raise CheckpointError(f"config.json: num_hidden_layers={layers!r} is not a layer count")
    indices = layer_indices(declared)
    if layers > len(indices):
        raise CheckpointError(
            f"config.json: num_hidden_layers={layers} but the tensors on disk name only "
            f"{len(indices)} distinct non-empty layer indices ({len(declared)} tensors)"
        )


def check_parameter_count(probe: nn.Module, declared: Mapping[str, TensorEntry]) -> None:
    """The model's parameters must fit the bytes on disk at the narrowest width stored."""
    parameters = sum(p.numel() for p in probe.parameters())
    stored_bits = 8 * sum(e.nbytes for e in declared.values())
    if parameters * MIN_BITS_PER_PARAMETER > stored_bits:
        raise CheckpointError(
            f"config.json: describes a model of {parameters} parameters, but the tensors on "
            f"disk hold only {stored_bits // 8} bytes (at least "
            f"{parameters * MIN_BITS_PER_PARAMETER // 8} needed)"
        )


def build_hf_skeleton(
    directory: Path, class_name: str, declared: Mapping[str, TensorEntry]
) -> nn.Module:
    """The model ``config.json`` describes, on the meta device, after bounding what it declares.

    The file is untrusted: a layer count larger than the layer indices the ``declared``
    tensors name is refused before anything is built; sizes are then checked on a
    meta-device probe (the parameters must fit the bytes on disk, and buffers such as
    rotary tables or causal masks, which are allocated for real when the model is built,
    must fit memory), and any error the model's own constructor raises is reported as
    a :class:`CheckpointError`.
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
    check_layer_count(config, declared)
    try:
        with torch.device("meta"):
            probe = cls._from_config(config)
        buffer_bytes = sum(b.numel() * b.element_size() for b in probe.buffers())
        budget = physical_memory_bytes() // 2
        if buffer_bytes > budget:
            raise CheckpointError(
                f"config.json: the model's buffers would take {buffer_bytes} bytes, more than "
                f"the budget of {budget}"
            )
        check_parameter_count(probe, declared)
        del probe
        with init_empty_weights(include_buffers=False):
            return cls._from_config(config)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(
            f"config.json: cannot build {class_name} from it ({type(exc).__name__}: {exc})"
        ) from None
