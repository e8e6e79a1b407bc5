import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchquant.errors import QuantizationError
from torchquant.numerics import pack_codes, packed_width, unpack_codes


@pytest.mark.parametrize("bits", range(2, 9))
@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 4), k=st.integers(1, 200), seed=st.integers(0, 2**31 - 1))
def test_unpack_inverts_pack(bits, rows, k, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (rows, k), generator=g)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (rows, packed_width(k, bits))
    assert torch.equal(unpack_codes(packed, bits, k).long(), codes)


@pytest.mark.parametrize("bits", range(2, 9))
def test_layout_is_a_little_endian_bitstream(bits):
    codes = torch.randint(0, 1 << bits, (1, 64))
    packed = pack_codes(codes, bits)
    stream = 0
    for i, word in enumerate(packed[0].tolist()):
        stream |= (word & 0xFFFFFFFF) << (32 * i)
    expected = 0
    for k, c in enumerate(codes[0].tolist()):
        expected |= c << (k * bits)
    assert stream == expected


def test_four_bit_nibbles_low_first():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8] + [0] * 24])
    assert pack_codes(codes, 4)[0, 0].item() == 0x87654321 - (1 << 32)


@pytest.mark.parametrize(
    "codes,bits",
    [
        (torch.tensor([[16]]), 4),
        (torch.tensor([[-1]]), 4),
        (torch.zeros(2, 3, 4, dtype=torch.int64), 4),
        (torch.zeros(2, 3), 4),
        (torch.zeros(2, 3, dtype=torch.int64), 9),
        (torch.zeros(2, 3, dtype=torch.int64), 1),
    ],
)
def test_pack_refuses_bad_codes(codes, bits):
    with pytest.raises(QuantizationError):
        pack_codes(codes, bits)


def test_unpack_refuses_wrong_width():
    with pytest.raises(QuantizationError, match="packed width"):
        unpack_codes(torch.zeros(2, 5, dtype=torch.int32), 4, 64)
