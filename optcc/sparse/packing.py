"""The packed 2:4 weight format: kept values plus 2-bit indices (pure numpy, no GPU).

A weight ``W`` of shape ``[M, K]`` (output channels x reduction, the sparse operand of a
GEMM) is 2:4 sparse when every group of four consecutive elements along ``K``,
``W[m, 4g : 4g + 4]``, holds at most two non-zeros. Sparse tensor cores (Ampere and newer)
read such a weight as

- **values** ``[M, K/2]``: the two kept elements of each group, in order, and
- **metadata**: for each group a 4-bit code ``i0 | i1 << 2`` with ``i0 < i1`` the positions
  (0-3) of the kept elements inside the group.

A group with fewer than two non-zeros still stores two positions (the spare one holds a
zero value); which spare positions are chosen is a convention, and each consumer has its
own, listed in :data:`FORMATS`. The values are the same under every convention.

Three metadata layouts are written:

``plain``
    ``uint8 [M, K/8]``: two codes per byte, group ``2j`` in the low nibble. optcc's own,
    readable layout (no hardware reads it).
``sm80``
    The layout of CUTLASS's Ampere sparse GEMM (and of ``torch``'s semi-structured
    tensors): codes packed into 16-bit words (32-bit for 8-bit weights) along K, then rows
    interleaved in groups of 32 (16), 2x2 blocks of words swapped and the matrix stored
    column-major with columns interleaved by two (CUTLASS's ``ColumnMajorInterleaved<2>``).
    Bit for bit what ``torch.sparse._semi_structured_conversions`` produces.
``sm90``
    The layout of CUTLASS's Hopper sparse GEMM (``Sm90GemmSparseConfig``): tiles of
    64 rows x 128 columns, M padded to 64 and K to 128. For 16-bit weights a tile is the
    ordered layout ``(m0:8, m1:2, m2:4) x (k0:16, k1:2, k2:4)`` with strides
    ``(128, 16, 2048) x (1, 1024, 32)`` in 1-bit units; for 8-bit weights it is row-major
    (k fastest). Tiles follow each other along M, then along K.

The offsets of the two hardware layouts are also computed by ``liboptcc_kernels`` from
CUTLASS's own layout code (``optcc_meta_nibble_offsets``); the tests check that both agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

Format = Literal["plain", "sm80", "sm90"]
FORMATS: dict[str, str] = {
    "plain": "optcc's readable layout; spare positions as in sm80",
    "sm80": "CUTLASS Ampere / torch semi-structured layout; torch's spare-position rule",
    "sm90": "CUTLASS Hopper layout; CUTLASS's device compressor's spare-position rule",
}

# Codes for each 4-bit non-zero mask of a group (bit j set: element j is non-zero), as
# (first, second) positions. Masks with more than two bits set are not 2:4.
_TORCH_RULE: dict[int, tuple[int, int]] = {
    0b0000: (2, 3), 0b0001: (0, 2), 0b0010: (1, 2), 0b0100: (2, 3), 0b1000: (2, 3),
    0b0011: (0, 1), 0b0101: (0, 2), 0b1001: (0, 3), 0b0110: (1, 2), 0b1010: (1, 3),
    0b1100: (2, 3),
}
# CUTLASS's compressor: no non-zero -> (0, 0); one at position p < 3 -> (p, 3); one at
# position 3 -> (0, 3); two -> their positions.
_CUTLASS_RULE: dict[int, tuple[int, int]] = {
    **{mask: pair for mask, pair in _TORCH_RULE.items() if bin(mask).count("1") == 2},
    0b0000: (0, 0), 0b0001: (0, 3), 0b0010: (1, 3), 0b0100: (2, 3), 0b1000: (0, 3),
}


def _rule_table(rule: dict[int, tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    first = np.full(16, -1, dtype=np.int64)
    second = np.full(16, -1, dtype=np.int64)
    for mask, (i0, i1) in rule.items():
        first[mask], second[mask] = i0, i1
    return first, second


_TABLES = {"torch": _rule_table(_TORCH_RULE), "cutlass": _rule_table(_CUTLASS_RULE)}


@dataclass(frozen=True)
class PackedWeight:
    """A 2:4 weight in packed form: ``values [M, K/2]`` plus ``meta`` in ``format``."""

    values: np.ndarray
    meta: np.ndarray
    format: str
    shape: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return int(self.values.nbytes + self.meta.nbytes)


def _element_bits(dtype: np.dtype) -> int:
    dtype = np.dtype(dtype)
    if dtype.kind not in "fiu" or dtype.itemsize not in (1, 2, 4):
        raise TypeError(f"2:4 packing needs a numeric weight, got {dtype}")
    return 8 * dtype.itemsize


def check_shape(shape: tuple[int, int], dtype: np.dtype, format: str) -> None:
    """Raise ``ValueError`` unless ``format`` can hold an ``[M, K]`` weight of ``dtype``."""
    if format not in FORMATS:
        raise ValueError(f"unknown 2:4 format {format!r} (known: {', '.join(FORMATS)})")
    m, k = shape
    bits = _element_bits(dtype)
    if k % 8:
        raise ValueError(f"K={k} must be a multiple of 8 (two groups of 4 per metadata byte)")
    if format == "sm80":
        if bits == 32:
            raise ValueError("the sm80 format holds 8- and 16-bit weights")
        rows = 16 if bits == 8 else 32
        cols = 64 if bits == 8 else 32  # an even number of metadata words per row
        if m % rows or k % cols:
            raise ValueError(
                f"the sm80 format needs M % {rows} == 0 and K % {cols} == 0, got {m}x{k}")
    if format == "sm90" and bits not in (8, 16):
        raise ValueError("the sm90 format holds 8- and 16-bit weights")


def group_mask(dense: np.ndarray) -> np.ndarray:
    """The 4-bit non-zero mask of every group of 4 along the last axis: ``uint8 [M, K/4]``.

    ``-0.0`` counts as zero, as it does for the hardware.
    """
    nz = (np.asarray(dense) != 0).reshape(dense.shape[0], -1, 4)
    weights = np.array([1, 2, 4, 8], dtype=np.uint8)
    return (nz.astype(np.uint8) * weights).sum(axis=-1, dtype=np.uint8)


def is_2to4(dense: np.ndarray) -> bool:
    """Whether every group of 4 along the last axis has at most two non-zeros."""
    dense = np.asarray(dense)
    if dense.ndim != 2 or dense.shape[1] % 4:
        return False
    counts = (dense != 0).reshape(dense.shape[0], -1, 4).sum(axis=-1)
    return bool((counts <= 2).all())


def _codes(dense: np.ndarray, rule: str) -> tuple[np.ndarray, np.ndarray]:
    """Positions (first, second) of the kept elements of each group, ``int64 [M, K/4]``."""
    masks = group_mask(dense)
    first_table, second_table = _TABLES[rule]
    first, second = first_table[masks], second_table[masks]
    bad = first < 0
    if bad.any():
        row, group = (int(v) for v in np.argwhere(bad)[0])
        count = int(np.count_nonzero(dense[row, 4 * group: 4 * group + 4]))
        raise ValueError(
            f"the weight is not 2:4 sparse: row {row}, columns {4 * group}-{4 * group + 3} hold "
            f"{count} non-zeros ({int(bad.sum())} such group(s) in all)")
    return first, second


def _gather_values(dense: np.ndarray, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    groups = dense.reshape(dense.shape[0], -1, 4)
    v0 = np.take_along_axis(groups, first[..., None], axis=-1)
    v1 = np.take_along_axis(groups, second[..., None], axis=-1)
    return np.concatenate([v0, v1], axis=-1).reshape(dense.shape[0], -1)


def pack(dense: np.ndarray, format: Format = "sm80") -> PackedWeight:
    """Pack a 2:4 sparse ``[M, K]`` weight (8-, 16- or 32-bit elements) into ``format``.

    Raises ``ValueError`` naming the first group with more than two non-zeros, or a shape
    the format cannot hold.
    """
    dense = np.ascontiguousarray(dense)
    if dense.ndim != 2:
        raise ValueError(f"2:4 packing takes a 2-D [M, K] weight, got shape {dense.shape}")
    check_shape(dense.shape, dense.dtype, format)
    first, second = _codes(dense, "cutlass" if format == "sm90" else "torch")
    values = _gather_values(dense, first, second)
    codes = (first | (second << 2)).astype(np.uint8)
    if format == "plain":
        meta = codes[:, 0::2] | (codes[:, 1::2] << 4)
    elif format == "sm80":
        meta = _sm80_reorder(codes, _element_bits(dense.dtype))
    else:
        meta = _sm90_scatter(codes, _element_bits(dense.dtype))
    return PackedWeight(values=values, meta=meta, format=format, shape=(int(dense.shape[0]),
                                                                         int(dense.shape[1])))


def unpack(packed: PackedWeight) -> np.ndarray:
    """The dense ``[M, K]`` weight a packed one stands for (zeros where nothing is kept)."""
    m, k = packed.shape
    bits = _element_bits(packed.values.dtype)
    if packed.format == "plain":
        meta = np.asarray(packed.meta, dtype=np.uint8)
        codes = np.empty((m, k // 4), dtype=np.uint8)
        codes[:, 0::2], codes[:, 1::2] = meta & 0xF, meta >> 4
    elif packed.format == "sm80":
        codes = _sm80_codes(packed.meta, m, k, bits)
    elif packed.format == "sm90":
        codes = _sm90_gather(packed.meta, m, k, bits)
    else:
        raise ValueError(f"unknown 2:4 format {packed.format!r}")
    first = (codes & 0b11).astype(np.int64)
    second = ((codes >> 2) & 0b11).astype(np.int64)
    values = np.asarray(packed.values).reshape(m, k // 4, 2)
    dense = np.zeros((m, k // 4, 4), dtype=packed.values.dtype)
    np.put_along_axis(dense, second[..., None], values[..., 1:2], axis=-1)
    np.put_along_axis(dense, first[..., None], values[..., 0:1], axis=-1)
    return dense.reshape(m, k)


# --------------------------------------------------------------------------- sm80 layout
def _sm80_word(bits: int) -> tuple[type, int]:
    """The metadata word type and how many 4-bit codes it holds."""
    return (np.uint32, 8) if bits == 8 else (np.uint16, 4)


def sm80_word_offsets(m: int, words_per_row: int, bits: int) -> np.ndarray:
    """Where each plain metadata word ``[row, col]`` lands in the reordered buffer.

    CUTLASS reorders rows within groups of 32 (16 for 32-bit words) so that one ldmatrix
    fetches what a warp's mma.sp needs: row ``r`` moves to ``8 * interweave``-blocks as
    ``(r % 8) * interweave + (r % group) // 8``; then the two off-diagonal words of every
    2x2 block swap, and the result is stored column-major with pairs of columns interleaved.
    """
    group, interweave = (16, 2) if bits == 8 else (32, 4)
    rows = np.arange(m)[:, None].repeat(words_per_row, axis=1)
    cols = np.arange(words_per_row)[None, :].repeat(m, axis=0)
    dst_rows = rows // group * group + (rows % 8) * interweave + (rows % group) // 8
    swap_down = (dst_rows % 2 == 0) & (cols % 2 == 1)
    swap_up = (dst_rows % 2 == 1) & (cols % 2 == 0)
    dst_rows = dst_rows + swap_down - swap_up
    dst_cols = cols - swap_down + swap_up
    return (dst_cols // 2) * (2 * m) + dst_rows * 2 + dst_cols % 2


def _sm80_reorder(codes: np.ndarray, bits: int) -> np.ndarray:
    word_type, per_word = _sm80_word(bits)
    m, groups = codes.shape
    shifts = (4 * np.arange(per_word)).astype(np.uint64)
    words = (codes.reshape(m, groups // per_word, per_word).astype(np.uint64) << shifts).sum(
        axis=-1, dtype=np.uint64).astype(word_type)
    out = np.empty(words.size, dtype=word_type)
    out[sm80_word_offsets(m, words.shape[1], bits).reshape(-1)] = words.reshape(-1)
    signed = np.int32 if word_type is np.uint32 else np.int16
    return out.view(signed).reshape(m, words.shape[1])


def _sm80_codes(meta: np.ndarray, m: int, k: int, bits: int) -> np.ndarray:
    word_type, per_word = _sm80_word(bits)
    words_per_row = k // 4 // per_word
    flat = np.ascontiguousarray(meta).reshape(-1).view(word_type)
    words = flat[sm80_word_offsets(m, words_per_row, bits).reshape(-1)].reshape(
        m, words_per_row).astype(np.uint64)
    shifts = (4 * np.arange(per_word)).astype(np.uint64)
    return ((words[..., None] >> shifts) & 0xF).astype(np.uint8).reshape(m, -1)


# --------------------------------------------------------------------------- sm90 layout
SM90_TILE_M = 64
SM90_TILE_K = 128


def _round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


def sm90_meta_bytes(m: int, k: int) -> int:
    """Bytes of Hopper metadata for an ``[M, K]`` weight (padded to 64 x 128 tiles)."""
    return _round_up(m, SM90_TILE_M) * _round_up(k, SM90_TILE_K) // 8


def sm90_nibble_offsets(m: int, k: int, bits: int) -> np.ndarray:
    """Nibble index of each group's code in the Hopper metadata buffer, ``int64 [M, K/4]``.

    The layout maps a logical weight element ``(row, col)`` to a bit offset (one bit per
    element, four per group), so a group's code sits at ``offset(row, 4 * group) / 4``.
    """
    m_padded = _round_up(m, SM90_TILE_M)
    rows = np.arange(m, dtype=np.int64)[:, None]
    cols = 4 * np.arange(k // 4, dtype=np.int64)[None, :]
    tile = (rows // SM90_TILE_M) * (SM90_TILE_M * SM90_TILE_K) + (cols // SM90_TILE_K) * (
        m_padded * SM90_TILE_K)
    r, c = rows % SM90_TILE_M, cols % SM90_TILE_K
    if bits == 8:
        inner = c + SM90_TILE_K * r
    else:
        inner = ((c % 16) + 1024 * ((c // 16) % 2) + 32 * (c // 32)
                 + 128 * (r % 8) + 16 * ((r // 8) % 2) + 2048 * (r // 16))
    return (tile + inner) // 4


def _sm90_scatter(codes: np.ndarray, bits: int) -> np.ndarray:
    m, groups = codes.shape
    nibbles = np.zeros(2 * sm90_meta_bytes(m, 4 * groups), dtype=np.uint8)
    nibbles[sm90_nibble_offsets(m, 4 * groups, bits).reshape(-1)] = codes.reshape(-1)
    return nibbles[0::2] | (nibbles[1::2] << 4)


def _sm90_gather(meta: np.ndarray, m: int, k: int, bits: int) -> np.ndarray:
    raw = np.ascontiguousarray(meta).reshape(-1).view(np.uint8)
    nibbles = np.empty(2 * raw.size, dtype=np.uint8)
    nibbles[0::2], nibbles[1::2] = raw & 0xF, raw >> 4
    return nibbles[sm90_nibble_offsets(m, k, bits)]


def nibble_offsets(format: Format, m: int, k: int, bits: int) -> np.ndarray:
    """Nibble index of each group's code in ``format``'s metadata buffer, ``[M, K/4]``."""
    if format == "plain":
        return np.arange(m * (k // 4), dtype=np.int64).reshape(m, k // 4)
    if format == "sm90":
        return sm90_nibble_offsets(m, k, bits)
    if format == "sm80":
        _, per_word = _sm80_word(bits)
        words_per_row = k // 4 // per_word
        word = sm80_word_offsets(m, words_per_row, bits)
        within = np.arange(per_word, dtype=np.int64)
        return (word[:, :, None] * per_word + within).reshape(m, -1)
    raise ValueError(f"unknown 2:4 format {format!r}")
