"""Int32 packings used by other libraries, expressed with our canonical bitstream packing.

Our packing (``numerics.packing``) writes codes as one little-endian bitstream per row,
``ceil(K/32)*bits`` words.  compressed-tensors (releases since mid-2026) writes the same bitstream
but keeps only the ``ceil(K*bits/32)`` words that hold codes; its earlier releases
wrote ``32 // bits`` codes per word, leaving the top bits of each word unused for
3/5/6/7 bits.  GPTQ packs the same bitstream along the *input* dimension of a
``(K, N)`` matrix (our layout transposed; its 3-bit packing is that bitstream too),
its zero points along the output dimension.  AWQ's GEMM layout packs 4-bit codes
along the output dimension, eight per word in the interleaved column order
``0 2 4 6 1 3 5 7``.
"""

from __future__ import annotations

import torch

from torchquant.errors import CheckpointError
from torchquant.numerics import pack_codes, packed_width, unpack_codes


def dense_width(num_codes: int, bits: int) -> int:
    """Words holding ``num_codes`` codes densely, without trailing padding words."""
    return -(-num_codes * bits // 32)


def padded_width(num_codes: int, bits: int) -> int:
    """Words holding ``num_codes`` codes at ``32 // bits`` codes per word."""
    return -(-num_codes // (32 // bits))


def pack_dense(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes ``(rows, K)`` -> int32 ``(rows, ceil(K*bits/32))``, little-endian bitstream."""
    return pack_codes(codes, bits)[:, : dense_width(codes.shape[1], bits)].contiguous()


def unpack_dense(words: torch.Tensor, bits: int, num_codes: int) -> torch.Tensor:
    full = packed_width(num_codes, bits)
    padded = torch.nn.functional.pad(words, (0, full - words.shape[1]))
    return unpack_codes(padded.contiguous(), bits, num_codes)


def unpack_per_word(words: torch.Tensor, bits: int, num_codes: int) -> torch.Tensor:
    """Inverse of ``32 // bits`` codes per word, lowest bits first."""
    per_word = 32 // bits
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    codes = (w.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(words.shape[0], -1)[:, :num_codes].to(torch.uint8)


def unpack_rows(words: torch.Tensor, bits: int, num_codes: int, what: str) -> torch.Tensor:
    """Unpack compressed-tensors rows, telling the dense and per-word layouts by width."""
    if words.dtype != torch.int32 or words.dim() != 2:
        raise CheckpointError(f"{what}: expected a 2-D int32 tensor, got {words.dtype}")
    width = words.shape[1]
    if width == dense_width(num_codes, bits):
        return unpack_dense(words, bits, num_codes)
    if width == padded_width(num_codes, bits):
        return unpack_per_word(words, bits, num_codes)
    raise CheckpointError(
        f"{what}: {width} words cannot hold {num_codes} codes of {bits} bits "
        f"(expected {dense_width(num_codes, bits)} or {padded_width(num_codes, bits)})"
    )


# -- GPTQ and AWQ: (K, N) matrices, packed along the input (GPTQ qweight) or output dimension

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a word holds column AWQ_ORDER[i] of its 8
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)


def pack_columns(values: torch.Tensor, bits: int, what: str) -> torch.Tensor:
    """Codes ``(R, C)`` -> int32 ``(R, C*bits/32)``, a bitstream along each row."""
    if values.shape[1] * bits % 32:
        raise CheckpointError(
            f"{what}: {values.shape[1]} codes of {bits} bits do not fill whole int32 words"
        )
    return pack_dense(values, bits)


def unpack_columns(words: torch.Tensor, bits: int, num_codes: int, what: str) -> torch.Tensor:
    """Inverse of :func:`pack_columns`, checking the word count."""
    if words.dtype != torch.int32 or words.dim() != 2:
        raise CheckpointError(f"{what}: expected a 2-D int32 tensor, got {words.dtype}")
    if words.shape[1] * 32 != num_codes * bits:
        raise CheckpointError(
            f"{what}: {words.shape[1]} words per row cannot hold {num_codes} codes of {bits} bits"
        )
    return unpack_dense(words, bits, num_codes)


def pack_rows(values: torch.Tensor, bits: int, what: str) -> torch.Tensor:
    """Codes ``(R, C)`` -> int32 ``(R*bits/32, C)``, a bitstream down each column (GPTQ)."""
    return pack_columns(values.t().contiguous(), bits, what).t().contiguous()


def _awq_permute(values: torch.Tensor, order: tuple[int, ...], what: str) -> torch.Tensor:
    rows, cols = values.shape
    if cols % 8:
        raise CheckpointError(f"{what}: {cols} columns is not a multiple of 8")
    return values.reshape(rows, cols // 8, 8)[:, :, list(order)].reshape(rows, cols)


def pack_awq(values: torch.Tensor, what: str) -> torch.Tensor:
    """4-bit codes ``(R, C)`` -> int32 ``(R, C/8)`` in AWQ's interleaved nibble order."""
    return pack_columns(_awq_permute(values, AWQ_ORDER, what).contiguous(), 4, what)


def unpack_awq(words: torch.Tensor, num_codes: int, what: str) -> torch.Tensor:
    nibbles = unpack_columns(words, 4, num_codes, what)
    return _awq_permute(nibbles, AWQ_REVERSE_ORDER, what).contiguous()


def dense_to_canonical(words: torch.Tensor, bits: int, num_codes: int) -> torch.Tensor:
    """Dense bitstream rows -> our packed rows, without unpacking: the bits are the same.

    Only the tail differs: our rows are padded with zero words to ``ceil(K/32)*bits``,
    and any stray bits past the last code are cleared so padding codes stay zero.
    """
    dense = dense_width(num_codes, bits)
    if words.dtype != torch.int32 or words.dim() != 2 or words.shape[1] != dense:
        raise CheckpointError(f"expected int32 rows of {dense} words, got {tuple(words.shape)}")
    out = torch.nn.functional.pad(words, (0, packed_width(num_codes, bits) - dense))
    used = num_codes * bits - (dense - 1) * 32  # bits of the last dense word holding codes
    if used < 32:
        out[:, dense - 1] &= (1 << used) - 1
    return out
