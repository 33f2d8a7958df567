"""Code streams and masks on disk (jaxcompress.io.streams): layout choice, blocks, damage."""

import hashlib
from unittest import mock

import numpy as np
import pytest

from jaxcompress.io import ans, streams
from jaxcompress.io.errors import FileFormatError


def _reference_pack(codes, bits):
    """The bit-plane packing the blocked and nibble paths must reproduce."""
    codes = np.asarray(codes, np.uint8)
    if bits == 8:
        return codes
    planes = (codes[..., None] >> np.arange(bits, dtype=np.uint8)) & np.uint8(1)
    stream = planes.reshape(*codes.shape[:-1], codes.shape[-1] * bits)
    return np.packbits(stream, axis=-1, bitorder="little")


def _packed_mask(keep):
    return np.packbits(keep, axis=-1, bitorder="little")


def _round_trip_mask(keep, entropy=True):
    packed = _packed_mask(keep)
    record, payload = streams.encode_mask(packed, shape=keep.shape, entropy=entropy)
    data = memoryview(bytes(payload))
    back = streams.decode_mask(record, data, shape=keep.shape, nnz=int(keep.sum()), where="w")
    np.testing.assert_array_equal(back, packed)
    return record, len(data)


# ----------------------------------------------------------------------------- bit packing


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("shape", [(0,), (1,), (7,), (13, 9), (3, 4, 21), (2, 0, 5)])
def test_pack_bits_matches_bit_planes(bits, shape):
    codes = np.random.default_rng(bits).integers(0, 2**bits, shape).astype(np.uint8)
    packed = streams.pack_bits(codes, bits)
    np.testing.assert_array_equal(packed, _reference_pack(codes, bits))
    np.testing.assert_array_equal(streams.unpack_bits(packed, bits, shape[-1]), codes)


@pytest.mark.parametrize("bits", [3, 4, 5, 7])
@pytest.mark.parametrize("shape", [(1000,), (5, 203), (40, 17)])
def test_pack_bits_in_small_blocks(bits, shape):
    """Row blocks and (for rows wider than a block) column blocks give the same bytes."""
    codes = np.random.default_rng(shape[-1]).integers(0, 2**bits, shape).astype(np.uint8)
    with mock.patch.object(streams, "_CHUNK", 64):
        packed = streams.pack_bits(codes, bits)
        back = streams.unpack_bits(packed, bits, shape[-1])
    np.testing.assert_array_equal(packed, _reference_pack(codes, bits))
    np.testing.assert_array_equal(back, codes)


def test_pack_bits_keeps_only_the_low_bits():
    codes = np.array([0x13, 0xF2, 0x21], np.uint8)
    np.testing.assert_array_equal(streams.pack_bits(codes, 4), _reference_pack(codes, 4))


# ----------------------------------------------------------------------------- rANS sizes


@pytest.mark.parametrize("alphabet", [2, 16, 256, 4096])
@pytest.mark.parametrize("n", [50, 20_000, 700_001])
def test_coded_size_predicts_encode(alphabet, n):
    rng = np.random.default_rng([alphabet, n])
    symbols = np.minimum(rng.geometric(0.2, n) - 1, alphabet - 1)
    real = len(ans.encode(symbols, alphabet))
    estimate = ans.coded_size(np.bincount(symbols, minlength=alphabet))
    assert abs(estimate - real) <= 0.002 * real + 8


def test_coded_size_of_special_streams_is_exact():
    for counts, symbols in [([0, 0, 0], []), ([0, 9, 0], [1] * 9), ([0] * 300 + [4], [300] * 4)]:
        alphabet = len(counts)
        assert ans.coded_size(np.array(counts)) == len(ans.encode(np.array(symbols, int), alphabet))


# Encoder output of the original (per-step divmod, uint16 copies) implementation: the
# faster encoder must write the same bytes, so old and new files agree.
GOLDEN = {
    "geometric16": ("1e6af1efe4f0ffb8", 146791),
    "bits50": ("df111c5702b372e2", 37632),
    "rare": ("506508eabd4ae9d9", 2091),
    "wide": ("cb514b549de467b1", 36317),
    "laplace256": ("7a21646b0483af7e", 631117),
    "short": ("38db6bc77875d6cc", 12),
}


def _golden_streams():
    rng = np.random.default_rng(11)
    return {
        "geometric16": (np.minimum(rng.geometric(0.3, 400_003) - 1, 15), 16),
        "bits50": ((rng.random(300_000) < 0.5).astype(np.uint8), 2),
        "rare": ((rng.random(200_001) < 0.01).astype(np.uint8), 2),
        "wide": (rng.integers(100, 900, 30_000), 1000),
        "laplace256": (np.clip(np.round(rng.laplace(128, 6, 1_000_003)), 0, 255), 256),
        "short": (np.array([3, 1, 3, 3, 0, 3]), 4),
    }


def test_encoder_bytes_are_unchanged():
    for name, (symbols, alphabet) in _golden_streams().items():
        data = ans.encode(symbols.astype(np.int64), alphabet)
        assert (hashlib.sha256(data).hexdigest()[:16], len(data)) == GOLDEN[name], name
        np.testing.assert_array_equal(ans.decode(data, symbols.size, alphabet), symbols)


@pytest.mark.parametrize("lanes", [25, 100, 4096])
def test_lane_decoder_matches_scalar_decoder(lanes):
    """The numpy lane decoder (full steps and a partial last one) equals the scalar one."""
    rng = np.random.default_rng(lanes)
    symbols = np.minimum(rng.geometric(0.1, 4096 * 7 + 5) - 1, 63)
    with mock.patch.object(ans, "_choose_lanes", lambda payload, count: lanes):
        data = ans.encode(symbols, 64)
        fast = ans.decode(data, symbols.size, 64)
        with mock.patch.object(ans, "SCALAR_MAX_LANES", 4096):
            slow = ans.decode(data, symbols.size, 64)
    np.testing.assert_array_equal(fast, symbols)
    np.testing.assert_array_equal(slow, symbols)


def test_lane_decoder_reports_a_short_word_stream():
    symbols = np.random.default_rng(0).integers(0, 16, 100_000)
    data = ans.encode(symbols, 16)
    with pytest.raises(FileFormatError, match="ends early|left over|not whole"):
        ans.decode(data[:-4], symbols.size, 16)


# ----------------------------------------------------------------------------- masks


def test_random_half_mask_is_a_raw_bitmap_without_any_rans_pass():
    keep = np.random.default_rng(0).random((300, 512)) < 0.5
    with mock.patch.object(ans, "encode", side_effect=AssertionError("encoded")):
        record, size = _round_trip_mask(keep)
    assert (record["encoding"], record["coding"], size) == ("bitmap", "packed", 300 * 64)


def test_sparse_mask_uses_coded_gaps_near_entropy():
    keep = np.random.default_rng(1).random((400, 300)) < 0.02
    record, size = _round_trip_mask(keep)
    assert record["coding"] == "rans"
    assert size < _packed_mask(keep).nbytes / 4
    assert size <= record["entropy_bits"] / 8 * 1.03 + 64


def test_mask_choice_is_as_small_as_trying_every_layout():
    """Encoding only the estimated winner loses nothing against encoding them all."""
    rng = np.random.default_rng(2)
    for density in (0.001, 0.05, 0.3, 0.5, 0.9, 0.999):
        keep = rng.random((120, 333)) < density
        packed = _packed_mask(keep)
        _, chosen = streams.encode_mask(packed, shape=keep.shape, entropy=True)
        chosen = len(bytes(chosen))
        scan = streams._MaskScan(packed, keep.shape)
        best = packed.nbytes
        for encoding, gap_bits in [("bitmap", 0)] + [("gaps", b) for b in range(1, 9)]:
            symbols = streams._mask_symbols(scan, encoding, gap_bits)
            alphabet = 2 if encoding == "bitmap" else 2**gap_bits
            raw = packed.nbytes if encoding == "bitmap" else -(-symbols.size * gap_bits // 8)
            best = min(best, raw, len(ans.encode(symbols, alphabet)))
        assert chosen <= best * 1.002 + 8, density


@pytest.mark.parametrize("entropy", [False, True])
@pytest.mark.parametrize("shape", [(0,), (1,), (5,), (9, 13), (2, 3, 70), (1, 500)])
@pytest.mark.parametrize("density", [0.0, 0.01, 0.2, 0.6, 1.0])
def test_mask_round_trips_in_small_blocks(shape, density, entropy):
    """Tiny blocks and gap cap: block seams, column blocks and long gaps all count."""
    keep = np.random.default_rng(len(shape)).random(shape) < density
    with mock.patch.object(streams, "_CHUNK", 16), mock.patch.object(streams, "_GAP_CAP", 4):
        small = _round_trip_mask(keep, entropy)
    assert small == _round_trip_mask(keep, entropy)


def test_mask_with_one_far_entry_stays_small():
    keep = np.zeros((1000, 1000), bool)
    keep[-1, -1] = True
    record, size = _round_trip_mask(keep)
    assert record["coding"] == "rans" and size < 100


def test_mask_padding_bits_do_not_count():
    keep = np.random.default_rng(3).random((20, 13)) < 0.1
    packed = _packed_mask(keep)
    packed[:, -1] |= 0xE0  # stray bits past the row end
    record, payload = streams.encode_mask(packed, shape=keep.shape, entropy=True)
    back = streams.decode_mask(
        record, memoryview(bytes(payload)), shape=keep.shape, nnz=int(keep.sum()), where="w"
    )
    np.testing.assert_array_equal(back, _packed_mask(keep))


def test_damaged_gap_mask_is_a_file_format_error():
    keep = np.random.default_rng(4).random((50, 60)) < 0.05
    record, payload = streams.encode_mask(_packed_mask(keep), shape=keep.shape, entropy=False)
    assert record["encoding"] == "gaps"
    nnz = int(keep.sum())
    filler = bytes([0xFF]) * len(bytes(payload))  # every symbol a filler: no kept entries
    with pytest.raises(FileFormatError, match="keeps 0 entries"):
        streams.decode_mask(record, memoryview(filler), shape=keep.shape, nnz=nnz, where="w")
    longer = {**record, "symbols": record["symbols"] * 4}
    # Each symbol 1 advances two entries: 4x the symbols run past a leaf of 1.5x.
    raw = streams.pack_bits(np.full(longer["symbols"], 1, np.uint8), record["gap_bits"])
    short = (longer["symbols"] * 3 // 2,)
    with pytest.raises(FileFormatError, match="past the end"):
        streams.decode_mask(longer, memoryview(raw.tobytes()), shape=short, nnz=nnz, where="w")


def test_damaged_rans_mask_is_a_file_format_error():
    keep = np.random.default_rng(5).random((100, 100)) < 0.03
    record, payload = streams.encode_mask(_packed_mask(keep), shape=keep.shape, entropy=True)
    assert record["coding"] == "rans"
    with pytest.raises(FileFormatError):
        streams.decode_mask(
            record, memoryview(payload[:-3]), shape=keep.shape, nnz=int(keep.sum()), where="w"
        )


# ----------------------------------------------------------------------------- codes


def test_skewed_4_bit_codes_are_coded_near_entropy():
    rng = np.random.default_rng(6)
    codes = np.clip(np.round(rng.normal(7.5, 2.0, (300, 400))), 0, 15).astype(np.uint8)
    packed = streams.pack_bits(codes, 4)
    record, payload = streams.encode_codes(packed, bits=4, shape=codes.shape, entropy=True)
    assert record["coding"] == "rans"
    assert len(payload) <= record["entropy_bits"] / 8 * 1.01
    back = streams.decode_codes(record, memoryview(payload), bits=4, shape=codes.shape, where="w")
    np.testing.assert_array_equal(back, packed)


def test_uniform_codes_stay_packed_without_a_rans_pass():
    codes = np.random.default_rng(7).integers(0, 16, (200, 300)).astype(np.uint8)
    packed = streams.pack_bits(codes, 4)
    with mock.patch.object(ans, "encode", side_effect=AssertionError("encoded")):
        record, payload = streams.encode_codes(packed, bits=4, shape=codes.shape, entropy=True)
    assert record["coding"] == "packed" and payload is packed
