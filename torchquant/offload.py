"""Models dispatched by accelerate (``device_map``): reach weights that are offloaded.

With ``device_map="auto"`` and too little memory, accelerate keeps some layers'
weights on the meta device and attaches an ``AlignDevicesHook`` that loads them
from its ``weights_map`` (CPU memory or an ``offload_folder`` on disk) for each
forward.  Conversion and saving must read those weights the same way, one
module at a time; a quantized layer then stays resident on the hook's execution
device (it is several times smaller than the float weight it replaces).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def _align_hook(module: nn.Module):
    """The module's accelerate ``AlignDevicesHook``, or ``None``."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return None
    from accelerate.hooks import AlignDevicesHook

    return hook if isinstance(hook, AlignDevicesHook) else None


def is_offloaded(module: nn.Module) -> bool:
    """Whether accelerate keeps this module's own weights off-device until its forward."""
    hook = _align_hook(module)
    return hook is not None and bool(hook.offload) and hook.weights_map is not None


def execution_device(module: nn.Module, default: torch.device) -> torch.device:
    """Where the module's forward runs: its hook's execution device, else ``default``."""
    hook = _align_hook(module)
    if hook is None or hook.execution_device is None:
        return default
    return torch.device(hook.execution_device)


@contextlib.contextmanager
def onloaded(module: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, an offloaded module's own tensors are real (not meta)."""
    if not is_offloaded(module):
        yield module
        return
    from accelerate.utils import align_module_device

    with align_module_device(module):
        yield module


def carry_hook(old: nn.Module, new: nn.Module) -> None:
    """Give ``new`` the device alignment of ``old``'s hook, without the offloading.

    The replacement keeps moving its inputs to the execution device (and its output
    back, where ``old`` did), so it slots into the dispatched model like ``old``.
    """
    hook = _align_hook(old)
    if hook is None:
        return
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    aligned = AlignDevicesHook(
        execution_device=hook.execution_device, io_same_device=hook.io_same_device
    )
    add_hook_to_module(new, aligned)


def materialized_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with each offloaded tensor read from its hook's weights map.

    Tensors still on the meta device afterwards (no hook holds them) stay meta; the
    caller decides whether that is an error.  Tied tensors come back as one tensor, so
    savers still see them as tied: accelerate's hooks untie offloaded parameters after
    a forward, so the model's own ``all_tied_weights_keys`` (``{target: source}``, as
    transformers declares it) names them too, and equal values are required.
    """
    state = model.state_dict()
    if not any(t.device.type == "meta" for t in state.values()):
        return state
    first_name: dict[int, str] = {}
    declared = getattr(model, "all_tied_weights_keys", None) or {}
    tied = {k: v for k, v in declared.items() if k in state and state[k].device.type == "meta"}
    named = [
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ]
    for key, tensor in named:
        if tensor.device.type == "meta":
            source = first_name.setdefault(id(tensor), key)
            if source != key:
                tied[key] = source
    for name, module in model.named_modules():
        if not is_offloaded(module):
            continue
        prefix = f"{name}." if name else ""
        with onloaded(module):
            own = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
            for key, tensor in own:
                if state.get(prefix + key) is not None and tensor.device.type != "meta":
                    state[prefix + key] = tensor.detach().to("cpu")
    for key, source in tied.items():
        pair = [state.get(key), state.get(source)]
        if any(t is None or t.device.type == "meta" for t in pair):
            continue
        if torch.equal(*pair):
            state[key] = state[source]
    return state
