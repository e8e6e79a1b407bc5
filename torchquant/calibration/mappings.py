"""Architecture knowledge as data: where the blocks are and which module feeds which linears.

Each :class:`ArchMapping` is matched against the model's class name (shell globs).
Inside a block, a :class:`BalanceMapping` names a ``source`` (a norm or a linear whose
output is exactly the input of ``linears``) and the ``inspect`` module whose output
AWQ compares; smoothing factors can be folded into ``source``.  Names are relative to
the block.  Models without an entry fall back to the largest ``ModuleList`` of blocks
holding linears, with no folding (a warning says so).
"""

from __future__ import annotations

import fnmatch
import warnings
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class BalanceMapping:
    """``source`` output -> input of every one of ``linears``; AWQ scores ``inspect``'s output.

    ``source_is_linear`` marks inputs another linear produces, which SmoothQuant leaves
    alone unless asked (:class:`~torchquant.config.SmoothQuantConfig`).  ``token_wise``
    marks an ``inspect`` whose output at a token depends on that token's input alone (an
    MLP; a linear is token-wise without it), so AWQ may score it on a subset of rows.
    """

    source: str
    linears: tuple[str, ...]
    inspect: str | None = None
    source_is_linear: bool = False
    token_wise: bool = False

    @property
    def inspects_tokens(self) -> bool:
        """Whether ``inspect`` may be scored row by row (token-wise or one of the linears)."""
        return self.token_wise or self.inspect in self.linears


@dataclass(frozen=True)
class ArchMapping:
    name: str
    class_patterns: tuple[str, ...]
    blocks: tuple[str, ...]
    balance: tuple[BalanceMapping, ...]


_LLAMA_LIKE = (
    BalanceMapping(
        "input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"
    ),
    BalanceMapping("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj", True),
    BalanceMapping(
        "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp", token_wise=True
    ),
    BalanceMapping("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj", True),
)

ARCH_MAPPINGS: tuple[ArchMapping, ...] = (
    ArchMapping(
        "llama",
        ("Llama*", "Mistral*", "Qwen2For*", "Qwen2Model", "Qwen3For*", "Qwen3Model"),
        ("model.layers", "layers"),
        _LLAMA_LIKE,
    ),
    ArchMapping(
        "gpt2",
        ("GPT2*",),
        ("transformer.h", "h"),
        (
            BalanceMapping("ln_1", ("attn.c_attn",), "attn.c_attn"),
            BalanceMapping("ln_2", ("mlp.c_fc",), "mlp.c_fc"),
        ),
    ),
    ArchMapping(
        "opt",
        ("OPT*",),
        ("model.decoder.layers", "decoder.layers"),
        (
            BalanceMapping(
                "self_attn_layer_norm",
                ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                "self_attn",
            ),
            BalanceMapping("self_attn.v_proj", ("self_attn.out_proj",), "self_attn.out_proj", True),
            BalanceMapping("final_layer_norm", ("fc1",), "fc1"),
        ),
    ),
    ArchMapping(
        # post-LN encoders: a LayerNorm output also feeds the residual, so only v -> out folds
        "bert",
        ("Bert*", "Roberta*", "XLMRoberta*"),
        ("bert.encoder.layer", "roberta.encoder.layer", "encoder.layer"),
        (
            BalanceMapping(
                "attention.self.value",
                ("attention.output.dense",),
                "attention.output.dense",
                True,
            ),
        ),
    ),
)


@dataclass(frozen=True)
class ModelLayout:
    """The block list to calibrate and the balance mappings inside each block."""

    arch: str
    blocks_path: str
    blocks: nn.ModuleList
    balance: tuple[BalanceMapping, ...]


def _has_linear(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D" for m in module.modules())


def _fallback_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    best = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and all(map(_has_linear, module)):
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    return best


def find_layout(model: nn.Module) -> ModelLayout:
    """The layout of ``model``: from the mapping table, else a generic one with a warning."""
    cls = type(model).__name__
    for arch in ARCH_MAPPINGS:
        if not any(fnmatch.fnmatchcase(cls, p) for p in arch.class_patterns):
            continue
        for path in arch.blocks:
            try:
                blocks = model.get_submodule(path)
            except AttributeError:
                continue
            if isinstance(blocks, nn.ModuleList):
                return ModelLayout(arch.name, path, blocks, arch.balance)
    found = _fallback_blocks(model)
    if found is None:
        return ModelLayout("generic", "", nn.ModuleList([model]), ())
    warnings.warn(
        f"no architecture mapping for {cls}: calibrating the blocks at {found[0]!r} with "
        "hooks on every linear, without folding scales into preceding layers",
        stacklevel=2,
    )
    return ModelLayout("generic", found[0], found[1], ())
