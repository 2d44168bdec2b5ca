import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qvg_compile.quant.packing import pack, packed_size, unpack


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), rows=st.integers(1, 5), units=st.integers(1, 6),
       seed=st.integers(0, 2**31 - 1))
def test_round_trip_is_exact(bits, rows, units, seed):
    per = 8 if bits == 3 else 8 // bits
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (rows, units * per), generator=gen, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape[-1] == packed_size(units * per, bits) == units * per * bits // 8
    assert torch.equal(unpack(packed, bits), codes)


def test_three_bit_layout_is_little_endian_words():
    codes = torch.arange(8, dtype=torch.uint8)
    word = sum(int(c) << (3 * i) for i, c in enumerate(codes))
    assert pack(codes, 3).tolist() == [word & 0xFF, (word >> 8) & 0xFF, word >> 16]


def test_two_bit_layout():
    assert pack(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2).tolist() == [1 | 2 << 2 | 3 << 4]


@pytest.mark.parametrize("bits", [1, 5, 16])
def test_unsupported_bits(bits):
    with pytest.raises(ValueError, match="bits"):
        pack(torch.zeros(8, dtype=torch.uint8), bits)


def test_bad_inputs():
    with pytest.raises(ValueError, match="multiple of 8"):
        pack(torch.zeros(4, dtype=torch.uint8), 3)
    with pytest.raises(TypeError, match="integer"):
        pack(torch.zeros(4), 2)
    with pytest.raises(TypeError, match="uint8"):
        unpack(torch.zeros(4, dtype=torch.int32), 2)
