"""The packed 2:4 format (optcc.sparse.packing): round trips, errors, and bit-for-bit
equality with torch's reference of CUTLASS's Ampere layout. The Hopper layout is checked
against CUTLASS's own layout code in test_kernels.py (it needs the compiled library)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sparse_nets import magnitude_2to4, random_2to4
from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass

from optcc.sparse import packing


@pytest.mark.parametrize("dtype", [np.float16, np.int8])
@pytest.mark.parametrize("shape", [(32, 64), (64, 128), (96, 384), (256, 1024)])
def test_sm80_equals_torch_reference_bit_for_bit(dtype: np.dtype, shape: tuple[int, int]) -> None:
    m, k = shape
    if dtype == np.int8 and k % 64:
        pytest.skip("int8 metadata words hold 32 columns; the layout needs K % 64")
    dense = random_2to4(m, k, dtype, seed=m + k)
    packed = packing.pack(dense, "sm80")
    values, meta = sparse_semi_structured_from_dense_cutlass(torch.from_numpy(dense))
    assert packed.values.tobytes() == values.numpy().tobytes()
    assert packed.meta.dtype == meta.numpy().dtype
    assert np.array_equal(packed.meta, meta.numpy())


def test_sm80_bfloat16_equals_torch_reference() -> None:
    """bfloat16 weights are packed as their bits viewed as float16 (zeros are the same
    bit patterns in both types)."""
    dense = torch.from_numpy(random_2to4(64, 256, np.float32, seed=3)).to(torch.bfloat16)
    bits = dense.view(torch.int16).numpy().view(np.float16)
    packed = packing.pack(bits, "sm80")
    values, meta = sparse_semi_structured_from_dense_cutlass(dense)
    assert packed.values.tobytes() == values.view(torch.int16).numpy().tobytes()
    assert np.array_equal(packed.meta, meta.numpy())


@pytest.mark.parametrize("fmt", ["plain", "sm80", "sm90"])
@pytest.mark.parametrize("dtype", [np.float16, np.int8, np.float32])
def test_unpack_restores_the_weight(fmt: str, dtype: np.dtype) -> None:
    if fmt != "plain" and dtype == np.float32:
        pytest.skip("the hardware layouts hold 8- and 16-bit weights")
    m, k = (64, 256) if dtype != np.int8 else (64, 512)
    dense = random_2to4(m, k, dtype, seed=7)
    packed = packing.pack(dense, fmt)  # type: ignore[arg-type]
    assert packed.values.shape == (m, k // 2)
    assert packed.shape == (m, k)
    restored = packing.unpack(packed)
    assert restored.dtype == dense.dtype
    assert np.array_equal(restored, dense)


def test_values_are_the_same_in_every_format() -> None:
    """Only the metadata differs between layouts; the spare-position conventions place the
    same numbers in the values array."""
    dense = random_2to4(128, 256, np.float16, seed=11)
    values = [packing.pack(dense, f).values for f in ("plain", "sm80", "sm90")]
    assert np.array_equal(values[0], values[1]) and np.array_equal(values[0], values[2])


def test_plain_metadata_holds_the_kept_positions() -> None:
    dense = np.zeros((32, 8), dtype=np.float16)
    dense[0, [1, 3]] = 1.0          # group 0: positions 1 and 3 -> code 0b1101
    dense[0, [4, 6]] = 2.0          # group 1: positions 0 and 2 -> code 0b1000
    packed = packing.pack(dense, "plain")
    assert packed.meta.shape == (32, 1)
    assert packed.meta[0, 0] == 0b1101 | (0b1000 << 4)
    assert np.array_equal(packed.values[0], [1, 1, 2, 2])


def test_sm90_spare_positions_follow_cutlass_compressor() -> None:
    dense = np.zeros((64, 128), dtype=np.float16)
    dense[0, 3] = 5.0               # one non-zero at position 3 -> (0, 3), value second
    dense[0, 5] = 7.0               # one at position 1 -> (1, 3), value first
    packed = packing.pack(dense, "sm90")
    codes = packing.nibble_offsets("sm90", 64, 128, 16)
    raw = packed.meta
    nibble = lambda i: (raw[i // 2] >> (4 * (i % 2))) & 0xF  # noqa: E731
    assert nibble(codes[0, 0]) == 0 | (3 << 2)
    assert nibble(codes[0, 1]) == 1 | (3 << 2)
    assert nibble(codes[0, 2]) == 0  # empty group -> (0, 0)
    assert np.array_equal(packed.values[0, :4], [0, 5, 7, 0])


def test_sm90_metadata_size_and_padding() -> None:
    # M and K are padded to 64 x 128 tiles; one bit per weight element.
    assert packing.sm90_meta_bytes(64, 128) == 64 * 128 // 8
    assert packing.sm90_meta_bytes(96, 200) == 128 * 256 // 8
    dense = random_2to4(96, 192, np.int8, seed=5)
    packed = packing.pack(dense, "sm90")
    assert packed.meta.nbytes == packing.sm90_meta_bytes(96, 192)
    assert np.array_equal(packing.unpack(packed), dense)


@pytest.mark.parametrize("fmt,bits", [("sm80", 16), ("sm80", 8), ("sm90", 16), ("sm90", 8)])
def test_nibble_offsets_are_a_permutation(fmt: str, bits: int) -> None:
    m, k = 128, 512
    offsets = packing.nibble_offsets(fmt, m, k, bits)  # type: ignore[arg-type]
    assert offsets.shape == (m, k // 4)
    assert len(np.unique(offsets)) == offsets.size
    assert offsets.min() >= 0


def test_magnitude_pruned_weight_packs() -> None:
    rng = np.random.default_rng(0)
    weight = magnitude_2to4(rng.standard_normal((64, 128)).astype(np.float16))
    assert packing.is_2to4(weight)
    assert np.array_equal(packing.unpack(packing.pack(weight)), weight)


def test_not_2to4_names_the_group() -> None:
    dense = random_2to4(32, 64, np.float16, seed=1, dense_groups=True)
    dense[5, 8:11] = 1.0  # three non-zeros in row 5, columns 8-11
    assert not packing.is_2to4(dense)
    with pytest.raises(ValueError, match="row 5, columns 8-11 hold 3 non-zeros"):
        packing.pack(dense, "sm80")


def test_negative_zero_counts_as_zero() -> None:
    dense = np.zeros((32, 32), dtype=np.float16)
    dense[0, :4] = [1.0, -0.0, 2.0, -0.0]
    assert packing.is_2to4(dense)
    assert np.array_equal(packing.unpack(packing.pack(dense, "sm80")), dense)


@pytest.mark.parametrize("shape,fmt,dtype,message", [
    ((30, 64), "sm80", np.float16, "M % 32"),
    ((32, 48), "sm80", np.float16, "K % 32"),
    ((32, 96), "sm80", np.int8, "M % 16 == 0 and K % 64"),
    ((32, 64), "sm80", np.float32, "8- and 16-bit"),
    ((32, 12), "plain", np.float16, "multiple of 8"),
    ((32, 64), "sm75", np.float16, "unknown 2:4 format"),
])
def test_shapes_a_format_cannot_hold(shape: tuple[int, int], fmt: str, dtype: np.dtype,
                                     message: str) -> None:
    with pytest.raises(ValueError, match=message):
        packing.pack(np.zeros(shape, dtype=dtype), fmt)  # type: ignore[arg-type]
