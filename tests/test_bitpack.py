"""bitpack: pack/unpack is the identity for every width, with exact packed sizes."""

import math

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxcompress.core.bitpack import pack, packed_length, unpack


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 13), (2, 4, 64)])
def test_round_trip_and_size(bits, shape):
    codes = np.random.default_rng(bits).integers(0, 2**bits, size=shape).astype(np.uint8)
    packed = pack(jnp.asarray(codes), bits)
    assert packed.dtype == jnp.uint8
    assert packed.shape == (*shape[:-1], math.ceil(shape[-1] * bits / 8))
    assert packed.shape[-1] == packed_length(shape[-1], bits)
    np.testing.assert_array_equal(unpack(packed, bits, shape[-1]), codes)


def test_layout_is_little_endian_end_to_end():
    # 3-bit codes 5 (101), 3 (011), 7 (111) -> stream 1,0,1, 1,1,0, 1,1,1 -> bytes 0b11011101, 0b1
    assert pack(jnp.array([5, 3, 7], jnp.uint8), 3).tolist() == [0b11011101, 0b1]


def test_works_under_jit():
    codes = jnp.arange(16, dtype=jnp.uint8).reshape(2, 8) % 4
    packed = jax.jit(pack, static_argnums=1)(codes, 2)
    np.testing.assert_array_equal(jax.jit(unpack, static_argnums=(1, 2))(packed, 2, 8), codes)


@pytest.mark.parametrize("bits", [0, 9, 2.5, True])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match="bits"):
        pack(jnp.zeros(3, jnp.uint8), bits)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), bits=st.integers(1, 8))
def test_property_identity(data, bits):
    shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=3, max_side=17))
    codes = data.draw(hnp.arrays(np.uint8, shape, elements=st.integers(0, 2**bits - 1)))
    np.testing.assert_array_equal(unpack(pack(jnp.asarray(codes), bits), bits, shape[-1]), codes)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", [1, 5, 8, 13])
def test_bytes_are_the_little_endian_bit_stream(bits, count):
    # The file format: codes laid end to end as a little-endian bit stream (numpy's
    # packbits of each code's bits), whichever route pack takes for this width.
    codes = np.random.default_rng(count).integers(0, 2**bits, size=(3, count)).astype(np.uint8)
    stream = (codes[..., None] >> np.arange(bits, dtype=np.uint8)) & 1
    expected = np.packbits(stream.reshape(3, count * bits), axis=-1, bitorder="little")
    np.testing.assert_array_equal(pack(jnp.asarray(codes), bits), expected)
