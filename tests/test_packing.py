import pytest
import torch

from llmq.formats.packing import pack_bits, packed_words, unpack_bits


def bitstream_reference(codes, bits):
    """Pure-Python reference: element j at bits [j*b, (j+1)*b) of a little-endian stream of int32 words."""
    n = len(codes)
    stream = 0
    for j, c in enumerate(codes):
        stream |= int(c) << (j * bits)
    words = []
    for w in range(packed_words(n, bits)):
        u = (stream >> (32 * w)) & 0xFFFFFFFF
        words.append(u - 2**32 if u >= 2**31 else u)
    return words


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("n", [1, 5, 32, 33, 96, 577])
def test_round_trip_exact(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 2**bits, (7, n), generator=g)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (7, packed_words(n, bits))
    assert torch.equal(unpack_bits(packed, bits, n).long(), codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_layout_matches_bitstream(bits):
    codes = torch.randint(0, 2**bits, (45,), generator=torch.Generator().manual_seed(1))
    assert pack_bits(codes[None], bits)[0].tolist() == bitstream_reference(codes.tolist(), bits)


def test_four_bit_low_nibble_first():
    assert pack_bits(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]]), 4).tolist() == [[0x87654321 - 2**32]]


def test_out_of_range_codes_rejected():
    with pytest.raises(ValueError):
        pack_bits(torch.tensor([[4]]), 2)
