"""Dense bit packing of unsigned integer codes into int32 words.

Layout (the canonical checkpoint layout): codes of shape ``(rows, K)`` with
``bits`` in 2..8 are laid out as one little-endian bitstream per row: code ``k``
occupies bits ``[k * bits, (k + 1) * bits)`` of the stream, and the stream is cut
into 32-bit words, word 0 holding the lowest bits.  Codes may straddle two words
(3, 5, 6 and 7 bits), exactly as GPTQ packs 3-bit weights.  ``K`` is padded with
zero codes to a multiple of 32, so every row packs into ``ceil(K / 32) * bits``
words and every run of 32 codes fills exactly ``bits`` words.
"""

from __future__ import annotations

import torch

from torchquant.errors import QuantizationError

_CODES_PER_BLOCK = 32


def packed_width(num_codes: int, bits: int) -> int:
    """Number of int32 words that hold ``num_codes`` codes of ``bits`` bits."""
    return -(-num_codes // _CODES_PER_BLOCK) * bits


def _bit_positions(bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    offsets = torch.arange(_CODES_PER_BLOCK, device=device, dtype=torch.int64) * bits
    return offsets // 32, offsets % 32


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise QuantizationError(f"bits must be an int in 2..8, got {bits!r}")


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes ``(rows, K)`` in ``[0, 2**bits)`` into int32 ``(rows, K_words)``."""
    _check_bits(bits)
    if codes.dim() != 2:
        raise QuantizationError(f"codes must be 2-D (rows, K), got shape {tuple(codes.shape)}")
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise QuantizationError(f"codes must be an integer tensor, got {codes.dtype}")
    rows, k = codes.shape
    codes = codes.to(torch.int64)
    if codes.numel() and (codes.min() < 0 or codes.max() >= 1 << bits):
        raise QuantizationError(f"codes must lie in [0, {(1 << bits) - 1}] for {bits}-bit packing")
    blocks = -(-k // _CODES_PER_BLOCK)
    padded = torch.zeros(rows, blocks * _CODES_PER_BLOCK, dtype=torch.int64, device=codes.device)
    padded[:, :k] = codes
    padded = padded.view(rows, blocks, _CODES_PER_BLOCK)
    word, shift = _bit_positions(bits, codes.device)
    # -- low part of each code goes into its own word, the spill into the next one
    low = (padded << shift) & 0xFFFFFFFF
    spill = torch.where(shift + bits > 32, padded >> (32 - shift), torch.zeros_like(padded))
    words = torch.zeros(rows, blocks, bits + 1, dtype=torch.int64, device=codes.device)
    words.index_add_(2, word, low)
    words.index_add_(2, word + 1, spill)
    words = words[..., :bits].reshape(rows, blocks * bits)
    # -- reinterpret the unsigned 32-bit value as int32 (two's complement)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def unpack_codes(packed: torch.Tensor, bits: int, num_codes: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int32 ``(rows, K_words)`` -> uint8 ``(rows, num_codes)``."""
    _check_bits(bits)
    if packed.dtype != torch.int32 or packed.dim() != 2:
        raise QuantizationError(
            f"packed codes must be a 2-D int32 tensor, got {packed.dtype} {tuple(packed.shape)}"
        )
    rows, width = packed.shape
    if width != packed_width(num_codes, bits):
        raise QuantizationError(
            f"packed width {width} does not hold {num_codes} codes of {bits} bits "
            f"(expected {packed_width(num_codes, bits)} words)"
        )
    if 32 % bits == 0:
        # -- no code straddles a word: shift each word once per code it holds
        shifts = torch.arange(0, 32, bits, device=packed.device, dtype=torch.int32)
        codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
        return codes.reshape(rows, width * (32 // bits))[:, :num_codes].to(torch.uint8)
    # -- codes straddle words: 32 codes fill ``bits`` words; read each code position at once
    # -- across all rows and blocks (32 strided slices beat one gather by ~30x on CPU)
    blocks = width // bits
    words = (packed.to(torch.int64) & 0xFFFFFFFF).view(rows, blocks, bits)
    codes = torch.empty(rows, blocks, _CODES_PER_BLOCK, dtype=torch.int64, device=packed.device)
    for j in range(_CODES_PER_BLOCK):
        word, shift = divmod(j * bits, 32)
        value = words[..., word] >> shift
        if shift + bits > 32:
            value = value | (words[..., word + 1] << (32 - shift))
        codes[..., j] = value
    codes &= (1 << bits) - 1
    return codes.reshape(rows, blocks * _CODES_PER_BLOCK)[:, :num_codes].to(torch.uint8)
