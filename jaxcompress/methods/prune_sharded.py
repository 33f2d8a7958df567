"""Magnitude pruning of a weight split over a mesh, shard by shard: nothing is gathered.

Every step runs inside :func:`jax.shard_map` on each device's block:

1. The threshold is the same two-pass radix selection as in :mod:`jaxcompress.prune`,
   with each block's histograms summed over the mesh (``psum`` of 65536 counts).
2. Ties at the threshold are pruned in row-major order, as on one device: a second
   radix selection, over the global row-major positions of the tied entries, finds
   the last tied position to prune.
3. The kept values are packed in row-major order, as :class:`~jaxcompress.Sparse`
   stores them. Each row segment of a block knows how many entries are kept before
   it from the kept counts of all row segments (one count per row and column shard,
   ``1 / (block columns)`` of the weight, all-gathered); each device scatters its
   values to their global positions and a ``psum_scatter`` leaves every device its
   slice of the values.

The result is bit-identical to :func:`jaxcompress.methods.prune.magnitude_sparse` on the
gathered weight; its mask keeps the weight's sharding and its values are split over
the same mesh axes (or replicated, where their count does not divide), as
:func:`jaxcompress.sharding.spec_for` lays them out.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxcompress.arrays import Sparse
from jaxcompress.core.mesh import axis_names, devices_along

_DIGIT_BITS = 16
_BINS = 1 << _DIGIT_BITS
_NO_POSITION = np.uint32(0xFFFFFFFF)


def split_layout(x: Any) -> tuple[Mesh, PartitionSpec] | None:
    """``(mesh, spec)`` where this module can prune ``x`` shard by shard, else ``None``.

    That is a concrete array with a ``NamedSharding`` (or, under ``jit``, a traced one
    whose type carries ``Explicit`` mesh axes) that is split over at least one mesh
    axis, with every split dimension dividing evenly and, where the last axis is
    split, whole bytes of packed mask per block.

    Example:
        >>> import jax.numpy as jnp
        >>> split_layout(jnp.ones((8, 8))) is None
        True
    """
    if isinstance(x, jax.core.Tracer):
        sharding = jax.typeof(x).sharding
        mesh = getattr(sharding, "mesh", None)
        if mesh is None or not any(t == AxisType.Explicit for t in mesh.axis_types):
            return None
    elif isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding):
        sharding = x.sharding
        if x.is_fully_replicated:
            return None
    else:
        return None
    mesh = sharding.mesh
    shape = tuple(x.shape)
    spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
    devices = [devices_along(mesh, entry) for entry in spec]
    if not shape or math.prod(devices) == 1 or math.prod(shape) >= 2**31:
        return None
    if any(dim % count for dim, count in zip(shape, devices, strict=True)):
        return None
    if devices[-1] > 1 and (shape[-1] // devices[-1]) % 8:
        return None
    return mesh, PartitionSpec(*spec)


def _spec_axes(spec: PartitionSpec) -> tuple[str, ...]:
    return tuple(name for entry in spec for name in axis_names(entry))


def _keys(block: jax.Array) -> jax.Array:
    """``|block|`` as uint32 keys that order like the magnitudes (float32 bit patterns)."""
    return jax.lax.bitcast_convert_type(jnp.abs(block.astype(jnp.float32)), jnp.uint32)


def _histogram(digits: jax.Array, valid: jax.Array) -> jax.Array:
    # Invalid entries go to an extra bin that is dropped.
    index = jnp.where(valid, digits.astype(jnp.int32), _BINS)
    return jnp.zeros(_BINS + 1, jnp.int32).at[index].add(1)[:_BINS]


def _select_bin(histogram: jax.Array, k: jax.Array, below: jax.Array):
    """The first bin whose cumulative count (after ``below``) reaches ``k``."""
    cumulative = below + jnp.cumsum(histogram)
    index = jnp.minimum(jnp.searchsorted(cumulative, k, side="left"), _BINS - 1)
    return index.astype(jnp.uint32), cumulative[index] - histogram[index]


def _block_start(spec: PartitionSpec, block_shape: tuple[int, ...]) -> list[jax.Array]:
    """This device's block offset along every axis (inside ``shard_map``)."""
    starts = []
    for entry, size in zip(spec, block_shape, strict=True):
        index = jnp.zeros((), jnp.int32)
        for name in axis_names(entry):
            index = index * jax.lax.axis_size(name) + jax.lax.axis_index(name)
        starts.append(index * size)
    return starts


def _positions(spec: PartitionSpec, block_shape: tuple[int, ...], shape: tuple[int, ...]):
    """The global row-major position of every entry of this device's block (uint32)."""
    starts = _block_start(spec, block_shape)
    position = jnp.zeros(block_shape, jnp.uint32)
    for axis, start in enumerate(starts):
        stride = math.prod(shape[axis + 1 :])
        along = jax.lax.broadcasted_iota(jnp.uint32, block_shape, axis) + start.astype(jnp.uint32)
        position = position + along * np.uint32(stride)
    return position


def _kth(histogram_of, k: jax.Array) -> jax.Array:
    """The ``k``-th smallest key (``k >= 1``) from a function giving summed histograms."""
    high = histogram_of(jnp.uint32(0), jnp.bool_(False))
    high_bin, below = _select_bin(high, k, jnp.int32(0))
    low = histogram_of(high_bin, jnp.bool_(True))
    low_bin, _ = _select_bin(low, k, below)
    return (high_bin << _DIGIT_BITS) | low_bin


def _summed_histogram(keys_of, weight, operand, high_bin, low_pass, *, mesh, spec):
    """The histogram of one radix digit of ``keys_of(block, operand)`` over every block.

    ``low_pass`` False: the high 16 bits of every valid key; True: the low 16 bits of
    the valid keys whose high bits are ``high_bin``. Each block bins its own keys and
    a ``psum`` of the 65536 counts combines them.
    """
    axes = _spec_axes(spec)

    def local(block, operand, high_bin, low_pass):
        keys, valid = keys_of(block, operand)
        in_bin = valid & (~low_pass | ((keys >> _DIGIT_BITS) == high_bin))
        digits = jnp.where(low_pass, keys & (_BINS - 1), keys >> _DIGIT_BITS)
        return jax.lax.psum(_histogram(digits, in_bin), axes)

    replicated = PartitionSpec()
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(spec, replicated, replicated, replicated),
        out_specs=replicated,
    )(weight, operand, high_bin, low_pass)


def _magnitude(block: jax.Array, _: Any) -> tuple[jax.Array, jax.Array]:
    return _keys(block), jnp.ones(block.shape, bool)


@functools.partial(jax.jit, static_argnames=("mesh", "spec"))
def magnitude_histogram(
    weight: jax.Array, high_bin: jax.Array, low_pass: jax.Array, *, mesh: Mesh, spec: PartitionSpec
) -> jax.Array:
    """One radix digit's histogram of ``|weight|``'s keys, binned block by block.

    The split-weight twin of the histogram passes of
    :func:`jaxcompress.prune.kth_smallest_key` (a global threshold over many leaves).

    Example:
        >>> import jax
        >>> from jax.sharding import NamedSharding, PartitionSpec as P
        >>> mesh = jax.make_mesh((len(jax.devices()),), ("x",))
        >>> w = jax.device_put(jnp.ones((len(jax.devices()), 4)), NamedSharding(mesh, P("x")))
        >>> int(magnitude_histogram(w, jnp.uint32(0), jnp.bool_(False), mesh=mesh,
        ...                         spec=P("x", None)).sum()) == w.size
        True
    """
    return _summed_histogram(
        _magnitude, weight, jnp.uint32(0), high_bin, low_pass, mesh=mesh, spec=spec
    )


def _below(block: jax.Array, threshold: jax.Array, axes: tuple[str, ...]):
    keys = _keys(block)
    below = jnp.sum(keys < threshold, dtype=jnp.int32)
    tied = jnp.sum(keys == threshold, dtype=jnp.int32)
    return jax.lax.psum(below, axes), jax.lax.psum(tied, axes)


@functools.partial(jax.jit, static_argnames=("mesh", "spec"))
def below_and_tied(
    weight: jax.Array, threshold: jax.Array, *, mesh: Mesh, spec: PartitionSpec
) -> tuple[jax.Array, jax.Array]:
    """How many keys of ``|weight|`` are below and equal to ``threshold``, block by block.

    Example:
        >>> import jax
        >>> from jax.sharding import NamedSharding, PartitionSpec as P
        >>> mesh = jax.make_mesh((len(jax.devices()),), ("x",))
        >>> w = jax.device_put(jnp.ones((len(jax.devices()), 4)), NamedSharding(mesh, P("x")))
        >>> below, tied = below_and_tied(w, jnp.uint32(0x3F800000), mesh=mesh, spec=P("x", None))
        >>> int(below), int(tied) == w.size
        (0, True)
    """
    replicated = PartitionSpec()
    return jax.shard_map(
        functools.partial(_below, axes=_spec_axes(spec)),
        mesh=mesh,
        in_specs=(spec, replicated),
        out_specs=(replicated, replicated),
    )(weight, threshold)


_UINTS = {2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}


def _to_bits(x: jax.Array) -> jax.Array:
    """``x``'s bit patterns as unsigned integers of at least 32 bits."""
    bits = jax.lax.bitcast_convert_type(x, _UINTS[x.dtype.itemsize])
    return bits.astype(jnp.uint32) if x.dtype.itemsize < 4 else bits


def _from_bits(bits: jax.Array, dtype: np.dtype) -> jax.Array:
    """The inverse of :func:`_to_bits`."""
    uint = _UINTS[np.dtype(dtype).itemsize]
    return jax.lax.bitcast_convert_type(bits.astype(uint), dtype)


@functools.partial(jax.jit, static_argnames=("nnz", "mesh", "spec"))
def _sharded_sparse(weight: jax.Array, num_pruned: jax.Array, *, nnz: int, mesh, spec):
    shape = tuple(weight.shape)
    axes = _spec_axes(spec)
    shards = math.prod(mesh.shape[a] for a in axes)
    replicated = PartitionSpec()
    k = num_pruned.astype(jnp.int32)
    histogram = functools.partial(_summed_histogram, mesh=mesh, spec=spec)

    threshold = _kth(functools.partial(histogram, _magnitude, weight, jnp.uint32(0)), k)
    below, _ = below_and_tied(weight, threshold, mesh=mesh, spec=spec)
    ties = k - below

    def tied_positions(block, threshold):
        return _positions(spec, block.shape, shape), _keys(block) == threshold

    # The last tied position to prune (ties go in row-major order); none when ties == 0.
    last_tie = _kth(functools.partial(histogram, tied_positions, weight, threshold), ties)

    def local(block, threshold, ties, last_tie):
        keys = _keys(block)
        position = _positions(spec, block.shape, shape)
        tied = keys == threshold
        keep = (keys > threshold) | (tied & ((ties <= 0) | (position > last_tie)))
        packed = jnp.packbits(keep, axis=-1, bitorder="little")
        # Kept entries before each row segment: exclusive prefix over every (row, column
        # shard) count, in row-major order.
        counts = jnp.sum(keep, axis=-1, keepdims=True, dtype=jnp.int32)
        every = counts
        for axis, entry in enumerate(spec):
            if axis_names(entry):
                every = jax.lax.all_gather(every, axis_names(entry), axis=axis, tiled=True)
        before = (jnp.cumsum(every.reshape(-1)) - every.reshape(-1)).reshape(every.shape)
        starts = _block_start(spec, block.shape)
        starts[-1] = starts[-1] // block.shape[-1]
        before = jax.lax.dynamic_slice(before, starts, counts.shape)
        kept = keep.astype(jnp.int32)
        rank = before + jnp.cumsum(kept, axis=-1) - kept
        slots = -(-nnz // shards) * shards
        target = jnp.where(keep, rank, slots).reshape(-1)
        # Summed as bit patterns: every slot is set on one device only, and a float sum
        # would flush subnormals to zero (XLA on CPU) and turn -0.0 into +0.0.
        bits = _to_bits(block.reshape(-1))
        values = jnp.zeros(slots, bits.dtype).at[target].set(bits, mode="drop")
        if nnz % shards:
            return packed, _from_bits(jax.lax.psum(values, axes)[:nnz], block.dtype)
        summed = jax.lax.psum_scatter(values, axes, scatter_dimension=0, tiled=True)
        return packed, _from_bits(summed, block.dtype)

    values_spec = PartitionSpec(axes if len(axes) > 1 else axes[0])
    packed, values = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(spec, replicated, replicated, replicated),
        out_specs=(spec, replicated if nnz % shards else values_spec),
    )(weight, threshold, ties, last_tie)
    return values, packed


def sharded_magnitude_sparse(
    weight: jax.Array, num_pruned: int, layout: tuple[Mesh, PartitionSpec]
) -> Sparse:
    """Prunes the ``num_pruned`` smallest-magnitude entries of a split ``weight``.

    The same leaf as :func:`jaxcompress.methods.prune.magnitude_sparse` (ties pruned in
    row-major order), computed block by block on ``layout`` (from
    :func:`split_layout`) without gathering the weight.

    Example:
        >>> import jax
        >>> from jax.sharding import NamedSharding, PartitionSpec as P
        >>> mesh = jax.make_mesh((len(jax.devices()),), ("x",))
        >>> w = jax.device_put(jnp.arange(16.0 * len(jax.devices())).reshape(-1, 16),
        ...                    NamedSharding(mesh, P("x")))
        >>> sparse = sharded_magnitude_sparse(w, w.size // 2, split_layout(w))
        >>> bool((sparse.materialize() == jnp.where(w >= w.size // 2, w, 0)).all())
        True
    """
    mesh, spec = layout
    size = math.prod(weight.shape)
    values, packed = _sharded_sparse(
        weight, jnp.asarray(num_pruned, jnp.int32), nnz=size - num_pruned, mesh=mesh, spec=spec
    )
    return Sparse(values, packed, tuple(weight.shape), np.dtype(weight.dtype))
