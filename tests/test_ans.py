"""Interleaved rANS coding (jaxcompress.io.ans): round trips, size, speed and bad input."""

import time
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxcompress.io import ans
from jaxcompress.io.ans import decode, empirical_entropy_bits, encode
from jaxcompress.io.errors import FileFormatError

ALPHABETS = [1, 2, 3, 16, 256, 4096, 65536]
LENGTHS = [0, 1, 2, 7, 1000, 100_003]
KINDS = ["uniform", "geometric", "laplace", "kmeans", "single", "rare"]


def _kmeans_codes(rng, n, k):
    """Cluster indices of Gaussian weights under 1-D k-means-like centroids.

    k-means puts centroids with density ~ p**(1/3), i.e. at quantiles of a normal of
    variance 3; indices follow the sorted centroids, as jaxcompress.cluster does.
    """
    wide = np.sort(rng.normal(0.0, np.sqrt(3.0), 20 * k + 1000))
    centroids = wide[(2 * np.arange(k) + 1) * wide.size // (2 * k)]
    boundaries = (centroids[1:] + centroids[:-1]) / 2
    return np.searchsorted(boundaries, rng.normal(0.0, 1.0, n))


def _stream(kind, n, alphabet, seed=0):
    rng = np.random.default_rng([seed, n, alphabet, KINDS.index(kind)])
    top = alphabet - 1
    if kind == "uniform":
        s = rng.integers(0, alphabet, n)
    elif kind == "geometric":
        s = np.minimum(rng.geometric(0.3, n) - 1, top)
    elif kind == "laplace":
        s = np.clip(np.round(rng.laplace(top / 2, max(alphabet / 40, 0.4), n)), 0, top)
    elif kind == "kmeans":
        s = _kmeans_codes(rng, n, alphabet)
    elif kind == "single":
        s = np.full(n, top)
    elif kind == "rare":  # two symbols, p = 0.999 and 0.001
        s = np.where(rng.random(n) < 0.001, top, 0)
    else:
        raise AssertionError(kind)
    return s.astype(np.int64)


def _out_dtype(alphabet):
    return np.uint8 if alphabet <= 256 else np.uint16


def _read_varint(data, position):
    value, shift = 0, 0
    while True:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, position


def _layout(data):
    """Offsets of the rANS layout documented in the module: lane-count field, states, words."""
    assert data[0] & 3 == 2
    position = 1
    _, position = _read_varint(data, position)  # first used symbol
    _, position = _read_varint(data, position)  # span - 2
    if data[0] & 8:  # flat: no table field
        lanes_at = position
    else:
        table_size, position = _read_varint(data, position)
        lanes_at = position + table_size
    lanes, states_at = _read_varint(data, lanes_at)
    lanes += 1
    return {"lanes_at": lanes_at, "lanes": lanes, "states_at": states_at}


# ----------------------------------------------------------------------------- entropy


def test_empirical_entropy_hand_computed():
    assert empirical_entropy_bits(np.array([0, 0, 1, 1]), 2) == pytest.approx(4.0)
    h_quarter = -(0.25 * np.log2(0.25) + 0.75 * np.log2(0.75))
    assert empirical_entropy_bits(np.array([0, 0, 0, 1]), 2) == pytest.approx(4 * h_quarter)
    # Four equiprobable symbols among 256: 2 bits each.
    assert empirical_entropy_bits(np.array([7, 9, 200, 3] * 5, np.uint8), 256) == pytest.approx(
        40.0
    )
    assert empirical_entropy_bits(np.array([], np.int32), 4) == 0.0
    assert empirical_entropy_bits(np.full(50, 3), 4) == 0.0
    assert isinstance(empirical_entropy_bits(np.array([0, 1]), 2), float)


# ----------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("alphabet", ALPHABETS)
@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("kind", KINDS)
def test_round_trip(kind, n, alphabet):
    symbols = _stream(kind, n, alphabet)
    data = encode(symbols, alphabet)
    assert isinstance(data, bytes)
    out = decode(data, n, alphabet)
    assert out.dtype == _out_dtype(alphabet)
    assert out.shape == (n,)
    np.testing.assert_array_equal(out, symbols)


@pytest.mark.parametrize(
    "dtype", [np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32, np.uint64, np.int64]
)
def test_round_trip_any_integer_dtype(dtype):
    symbols = _stream("laplace", 5000, 100).astype(dtype)
    data = encode(symbols, 100)
    np.testing.assert_array_equal(decode(data, symbols.size, 100), symbols)
    assert encode(symbols.astype(np.int64), 100) == data


def test_round_trip_many_lanes_and_partial_last_step():
    symbols = _stream("kmeans", 100_003, 16)
    with mock.patch.object(ans, "LANE_OVERHEAD", 100.0):  # as many lanes as allowed
        data = encode(symbols, 16)
    assert _layout(data)["lanes"] == ans.MAX_LANES
    np.testing.assert_array_equal(decode(data, symbols.size, 16), symbols)
    with pytest.raises(FileFormatError, match="lane count"):
        decode(data, ans.MAX_LANES - 1, 16)


@pytest.mark.parametrize(
    ("kind", "n", "alphabet"),
    [("uniform", 100_003, 16), ("kmeans", 20_000, 256), ("rare", 50_000, 2), ("laplace", 777, 3)],
)
def test_numpy_and_scalar_coders_agree(kind, n, alphabet):
    """The per-step numpy coder and the Python-integer coder write the same bytes."""
    symbols = _stream(kind, n, alphabet)
    with mock.patch.object(ans, "LANE_OVERHEAD", 2.0):  # dozens to thousands of lanes
        with mock.patch.object(ans, "SCALAR_MAX_LANES", 0):
            numpy_bytes = encode(symbols, alphabet)
        with mock.patch.object(ans, "SCALAR_MAX_LANES", 1 << 20):
            scalar_bytes = encode(symbols, alphabet)
    assert numpy_bytes == scalar_bytes
    assert _layout(numpy_bytes)["lanes"] > 1
    for threshold in (0, 1 << 20):
        with mock.patch.object(ans, "SCALAR_MAX_LANES", threshold):
            np.testing.assert_array_equal(decode(numpy_bytes, n, alphabet), symbols)


@st.composite
def _streams(draw):
    alphabet = draw(st.sampled_from([1, 2, 3, 16, 255, 256, 257, 4096, 65536]))
    if draw(st.booleans()):  # a few distinct values, as in skewed streams
        pool = draw(st.lists(st.integers(0, alphabet - 1), min_size=1, max_size=4))
        values = draw(st.lists(st.sampled_from(pool), max_size=400))
    else:
        values = draw(st.lists(st.integers(0, alphabet - 1), max_size=400))
    dtype = np.uint16 if alphabet <= 65536 and draw(st.booleans()) else np.int64
    return np.array(values, dtype), alphabet


@settings(max_examples=150, deadline=None)
@given(
    _streams(),
    st.sampled_from([ans.LANE_OVERHEAD, 0.2, 100.0]),
    st.sampled_from([ans.SCALAR_MAX_LANES, 0, 1 << 20]),
    st.sampled_from([ans._BLOCK_SYMBOLS, 1, 7]),
)
def test_round_trip_property(stream, lane_overhead, scalar_max_lanes, block_symbols):
    """Round trips with default, many or one symbol per lane, either coder, any blocking."""
    symbols, alphabet = stream
    with (
        mock.patch.object(ans, "LANE_OVERHEAD", lane_overhead),
        mock.patch.object(ans, "SCALAR_MAX_LANES", scalar_max_lanes),
        mock.patch.object(ans, "_BLOCK_SYMBOLS", block_symbols),
    ):
        data = encode(symbols, alphabet)
        out = decode(data, symbols.size, alphabet)
    assert out.dtype == _out_dtype(alphabet)
    np.testing.assert_array_equal(out, symbols)
    # Any wrong count is caught (the start states hash the count).
    if symbols.size and data[0] & 3 == 2:
        with pytest.raises(FileFormatError):
            decode(data, symbols.size + 1, alphabet)


def test_decode_accepts_buffers():
    symbols = _stream("laplace", 3000, 16)
    data = encode(symbols, 16)
    for buffer in (bytearray(data), memoryview(data), np.frombuffer(data, np.uint8)):
        np.testing.assert_array_equal(decode(buffer, 3000, 16), symbols)


def test_special_streams_are_tiny():
    assert encode(np.array([], np.uint8), 16) == b"\x00"
    assert encode(np.full(10_000, 5), 16) == b"\x01\x05"
    assert decode(b"\x01\x05", 3, 16).tolist() == [5, 5, 5]
    assert decode(b"\x00", 0, 300).dtype == np.uint16


def test_encode_is_deterministic():
    symbols = _stream("kmeans", 30_000, 256)
    assert encode(symbols, 256) == encode(symbols.copy(), 256)


# ----------------------------------------------------------------------------- size

SIZE_CASES = [
    ("uniform", 16),
    ("uniform", 256),
    ("uniform", 4096),
    ("kmeans", 16),
    ("kmeans", 256),
    ("laplace", 16),
    ("laplace", 256),
    ("geometric", 256),
    ("rare", 2),
]


@pytest.mark.parametrize("n", [10_000, 100_003])
@pytest.mark.parametrize(("kind", "alphabet"), SIZE_CASES)
def test_size_near_entropy(kind, alphabet, n):
    """Coded bits <= 1.02 * N*H + 512 for N >= 10,000 (and 1.01 * N*H + 512 from 100,000)."""
    if alphabet == 4096 and n < 100_000:
        pytest.skip("a 4096-symbol table cannot be described in 2 % of 10,000 symbols")
    symbols = _stream(kind, n, alphabet)
    entropy = empirical_entropy_bits(symbols, alphabet)
    bits = 8 * len(encode(symbols, alphabet))
    print(f"{kind} A={alphabet} N={n}: coded/entropy = {bits / entropy:.4f}")
    assert bits <= 1.02 * entropy + 64 * 8
    if n >= 100_000 and alphabet <= 256:
        assert bits <= 1.01 * entropy + 64 * 8


def test_uniform_4_bit_stream_takes_half_a_byte_per_symbol():
    n = 100_000
    symbols = np.random.default_rng(7).integers(0, 16, n, dtype=np.uint8)
    size = len(encode(symbols, 16))
    assert n / 2 <= size <= 1.02 * n / 2


@pytest.mark.parametrize("alphabet", [300, 4096, 65536])
@pytest.mark.parametrize("n", [1000, 10_000])
def test_large_alphabet_never_much_worse_than_fixed_width(alphabet, n):
    """Few samples of a large alphabet cannot pay for a table; the flat model caps the size."""
    symbols = _stream("uniform", n, alphabet)
    data = encode(symbols, alphabet)
    assert 8 * len(data) <= 1.01 * n * np.log2(alphabet) + 256
    np.testing.assert_array_equal(decode(data, n, alphabet), symbols)


def test_skewed_stream_beats_fixed_width_by_far():
    symbols = _stream("rare", 100_003, 2)
    assert len(encode(symbols, 2)) < 100_003 / 8 / 10


def test_one_million_symbols_fast():
    symbols = np.random.default_rng(3).integers(0, 16, 1_000_000, dtype=np.uint8)
    start = time.perf_counter()
    data = encode(symbols, 16)
    out = decode(data, symbols.size, 16)
    elapsed = time.perf_counter() - start
    np.testing.assert_array_equal(out, symbols)
    assert elapsed < 5.0, f"1M symbols took {elapsed:.2f} s"


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("symbols", "alphabet", "match"),
    [
        (np.zeros((2, 3), np.int32), 4, "1-D"),
        (np.array(3), 4, "1-D"),
        (np.array([0.0, 1.0]), 4, "integer dtype"),
        (np.array([True, False]), 4, "integer dtype"),
        (np.array([0, -1, 2]), 4, "non-negative"),
        (np.array([0, 4, 2]), 4, "out of range"),
        (np.array([0, 2**40], np.uint64), 65536, "out of range"),
        (np.array([0, 1]), 0, "alphabet_size"),
        (np.array([0, 1]), 65537, "alphabet_size"),
        (np.array([0, 1]), 2.0, "alphabet_size must be an integer"),
        (np.array([0, 1]), True, "alphabet_size must be an integer"),
    ],
)
def test_encode_rejects_bad_input(symbols, alphabet, match):
    with pytest.raises(ValueError, match=match):
        encode(symbols, alphabet)
    with pytest.raises(ValueError, match=match):
        empirical_entropy_bits(symbols, alphabet)


@pytest.fixture(scope="module")
def coded():
    """A few coded streams: (symbols, alphabet, data), from 1 to hundreds of lanes."""
    cases = [
        (_stream("laplace", 1000, 16), 16),
        (_stream("kmeans", 8000, 256), 256),
        (_stream("rare", 5000, 2), 2),
        (np.array([0, 1]), 2),
        (_stream("uniform", 3000, 600), 600),
        (_stream("uniform", 40_000, 16), 16),
    ]
    coded = [(s, a, encode(s, a)) for s, a in cases]
    many = _stream("kmeans", 5000, 16)
    with mock.patch.object(ans, "LANE_OVERHEAD", 1.0):  # hundreds of lanes: numpy coder
        coded.append((many, 16, encode(many, 16)))
    assert _layout(coded[-1][2])["lanes"] > 4 * ans.SCALAR_MAX_LANES
    return coded


def test_decode_rejects_truncation_and_extra_bytes(coded):
    for symbols, alphabet, data in coded:
        n = symbols.size
        step = max(1, len(data) // 200)
        for length in [*range(0, len(data), step), len(data) - 1]:
            with pytest.raises(FileFormatError):
                decode(data[:length], n, alphabet)
        for extra in (b"\x00", b"\x00\x00\x00\x00", b"\x01\x02\x03\x04", bytes(9)):
            with pytest.raises(FileFormatError):
                decode(data + extra, n, alphabet)


def test_decode_rejects_wrong_count_and_alphabet(coded):
    for symbols, alphabet, data in coded:
        n = symbols.size
        lanes = _layout(data)["lanes"]
        for count in {n - 1, n + 1, n + lanes, n - lanes, 2 * n, 0}:
            if count >= 0 and count != n:
                with pytest.raises(FileFormatError):
                    decode(data, count, alphabet)
        for size in (alphabet + 1, 2 * alphabet, 65536):
            with pytest.raises(FileFormatError):
                decode(data, n, size)
        with pytest.raises(FileFormatError, match="alphabet_size"):
            decode(data, n, 65537)
        with pytest.raises(FileFormatError, match="non-negative"):
            decode(data, -1, alphabet)


def test_decode_rejects_flips_in_header_and_table(coded):
    """Every flip before the lane states is caught: the start states hash those bytes.

    (A flip in a lane state acts like one in the word stream: it may just change a few
    symbols, e.g. when all frequencies are powers of two; the file's CRC covers that.
    The state checks are tested below and by the fuzz test.)
    """
    for symbols, alphabet, data in coded:
        n = symbols.size
        for position in range(_layout(data)["states_at"]):
            for mask in (0x01, 0x80, 0xFF, 1 << (position % 8)):
                damaged = bytearray(data)
                damaged[position] ^= mask
                with pytest.raises(FileFormatError):
                    decode(bytes(damaged), n, alphabet)


def test_decode_rejects_states_out_of_range(coded):
    for symbols, alphabet, data in coded:
        layout = _layout(data)
        for lane in sorted({0, layout["lanes"] - 1}):
            at = layout["states_at"] + 8 * lane
            state = int.from_bytes(data[at : at + 8], "little")
            for bad in (state | 1 << 63, state & 0xFFFFFFFF & ~(1 << 31), 0, 2**64 - 1):
                damaged = data[:at] + bad.to_bytes(8, "little") + data[at + 8 :]
                with pytest.raises(FileFormatError, match="state is out of range"):
                    decode(damaged, symbols.size, alphabet)


def test_decode_reports_specific_problems(coded):
    symbols, alphabet, data = coded[1]
    n = symbols.size
    layout = _layout(data)
    states_at = layout["states_at"]
    cases = [
        ("no data", b"", 5, 16),
        ("holds no symbols", b"\x00", 5, 16),
        ("empty-stream marker", b"\x00\x00", 0, 16),
        ("count is 0", b"\x01\x05", 0, 16),
        ("constant symbol 16 is out of range", b"\x01\x10", 3, 16),
        ("bytes left over", b"\x01\x05\x00", 3, 16),
        ("unknown header byte", b"\x03", 3, 16),
        ("unknown header byte", b"\x1a", 3, 16),  # flat takes no mantissa
        ("overlong varint", b"\x01\x85\x00", 3, 16),
        ("truncated while reading", b"\x01\x85", 3, 16),
        ("frequency table size", b"\x02\x00\x00" + b"\xff\xff\xff\x03", 10, 16),
        ("lane count", data[: layout["lanes_at"]] + b"\xff\xff\x01", n, alphabet),
        (
            "state is out of range",
            data[: states_at + 7] + b"\x80" + data[states_at + 8 :],
            n,
            alphabet,
        ),
        ("not whole 32-bit words", data + b"\x00", n, alphabet),
        ("words for", data + bytes(4 * n), n, alphabet),
        ("ends early", data[: states_at + 8 * layout["lanes"]], n, alphabet),
    ]
    for message, damaged, count, size in cases:
        with pytest.raises(FileFormatError, match=message):
            decode(damaged, count, size)
    # A rANS stream needs at least two distinct symbols in range.
    with pytest.raises(FileFormatError, match="alphabet_size 1"):
        decode(data, n, 1)
    with pytest.raises(FileFormatError, match="more than count"):
        decode(data, 3, alphabet)


def test_decode_rejects_non_byte_arrays():
    with pytest.raises(TypeError):
        decode(np.zeros(4, np.int32), 0, 4)
    with pytest.raises(TypeError):
        decode([0], 0, 4)


@settings(max_examples=200, deadline=None)
@given(
    case=st.integers(0, 6),
    flips=st.lists(
        st.tuples(st.one_of(st.integers(0, 48), st.integers(0, 1 << 20)), st.integers(1, 255)),
        max_size=4,
    ),
    cut=st.one_of(st.none(), st.integers(0, 1 << 20)),
    tail=st.binary(max_size=9),
    count_delta=st.sampled_from([0, 0, 0, 1, -1]),
)
def test_decode_of_damaged_data_returns_or_raises_file_format_error(
    coded, case, flips, cut, tail, count_delta
):
    symbols, alphabet, data = coded[case]
    damaged = bytearray(data)
    for position, mask in flips:
        damaged[position % len(damaged)] ^= mask
    if cut is not None:
        damaged = damaged[: cut % (len(damaged) + 1)]
    damaged += tail
    count = symbols.size + count_delta
    try:
        out = decode(bytes(damaged), count, alphabet)
    except FileFormatError:
        return
    assert out.shape == (count,)
    assert out.dtype == _out_dtype(alphabet)
    assert int(out.max(initial=0)) < alphabet


def test_histogram_equals_bincount_across_blocks():
    symbols = np.random.default_rng(3).integers(0, 300, 3 * 65536 + 17).astype(np.uint16)
    with mock.patch.object(ans, "_HISTOGRAM_BLOCK", 1000):
        counts = ans.histogram(symbols, 300)
    assert counts.dtype == np.int64
    np.testing.assert_array_equal(counts, np.bincount(symbols, minlength=300))
    # A symbol beyond the alphabet lengthens the result, as bincount does.
    assert ans.histogram(np.array([0, 5], np.uint8), 3).tolist() == [1, 0, 0, 0, 0, 1]


def test_encode_with_counts_gives_the_same_bytes_and_checks_them():
    symbols = np.random.default_rng(4).integers(0, 16, 50_000).astype(np.uint8)
    counts = ans.histogram(symbols, 16)
    assert encode(symbols, 16, counts=counts) == encode(symbols, 16)
    with pytest.raises(ValueError, match="counts must be the histogram"):
        encode(symbols, 16, counts=counts[:8])
    with pytest.raises(ValueError, match="counts must be the histogram"):
        encode(symbols, 16, counts=counts * 2)
