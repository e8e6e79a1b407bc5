"""What a quantized checkpoint holds: per-layer scheme and size, whole-model compression.

The compression ratio compares the checkpoint's files with the same model stored
at 16 bits per value (how Hugging Face models usually ship), so a ratio of 3.5
means the folder is 3.5 times smaller than its bf16/fp16 original.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from torchquant.errors import CheckpointError
from torchquant.formats.dispatch import detect_format, load_checkpoint
from torchquant.modules import QuantLinear

BYTES_16BIT = 2


@dataclass(frozen=True)
class LayerRow:
    name: str
    scheme: str
    bits: int
    group_size: int
    shape: tuple[int, int]
    nbytes: int


@dataclass
class CheckpointReport:
    """Per quantized layer rows plus totals; ``table()`` for people, ``to_dict()`` for tools."""

    directory: str
    format: str
    model_class: str
    layers: list[LayerRow] = field(default_factory=list)
    float_tensor_bytes: int = 0
    float_tensor_count: int = 0
    file_bytes: int = 0
    bytes_16bit: int = 0

    @property
    def compression_ratio(self) -> float:
        return self.bytes_16bit / self.file_bytes if self.file_bytes else float("nan")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["compression_ratio"] = self.compression_ratio
        return data

    def table(self) -> str:
        width = max([len(r.name) for r in self.layers] + [5])
        sw = max([len(r.scheme) + 2 for r in self.layers] + [28])
        lines = [
            f"{'layer':<{width}}  {'scheme':<{sw}}{'bits':>5}{'group':>7}{'shape':>13}{'KiB':>10}"
        ]
        for r in self.layers:
            shape = f"{r.shape[0]}x{r.shape[1]}"
            lines.append(
                f"{r.name:<{width}}  {r.scheme:<{sw}}{r.bits:>5}{r.group_size:>7}{shape:>13}"
                f"{r.nbytes / 1024:>10.1f}"
            )
        quant = sum(r.nbytes for r in self.layers)
        lines += [
            "",
            f"checkpoint     {self.directory} ({self.format}, {self.model_class})",
            f"quantized      {len(self.layers)} layer(s), {quant / 2**20:.2f} MiB",
            f"float tensors  {self.float_tensor_count}, {self.float_tensor_bytes / 2**20:.2f} MiB",
            f"files          {self.file_bytes / 2**20:.2f} MiB on disk",
            f"16-bit model   {self.bytes_16bit / 2**20:.2f} MiB",
            f"compression    {self.compression_ratio:.2f}x smaller than 16-bit",
        ]
        return "\n".join(lines)


def _layer_row(name: str, layer: QuantLinear) -> LayerRow:
    w = layer.scheme.weight
    act_order = " act-order" if layer.g_idx is not None else ""  # groups given by a g_idx
    return LayerRow(
        name,
        layer.scheme.describe() + act_order,
        w.bits,
        w.group_size,
        (layer.out_features, layer.in_features),
        layer.nbytes(),
    )


def report_model(model: nn.Module, directory: str | Path, fmt: str) -> CheckpointReport:
    """The report of a loaded quantized ``model`` whose files are in ``directory``."""
    directory = Path(directory)
    report = CheckpointReport(str(directory), fmt, type(model).__name__)
    quantized = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            quantized[name] = module
            report.layers.append(_layer_row(name, module))
            values = module.in_features * module.out_features
            values += 0 if module.bias is None else module.out_features
            report.bytes_16bit += values * BYTES_16BIT
    prefixes = tuple(f"{n}." for n in quantized)
    seen = set()
    for key, t in model.state_dict().items():  # what a checkpoint holds: no transient buffers
        storage = (t.untyped_storage().data_ptr(), t.storage_offset(), t.shape)
        if key.startswith(prefixes) or storage in seen:
            continue
        seen.add(storage)  # tied tensors count once
        report.float_tensor_count += 1
        report.float_tensor_bytes += t.numel() * t.element_size()
        report.bytes_16bit += t.numel() * BYTES_16BIT
    report.file_bytes = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
    return report


def inspect_checkpoint(directory: str | Path) -> CheckpointReport:
    """Load (validating) the checkpoint in ``directory`` and describe it."""
    fmt = detect_format(directory)
    if fmt is None:
        raise CheckpointError(f"{directory} is not a quantized checkpoint")
    return report_model(load_checkpoint(directory), directory, fmt)
