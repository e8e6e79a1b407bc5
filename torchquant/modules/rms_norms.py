"""RMSNorm modules of known model families run as one kernel (``torchquant::rms_norm``).

Eager Hugging Face RMSNorm is 7-8 aten ops, one CUDA kernel each: a batch-1 decode step of
a Llama-3-8B-shaped model runs 65 norms as 520 kernels, whose boundaries cost more than the
norms' own work (a few microseconds).  :func:`fuse_rms_norms` finds the norms whose class is one
of :data:`RMSNORM_FORMS` (or ``torch.nn.RMSNorm``) and gives each instance a ``forward``
that calls the one-kernel op with the module's own ``weight`` and epsilon, read at call
time.  The module, its class and its parameter stay as they are, so ``state_dict`` keys
and tensors, saved checkpoints and loading are unchanged; :func:`unfuse_rms_norms`
removes the instance ``forward`` again.

The op computes the family's own formula (``torchquant.ops.rms_norm``), so outputs match
the module's up to the order of the float32 sum.  A call the op does not cover runs the
module's own forward: inputs or weights outside float32/bfloat16/float16, calls that
autograd must follow (the op has no backward), and calls ``torch.compile`` traces
(Inductor fuses the norm's aten ops with their neighbours, the residual add included,
which it cannot do across a custom op; ``torchquant::rms_norm`` itself traces too).
Only norms on ``devices`` are fused (CUDA by default: on CPU the op is the module's own
aten ops anyway).  Norms another wrapper already gave an instance ``forward``
(accelerate's offload hooks) are left alone.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from torchquant.ops import common
from torchquant.ops.rms_norm import rms_norm

FUSED_DEVICES = ("cuda",)
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_FORM_KEY = "_rms_norm_form"  # -- the instance's RMSNormForm, a plain attribute


@dataclass(frozen=True)
class RMSNormForm:
    """How one family writes RMSNorm: where its epsilon lives, the offset its weight gets
    (Gemma multiplies by ``1 + weight``), and whether the weight multiplies the row after
    its cast to the input's dtype (Llama) or in float32 before it (Gemma, OLMo-2)."""

    eps_attribute: str
    weight_offset: float = 0.0
    weight_after_cast: bool = True


_LLAMA = RMSNormForm("variance_epsilon")
_GEMMA = RMSNormForm("eps", weight_offset=1.0, weight_after_cast=False)
_OLMO2 = RMSNormForm("variance_epsilon", weight_after_cast=False)
_TORCH = RMSNormForm("eps", weight_after_cast=False)

# -- transformers classes (by name, defined in a ``transformers`` module) and the form of
# -- their forward; each is held to its class by tests/modules/test_rms_norms.py
RMSNORM_FORMS: dict[str, RMSNormForm] = {
    "LlamaRMSNorm": _LLAMA,
    "MistralRMSNorm": _LLAMA,
    "MinistralRMSNorm": _LLAMA,
    "MixtralRMSNorm": _LLAMA,
    "Qwen2RMSNorm": _LLAMA,
    "Qwen2MoeRMSNorm": _LLAMA,
    "Qwen3RMSNorm": _LLAMA,
    "Qwen3MoeRMSNorm": _LLAMA,
    "Phi3RMSNorm": _LLAMA,
    "GraniteRMSNorm": _LLAMA,
    "SmolLM3RMSNorm": _LLAMA,
    "DeepseekV3RMSNorm": _LLAMA,
    "GemmaRMSNorm": _GEMMA,
    "Gemma2RMSNorm": _GEMMA,
    "Gemma3RMSNorm": _GEMMA,
    "Olmo2RMSNorm": _OLMO2,
}


def rms_norm_form(module: nn.Module) -> RMSNormForm | None:
    """The form of ``module`` if it is an RMSNorm this file can fuse, else None: a known
    class with a 1-D ``weight`` parameter and a float epsilon (``torch.nn.RMSNorm``: one
    normalized dimension, a weight, epsilon None or a float)."""
    cls = type(module)
    if cls is nn.RMSNorm:
        form = _TORCH
        if len(module.normalized_shape) != 1:
            return None
    elif cls.__module__.startswith("transformers.") and cls.__name__ in RMSNORM_FORMS:
        form = RMSNORM_FORMS[cls.__name__]
    else:
        return None
    weight = module._parameters.get("weight")
    if not isinstance(weight, nn.Parameter) or weight.dim() != 1:
        return None
    eps = getattr(module, form.eps_attribute, None)
    if not (isinstance(eps, float) or (eps is None and cls is nn.RMSNorm)):
        return None
    return form


def _epsilon(module: nn.Module, form: RMSNormForm) -> float:
    eps = getattr(module, form.eps_attribute)
    return torch.finfo(torch.float32).eps if eps is None else eps  # -- nn.RMSNorm's default


def fused_rms_norm_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The ``forward`` of a fused norm: the one-kernel op, or the class's own forward for a
    call the op does not cover (see the module docstring)."""
    form: RMSNormForm = module.__dict__[_FORM_KEY]
    weight = module.weight
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    unsupported = x.dtype not in _DTYPES or weight.dtype not in _DTYPES
    if needs_grad or unsupported or torch.compiler.is_compiling():
        return type(module).forward(module, x)
    return common.run(
        rms_norm, x, weight, _epsilon(module, form), form.weight_offset, form.weight_after_cast
    )


def _is_fused(module: nn.Module) -> bool:
    forward = module.__dict__.get("forward")
    return isinstance(forward, functools.partial) and forward.func is fused_rms_norm_forward


def fuse_rms_norms(model: nn.Module, devices: Iterable[str] = FUSED_DEVICES) -> list[str]:
    """Give every fusable RMSNorm of ``model`` whose weight is on ``devices`` the one-kernel
    ``forward``; returns the names of the norms fused (those fused before included)."""
    devices = tuple(devices)
    fused = []
    for name, module in model.named_modules():
        if _is_fused(module):
            fused.append(name)
            continue
        form = rms_norm_form(module)
        if form is None or "forward" in module.__dict__:
            continue
        if module.weight.device.type not in devices:
            continue
        module.__dict__[_FORM_KEY] = form
        module.__dict__["forward"] = functools.partial(fused_rms_norm_forward, module)
        fused.append(name)
    return fused


def unfuse_rms_norms(model: nn.Module) -> list[str]:
    """Give every norm :func:`fuse_rms_norms` fused its class's ``forward`` back; returns
    their names."""
    restored = []
    for name, module in model.named_modules():
        if _is_fused(module):
            del module.__dict__["forward"]
            del module.__dict__[_FORM_KEY]
            restored.append(name)
    return restored
