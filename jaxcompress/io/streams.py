"""How code streams and sparse masks are laid out on disk, and which layout wins.

A *code stream* (cluster indices, quantized codes) is stored either bit-packed
exactly as it sits in memory (``"packed"``, so it can be memory-mapped and sliced
per shard) or entropy-coded with rANS (``"rans"``), whichever is smaller.

A *mask* is stored as the packed bitmap or as relative indices, whichever is
smaller, as in Deep Compression: each kept entry is written as the number of
pruned entries before it, in ``b``-bit symbols, and a gap that does not fit emits
the filler symbol ``2**b - 1`` ("skip ``2**b - 1`` entries") as often as needed.
Either form may be entropy-coded. Every candidate's size is known before encoding,
from one pass that histograms the gaps (raw sizes exactly, rANS sizes from
:func:`jaxcompress.io.ans.coded_size`), so only the winner is built and encoded; an
rANS winner is kept only if it really beats the smallest raw layout. The mask is
unpacked a block at a time, so no temporary grows with the leaf beyond the
winner's own symbols.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from jaxcompress.io import ans
from jaxcompress.io.errors import FileFormatError

# Mask entries (and general-width codes) handled at a time, to bound temporaries.
_CHUNK = 1 << 20
# Gaps below this are histogrammed directly; longer ones (at most size / _GAP_CAP of
# them) are kept as a list.
_GAP_CAP = 1 << 12


def _blocks(rows: int, width: int, align: int):
    """``(row slice, column slice)`` blocks of about ``_CHUNK`` entries of a 2-D array.

    Column blocks (for rows wider than ``_CHUNK``) start at multiples of ``align``.
    """
    if width > _CHUNK:
        step = _CHUNK // align * align
        for row in range(rows):
            for column in range(0, width, step):
                yield slice(row, row + 1), slice(column, column + step)
    else:
        step = max(1, _CHUNK // max(width, 1))
        for row in range(0, rows, step):
            yield slice(row, row + step), slice(None)


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """NumPy twin of :func:`jaxcompress.bitpack.pack`: packs codes along the last axis.

    Example:
        >>> pack_bits(np.array([1, 2, 3, 15], np.uint8), 4).tolist()
        [33, 243]
    """
    codes = np.asarray(codes, np.uint8)
    if bits == 8:
        return codes
    width = codes.shape[-1]
    out = np.zeros((*codes.shape[:-1], -(-width * bits // 8)), np.uint8)
    if out.size == 0:
        return out
    if 8 % bits == 0:
        # Symbol j of each group of 8 // bits shares a byte at bit j * bits.
        per = 8 // bits
        for j in range(per):
            part = codes[..., j::per] & np.uint8((1 << bits) - 1)
            out[..., : part.shape[-1]] |= part << np.uint8(j * bits)
        return out
    # 3, 5, 6 or 7 bits: bit planes, a block at a time (8 codes fill `bits` bytes).
    rows_in, rows_out = codes.reshape(-1, width), out.reshape(-1, out.shape[-1])
    for rows, columns in _blocks(rows_in.shape[0], width, 8):
        block = rows_in[rows, columns]
        planes = (block[..., None] >> np.arange(bits, dtype=np.uint8)) & np.uint8(1)
        stream = planes.reshape(block.shape[0], -1)
        packed = np.packbits(stream, axis=-1, bitorder="little")
        first = (columns.start or 0) * bits // 8
        rows_out[rows, first : first + packed.shape[-1]] = packed
    return out


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """NumPy twin of :func:`jaxcompress.bitpack.unpack`.

    Example:
        >>> unpack_bits(np.array([33, 243], np.uint8), 4, 4).tolist()
        [1, 2, 3, 15]
    """
    packed = np.asarray(packed, np.uint8)
    if bits == 8:
        return packed[..., :count]
    out = np.empty((*packed.shape[:-1], count), np.uint8)
    if out.size == 0:
        return out
    low = np.uint8((1 << bits) - 1)
    if 8 % bits == 0:
        per = 8 // bits
        for j in range(per):
            part = out[..., j::per]
            np.bitwise_and(packed[..., : part.shape[-1]] >> np.uint8(j * bits), low, out=part)
        return out
    rows_in, rows_out = packed.reshape(-1, packed.shape[-1]), out.reshape(-1, count)
    for rows, columns in _blocks(rows_in.shape[0], count, 8):
        first = columns.start or 0
        block = rows_out[rows, columns]
        raw = rows_in[rows, first * bits // 8 :]
        stream = np.unpackbits(raw, axis=-1, count=block.shape[-1] * bits, bitorder="little")
        planes = stream.reshape(block.shape[0], block.shape[-1], bits)
        block[...] = (planes << np.arange(bits, dtype=np.uint8)).sum(axis=-1, dtype=np.uint8)
    return out


def _entropy_bits(counts: np.ndarray) -> float:
    """Empirical entropy, in bits, of a stream with this histogram."""
    counts = counts[counts > 0].astype(np.float64)
    if counts.size <= 1:
        return 0.0
    return float(np.sum(counts * np.log2(counts.sum() / counts)))


def _rans_if_smaller(
    symbols: np.ndarray, alphabet: int, counts: np.ndarray, limit: int, *, exact: bool = False
) -> bytes | None:
    """The rANS coding of ``symbols`` if it takes fewer than ``limit`` bytes, else None.

    ``exact``: ``counts`` is the symbols' own histogram, so the coder need not count again.
    """
    # The size estimate is within a few bytes per lane: encode only where it can win.
    if ans.coded_size(counts) >= limit:
        return None
    coded = ans.encode(symbols, alphabet, counts=counts if exact else None)
    return coded if len(coded) < limit else None


def encode_codes(
    packed: np.ndarray, *, bits: int, shape: tuple[int, ...], entropy: bool
) -> tuple[dict[str, Any], np.ndarray | bytes]:
    """The record and payload of a bit-packed code array laid out like ``shape``.

    Example:
        >>> codes = np.zeros((100, 100), np.uint8); codes[0, :3] = 1
        >>> record, payload = encode_codes(pack_bits(codes, 4), bits=4, shape=(100, 100),
        ...                                entropy=True)
        >>> record["coding"], len(payload) < 5000
        ('rans', True)
    """
    symbols = unpack_bits(packed, bits, shape[-1]).reshape(-1)
    counts = ans.histogram(symbols, 2**bits)
    record: dict[str, Any] = {"coding": "packed", "entropy_bits": _entropy_bits(counts)}
    coded = None
    if entropy:
        coded = _rans_if_smaller(symbols, 2**bits, counts, packed.nbytes, exact=True)
    if coded is None:
        return record, packed
    return {**record, "coding": "rans"}, coded


def _fail(where: str, message: str) -> FileFormatError:
    return FileFormatError(f"{where}: {message}")


def _payload_symbols(
    record: dict[str, Any], data: memoryview, *, count: int, alphabet: int, where: str
) -> np.ndarray | None:
    """Decoded symbols of an rANS payload, or ``None`` for a packed one."""
    coding = record.get("coding")
    if coding == "rans":
        return ans.decode(data, count, alphabet)
    if coding != "packed":
        raise _fail(where, f"unknown coding {coding!r}")
    return None


def _raw_array(data: memoryview, shape: tuple[int, ...], where: str) -> np.ndarray:
    array = np.frombuffer(data, np.uint8)
    expected = math.prod(shape)
    if array.size != expected:
        raise _fail(where, f"packed buffer has {array.size} bytes, expected {expected}")
    return array.reshape(shape)


def decode_codes(
    record: dict[str, Any], data: memoryview, *, bits: int, shape: tuple[int, ...], where: str
) -> np.ndarray:
    """Inverse of :func:`encode_codes`: the bit-packed codes as they sit in memory.

    Example:
        >>> codes = np.arange(12, dtype=np.uint8).reshape(3, 4) % 5
        >>> record, payload = encode_codes(pack_bits(codes, 3), bits=3, shape=(3, 4),
        ...                                entropy=False)
        >>> packed = decode_codes(record, memoryview(payload), bits=3, shape=(3, 4), where="w")
        >>> unpack_bits(packed, 3, 4).tolist() == codes.tolist()
        True
    """
    packed_shape = (*shape[:-1], math.ceil(shape[-1] * bits / 8))
    symbols = _payload_symbols(record, data, count=math.prod(shape), alphabet=2**bits, where=where)
    if symbols is None:
        return _raw_array(data, packed_shape, where)
    return pack_bits(symbols.reshape(shape), bits)


def _gap_symbols(gaps: np.ndarray, gap_bits: int) -> np.ndarray:
    """Relative-index symbols: each kept entry's gap, with fillers for long gaps."""
    filler = 2**gap_bits - 1
    fillers = gaps // filler
    # Each kept entry becomes `fillers` filler symbols followed by the remainder.
    ends = np.cumsum(fillers + 1)
    symbols = np.full(int(ends[-1]) if ends.size else 0, filler, np.uint8)
    symbols[ends - 1] = gaps % filler
    return symbols


def _keep_of_gaps(symbols: np.ndarray, gap_bits: int, size: int, where: str) -> np.ndarray:
    """The flat keep-mask that relative-index symbols describe, a block at a time."""
    filler = 2**gap_bits - 1
    keep = np.zeros(size, bool)
    last = -1  # the entry the previous symbol ended on
    for start in range(0, symbols.size, _CHUNK):
        block = symbols[start : start + _CHUNK].astype(np.int64)
        is_filler = block == filler
        ends = np.cumsum(np.where(is_filler, filler, block + 1)) + last
        positions = ends[~is_filler]
        if positions.size and positions[-1] >= size:
            raise _fail(where, "relative indices run past the end of the leaf")
        keep[positions] = True
        last = int(ends[-1])
    return keep


class _MaskScan:
    """One pass over a packed mask, a block at a time: kept count and gap histogram."""

    def __init__(self, packed: np.ndarray, shape: tuple[int, ...]) -> None:
        self.packed, self.shape = packed, shape
        self.size = math.prod(shape)
        self.nnz = 0
        self.short = np.zeros(_GAP_CAP, np.int64)  # histogram of gaps below the cap
        longs = [np.zeros(0, np.int64)]
        for gaps in self.gaps():
            self.nnz += gaps.size
            self.short += np.bincount(gaps[gaps < _GAP_CAP], minlength=_GAP_CAP)
            longs.append(gaps[gaps >= _GAP_CAP])
        self.long = np.concatenate(longs)

    def keep_blocks(self):
        """``(offset, keep bits as uint8)`` in order, about ``_CHUNK`` entries each."""
        if self.size == 0:
            return
        width = self.shape[-1]
        rows = self.packed.reshape(-1, self.packed.shape[-1])
        for row_slice, columns in _blocks(rows.shape[0], width, 8):
            first = columns.start or 0
            count = min(columns.stop or width, width) - first
            bits = np.unpackbits(
                rows[row_slice, first // 8 :], axis=-1, count=count, bitorder="little"
            )
            yield row_slice.start * width + first, bits.reshape(-1)

    def gaps(self):
        """Each kept entry's count of pruned entries before it, a block at a time."""
        last = -1
        for offset, bits in self.keep_blocks():
            positions = np.flatnonzero(bits) + offset
            if positions.size:
                yield np.diff(positions, prepend=last) - 1
                last = int(positions[-1])

    def gap_counts(self, gap_bits: int) -> np.ndarray:
        """Histogram of the relative-index symbols for ``gap_bits``, from the gaps'."""
        filler = 2**gap_bits - 1
        gaps = np.arange(_GAP_CAP)
        counts = np.bincount(gaps % filler, weights=self.short, minlength=filler + 1)
        counts = np.rint(counts).astype(np.int64)  # float sums of ints < 2**53: exact
        counts += np.bincount(self.long % filler, minlength=filler + 1)
        counts[filler] = int(self.short @ (gaps // filler)) + int((self.long // filler).sum())
        return counts


def _mask_candidates(scan: _MaskScan, packed: np.ndarray, entropy: bool) -> list[tuple]:
    """``(bytes, encoding, gap_bits, coded, counts)``: raw sizes exact, rANS estimated."""
    bitmap_counts = np.array([scan.size - scan.nnz, scan.nnz])
    candidates = [(packed.nbytes, "bitmap", 0, False, bitmap_counts)]
    if entropy:
        candidates.append((ans.coded_size(bitmap_counts), "bitmap", 0, True, bitmap_counts))
    for gap_bits in range(1, 9):
        counts = scan.gap_counts(gap_bits)
        raw_bytes = math.ceil(int(counts.sum()) * gap_bits / 8)
        candidates.append((raw_bytes, "gaps", gap_bits, False, counts))
        if entropy:
            candidates.append((ans.coded_size(counts), "gaps", gap_bits, True, counts))
    return candidates


def _mask_symbols(scan: _MaskScan, encoding: str, gap_bits: int) -> np.ndarray:
    """The symbols of one mask layout: keep bits, or relative indices."""
    if encoding == "bitmap":
        parts = [bits for _, bits in scan.keep_blocks()]
    else:
        parts = [_gap_symbols(gaps, gap_bits) for gaps in scan.gaps()]
    return np.concatenate(parts) if parts else np.zeros(0, np.uint8)


def encode_mask(
    packed: np.ndarray, *, shape: tuple[int, ...], entropy: bool
) -> tuple[dict[str, Any], np.ndarray | bytes]:
    """The record and payload of a packed keep-mask: bitmap or relative indices.

    Every layout's size is known from one histogram pass (raw sizes exactly, rANS
    sizes to within a few bytes per lane), so only the winner is built and encoded;
    an rANS winner must still beat the smallest raw layout for real.

    Example:
        >>> keep = np.zeros((50, 80), bool); keep[::7, ::3] = True
        >>> packed = np.packbits(keep, axis=-1, bitorder="little")
        >>> record, payload = encode_mask(packed, shape=(50, 80), entropy=False)
        >>> record["encoding"], len(payload) < packed.nbytes
        ('gaps', True)
    """
    scan = _MaskScan(packed, shape)
    candidates = _mask_candidates(scan, packed, entropy)
    best = min(candidates, key=lambda c: c[0])  # the first smallest: bitmap on ties
    best_raw = min((c for c in candidates if not c[3]), key=lambda c: c[0])
    payload: np.ndarray | bytes | None = None
    if best[3]:
        _, encoding, gap_bits, _, counts = best
        alphabet = 2 if encoding == "bitmap" else 2**gap_bits
        symbols = _mask_symbols(scan, encoding, gap_bits)
        payload = _rans_if_smaller(symbols, alphabet, counts, best_raw[0])
        coding = "rans"
    if payload is None:
        _, encoding, gap_bits, _, counts = best_raw
        coding = "packed"
        if encoding == "bitmap":
            payload = packed
        else:
            payload = pack_bits(_mask_symbols(scan, encoding, gap_bits), gap_bits)
    record = {
        "coding": coding,
        "entropy_bits": _entropy_bits(counts),
        "encoding": encoding,
        "symbols": int(counts.sum()),
    }
    if encoding == "gaps":
        record["gap_bits"] = gap_bits
    return record, payload


def decode_mask(
    record: dict[str, Any], data: memoryview, *, shape: tuple[int, ...], nnz: int, where: str
) -> np.ndarray:
    """Inverse of :func:`encode_mask`: the mask packed along the last axis.

    Raises:
        FileFormatError: the stream does not describe exactly ``nnz`` kept entries
            inside ``shape``.

    Example:
        >>> keep = np.eye(20, dtype=bool)
        >>> packed = np.packbits(keep, axis=-1, bitorder="little")
        >>> record, payload = encode_mask(packed, shape=(20, 20), entropy=True)
        >>> back = decode_mask(record, memoryview(bytes(payload)), shape=(20, 20), nnz=20,
        ...                    where="w")
        >>> bool((back == packed).all())
        True
    """
    size = math.prod(shape)
    packed_shape = (*shape[:-1], math.ceil(shape[-1] / 8))
    encoding, count = record.get("encoding"), record.get("symbols")
    if type(count) is not int or count < 0:
        raise _fail(where, f"mask symbol count {count!r} is not a non-negative integer")
    if encoding == "bitmap":
        if count != size:
            raise _fail(where, f"bitmap mask has {count} entries, the leaf has {size}")
        symbols = _payload_symbols(record, data, count=size, alphabet=2, where=where)
        if symbols is None:
            bits = np.unpackbits(
                _raw_array(data, packed_shape, where), axis=-1, count=shape[-1], bitorder="little"
            )
            # Re-packing clears any stray padding bits.
            packed, kept = np.packbits(bits, axis=-1, bitorder="little"), int(bits.sum())
        else:
            keep = symbols.reshape(shape).view(bool)  # symbols are 0 or 1: no copy
            packed, kept = np.packbits(keep, axis=-1, bitorder="little"), int(keep.sum())
    elif encoding == "gaps":
        gap_bits = record.get("gap_bits")
        if type(gap_bits) is not int or not 1 <= gap_bits <= 8:
            raise _fail(where, f"gap_bits {gap_bits!r} is not an integer from 1 to 8")
        if count > size:
            raise _fail(where, f"{count} gap symbols for a leaf of {size} entries")
        symbols = _payload_symbols(record, data, count=count, alphabet=2**gap_bits, where=where)
        if symbols is None:
            raw = _raw_array(data, (math.ceil(count * gap_bits / 8),), where)
            symbols = unpack_bits(raw, gap_bits, count)
        keep = _keep_of_gaps(symbols, gap_bits, size, where)
        packed = np.packbits(keep.reshape(shape), axis=-1, bitorder="little")
        kept = int(np.count_nonzero(keep))
    else:
        raise _fail(where, f"unknown mask encoding {encoding!r}")
    if kept != nnz:
        raise _fail(where, f"mask keeps {kept} entries but {nnz} values are stored")
    return packed
