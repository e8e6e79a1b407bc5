"""The exchange formats' weight definitions written out bit by bit, independent of torchquant.

Tests compare torchquant's exports with these and build checkpoints with them, so a
mistake in torchquant's packing cannot hide behind the same mistake in the oracle.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn


def ref_unpack_dim0(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """A bitstream down each column of int32 ``words`` -> ``count`` codes per column."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    out = torch.zeros(count, words.shape[1], dtype=torch.int64)
    for i in range(count):
        bit = i * bits
        word, shift = divmod(bit, 32)
        value = w[word] >> shift
        if shift + bits > 32:
            value = value | (w[word + 1] << (32 - shift))
        out[i] = value & ((1 << bits) - 1)
    return out


def ref_pack_dim1(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes ``(R, C)`` into ``32 // bits`` codes per int32 word along each row (2/4/8 bits)."""
    per = 32 // bits
    c = codes.to(torch.int64)
    words = torch.zeros(c.shape[0], c.shape[1] // per, dtype=torch.int64)
    for j in range(per):
        words |= c[:, j::per] << (bits * j)
    return words.to(torch.uint32).view(torch.int32) if hasattr(torch, "uint32") else words


def ref_gptq_dequant(tensors: dict[str, torch.Tensor], bits: int, version: str) -> torch.Tensor:
    """``w[n, k] = (q[k, n] - zero[g_idx[k], n]) * scale[g_idx[k], n]``, as ``(N, K)``."""
    qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    k, n = qweight.shape[0] * 32 // bits, qweight.shape[1]
    q = ref_unpack_dim0(qweight, bits, k)  # (K, N)
    z = ref_unpack_dim0(qzeros.t().contiguous(), bits, n).t()  # (G, N)
    if version == "gptq":
        z = z + 1
    g_idx = tensors["g_idx"].long()
    w = (q - z[g_idx]).to(scales.dtype) * scales[g_idx]
    return w.t()


def ref_signed_qparams(
    groups: torch.Tensor, bits: int, symmetric: bool, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """compressed-tensors' min-max qparams for ``groups (N, G, g)``: signed codes, the range
    widened to hold 0; returns ``scale`` in ``dtype`` and ``zero_point`` int8, ``(N, G)``."""
    lo, hi = groups.amin(-1).clamp(max=0), groups.amax(-1).clamp(min=0)
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if symmetric:
        scale = torch.maximum(-lo, hi) / ((qmax - qmin) / 2)
        zp = torch.zeros_like(scale)
    else:
        scale = (hi - lo) / (qmax - qmin)
        zp = torch.round(qmin - lo / scale).clamp(qmin, qmax)
    return scale.to(dtype), zp.to(torch.int8)


def layer_tensors(folder: Path, name: str) -> dict[str, torch.Tensor]:
    """The tensors of layer ``name`` in ``folder/model.safetensors``, by local name."""
    state = load_file(folder / "model.safetensors")
    return {k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(name + ".")}


def library_compress(weight, scheme, bits, symmetric, group_size):
    """Quantization parameters from the weight's range, then the library's own compressor."""
    from compressed_tensors.compressors import BaseCompressor

    n, k = weight.shape
    g = k if group_size == -1 else group_size
    w = weight.float().reshape(n, k // g, g)
    scale, zp = ref_signed_qparams(w, bits, symmetric, weight.dtype)
    state = {"weight": weight, "weight_scale": scale, "weight_zero_point": zp}
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    compressed = compressor.compress(state, scheme)
    decompressed = compressor.decompress(compressed, scheme)["weight"]
    return compressed, decompressed


def replace_weight(state: dict, name: str, tensors: dict[str, torch.Tensor]) -> None:
    """Swap layer ``name``'s float weight in ``state`` for its stored ``tensors`` (local names)."""
    del state[f"{name}.weight"]
    state.update({f"{name}.{key}": v for key, v in tensors.items()})


def save_library_checkpoint(folder: Path, build: Callable[[], nn.Module], scheme, compress):
    """Write ``build()`` as a compressed-tensors folder, every linear but the tied ``lm_head``
    holding what ``compress(name, weight)`` returns as ``(tensors, dequantized weight)``, with
    the library's own ``quantization_config`` of ``scheme``; returns a float ``build()``
    holding the dequantized weights, the model the folder must load as."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig

    model, reference = build(), build()
    model.save_pretrained(folder)
    state = dict(model.state_dict())
    state.pop("lm_head.weight")  # tied to the embedding
    ref_state = reference.state_dict()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            compressed, ref_state[f"{name}.weight"] = compress(name, module.weight.detach())
            replace_weight(state, name, compressed)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    qconfig = QuantizationConfig(
        config_groups={"group_0": scheme},
        format=scheme.format,
        quantization_status="compressed",
        ignore=["lm_head"],
    )
    ModelCompressor(quantization_config=qconfig).update_config(str(folder))
    reference.load_state_dict(ref_state)
    return reference


def assert_same_outputs(loaded: nn.Module, reference: nn.Module) -> None:
    """The loaded Llama gives the float reference's logits, and its first ``q_proj`` the
    float layer's output, bit for bit."""
    ids = torch.randint(0, reference.config.vocab_size, (2, 11))
    assert torch.equal(loaded(ids).logits, reference(ids).logits)
    x = torch.randn(3, reference.config.hidden_size)
    want = F.linear(x, reference.model.layers[0].self_attn.q_proj.weight)
    assert torch.equal(loaded.model.layers[0].self_attn.q_proj(x), want)
