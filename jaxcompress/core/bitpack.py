"""Bit-packing of small unsigned codes along the last axis.

Codes of ``bits`` bits (1 to 8) are laid end to end, little-endian within each code
and each byte, so a row of ``n`` codes takes ``ceil(n * bits / 8)`` bytes. Packing
along the last axis keeps the packed array laid out like the codes, so it shards
along the leading axes the same way.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer from 1 to 8, got {bits!r}")


def packed_length(count: int, bits: int) -> int:
    """Bytes that ``count`` codes of ``bits`` bits take in one packed row.

    Example:
        >>> packed_length(10, 4), packed_length(10, 3), packed_length(10, 8)
        (5, 4, 10)
    """
    _check_bits(bits)
    return math.ceil(count * bits / 8)


def pack(codes: jax.Array, bits: int) -> jax.Array:
    """Packs unsigned integer codes below ``2**bits`` along the last axis into uint8.

    Args:
        codes: unsigned or non-negative integer array, every entry ``< 2**bits``.
        bits: bits per code, 1 to 8.

    Returns:
        uint8 array of shape ``(*codes.shape[:-1], ceil(codes.shape[-1] * bits / 8))``.

    Example:
        >>> import jax.numpy as jnp
        >>> pack(jnp.array([1, 2, 3, 15], jnp.uint8), 4).tolist()
        [33, 243]
    """
    _check_bits(bits)
    codes = codes.astype(jnp.uint8)
    if bits == 8:
        return codes
    if 8 % bits == 0:
        # Whole codes per byte: shift each into place and add, with no bit-plane stream
        # (8 / bits times the codes' size) in between. Same bytes as the stream.
        per_byte = 8 // bits
        count = codes.shape[-1]
        padded = packed_length(count, bits) * per_byte
        if padded != count:
            widths = [(0, 0)] * (codes.ndim - 1) + [(0, padded - count)]
            codes = jnp.pad(codes, widths)
        codes = codes.reshape(*codes.shape[:-1], padded // per_byte, per_byte)
        packed = codes[..., 0]
        for j in range(1, per_byte):  # elementwise: fuses with whatever made the codes
            packed = packed | (codes[..., j] << jnp.uint8(j * bits))
        return packed
    # Explicit ranks: the library stays clean under jax_numpy_rank_promotion="raise".
    shifts = jnp.arange(bits, dtype=jnp.uint8).reshape((1,) * codes.ndim + (bits,))
    bit_planes = (codes[..., None] >> shifts) & jnp.uint8(1)
    stream = bit_planes.reshape(*codes.shape[:-1], codes.shape[-1] * bits)
    return jnp.packbits(stream, axis=-1, bitorder="little")


def unpack(packed: jax.Array, bits: int, count: int) -> jax.Array:
    """Inverse of :func:`pack`: the first ``count`` codes of each row, as uint8.

    Example:
        >>> import jax.numpy as jnp
        >>> unpack(jnp.array([33, 243], jnp.uint8), 4, 4).tolist()
        [1, 2, 3, 15]
    """
    _check_bits(bits)
    if bits == 8:
        return packed[..., :count]
    stream = jnp.unpackbits(packed, axis=-1, count=count * bits, bitorder="little")
    bit_planes = stream.reshape(*packed.shape[:-1], count, bits)
    shifts = jnp.arange(bits, dtype=jnp.uint8).reshape((1,) * packed.ndim + (bits,))
    return jnp.sum(bit_planes << shifts, axis=-1, dtype=jnp.uint8)
