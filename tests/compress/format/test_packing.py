import pytest
import torch

from compress.format.packing import bit_planes, pack_indices, packed_cols, unpack_indices


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("cols", [1, 3, 7, 9, 16, 27])
def test_round_trip(bits: int, cols: int) -> None:
    gen = torch.Generator().manual_seed(bits * 100 + cols)
    idx = torch.randint(0, 2 ** bits, (5, cols), generator=gen, dtype=torch.uint8)
    packed = pack_indices(idx, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (5, packed_cols(cols, bits)), f"{bits} bits x {cols} cols packed to {tuple(packed.shape)}"
    assert torch.equal(unpack_indices(packed, bits, cols), idx), f"round trip failed at {bits} bits, {cols} cols"


def test_sizes_are_minimal_per_plane() -> None:
    assert packed_cols(9, 1) == 2 and packed_cols(9, 2) == 3 and packed_cols(9, 4) == 5 and packed_cols(9, 8) == 9
    assert packed_cols(9, 3) == 3 + 2, "3 bits = a 2-bit plane (3 bytes) + a 1-bit plane (2 bytes)"
    assert bit_planes(3) == [2, 1] and bit_planes(7) == [4, 2, 1] and bit_planes(6) == [4, 2]


def test_layout_is_the_documented_one() -> None:
    # 2 bits: first column in the lowest bits of byte 0
    idx = torch.tensor([[1, 2, 3, 0, 3]], dtype=torch.uint8)
    assert pack_indices(idx, 2).tolist() == [[1 | 2 << 2 | 3 << 4, 3]]
    # 3 bits: the low 2-bit plane, then the high 1-bit plane, concatenated
    idx3 = torch.tensor([[5, 2, 7]], dtype=torch.uint8)  # low bits 1, 2, 3; high bits 1, 0, 1
    assert pack_indices(idx3, 3).tolist() == [[1 | 2 << 2 | 3 << 4, 1 | 1 << 2]]


def test_refuses_values_too_wide() -> None:
    with pytest.raises(ValueError, match="does not fit in 2 bits"):
        pack_indices(torch.tensor([[4]], dtype=torch.uint8), 2)
