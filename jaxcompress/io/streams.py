"""How code streams and sparse masks are laid out on disk, and which layout wins.

A *code stream* (cluster indices, quantized codes) is stored either bit-packed
exactly as it sits in memory (``"packed"``, so it can be memory-mapped and sliced
per shard) or entropy-coded with rANS (``"rans"``), whichever is smaller.

A *mask* is stored as the packed bitmap or as relative indices, whichever is
smaller, as in Deep Compression: each kept entry is written as the number of
pruned entries before it, in ``b``-bit symbols, and a gap that does not fit emits
the filler symbol ``2**b - 1`` ("skip ``2**b - 1`` entries") as often as needed.
Either form may be entropy-coded. Every candidate's size is known before encoding
(raw sizes exactly, rANS sizes from the empirical entropy), so only the winner
(and, for rANS, the raw runner-up as a guard) is encoded.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from jaxcompress.io import ans
from jaxcompress.io.errors import FileFormatError

# An rANS stream costs its entropy plus lane states and a frequency table (estimates
# used only to rank the mask candidates; the final choice compares real sizes).
_RANS_SLACK = 1.01
_RANS_FIXED_BYTES = 16


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """NumPy twin of :func:`jaxcompress.bitpack.pack`: packs codes along the last axis.

    Example:
        >>> pack_bits(np.array([1, 2, 3, 15], np.uint8), 4).tolist()
        [33, 243]
    """
    codes = np.asarray(codes, np.uint8)
    if bits == 8:
        return codes
    planes = (codes[..., None] >> np.arange(bits, dtype=np.uint8)) & np.uint8(1)
    stream = planes.reshape(*codes.shape[:-1], codes.shape[-1] * bits)
    return np.packbits(stream, axis=-1, bitorder="little")


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """NumPy twin of :func:`jaxcompress.bitpack.unpack`.

    Example:
        >>> unpack_bits(np.array([33, 243], np.uint8), 4, 4).tolist()
        [1, 2, 3, 15]
    """
    packed = np.asarray(packed, np.uint8)
    if bits == 8:
        return packed[..., :count]
    stream = np.unpackbits(packed, axis=-1, count=count * bits, bitorder="little")
    planes = stream.reshape(*packed.shape[:-1], count, bits)
    return (planes << np.arange(bits, dtype=np.uint8)).sum(axis=-1, dtype=np.uint8)


def _rans_estimate(entropy_bits: float, used_symbols: int = 2) -> float:
    # The frequency table costs about a byte per used symbol.
    return entropy_bits / 8 * _RANS_SLACK + _RANS_FIXED_BYTES + used_symbols


def _encoded(
    symbols: np.ndarray, alphabet: int, raw: np.ndarray, entropy: bool
) -> tuple[dict[str, Any], np.ndarray | bytes]:
    """The smaller of ``raw`` (bit-packed) and the rANS coding of ``symbols``."""
    entropy_bits = ans.empirical_entropy_bits(symbols, alphabet)
    record: dict[str, Any] = {"coding": "packed", "entropy_bits": entropy_bits}
    # Encoding is cheap, so whenever the entropy leaves room, try it and compare.
    if entropy and entropy_bits / 8 < raw.nbytes:
        coded = ans.encode(symbols, alphabet)
        if len(coded) < raw.nbytes:
            return {**record, "coding": "rans"}, coded
    return record, raw


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
    return _encoded(symbols, 2**bits, packed, entropy)


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


def _gap_symbols(positions: np.ndarray, gap_bits: int) -> np.ndarray:
    """Relative-index symbols: each kept entry's gap, with fillers for long gaps."""
    filler = 2**gap_bits - 1
    gaps = np.diff(positions, prepend=-1) - 1
    fillers = gaps // filler
    # Each kept entry becomes `fillers` filler symbols followed by the remainder.
    counts = fillers + 1
    symbols = np.full(int(counts.sum()), filler, np.uint8)
    symbols[np.cumsum(counts) - 1] = gaps % filler
    return symbols


def _positions(symbols: np.ndarray, gap_bits: int) -> np.ndarray:
    filler = 2**gap_bits - 1
    symbols = symbols.astype(np.int64)
    is_filler = symbols == filler
    advance = np.where(is_filler, filler, symbols + 1)
    return np.cumsum(advance)[~is_filler] - 1


def encode_mask(
    packed: np.ndarray, *, shape: tuple[int, ...], entropy: bool
) -> tuple[dict[str, Any], np.ndarray | bytes]:
    """The record and payload of a packed keep-mask: bitmap or relative indices.

    Example:
        >>> keep = np.zeros((50, 80), bool); keep[::7, ::3] = True
        >>> packed = np.packbits(keep, axis=-1, bitorder="little")
        >>> record, payload = encode_mask(packed, shape=(50, 80), entropy=False)
        >>> record["encoding"], len(payload) < packed.nbytes
        ('gaps', True)
    """
    keep = np.unpackbits(packed, axis=-1, count=shape[-1], bitorder="little").reshape(-1)
    positions = np.flatnonzero(keep)
    candidates = []  # (estimated bytes, encoding, gap_bits, symbols, raw payload)
    symbols = keep.astype(np.uint8)
    bitmap_entropy = ans.empirical_entropy_bits(symbols, 2)
    candidates.append((packed.nbytes, "bitmap", 0, False, symbols, packed))
    if entropy:
        candidates.append((_rans_estimate(bitmap_entropy), "bitmap", 0, True, symbols, packed))
    for gap_bits in range(1, 9):
        gap_symbols = _gap_symbols(positions, gap_bits)
        raw = pack_bits(gap_symbols, gap_bits)
        candidates.append((raw.nbytes, "gaps", gap_bits, False, gap_symbols, raw))
        if entropy:
            bits = ans.empirical_entropy_bits(gap_symbols, 2**gap_bits)
            used = int(np.count_nonzero(np.bincount(gap_symbols, minlength=2**gap_bits)))
            candidates.append(
                (_rans_estimate(bits, used), "gaps", gap_bits, True, gap_symbols, raw)
            )
    # The smallest raw form always competes, so an rANS estimate can't make it worse;
    # the three best rANS estimates are encoded for real, as the estimates are rough.
    best_raw = min((c for c in candidates if not c[3]), key=lambda c: c[0])
    finalists = [best_raw] + sorted((c for c in candidates if c[3]), key=lambda c: c[0])[:3]
    chosen = []
    for _, encoding, gap_bits, coded, stream, raw in finalists:
        alphabet = 2 if encoding == "bitmap" else 2**gap_bits
        record, payload = _encoded(stream, alphabet, raw, coded)
        record = {**record, "encoding": encoding, "symbols": int(stream.size)}
        if encoding == "gaps":
            record["gap_bits"] = gap_bits
        chosen.append(
            (len(payload) if isinstance(payload, bytes) else payload.nbytes, record, payload)
        )
    _, record, payload = min(chosen, key=lambda c: c[0])
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
            keep = symbols.reshape(shape).astype(bool)
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
        positions = _positions(symbols, gap_bits)
        if positions.size and positions[-1] >= size:
            raise _fail(where, "relative indices run past the end of the leaf")
        keep = np.zeros(size, bool)
        keep[positions] = True
        packed, kept = np.packbits(keep.reshape(shape), axis=-1, bitorder="little"), positions.size
    else:
        raise _fail(where, f"unknown mask encoding {encoding!r}")
    if kept != nnz:
        raise _fail(where, f"mask keeps {kept} entries but {nnz} values are stored")
    return packed
