"""Entropy coding of small unsigned integer symbols with interleaved rANS.

:func:`encode` turns a 1-D stream of symbols below ``alphabet_size`` (cluster
indices, quantized codes, run-length gaps) into bytes whose length is close to the
stream's empirical entropy (:func:`empirical_entropy_bits`); :func:`decode` inverts
it given the symbol count and the alphabet size, which the caller stores elsewhere.

The coder is range asymmetric numeral systems (rANS) with a 64-bit state per lane
kept in ``[L, 2**63)``, ``L = 2**31``, and 32-bit renormalization words (at most one
per lane and step). Symbol ``i`` goes to lane ``i % K`` at step ``i // K``; each step
is a few numpy operations over all ``K`` lanes, so Python loops ``ceil(N / K)``
times (with at most ``SCALAR_MAX_LANES`` lanes, plain Python integers are faster and
give the same bytes). ``K`` grows with the expected payload so that the 8-byte lane
states take about ``LANE_OVERHEAD`` (0.5 %) of it, from 1 up to ``MAX_LANES``.

The encoder runs the steps backwards; the lanes that renormalize at a step emit their
words in descending lane order into one shared stream, which is stored reversed, so
the decoder reads it forwards and refills lanes in ascending order. Each lane starts
encoding at a state in ``[L, 2L)`` that hashes the header, the count and the alphabet
size, and the decoder must end exactly there with every word used: this catches a
damaged header, table or lane count, a wrong ``count`` or ``alphabet_size``, and
truncation. A damaged word or lane state is usually caught too (the lanes drift off
their path), but not always: with power-of-two frequencies rANS is a plain bit
packer, and the damage just changes a few symbols. The file's CRC covers that.

Frequencies sum to ``M = 2**b`` with ``b`` derived from the count and the number of
distinct symbols (12 to 20 bits). The file stores, per symbol of the used range, a
small log-scale *weight code*: values below ``2**(m + 1)`` exactly, larger ones as
an ``m``-bit mantissa and an exponent (``m`` is picked per stream to balance table
size against modelling loss). Encoder and decoder turn the weights into the same
frequencies with the same integer rounding: each used symbol gets 1 plus its floor
share of ``M - used``; the remainder goes to the largest remainders, ties to the
lower symbol.

Layout (varints are unsigned LEB128, multi-byte integers little-endian)::

    empty stream      u8 0
    constant stream   u8 1, varint symbol
    rANS              u8 2 | delta << 2 | flat << 3 | m << 4
                      varint first used symbol
                      varint span - 2           (span = last - first + 1 >= 2)
                      unless flat (all weights 1, header byte exactly 2 | 8):
                      varint table bytes
                      table: span values as 3-bit nibble varints (low nibble first,
                             bit 3 = more follows, odd count padded with a 0 nibble);
                             the weight codes, or with delta their zigzag differences
                      varint K - 1              (1 <= K <= min(count, 4096))
                      u64[K] final encoder states (the decoder's start states)
                      u32[*] words, in decoding order
"""

from __future__ import annotations

import bisect
import math
import operator
import zlib
from typing import Any, NamedTuple

import numpy as np

from jaxcompress.io.errors import FileFormatError

__all__ = ["coded_size", "decode", "empirical_entropy_bits", "encode", "histogram"]

MAX_ALPHABET = 1 << 16
MAX_LANES = 4096
MIN_PROB_BITS = 12
MAX_PROB_BITS = 20
STATE_LOWER = 1 << 31
STATE_UPPER = 1 << 63
# The lane states may take about this share of the expected payload.
LANE_OVERHEAD = 0.005
# Up to this many lanes, plain Python integers beat one numpy call per step.
SCALAR_MAX_LANES = 24

_EMPTY, _CONSTANT, _RANS = 0, 1, 2
_DELTA, _FLAT = 4, 8  # flags in the rANS header byte
_ENCODER_MAX_MANTISSA = 10
_WEIGHT_BITS = 40  # every weight is below 2**40, so weight * M fits int64
_MAX_NIBBLES = 8
_MAX_VARINT_BYTES = 5
_BLOCK_SYMBOLS = 1 << 16  # symbols gathered or listed at a time, to bound memory
# np.bincount widens its input to intp first: in blocks that stay in cache it is
# about ten times faster on a long uint8 stream than in one call.
_HISTOGRAM_BLOCK = 1 << 16


# ----------------------------------------------------------------------------- checks


def _check_int(value: Any, name: str) -> int:
    if not isinstance(value, bool | np.bool_):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise ValueError(f"{name} must be an integer, got {value!r}")


def _check_alphabet_size(alphabet_size: Any, error: type[ValueError]) -> int:
    size = _check_int(alphabet_size, "alphabet_size")
    if not 1 <= size <= MAX_ALPHABET:
        raise error(f"alphabet_size must be from 1 to {MAX_ALPHABET}, got {size}")
    return size


def _check_symbols(symbols: Any, alphabet_size: Any) -> tuple[np.ndarray, int]:
    """Validated symbols as a uint16 array, and the alphabet size."""
    size = _check_alphabet_size(alphabet_size, ValueError)
    array = np.asarray(symbols)
    if array.ndim != 1:
        raise ValueError(f"symbols must be a 1-D array, got shape {array.shape}")
    if array.dtype.kind not in "iu":
        raise ValueError(f"symbols must have an integer dtype, got {array.dtype}")
    if array.size:
        low, high = array.min(), array.max()
        if low < 0:
            raise ValueError(f"symbols must be non-negative, got {int(low)}")
        if high >= size:
            raise ValueError(
                f"symbol {int(high)} is out of range for alphabet_size={size} "
                f"(symbols must be below it)"
            )
    # The narrowest unsigned type (no copy when it already is): less memory to gather.
    return array.astype(np.uint8 if size <= 256 else np.uint16, copy=False), size


# ----------------------------------------------------------------------------- model


def _prob_bits(count: int, used: int) -> int:
    """Bits of the frequency total: about 4 * count, at least 16 slots per used symbol."""
    bits = max(MIN_PROB_BITS, count.bit_length() + 2, (used - 1).bit_length() + 4)
    return min(bits, MAX_PROB_BITS)


def _max_code(mantissa: int) -> int:
    """Largest weight code whose weight stays below ``2**_WEIGHT_BITS``."""
    return ((_WEIGHT_BITS - mantissa) << mantissa) + (1 << mantissa) - 1


def _weights_of_codes(codes: np.ndarray, mantissa: int) -> np.ndarray:
    """Weight of each log-scale code (codes below ``2**(m + 1)`` are their own weight)."""
    small = codes < (2 << mantissa)
    exponent = np.maximum((codes >> mantissa) - 1, 0)
    fraction = codes & ((1 << mantissa) - 1)
    return np.where(small, codes, ((1 << mantissa) + fraction) << exponent)


def _codes_of_counts(counts: np.ndarray, mantissa: int) -> np.ndarray:
    """Code of the representable weight nearest each count (counts below ``2**39``)."""
    small = counts < (2 << mantissa)
    # frexp gives the bit length exactly for integers below 2**53.
    bit_length = np.frexp(counts.astype(np.float64))[1].astype(np.int64)
    exponent = np.maximum(bit_length - 1 - mantissa, 1)
    rounded = (counts + (np.int64(1) << (exponent - 1))) >> exponent
    carry = rounded >> (mantissa + 1)
    exponent = exponent + carry
    rounded = np.where(carry > 0, 1 << mantissa, rounded)
    codes = ((exponent + 1) << mantissa) + rounded - (1 << mantissa)
    return np.where(small, counts, codes)


def _normalize(weights: np.ndarray, total: int) -> np.ndarray:
    """Integer frequencies summing to ``total``: >= 1 for each positive weight, else 0.

    Each used symbol gets 1 plus the floor of its share of ``total - used``; what is
    left goes to the largest remainders (ties to the lower index). Integer-only, so
    the encoder and the decoder agree exactly.
    """
    present = weights > 0
    used = int(np.count_nonzero(present))
    weight_sum = int(weights.sum())
    scaled = weights * (total - used)  # < 2**40 * 2**20
    freqs = np.where(present, scaled // weight_sum + 1, 0)
    short = total - int(freqs.sum())  # 0 <= short < used, all at positive remainders
    if short:
        order = np.argsort(-(scaled % weight_sum), kind="stable")
        freqs[order[:short]] += 1
    return freqs


def _zigzag(values: np.ndarray) -> np.ndarray:
    return (values << 1) ^ (values >> 63)


def _unzigzag(values: np.ndarray) -> np.ndarray:
    return (values >> 1) ^ -(values & 1)


def _nibble_lengths(values: np.ndarray) -> np.ndarray:
    lengths = np.ones(values.shape, np.int64)
    for j in range(1, _MAX_NIBBLES):
        lengths += values >= (1 << (3 * j))
    return lengths


def _nibble_pack(values: np.ndarray) -> bytes:
    """Non-negative values below ``2**24`` as 3-bit nibble varints, two per byte."""
    lengths = _nibble_lengths(values)
    owner = np.repeat(np.arange(values.size), lengths)
    first = np.cumsum(lengths) - lengths
    place = np.arange(owner.size) - first[owner]
    nibbles = (values[owner] >> (3 * place)) & 7
    nibbles |= np.where(place < lengths[owner] - 1, 8, 0)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, 0)
    return (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8).tobytes()


def _nibble_unpack(raw: np.ndarray, count: int) -> np.ndarray:
    """Inverse of :func:`_nibble_pack`: exactly ``count`` values filling ``raw``."""
    nibbles = np.empty(2 * raw.size, np.int64)
    nibbles[0::2] = raw & 15
    nibbles[1::2] = raw >> 4
    ends = np.flatnonzero(nibbles < 8)
    if ends.size < count:
        raise FileFormatError(
            f"rANS stream: frequency table holds {ends.size} entries, expected {count}"
        )
    last = int(ends[count - 1])
    tail = nibbles[last + 1 :]
    if tail.size > 1 or (tail.size == 1 and tail[0] != 0):
        raise FileFormatError("rANS stream: frequency table has bytes left over")
    ends = ends[:count]
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if int(lengths.max()) > _MAX_NIBBLES:
        raise FileFormatError("rANS stream: frequency table entry is too long")
    place = np.arange(last + 1) - np.repeat(starts, lengths)
    return np.add.reduceat((nibbles[: last + 1] & 7) << (3 * place), starts)


def _table_values(codes: np.ndarray, delta: bool) -> np.ndarray:
    return _zigzag(np.diff(codes, prepend=0)) if delta else codes


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _choose_lanes(payload_bits: float, count: int) -> int:
    """Lanes whose 8-byte states take about LANE_OVERHEAD of the expected payload."""
    lanes = int(payload_bits / 8 * LANE_OVERHEAD / 8)
    return max(1, min(lanes, MAX_LANES, count))


# ----------------------------------------------------------------------------- public


def histogram(symbols: np.ndarray, alphabet_size: int) -> np.ndarray:
    """``np.bincount(symbols, minlength=alphabet_size)`` of a 1-D stream, a block at a time.

    The same counts (int64) as one ``np.bincount`` call, without its stream-sized
    ``intp`` copy. Symbols must be non-negative; the result is longer than
    ``alphabet_size`` if one is not below it.

    Example:
        >>> import numpy as np
        >>> histogram(np.array([0, 2, 2, 1], np.uint8), 4).tolist()
        [1, 1, 2, 0]
    """
    counts = np.zeros(alphabet_size, np.int64)
    for start in range(0, symbols.size, _HISTOGRAM_BLOCK):
        block = np.bincount(symbols[start : start + _HISTOGRAM_BLOCK], minlength=alphabet_size)
        if block.size > counts.size:
            counts = np.concatenate([counts, np.zeros(block.size - counts.size, np.int64)])
        counts[: block.size] += block
    return counts


def empirical_entropy_bits(symbols: np.ndarray, alphabet_size: int) -> float:
    """``N * H`` in bits, ``H`` the Shannon entropy of the stream's own symbol histogram.

    This is the size an ideal coder with a free, exact model would reach; the size
    of :func:`encode` is measured against it.

    Args:
        symbols: 1-D integer array, every entry in ``[0, alphabet_size)``.
        alphabet_size: number of possible symbols, 1 to 65536.

    Returns:
        The entropy in bits as a float; 0.0 for an empty or constant stream.

    Raises:
        ValueError: on the same bad arguments as :func:`encode`.

    Example:
        >>> import numpy as np
        >>> empirical_entropy_bits(np.array([0, 0, 1, 1]), 2)
        4.0
        >>> round(empirical_entropy_bits(np.array([0, 0, 0, 1]), 2), 4)
        3.2451
    """
    array, size = _check_symbols(symbols, alphabet_size)
    counts = histogram(array, size)
    counts = counts[counts > 0].astype(np.float64)
    if counts.size <= 1:
        return 0.0
    return float(np.sum(counts * np.log2(array.size / counts)))


def encode(symbols: np.ndarray, alphabet_size: int, *, counts: np.ndarray | None = None) -> bytes:
    """Entropy-codes a stream of small unsigned integers with interleaved rANS.

    The result is self-contained (frequency table, lane count, states and words)
    except for the symbol count and the alphabet size, which :func:`decode` needs.

    Args:
        symbols: 1-D array of any integer dtype, every entry in ``[0, alphabet_size)``.
        alphabet_size: number of possible symbols, 1 to 65536.
        counts: the stream's :func:`histogram`, where the caller has it already (its
            length and total are checked; its values are trusted).

    Returns:
        The coded bytes.

    Raises:
        ValueError: ``symbols`` is not 1-D, not of an integer dtype, or holds a
            negative or too large symbol; or ``alphabet_size`` is out of range.

    Example:
        >>> import numpy as np
        >>> symbols = np.array([0, 0, 1, 0, 2, 0, 0, 1] * 500, dtype=np.uint8)
        >>> data = encode(symbols, 3)
        >>> len(data), round(empirical_entropy_bits(symbols, 3) / 8)
        (664, 649)
        >>> bool(np.array_equal(decode(data, symbols.size, 3), symbols))
        True
    """
    array, size = _check_symbols(symbols, alphabet_size)
    count = array.size
    if count == 0:
        return bytes([_EMPTY])
    if counts is None:
        counts = histogram(array, size)
    elif np.shape(counts) != (size,) or int(np.sum(counts)) != count:
        raise ValueError(
            f"counts must be the histogram of the {count} symbols over alphabet_size={size}, "
            f"got shape {np.shape(counts)} summing to {int(np.sum(counts))}"
        )
    used_symbols = np.flatnonzero(counts)
    if used_symbols.size == 1:
        return bytes([_CONSTANT]) + _varint(int(used_symbols[0]))
    plan = _plan(counts, size)
    initial = _initial_states(plan.header, count, size, plan.lanes)
    coder = _encode_scalar if plan.lanes <= SCALAR_MAX_LANES else _encode_lanes
    states, words = coder(array, plan.first, plan.freqs, plan.prob_bits, initial)
    return plan.header + states.astype("<u8").tobytes() + words.astype("<u4").tobytes()


def coded_size(counts: np.ndarray) -> int:
    """About how many bytes :func:`encode` writes for a stream with this histogram.

    Exact for empty and constant streams; for rANS it is the exact header and table
    plus the model's payload estimate and the lane states, typically within a few
    bytes per lane of the real size. It costs no pass over the symbols, so callers
    can rank layouts (or skip coding) before encoding anything.

    Args:
        counts: 1-D histogram of the stream, ``counts[s]`` = occurrences of symbol
            ``s``; its length is the alphabet size (1 to 65536).

    Returns:
        The estimated size in bytes.

    Example:
        >>> import numpy as np
        >>> symbols = np.array([0, 0, 1, 0, 2, 0, 0, 1] * 500, dtype=np.uint8)
        >>> coded_size(np.bincount(symbols, minlength=3)), len(encode(symbols, 3))
        (664, 664)
        >>> coded_size(np.array([0, 7, 0]))
        2
    """
    counts = np.asarray(counts)
    size = _check_alphabet_size(counts.size, ValueError)
    used_symbols = np.flatnonzero(counts)
    if used_symbols.size == 0:
        return 1
    if used_symbols.size == 1:
        return 1 + len(_varint(int(used_symbols[0])))
    plan = _plan(counts, size)
    # A lane costs its 8-byte final state plus the ~31 bits its start state carries,
    # less the payload its final state holds (log2 x is about uniform in [31, 63)):
    # about 6 bytes.
    return len(plan.header) + 6 * plan.lanes + math.ceil(plan.payload_bits / 8)


class _Plan(NamedTuple):
    """The model :func:`encode` picks for a histogram (at least two used symbols)."""

    header: bytes
    first: int
    freqs: np.ndarray  # over the used span first..last
    prob_bits: int
    payload_bits: float
    lanes: int


def _plan(counts: np.ndarray, size: int) -> _Plan:
    """The cheapest table (and its header) for a histogram with >= 2 used symbols."""
    counts = counts.astype(np.int64)
    count = int(counts.sum())
    used_symbols = np.flatnonzero(counts)
    first, last = int(used_symbols[0]), int(used_symbols[-1])
    span_counts = counts[first : last + 1]
    while int(span_counts.max()) >= 1 << (_WEIGHT_BITS - 1):  # only for absurd counts
        span_counts = (span_counts + 1) >> 1
    span = last - first + 1
    used = span_counts > 0

    def payload_bits(freqs: np.ndarray, prob_bits: int) -> float:
        return float(np.sum(span_counts[used] * (prob_bits - np.log2(freqs[used] * 1.0))))

    # Candidates (estimated bits, header byte, table field, frequencies, b, payload): a
    # log-scale table for each mantissa, direct or delta, or none (flat: all symbols of
    # the span equally likely, for few symbols over a large alphabet). The first
    # cheapest wins.
    options = []
    prob_bits = _prob_bits(count, used_symbols.size)
    for mantissa in range(_ENCODER_MAX_MANTISSA + 1):
        codes = _codes_of_counts(span_counts, mantissa)
        freqs = _normalize(_weights_of_codes(codes, mantissa), 1 << prob_bits)
        payload = payload_bits(freqs, prob_bits)
        for delta in (False, True):
            table = _nibble_pack(_table_values(codes, delta))
            field = _varint(len(table)) + table
            head = _RANS | (_DELTA if delta else 0) | (mantissa << 4)
            options.append((payload + 8 * len(field), head, field, freqs, prob_bits, payload))
    flat_bits = _prob_bits(count, span)
    freqs = _normalize(np.ones(span, np.int64), 1 << flat_bits)
    payload = payload_bits(freqs, flat_bits)
    options.append((payload, _RANS | _FLAT, b"", freqs, flat_bits, payload))
    _, head, field, freqs, prob_bits, payload = min(options, key=lambda option: option[0])

    lanes = _choose_lanes(payload, count)
    header = bytes([head]) + _varint(first) + _varint(span - 2) + field + _varint(lanes - 1)
    return _Plan(header, first, freqs, prob_bits, payload, lanes)


def _initial_states(header: bytes, count: int, alphabet_size: int, lanes: int) -> np.ndarray:
    """Encoder start states in ``[L, 2L)``, a 31-bit hash of the header, count and lane.

    The decoder must end each lane at exactly this state, which checks the table, the
    lane count, ``count`` and ``alphabet_size`` at the cost of at most one bit a lane.
    """
    seed = zlib.crc32(header + b"|" + _varint(count) + b"|" + _varint(alphabet_size))
    z = np.arange(lanes, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(seed)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)  # splitmix64 finalizer
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return np.uint64(STATE_LOWER) + (z >> np.uint64(33))


def _symbol_tables(
    first: int, freqs: np.ndarray, prob_bits: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Frequency, start and spill limit per symbol value, plus a padding symbol.

    Indexed by the symbol itself (entries below ``first`` are never used), so the
    stream needs no shifted copy. The padding symbol ``first + span`` codes with
    frequency M at start 0: x -> x, and never renormalizes as x < 2**63.
    """
    padding = first + freqs.size
    freq_table = np.zeros(padding + 1, np.uint64)
    freq_table[first:padding] = freqs
    freq_table[padding] = 1 << prob_bits
    start_table = np.zeros(padding + 1, np.uint64)
    start_table[first:padding] = np.cumsum(freqs) - freqs
    limit_table = freq_table << np.uint64(63 - prob_bits)  # spill when x >= f * 2**(63-b)
    return freq_table, start_table, limit_table


def _encode_lanes(
    symbols: np.ndarray, first: int, freqs: np.ndarray, prob_bits: int, initial: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Final states and the word stream (decoding order) for ``symbols``."""
    count = symbols.size
    lanes = initial.size
    steps = -(-count // lanes)
    freq_table, start_table, limit_table = _symbol_tables(first, freqs, prob_bits)
    # x -> (x // f) * M + x % f + start  ==  x + (x // f) * (M - f) + start: one
    # division and no remainder array.
    gain_table = np.uint64(1 << prob_bits) - freq_table
    padding = freq_table.size - 1

    x = initial.copy()
    quotient = np.empty_like(x)
    shift = np.empty_like(x)
    parts = []
    block = max(1, _BLOCK_SYMBOLS // lanes)  # steps gathered at a time, to bound memory
    spills = np.empty((block, lanes), np.bool_)
    low = np.empty((block, lanes), np.uint32)
    for block_end in range(steps, 0, -block):
        block_start = max(0, block_end - block)
        index = symbols[block_start * lanes : block_end * lanes].astype(np.intp)
        missing = (block_end - block_start) * lanes - index.size
        if missing:
            index = np.append(index, np.full(missing, padding, index.dtype))
        index = index.reshape(-1, lanes)
        freq_of, gain_of = freq_table[index], gain_table[index]
        start_of, limit_of = start_table[index], limit_table[index]
        rows = index.shape[0]
        for t in range(rows - 1, -1, -1):
            # A spilling lane emits its low word and keeps x >> 32: a shift by 0 or 32
            # for every lane, and the words picked out once per block (no per-step
            # boolean indexing).
            spill = spills[t]
            np.greater_equal(x, limit_of[t], out=spill)
            np.copyto(low[t], x, casting="unsafe")  # the low 32 bits
            np.left_shift(spill, np.uint64(5), out=shift, dtype=np.uint64)
            x >>= shift
            np.floor_divide(x, freq_of[t], out=quotient)
            quotient *= gain_of[t]
            x += quotient
            x += start_of[t]
        # In decoding order: steps ascending, lanes ascending within a step.
        parts.append(low[:rows][spills[:rows]])
    return x, np.concatenate(parts[::-1]) if parts else np.zeros(0, np.uint32)


def _encode_scalar(
    symbols: np.ndarray, first: int, freqs: np.ndarray, prob_bits: int, initial: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Same output as :func:`_encode_lanes`, with Python integers (faster for few lanes)."""
    freq_table, start_table, limit_table = _symbol_tables(first, freqs, prob_bits)
    freq_list, start_list = freq_table.tolist(), start_table.tolist()
    limit_list = limit_table.tolist()
    x = initial.tolist()
    lanes = len(x)
    words: list[int] = []
    emit = words.append
    # Symbol i is lane i % lanes of step i // lanes: going down i visits the steps
    # backwards and, within a step, the lanes in descending order, as the chunks do.
    for block_start in range(
        (symbols.size - 1) // _BLOCK_SYMBOLS * _BLOCK_SYMBOLS, -1, -_BLOCK_SYMBOLS
    ):
        block = symbols[block_start : block_start + _BLOCK_SYMBOLS].tolist()
        for i in range(len(block) - 1, -1, -1):
            lane = (block_start + i) % lanes
            s = block[i]
            state = x[lane]
            if state >= limit_list[s]:
                emit(state & 0xFFFFFFFF)
                state >>= 32
            f = freq_list[s]
            x[lane] = ((state // f) << prob_bits) + state % f + start_list[s]
    words.reverse()
    return np.array(x, np.uint64), np.array(words, np.uint64)


class _Reader:
    """Bounds-checked reading of the header fields."""

    def __init__(self, buf: np.ndarray, position: int) -> None:
        self.buf = buf
        self.position = position

    @property
    def remaining(self) -> int:
        return self.buf.size - self.position

    def varint(self, what: str, maximum: int) -> int:
        value = 0
        for i in range(_MAX_VARINT_BYTES):
            if self.position >= self.buf.size:
                raise FileFormatError(f"rANS stream: truncated while reading the {what}")
            byte = int(self.buf[self.position])
            self.position += 1
            value |= (byte & 0x7F) << (7 * i)
            if not byte & 0x80:
                if byte == 0 and i > 0:
                    raise FileFormatError(f"rANS stream: overlong varint for the {what}")
                if value > maximum:
                    raise FileFormatError(
                        f"rANS stream: {what} {value} is out of range (at most {maximum})"
                    )
                return value
        raise FileFormatError(f"rANS stream: varint for the {what} is too long")

    def take(self, size: int, what: str) -> np.ndarray:
        if size > self.remaining:
            raise FileFormatError(
                f"rANS stream: truncated {what}: needs {size} bytes, {self.remaining} left"
            )
        out = self.buf[self.position : self.position + size]
        self.position += size
        return out


def _read_table(reader: _Reader, span: int, head: int) -> np.ndarray:
    """The weights of the ``span`` symbols from the table field."""
    mantissa = head >> 4
    table_size = reader.varint("frequency table size", reader.remaining)
    values = _nibble_unpack(reader.take(table_size, "frequency table"), span)
    codes = np.cumsum(_unzigzag(values)) if head & _DELTA else values
    if codes.min() < 0 or codes.max() > _max_code(mantissa):
        raise FileFormatError("rANS stream: frequency table entry is out of range")
    weights = _weights_of_codes(codes, mantissa)
    if weights[0] == 0 or weights[-1] == 0:
        raise FileFormatError("rANS stream: frequency table does not start and end in use")
    return weights


def _as_byte_array(data: Any) -> np.ndarray:
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8 or data.ndim != 1:
            raise TypeError(f"data must be a 1-D uint8 array, got {data.dtype} {data.shape}")
        return np.ascontiguousarray(data)
    try:
        view = memoryview(data)
    except TypeError:
        raise TypeError(f"data must be bytes-like, got {type(data).__name__}") from None
    if not view.c_contiguous:
        raise ValueError("data must be a contiguous buffer")
    return np.frombuffer(view.cast("B"), dtype=np.uint8)


def decode(data: bytes | memoryview | np.ndarray, count: int, alphabet_size: int) -> np.ndarray:
    """Inverse of :func:`encode`.

    Args:
        data: the bytes :func:`encode` returned (bytes, memoryview or 1-D uint8 array).
        count: number of symbols that were encoded. The output is allocated from it,
            so a caller reading it from an untrusted header should bound it (e.g. by
            the tensor shape); every size read from ``data`` is checked against
            ``len(data)`` before anything is allocated from it.
        alphabet_size: the alphabet size given to :func:`encode`, 1 to 65536.

    Returns:
        The ``count`` symbols, as uint8 when ``alphabet_size <= 256`` else uint16.

    Raises:
        FileFormatError: ``data`` is truncated, has bytes left over, or is
            inconsistent (header, table, lane count, states, words) with itself,
            ``count`` or ``alphabet_size``; also for a negative ``count`` or an
            out-of-range ``alphabet_size``. Damage inside the words or the lane
            states can go undetected (that is the file CRC's job).
        ValueError: ``count`` or ``alphabet_size`` is not an integer.
        TypeError: ``data`` is not bytes-like or a 1-D uint8 array.

    Example:
        >>> import numpy as np
        >>> data = encode(np.array([3, 1, 3, 3, 0, 3]), 4)
        >>> decode(data, 6, 4).tolist()
        [3, 1, 3, 3, 0, 3]
        >>> decode(encode(np.array([], np.int32), 4), 0, 4).dtype
        dtype('uint8')
    """
    size = _check_alphabet_size(alphabet_size, FileFormatError)
    count = _check_int(count, "count")
    if count < 0:
        raise FileFormatError(f"rANS stream: symbol count must be non-negative, got {count}")
    dtype = np.uint8 if size <= 256 else np.uint16
    buf = _as_byte_array(data)
    if buf.size == 0:
        raise FileFormatError("rANS stream: no data (even an empty stream takes one byte)")
    head = int(buf[0])
    kind = head & 3
    if kind == _EMPTY:
        if head != _EMPTY or buf.size != 1:
            raise FileFormatError("rANS stream: malformed empty-stream marker")
        if count != 0:
            raise FileFormatError(f"rANS stream: data holds no symbols, but count is {count}")
        return np.zeros(0, dtype)
    if count == 0:
        raise FileFormatError("rANS stream: count is 0, but data holds symbols")
    reader = _Reader(buf, 1)
    if kind == _CONSTANT:
        if head != _CONSTANT:
            raise FileFormatError(f"rANS stream: unknown header byte {head:#04x}")
        symbol = reader.varint("constant symbol", size - 1)
        if reader.remaining:
            raise FileFormatError(f"rANS stream: {reader.remaining} bytes left over")
        return np.full(count, symbol, dtype)
    flat = bool(head & _FLAT)
    if kind != _RANS or (flat and head != _RANS | _FLAT):
        raise FileFormatError(f"rANS stream: unknown header byte {head:#04x}")
    if size < 2:
        raise FileFormatError("rANS stream: alphabet_size 1 cannot hold two distinct symbols")

    first = reader.varint("first symbol", size - 2)
    span = reader.varint("symbol span", size - first - 2) + 2
    if flat:
        weights = np.ones(span, np.int64)
    else:
        weights = _read_table(reader, span, head)
        if count < int(np.count_nonzero(weights)):
            raise FileFormatError(
                f"rANS stream: table uses {np.count_nonzero(weights)} distinct symbols, "
                f"more than count={count}"
            )
    used = int(np.count_nonzero(weights))
    prob_bits = _prob_bits(count, used)
    freqs = _normalize(weights, 1 << prob_bits)

    lanes = reader.varint("lane count", min(count, MAX_LANES) - 1) + 1
    expected = _initial_states(buf[: reader.position].tobytes(), count, size, lanes)
    states = reader.take(8 * lanes, "lane states").view("<u8").astype(np.uint64)
    if states.min() < STATE_LOWER or states.max() >= STATE_UPPER:
        raise FileFormatError("rANS stream: a lane state is out of range")
    rest = reader.take(reader.remaining, "word stream")
    if rest.size % 4:
        raise FileFormatError(
            f"rANS stream: word stream of {rest.size} bytes is not whole 32-bit words"
        )
    if rest.size // 4 > count:
        raise FileFormatError(
            f"rANS stream: {rest.size // 4} words for {count} symbols (at most one each)"
        )
    words = rest.view("<u4")  # widened a few at a time by the decoder
    symbols = (np.arange(span) + first).astype(dtype)
    coder = _decode_scalar if lanes <= SCALAR_MAX_LANES else _decode_lanes
    return coder(states, words, symbols, freqs, prob_bits, count, expected)


def _decode_scalar(
    x: np.ndarray,
    words: np.ndarray,
    symbols: np.ndarray,
    freqs: np.ndarray,
    prob_bits: int,
    count: int,
    expected: np.ndarray,
) -> np.ndarray:
    """Same result as :func:`_decode_lanes`, with Python integers (faster for few lanes)."""
    lanes = x.size
    state_list = x.tolist()
    word_list = words.tolist()
    freq_list = freqs.tolist()
    start_list = (np.cumsum(freqs) - freqs).tolist()
    slot_mask = (1 << prob_bits) - 1
    out = np.empty(count, symbols.dtype)
    position, available = 0, len(word_list)
    for block_start in range(0, count, _BLOCK_SYMBOLS):
        block: list[int] = []
        keep = block.append
        for i in range(block_start, min(count, block_start + _BLOCK_SYMBOLS)):
            lane = i % lanes
            state = state_list[lane]
            slot = state & slot_mask
            s = bisect.bisect_right(start_list, slot) - 1
            keep(s)
            state = freq_list[s] * (state >> prob_bits) + slot - start_list[s]
            if state < STATE_LOWER:
                if position == available:
                    raise FileFormatError(
                        f"rANS stream: word stream ends early, at symbol {i} of {count}"
                    )
                state = (state << 32) | word_list[position]
                position += 1
            state_list[lane] = state
        out[block_start : block_start + len(block)] = symbols[np.array(block, np.intp)]
    _check_end(available - position, state_list, count, expected)
    return out


def _check_end(left_over: int, states: Any, count: int, expected: np.ndarray) -> None:
    if left_over:
        raise FileFormatError(f"rANS stream: {left_over} words left over after {count} symbols")
    if not np.array_equal(np.asarray(states, np.uint64), expected):
        raise FileFormatError(
            "rANS stream: final lane states do not match (corrupt data or wrong count)"
        )


def _decode_lanes(
    x: np.ndarray,
    words: np.ndarray,
    symbols: np.ndarray,
    freqs: np.ndarray,
    prob_bits: int,
    count: int,
    expected: np.ndarray,
) -> np.ndarray:
    lanes = x.size
    total = 1 << prob_bits
    starts = np.cumsum(freqs) - freqs
    tables = (
        np.repeat(symbols, freqs),  # symbol of each slot
        np.repeat(freqs, freqs).astype(np.uint64),  # its frequency
        (np.arange(total) - np.repeat(starts, freqs)).astype(np.uint64),  # slot - start
    )
    steps, full_steps = -(-count // lanes), count // lanes
    out = np.empty((steps, lanes), symbols.dtype)
    x = x.copy()
    constants = (np.int64(total - 1), np.uint64(prob_bits), np.uint64(STATE_LOWER))
    position = 0
    for t in range(full_steps):
        out[t], position = _decode_step(x, words, position, tables, constants)
    if steps > full_steps:  # a partial last step: only the first lanes hold symbols
        width = count - full_steps * lanes
        out[full_steps, :width], position = _decode_step(
            x[:width], words, position, tables, constants
        )
    _check_end(words.size - position, x, count, expected)
    return out.reshape(-1)[:count]


def _decode_step(
    x: np.ndarray,
    words: np.ndarray,
    position: int,
    tables: tuple[np.ndarray, np.ndarray, np.ndarray],
    constants: tuple[np.int64, np.uint64, np.uint64],
) -> tuple[np.ndarray, int]:
    """One symbol per lane, updating ``x`` in place; the symbols and the next word."""
    symbol_of_slot, freq_of_slot, bias_of_slot = tables
    slot_mask, prob_bits, lower = constants
    # x < 2**63, so its int64 view is the same number (and a valid gather index).
    slot = x.view(np.int64) & slot_mask
    x >>= prob_bits
    x *= freq_of_slot[slot]
    x += bias_of_slot[slot]
    # x < 2**63 gives f * (x >> b) + slot - start < 2**63, and >= 2**(31 - b),
    # so one 32-bit word always brings a state back into [2**31, 2**63).
    refill = (x < lower).nonzero()[0]
    if refill.size:
        end = position + refill.size
        if end > words.size:
            raise FileFormatError("rANS stream: word stream ends early")
        x[refill] = (x[refill] << np.uint64(32)) | words[position:end]
        position = end
    return symbol_of_slot[slot], position
