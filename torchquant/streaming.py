"""Convert a model straight from float safetensors files, one layer in memory at a time.

``convert_model`` needs the float model materialised; for a model larger than
the memory at hand, build its skeleton on the meta device instead and let
:func:`convert_from_safetensors` read each linear layer's weight from disk,
quantize it, and drop it before reading the next.  Peak memory is then the
quantized model plus one float layer (and its quantization temporaries).

Fused mixture-of-experts modules are split into per-expert linears first (see
``QuantExperts``); their weights are read under the per-expert names Hugging Face
checkpoints use (``<experts>.<e>.gate_proj.weight`` ...) or, failing that, sliced
from the fused tensors (``<experts>.gate_up_proj``), one experts module's at a time.
Files may name tensors as the model type's original checkpoints do (Mixtral's
``block_sparse_moe.experts.<e>.w1`` ..., see ``formats.checkpoint_names``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from torchquant.checkpoint.names import CheckpointNames, names_for_model, names_for_type
from torchquant.checkpoint.safetensors_check import TensorEntry, check_safetensors
from torchquant.config import QuantConfig
from torchquant.conversion_guards import count_nonfinite
from torchquant.errors import CheckpointError, ConfigError, QuantizationError
from torchquant.modules import QuantExperts, QuantLinear
from torchquant.plan import (
    ConversionSummary,
    build_quant_linear,
    plan_conversion,
    replace_layer,
    split_experts_and_plan,
    stores_transposed,
)


class FloatWeights:
    """Tensors of one or more validated safetensors files, read one at a time on request.

    Tensors are looked up by the model's names; ``names`` maps the files' names to them.
    """

    def __init__(self, files: Sequence[str | Path], names: CheckpointNames | None = None) -> None:
        names = names or names_for_type(None)
        self._where: dict[str, tuple[Path, TensorEntry]] = {}
        self._data_start: dict[Path, int] = {}
        stored_as: dict[str, str] = {}
        for path in map(Path, files):
            header = check_safetensors(path)
            self._data_start[path] = path.stat().st_size - header.data_bytes
            for stored, entry in header.entries.items():
                name = names.to_model(stored)
                if name in self._where:
                    first = stored_as[name]
                    if stored == first:
                        raise CheckpointError(f"tensor {name!r} appears in two files")
                    raise CheckpointError(
                        f"tensor {name!r} appears twice, as {first!r} "
                        f"({self._where[name][0].name}) and as {stored!r} ({path.name})"
                    )
                stored_as[name] = stored
                self._where[name] = (path, entry)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def names(self) -> list[str]:
        return list(self._where)

    def get(self, name: str, like: torch.Tensor | None = None) -> torch.Tensor:
        """Read tensor ``name``; with ``like``, its shape must match (dtype follows the file)."""
        if name not in self._where:
            raise CheckpointError(f"tensor {name!r} is not in the float weights")
        path, entry = self._where[name]
        if like is not None and tuple(like.shape) != entry.shape:
            raise CheckpointError(
                f"tensor {name!r}: {path.name} declares {entry.shape}, the model expects "
                f"{tuple(like.shape)}"
            )
        if like is not None and like.is_floating_point() != entry.dtype.is_floating_point:
            raise CheckpointError(
                f"tensor {name!r}: {path.name} stores {entry.dtype}, the model expects a "
                f"{'floating-point' if like.is_floating_point() else 'non-float'} tensor"
            )
        # -- a plain read into a fresh buffer: no mapping of the whole file, one tensor at a time
        buffer = torch.empty(entry.nbytes, dtype=torch.uint8)
        try:
            with open(path, "rb") as f:
                f.seek(self._data_start[path] + entry.start)
                got = f.readinto(memoryview(buffer.numpy()))
        except OSError as exc:
            raise CheckpointError(f"{path.name}: cannot read tensor {name!r} ({exc})") from None
        if got != entry.nbytes:
            raise CheckpointError(f"{path.name}: tensor {name!r} is truncated")
        tensor = buffer.view(entry.dtype).reshape(entry.shape)
        bad = count_nonfinite(tensor)
        if bad:
            raise QuantizationError(  # the same error as quantizing such a tensor directly
                f"{name} contains {bad} NaN/Inf value(s): tensor {name!r} in {path.name}; "
                "refusing to convert the model from it"
            )
        return tensor


class ExpertWeights:
    """Reads per-expert weights by name, or slices them from the fused tensor in the files.

    The fused tensors of the experts module last read from stay cached (gate/up and
    down alternate as the experts are converted in order).
    """

    def __init__(self, model: nn.Module, weights: FloatWeights) -> None:
        self.weights = weights
        self.sources: dict[str, tuple[str, str, tuple[int | slice, ...]]] = {}
        for name, module in model.named_modules():
            if isinstance(module, QuantExperts):
                for rel, (attr, index) in module.fused_sources().items():
                    self.sources[f"{name}.{rel}.weight"] = (name, f"{name}.{attr}", index)
        self._module = ""
        self._fused: dict[str, torch.Tensor] = {}

    def get(self, name: str, like: torch.Tensor | None = None) -> torch.Tensor:
        if name in self.weights or name not in self.sources:
            return self.weights.get(name, like)
        module, fused_name, index = self.sources[name]
        if fused_name not in self.weights:
            raise CheckpointError(
                f"tensor {name!r} is not in the float weights, nor its fused {fused_name!r}"
            )
        if module != self._module:
            self._module, self._fused = module, {}
        if fused_name not in self._fused:
            self._fused[fused_name] = self.weights.get(fused_name)
        fused = self._fused[fused_name]
        if fused.dim() != 3 or not all(isinstance(i, slice) or i < fused.shape[0] for i in index):
            raise CheckpointError(
                f"tensor {fused_name!r}: shape {tuple(fused.shape)} does not hold {name!r}"
            )
        weight = fused[index]
        if like is not None and tuple(weight.shape) != tuple(like.shape):
            raise CheckpointError(
                f"tensor {fused_name!r}: shape {tuple(fused.shape)} gives {name!r} the shape "
                f"{tuple(weight.shape)}, the model expects {tuple(like.shape)}"
            )
        return weight.clone()  # -- its own storage: the fused tensor can go with its module


@torch.no_grad()
def convert_from_safetensors(
    model: nn.Module,
    files: Sequence[str | Path],
    config: QuantConfig,
    *,
    progress: bool = True,
) -> tuple[nn.Module, ConversionSummary]:
    """Quantize ``model`` (a skeleton, typically on the meta device) from float ``files``.

    Every linear layer the config selects is read from the files, quantized exactly
    as :func:`convert_model` would (calibration-free algorithms only), and put in place; all
    other parameters and buffers are then assigned from the files unchanged.  Each
    tensor's declared shape is checked against the skeleton before it is read.
    Tied parameters are not re-tied (call the model's ``tie_weights`` if it has one).
    """
    if not isinstance(config, QuantConfig):
        raise ConfigError(f"config must be a QuantConfig, got {type(config).__name__}")
    plan = plan_conversion(model, config)  # -- refuse a bad override before any module changes
    plan, experts_left = split_experts_and_plan(model, config, plan)
    weights = ExpertWeights(model, FloatWeights(files, names_for_model(model)))
    needing = [n for n, (s, _) in plan.items() if s is not None and s.needs_calibration]
    if needing:
        raise ConfigError(
            f"{needing[0]!r} (and {len(needing) - 1} more) use an algorithm or static activation "
            "scales that need calibration; streaming conversion takes calibration-free ones "
            "only: load the model and call convert_model(model, config, calibration_data=...)"
        )
    summary = ConversionSummary(skipped=experts_left)
    summary.split_experts = {
        n: m.num_experts for n, m in model.named_modules() if isinstance(m, QuantExperts)
    }
    # -- nothing is swapped in until every tensor has been read and checked
    quantized: dict[str, tuple[QuantLinear, int]] = {}  # -- with the float weight's bytes
    for name, (scheme, why) in tqdm(
        plan.items(), desc="quantizing", unit="layer", disable=not progress
    ):
        if scheme is None:
            summary.skipped[name] = why
            continue
        layer = model.get_submodule(name)
        weight = weights.get(f"{name}.weight", layer.weight)
        if stores_transposed(layer):
            weight = weight.t()
        bias = getattr(layer, "bias", None)
        if bias is not None:
            bias = weights.get(f"{name}.bias", bias)
        new = build_quant_linear(weight, bias, scheme, name)
        quantized[name] = (new, weight.numel() * weight.element_size())
        del weight, bias, new
    rest = {
        name: weights.get(name, t)
        for name, t in model.state_dict().items()
        if name.rpartition(".")[0] not in quantized
    }
    for name, (layer, float_bytes) in quantized.items():
        replace_layer(model, name, layer, summary, float_bytes)
    model.load_state_dict(rest, strict=False, assign=True)
    return model, summary
