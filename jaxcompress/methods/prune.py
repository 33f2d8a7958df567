"""Unstructured pruning (magnitude, Wanda, SparseGPT) into :class:`~jaxcompress.Sparse` leaves."""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import cast

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType

from jaxcompress.arrays import Sparse
from jaxcompress.arrays.leading import from_leading, to_leading
from jaxcompress.arrays.lowrank import matrix_shape
from jaxcompress.calibration.lookup import LeafGram, leaf_gram, require_data
from jaxcompress.core.checks import is_traced
from jaxcompress.core.mesh import unsharded
from jaxcompress.methods.prune_sharded import (
    below_and_tied,
    magnitude_histogram,
    sharded_magnitude_sparse,
    split_layout,
)
from jaxcompress.numerics.obs import (
    check_block_size,
    check_damp,
    check_factorized,
    mesh_scope,
    relative_output_error,
)
from jaxcompress.numerics.sparsegpt import prefix_counts, sparsegpt
from jaxcompress.numerics.wanda import wanda_keep, wanda_scores
from jaxcompress.transforms.base import Transform, lazy_map
from jaxcompress.transforms.engine import per_leaf
from jaxcompress.transforms.filters import Filter, kernels
from jaxcompress.transforms.stats import PruneStats

_SCOPES = ("layer", "global")
_IMPORTANCES = ("magnitude", "wanda", "sparsegpt")
_COMPARISONS = ("layer", "output")


def check_sparsity(sparsity: object) -> Fraction:
    """``sparsity`` as the exact decimal the user wrote, or a ``TypeError``/``ValueError``.

    Example:
        >>> check_sparsity(0.29)
        Fraction(29, 100)
    """
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
        raise TypeError(f"prune: sparsity must be a real number in [0, 1), got {sparsity!r}")
    value = float(sparsity)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"prune: sparsity must be in [0, 1), got {sparsity!r}")
    # The decimal the user wrote, so floor(0.29 * 100) is 29 and not 28.
    return Fraction(repr(value))


def pruned_count(sparsity: float, size: int) -> int:
    """``floor(sparsity * size)``, computed on the decimal value of ``sparsity``.

    Example:
        >>> pruned_count(0.29, 100), pruned_count(0.9, 7)
        (29, 6)
    """
    return math.floor(check_sparsity(sparsity) * size)


def _int_dtype():
    return jnp.int64 if jax.config.x64_enabled else jnp.int32


def magnitude_keep_mask(weight: jax.Array, num_pruned: int | jax.Array) -> jax.Array:
    """The keep-mask zeroing the ``num_pruned`` smallest-magnitude entries of ``weight``.

    Ties are broken deterministically: among equal magnitudes the entry with the
    lower row-major index is pruned first. ``num_pruned`` may be traced (for example a
    count from a sparsity schedule inside a jitted training step). The threshold is
    found by a two-pass radix selection over histograms of the magnitudes' bit
    patterns (:func:`kth_smallest_key`), so nothing is sorted.

    Args:
        weight: a floating-point array with at least one dimension.
        num_pruned: how many entries to zero, ``0 <= num_pruned <= weight.size``.

    Returns:
        A boolean array shaped like ``weight``, ``False`` where an entry is pruned.

    Example:
        >>> import jax.numpy as jnp
        >>> magnitude_keep_mask(jnp.array([[3.0, -1.0], [1.0, 2.0]]), 2).tolist()
        [[True, False], [False, True]]
    """
    weight = unsharded(weight)
    return _keep_mask(magnitude_keys(weight), jnp.asarray(num_pruned, _int_dtype())).reshape(
        weight.shape
    )


def magnitude_keys(values: jax.Array) -> jax.Array:
    """``|values|`` as uint32 keys that sort like the magnitudes, shaped like ``values``.

    The float32 bit pattern of a non-negative float orders like the float itself, so
    selection can count and bin integer keys; float16 and bfloat16 widen exactly.
    The shape is kept so that binning a sharded weight never reshapes (and so
    gathers) it.

    Example:
        >>> import jax.numpy as jnp
        >>> k = magnitude_keys(jnp.array([-2.0, 0.5, 1.0]))
        >>> (k[1] < k[2]) & (k[2] < k[0])
        Array(True, dtype=bool)
    """
    magnitudes = jnp.abs(values.astype(jnp.float32))
    return jax.lax.bitcast_convert_type(magnitudes, jnp.uint32)


_DIGIT_BITS = 16
_BINS = 1 << _DIGIT_BITS


def _high_histogram(keys: jax.Array) -> jax.Array:
    return jnp.zeros(_BINS, _int_dtype()).at[(keys >> _DIGIT_BITS).astype(jnp.int32)].add(1)


def _low_histogram(keys: jax.Array, high_bin: jax.Array) -> jax.Array:
    in_bin = (keys >> _DIGIT_BITS).astype(jnp.int32) == high_bin
    low = jnp.where(in_bin, (keys & (_BINS - 1)).astype(jnp.int32), _BINS)
    return jnp.zeros(_BINS + 1, _int_dtype()).at[low].add(1)[:_BINS]


def _select_bin(histogram: jax.Array, k: jax.Array, below: jax.Array):
    """The first bin whose cumulative count (after ``below``) reaches ``k``."""
    cumulative = below + jnp.cumsum(histogram)
    index = jnp.minimum(jnp.searchsorted(cumulative, k, side="left"), _BINS - 1)
    return index.astype(jnp.int32), cumulative[index] - histogram[index]


def kth_smallest_key(
    keys: Sequence[jax.Array],
    k: jax.Array,
    *,
    to_keys: Callable[[jax.Array], jax.Array] | None = None,
) -> jax.Array:
    """The ``k``-th smallest uint32 key over all arrays (``k >= 1``; 0 for ``k == 0``).

    Two passes of a radix selection: a histogram of the high 16 bits of every key
    finds the bin holding the ``k``-th key; a histogram of the low 16 bits of the keys
    in that bin finds the key. Memory is two histograms of 65536 counts whatever the
    number of keys, and arrays are binned one at a time, never concatenated. With
    ``to_keys``, ``keys`` are arrays that ``to_keys`` turns into keys inside each pass
    (so the keys of only one array exist at a time).

    Example:
        >>> import jax.numpy as jnp
        >>> keys = [jnp.array([5, 70000, 3], jnp.uint32), jnp.array([9], jnp.uint32)]
        >>> [int(kth_smallest_key(keys, jnp.int32(k))) for k in (1, 2, 3, 4)]
        [3, 5, 9, 70000]
    """
    convert = to_keys or _identity
    k = jnp.asarray(k, _int_dtype())
    # sum() types its start, the int 0, into the result; over arrays it is an array.
    high = cast(jax.Array, sum(_digit_histogram(convert, x, None) for x in keys))
    high_bin, below = _select_bin(high, k, jnp.zeros((), _int_dtype()))
    low = cast(jax.Array, sum(_digit_histogram(convert, x, high_bin) for x in keys))
    low_bin, _ = _select_bin(low, k, below)
    return (high_bin.astype(jnp.uint32) << _DIGIT_BITS) | low_bin.astype(jnp.uint32)


def _identity(x: jax.Array) -> jax.Array:
    return x


def _digit_histogram(convert: Callable, x: jax.Array, high_bin: jax.Array | None) -> jax.Array:
    """The high-digit histogram (``high_bin`` None) or the low one within ``high_bin``.

    A weight split over a mesh is binned block by block (magnitude keys only), so the
    global threshold never gathers it.
    """
    layout = split_layout(x) if convert is magnitude_keys else None
    if layout is not None:
        mesh, spec = layout
        low_pass = high_bin is not None
        high = jnp.uint32(0) if high_bin is None else high_bin.astype(jnp.uint32)
        histogram = magnitude_histogram(x, high, jnp.bool_(low_pass), mesh=mesh, spec=spec)
        return histogram.astype(_int_dtype())
    return _jit_high(convert, x) if high_bin is None else _jit_low(convert, x, high_bin)


def _counts_at(convert: Callable, x: jax.Array, threshold: jax.Array):
    """How many keys of ``x`` are below and tied with ``threshold``."""
    layout = split_layout(x) if convert is magnitude_keys else None
    if layout is not None:
        mesh, spec = layout
        below, tied = below_and_tied(x, threshold, mesh=mesh, spec=spec)
        return below.astype(_int_dtype()), tied.astype(_int_dtype())
    return _below_and_tied(convert, x, threshold)


@functools.partial(jax.jit, static_argnums=0)
def _jit_high(convert: Callable, x: jax.Array) -> jax.Array:
    return _high_histogram(convert(x))


@functools.partial(jax.jit, static_argnums=0)
def _jit_low(convert: Callable, x: jax.Array, high_bin: jax.Array) -> jax.Array:
    return _low_histogram(convert(x), high_bin)


@jax.jit
def _keep_mask(keys: jax.Array, num_pruned: jax.Array) -> jax.Array:
    keys = keys.reshape(-1)
    threshold = kth_smallest_key([keys], num_pruned)
    below = keys < threshold
    tied = keys == threshold
    # Entries tied at the threshold are pruned in row-major order until the count is met.
    ties_to_prune = num_pruned - jnp.sum(below, dtype=_int_dtype())
    tie_rank = jnp.cumsum(tied, dtype=_int_dtype()) - 1
    return ~below & ~(tied & (tie_rank < ties_to_prune))


def sparse_from_mask(weight: jax.Array, keep: jax.Array, nnz: int) -> Sparse:
    """A :class:`~jaxcompress.Sparse` leaf holding ``weight`` where ``keep`` is true.

    Args:
        weight: the dense array.
        keep: a boolean mask shaped like ``weight``.
        nnz: the number of true entries of ``keep`` (static, it sizes ``values``).

    Example:
        >>> import jax.numpy as jnp
        >>> w = jnp.array([[3.0, -1.0], [1.0, 2.0]])
        >>> sparse_from_mask(w, jnp.abs(w) > 1.5, 2).values.tolist()
        [3.0, 2.0]
    """
    weight = unsharded(weight)
    keep = unsharded(keep)
    if is_traced(weight) or is_traced(keep):
        kept_index = jnp.flatnonzero(keep.reshape(-1), size=nnz)
        values = _gather_exactly(weight.reshape(-1), kept_index)
    else:
        # One program per leaf shape, not per kept count: with a global threshold every
        # leaf keeps a different count, and compiling once per leaf dominated big models.
        values = jax.lax.slice(_kept_values_first(weight, keep), (0,), (nnz,))
    mask = jnp.packbits(keep, axis=-1, bitorder="little")
    return Sparse(values, mask, tuple(weight.shape), np.dtype(weight.dtype))


@jax.jit
def _kept_values_first(weight: jax.Array, keep: jax.Array) -> jax.Array:
    """``weight``'s kept values in row-major order, then filler up to the full size."""
    kept_index = jnp.flatnonzero(keep.reshape(-1), size=keep.size, fill_value=0)
    return _gather_exactly(weight.reshape(-1), kept_index)


def _gather_exactly(values: jax.Array, index: jax.Array) -> jax.Array:
    """``values[index]`` gathered as bit patterns.

    XLA partitions a gather from a sharded operand into masked gathers and a sum over
    the devices; as floats that sum flushes subnormals to zero (on CPU) and turns
    -0.0 into +0.0, as unsigned integers it is exact.
    """
    uint = {2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}[values.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(values, uint)[index]
    return jax.lax.bitcast_convert_type(bits, values.dtype)


def magnitude_sparse(weight: jax.Array, num_pruned: int) -> Sparse:
    """Prunes the ``num_pruned`` smallest-magnitude entries of ``weight``.

    Ties are broken deterministically: among equal magnitudes the entry with the
    lower row-major index is pruned first (the mask is :func:`magnitude_keep_mask`).
    Works under ``jit`` (``num_pruned`` is static).

    Args:
        weight: a floating-point array with at least one dimension.
        num_pruned: how many entries to zero, ``0 <= num_pruned <= weight.size``.

    Returns:
        A :class:`~jaxcompress.Sparse` leaf with ``weight.size - num_pruned`` values.

    Example:
        >>> import jax.numpy as jnp
        >>> magnitude_sparse(jnp.array([[3.0, -1.0], [1.0, 2.0]]), 2).materialize().tolist()
        [[3.0, 0.0], [0.0, 2.0]]
    """
    size = math.prod(weight.shape)
    layout = split_layout(weight)
    if layout is not None and num_pruned < size:
        # Block by block on the mesh: the weight is never gathered.
        return sharded_magnitude_sparse(weight, num_pruned, layout)
    if _on_one_device(weight):
        return _compact_magnitude_sparse(weight, num_pruned)
    keep = magnitude_keep_mask(weight, num_pruned)
    return sparse_from_mask(weight, keep, size - num_pruned)


def _on_one_device(x: jax.Array) -> bool:
    """A concrete array held whole by one device (the eager, memory-bounded path)."""
    if is_traced(x) or not isinstance(x, jax.Array):
        return False
    return len(x.sharding.device_set) == 1


# Kept values are packed this many entries at a time, so no index array of the
# leaf's size ever exists.
_CHUNK = 1 << 16


def _capacity(nnz: int, size: int) -> int:
    """Room for ``nnz`` kept values: one of 8 lengths per power of two, at most ``size``.

    Under a global threshold every leaf keeps a different count; rounding it up lets
    leaves of one shape share a few programs instead of compiling one per count.
    """
    step = 1 << max(0, nnz.bit_length() - 4)
    return max(1, min(size, -(-nnz // step) * step))


def _compact_magnitude_sparse(weight: jax.Array, num_pruned: int) -> Sparse:
    """:func:`magnitude_sparse` of a weight on one device, in bounded memory.

    One program per shape finds the mask (exactly :func:`magnitude_keep_mask`'s) and
    packs it; a small one per shape and capacity writes the kept values chunk by
    chunk. The only leaf-sized temporaries are the magnitude keys and the mask.
    """
    weight = unsharded(weight)
    size = math.prod(weight.shape)
    nnz = size - num_pruned
    keep, mask = _magnitude_mask_and_bits(weight, jnp.asarray(num_pruned, _int_dtype()))
    values = _kept_values(weight, keep, capacity=_capacity(nnz, size))
    del keep
    if values.shape[0] != nnz:
        values = jax.lax.slice(values, (0,), (nnz,))
    return Sparse(values, mask, tuple(weight.shape), np.dtype(weight.dtype))


@jax.jit
def _magnitude_mask_and_bits(weight: jax.Array, num_pruned: jax.Array):
    """``(flat keep-mask, packed keep-mask)`` of :func:`magnitude_keep_mask`, as one program."""
    keys = magnitude_keys(weight).reshape(-1)
    threshold = kth_smallest_key([keys], num_pruned)
    ties_to_prune = num_pruned - jnp.sum(keys < threshold, dtype=_int_dtype())
    tied = jnp.sum(keys == threshold, dtype=_int_dtype())

    def all_ties_pruned(keys):
        return keys > threshold

    def some_ties_kept(keys):
        # As in _keep_mask: tied entries are pruned in row-major order.
        below, at = keys < threshold, keys == threshold
        tie_rank = jnp.cumsum(at, dtype=_int_dtype()) - 1
        return ~below & ~(at & (tie_rank < ties_to_prune))

    # Usually every tied entry goes (continuous weights tie only at the threshold
    # itself), so the leaf-sized rank is rarely computed.
    keep = jax.lax.cond(tied == ties_to_prune, all_ties_pruned, some_ties_kept, keys)
    return keep, jnp.packbits(keep.reshape(weight.shape), axis=-1, bitorder="little")


@functools.partial(jax.jit, static_argnames=("capacity",))
def _kept_values(weight: jax.Array, keep: jax.Array, *, capacity: int) -> jax.Array:
    return _kept_in_chunks(weight.reshape(-1), keep, capacity)


def _kept_in_chunks(flat: jax.Array, keep: jax.Array, capacity: int) -> jax.Array:
    """The entries of ``flat`` where ``keep``, in order, in ``capacity`` slots (zero filler).

    A loop over chunks of ``_CHUNK`` entries: each chunk's kept values are scattered
    to their positions after the values kept before it, so the temporaries are one
    chunk long. The last chunk is read ending at the array's end; its entries that
    an earlier chunk already covered are skipped.
    """
    n = flat.shape[0]
    chunk = min(_CHUNK, n)
    lanes = jnp.arange(chunk, dtype=jnp.int32)

    def body(i, state):
        out, offset = state
        start = i * chunk
        begin = jnp.minimum(start, n - chunk)
        kept = jax.lax.dynamic_slice(keep, (begin,), (chunk,)) & (begin + lanes >= start)
        values = jax.lax.dynamic_slice(flat, (begin,), (chunk,))
        rank = jnp.cumsum(kept, dtype=jnp.int32) - 1
        # Entries not kept go out of bounds and are dropped.
        where = jnp.where(kept, offset + rank, capacity)
        out = out.at[where].set(values, mode="drop")
        return out, offset + jnp.sum(kept, dtype=jnp.int32)

    out = jnp.zeros((capacity,), flat.dtype)
    out, _ = jax.lax.fori_loop(0, -(-n // chunk), body, (out, jnp.int32(0)))
    return out


@functools.partial(jax.jit, static_argnums=0)
def _below_and_tied(convert: Callable, x: jax.Array, threshold: jax.Array):
    keys = convert(x)
    below = jnp.sum(keys < threshold, dtype=_int_dtype())
    return below, jnp.sum(keys == threshold, dtype=_int_dtype())


def keep_one_per_output(
    weight: jax.Array, sparse: Sparse, num_pruned: int, *, outputs_first: bool = False
) -> tuple[Sparse, int]:
    """``sparse`` (``weight`` with ``num_pruned`` entries pruned), or, if that empties an
    output unit (an index of the last axis; of the first with ``outputs_first``, an
    equinox ``(out, in)`` weight), the same count pruned with each unit's
    largest-magnitude entry kept: ``(Sparse, entries pruned)``.

    Needs concrete arrays. Ties go by row-major index, as in :func:`magnitude_sparse`.

    Example:
        >>> import jax.numpy as jnp
        >>> w = jnp.array([[3.0, 0.25], [2.0, 0.5]])  # the 2 smallest empty column 1
        >>> sparse, count = keep_one_per_output(w, magnitude_sparse(w, 2), 2)
        >>> sparse.materialize().tolist(), count
        ([[3.0, 0.0], [0.0, 0.5]], 2)
    """
    first = outputs_first and weight.ndim >= 2
    units = (weight.shape[0] if first else weight.shape[-1]) if weight.ndim >= 2 else 1
    mask = sparse.keep_mask()
    kept_per_unit = (
        jnp.any(mask.reshape(units, -1), axis=1)
        if first
        else jnp.any(mask.reshape(-1, units), axis=0)
    )
    if bool(jnp.all(kept_per_unit)):
        return sparse, num_pruned
    weight = unsharded(weight)
    num_pruned = min(num_pruned, weight.size - units)
    # A numpy leaf has no sharding.
    mesh = getattr(getattr(weight, "sharding", None), "mesh", None)
    explicit = isinstance(mesh, jax.sharding.Mesh) and AxisType.Explicit in mesh.axis_types
    # Eager programs on a weight with Explicit mesh axes need that mesh in context.
    with jax.set_mesh(mesh) if explicit else contextlib.nullcontext():
        keep = _keep_strongest_per_unit(
            weight, jnp.asarray(num_pruned, _int_dtype()), outputs_first=first
        )
    return sparse_from_mask(weight, keep, weight.size - num_pruned), num_pruned


@functools.partial(jax.jit, static_argnames="outputs_first")
def _keep_strongest_per_unit(
    weight: jax.Array, num_pruned: jax.Array, *, outputs_first: bool = False
) -> jax.Array:
    """The keep-mask pruning ``num_pruned`` entries, never an output unit's largest."""
    # Integer keys, not floats: XLA on CPU compares subnormal floats as zeros.
    keys = magnitude_keys(weight)
    if outputs_first:
        # One unit per row of (out, everything else).
        keys = keys.reshape(weight.shape[0], -1)
        columns = jax.lax.broadcasted_iota(jnp.int32, keys.shape, 1)
        strongest = columns == jnp.argmax(keys, axis=1)[:, None]
    else:
        keys = keys.reshape(-1, weight.shape[-1] if weight.ndim >= 2 else 1)
        rows = jax.lax.broadcasted_iota(jnp.int32, keys.shape, 0)
        strongest = rows == jnp.argmax(keys, axis=0)[None, :]
    protected = jnp.where(strongest, jnp.uint32(np.iinfo(np.uint32).max), keys)
    return _keep_mask(protected, num_pruned).reshape(weight.shape)


def global_counts(weights: list[jax.Array], total_pruned: int | jax.Array) -> list[jax.Array]:
    """Per-weight prune counts from one global magnitude threshold; works under ``jit``.

    Exactly ``total_pruned`` entries are pruned over all weights (which may be traced).
    Entries tied at the threshold are pruned in leaf order, then row-major order
    (within a leaf, :func:`magnitude_keep_mask` breaks the ties). The threshold comes
    from a streaming radix selection (:func:`kth_smallest_key`): each weight is binned
    on its own, never sorted or concatenated with the others.

    Example:
        >>> import jax.numpy as jnp
        >>> [int(c) for c in global_counts([jnp.array([1.0, 2.0]), jnp.array([1.0, 9.0])], 2)]
        [1, 1]
    """
    # Split weights are binned block by block; others whole (Explicit axes refuse that).
    binned = lazy_map(lambda w: w if split_layout(w) is not None else unsharded(w), weights)
    total = jnp.asarray(total_pruned, _int_dtype())
    threshold = kth_smallest_key(binned, total, to_keys=magnitude_keys)
    # One counting pass per weight (each reads the whole weight).
    at_threshold = [_counts_at(magnitude_keys, w, threshold) for w in binned]
    counts, ties_left = [], total - sum(below for below, _ in at_threshold)
    # Ties at the threshold go to the earlier leaves first.
    for below, tied in at_threshold:
        from_ties = jnp.minimum(tied, ties_left)
        ties_left = ties_left - from_ties
        counts.append(below + from_ties)
    return counts


def global_pruned_counts(weights: list[jax.Array], sparsity: float) -> list[int]:
    """How many entries of each weight one global magnitude threshold prunes.

    Exactly ``floor(sparsity * total)`` entries are pruned over all weights. Entries
    tied at the threshold are pruned in leaf order, then row-major order.

    Example:
        >>> import jax.numpy as jnp
        >>> global_pruned_counts([jnp.array([1.0, 2.0, 3.0]), jnp.array([0.5, 9.0])], 0.6)
        [2, 1]
    """
    total = sum(math.prod(w.shape) for w in weights)
    total_pruned = pruned_count(sparsity, total)
    if total_pruned == 0:
        return [0] * len(weights)
    return [int(count) for count in global_counts(weights, total_pruned)]


@functools.partial(jax.jit, static_argnames=("fan_in", "importance", "comparison", "block"))
def _data_aware_mask(weight, gram, counts, *, fan_in, importance, comparison, damp, block):
    """``(values, keep, stats)`` of one leaf under a data-aware importance, as one program.

    ``counts`` (traced, so every sparsity shares the program): the layer's total for
    Wanda's layer group, per-column counts for its output group, per-block counts for
    SparseGPT.
    """
    shape = tuple(weight.shape)
    m, n = matrix_shape(shape, fan_in)
    matrix = unsharded(weight).reshape(m, n)
    gram = unsharded(gram)
    if importance == "wanda":
        keep = wanda_keep(matrix, gram, counts, comparison=comparison)
        stats = {
            "relative_output_error": relative_output_error(
                matrix.astype(jnp.float32), jnp.where(keep, matrix, 0.0).astype(jnp.float32), gram
            )
        }
        values = weight
    else:
        with mesh_scope(matrix):
            values, keep, stats = sparsegpt(matrix, gram, counts, damp=damp, block_size=block)
        values = values.astype(weight.dtype).reshape(shape)
    return values, keep.reshape(shape), stats


@functools.partial(jax.jit, static_argnames=("nnz",))
def _sparse_from_mask(weight: jax.Array, keep: jax.Array, nnz: int) -> Sparse:
    """:func:`sparse_from_mask` (the same leaf), by a stable sort: it compiles faster."""
    weight, keep = unsharded(weight), unsharded(keep)
    kept_index = jnp.argsort(jnp.logical_not(keep.reshape(-1)), stable=True)[:nnz]
    mask = jnp.packbits(keep, axis=-1, bitorder="little")
    return Sparse(weight.reshape(-1)[kept_index], mask, tuple(weight.shape), np.dtype(weight.dtype))


def _data_aware_leaf(weight, gram, *, fan_in, count, importance, comparison, fraction, options):
    """Prunes one leaf with a data-aware importance: ``(Sparse, stats)``."""
    shape = tuple(weight.shape)
    m, n = matrix_shape(shape, fan_in)
    if importance == "sparsegpt":
        block = min(options["block_size"], m)
        rows = [min(block, m - start) for start in range(0, m, block)]
        counts = prefix_counts(fraction, rows, n)
    elif comparison == "output":
        counts = prefix_counts(fraction, [1] * n, m)
    else:
        counts = count
    values, keep, stats = _data_aware_mask(
        weight,
        gram,
        jnp.asarray(counts, _int_dtype()),
        fan_in=fan_in,
        importance=importance,
        comparison=comparison,
        damp=jnp.float32(options["damp"]),
        block=options["block_size"],
    )
    if importance == "sparsegpt":
        stats = {"damp": options["damp"], **stats}
    return _sparse_from_mask(values, keep, nnz=math.prod(shape) - count), stats


def _view(weight: jax.Array, found: LeafGram) -> jax.Array:
    """The weight inputs first, as the data-aware importances read it."""
    return to_leading(weight, found.fan_in) if found.trailing else weight


def _refuse_empty_output(name: str, path: str, sparse: Sparse) -> None:
    """Raises naming ``path`` if a global threshold left an output unit no weight."""
    units = sparse.shape[-1] if len(sparse.shape) >= 2 else 1
    kept_per_unit = jnp.any(sparse.keep_mask().reshape(-1, units), axis=0)
    if not bool(jnp.all(kept_per_unit)):
        empty = int(units - jnp.sum(kept_per_unit))
        raise ValueError(
            f"{name}: the global threshold prunes every weight of {empty} output unit(s) "
            f"of leaf {path!r} (shape {tuple(sparse.shape)}); lower the sparsity, use "
            "scope='layer', or leave the leaf out with where="
        )


def prune(
    sparsity: float,
    *,
    scope: str = "layer",
    importance: str = "magnitude",
    comparison: str = "layer",
    damp: float = 0.01,
    block_size: int = 128,
    where: Filter = kernels,
    progress: bool = False,
) -> Transform:
    """Unstructured pruning by magnitude, or by calibration data (Wanda, SparseGPT).

    Each selected leaf becomes a :class:`~jaxcompress.Sparse` leaf holding its kept
    values and a bit-packed mask. The data-aware importances read each weight's
    input statistics from ``data=`` (a pytree from :func:`jaxcompress.calibrate`) and
    work on its ``(m, n)`` matrix view: ``m`` input features (the fan-in the
    statistics were taken over: ``in`` for a Dense ``(in, out)`` kernel, ``h * w * in``
    for a conv kernel) by ``n`` outputs. See :mod:`jaxcompress.numerics.obs`.

    NaN and Inf: an eager call raises. Under ``jax.jit`` magnitude pruning ranks a NaN
    or Inf above every finite magnitude, so it is kept as it is, never zeroed (unless
    a leaf holds more of them than it keeps values); each takes one of the kept
    slots, so the leaf keeps that many fewer finite weights. Wanda and SparseGPT are
    not covered: wrap them in :func:`jaxcompress.checked` to raise instead.

    Args:
        sparsity: fraction of entries to zero, in ``[0, 1)``.
        scope: ``"layer"`` zeroes exactly ``floor(sparsity * n)`` entries of each
            selected leaf. ``"global"`` applies one threshold (on magnitudes, or on
            Wanda scores) across all selected leaves, zeroing exactly
            ``floor(sparsity * total)`` entries in all; it needs concrete arrays (each
            leaf's storage size depends on the data), so call it outside ``jit``. Not
            supported with ``importance="sparsegpt"`` or ``comparison="output"``.
            A global threshold never empties a layer's output unit (an index of its
            last axis, a column of its matrix view), which would leave that output
            constant and a later stage nothing to compress: with magnitudes, where a
            leaf's share would empty a unit, each of its units' largest ``|w|`` is
            kept and the share is pruned from the rest (at most the leaf's size less
            its units, so "pruned" in its stats can be below its share); with Wanda
            scores it raises naming the leaf.
        importance: which entries go:

            * ``"magnitude"``: the smallest ``|w|`` (ties by row-major index).
            * ``"wanda"``: the smallest ``|W_ij| · √E[x_i²]`` (Wanda; the RMS of input
              feature ``i`` is the root of the Gram's diagonal). Values are kept as they
              are. With unit activation norms this is exactly magnitude pruning.
            * ``"sparsegpt"``: SparseGPT. The rows (input features) are swept in
              blocks of ``block_size``; at each block's start, the block's entries with
              the least ``w² / [H⁻¹]_jj`` (OBS saliency, from the upper Cholesky factor
              of the inverse damped Gram ``H = G + damp · mean(diag G) · I``) are chosen,
              over all the block's rows and outputs; then each row is pruned in turn and
              its error is fed into the rows not yet pruned, so the kept weights change
              to compensate. Each block prunes ``floor`` or ``ceil`` of its share of
              ``sparsity`` so that the layer total is exactly
              ``floor(sparsity * size)``.

        comparison: Wanda's comparison group. ``"layer"`` ranks the whole leaf (exact
            ``floor(sparsity * size)``, like magnitude pruning). ``"output"`` ranks each
            output column on its own, as the Wanda paper does: column ``j`` of ``m``
            entries prunes ``floor((j+1)·s·m) − floor(j·s·m)`` (``floor(s·m)`` or one
            more), so the leaf's total is still exactly ``floor(sparsity * size)``. Only
            with ``importance="wanda"``.
        damp: SparseGPT's damping, relative to the mean diagonal of the Gram (the
            absolute ``λ`` is reported in the stats).
        block_size: SparseGPT's rows per block (mask selection and lazy updates).
        where: which leaves to prune; by default :func:`jaxcompress.filters.kernels`
            (floating leaves with ndim >= 2), so biases and norms are left alone.

        progress: show a bar on stderr, by leaf and bytes, while it runs (not under
            ``jit``).
    Returns:
        A transform ``tx(params, *, key=None, data=None)`` returning
        ``(compressed, stats)``, where ``stats`` maps each pruned leaf path to
        ``{"pruned": count, "size": n}``; with ``"wanda"`` also
        ``"relative_output_error"`` (``√(tr(Eᵀ G E) / tr(Wᵀ G W))``, ``E`` the change of
        the weight), with ``"sparsegpt"`` also ``"damp"``, ``"damping"`` (the ``λ``
        added) and ``"factorized"`` (whether the Cholesky factors were finite).

    Raises:
        ValueError: sparsity outside ``[0, 1)``, an unknown scope, importance or
            comparison, a bad ``damp`` or ``block_size``; a selected scalar,
            zero-size or non-finite leaf; global scope under ``jit`` or with
            SparseGPT; a data-aware importance without ``data=``, without statistics
            for a selected leaf, or with statistics whose feature size fits no fan-in
            of the leaf; a SparseGPT Gram that is not positive definite even after
            damping (outside ``jit``). Errors name the transform and the leaf.
        TypeError: a selected integer, boolean or already-compressed leaf.

    Example:
        >>> import jax
        >>> import jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> params = {"dense": {"kernel": jnp.arange(12.0).reshape(3, 4), "bias": jnp.ones(4)}}
        >>> pruned, stats = jax.jit(jc.prune(0.5))(params)
        >>> pruned["dense"]["kernel"].nnz, int(stats["dense/kernel"]["pruned"])
        (6, 6)

        Data-aware pruning of a small model with calibration statistics:

        >>> from jaxcompress.examples.models import LeNet300100
        >>> model = LeNet300100()
        >>> x = jax.random.normal(jax.random.key(0), (64, 64))
        >>> params = model.init(jax.random.key(1), x)["params"]
        >>> data = jc.calibrate(lambda p, x: model.apply({"params": p}, x), params, [x])
        >>> pruned, stats = jc.prune(0.5, importance="sparsegpt")(params, data=data)
        >>> pruned["dense1"]["kernel"].nnz, int(stats["dense1/kernel"]["pruned"])
        (9600, 9600)
        >>> pruned, stats = jax.jit(jc.prune(0.5, importance="wanda"))(params, data=data)
        >>> float(stats["dense2/kernel"]["relative_output_error"]) < 0.5
        True
    """
    fraction = check_sparsity(sparsity)
    if scope not in _SCOPES:
        raise ValueError(f"prune: scope must be one of {_SCOPES}, got {scope!r}")
    if importance not in _IMPORTANCES:
        raise ValueError(f"prune: importance must be one of {_IMPORTANCES}, got {importance!r}")
    if comparison not in _COMPARISONS:
        raise ValueError(f"prune: comparison must be one of {_COMPARISONS}, got {comparison!r}")
    if comparison == "output" and importance != "wanda":
        raise ValueError(
            f"prune: comparison='output' is Wanda's per-output group; it needs "
            f"importance='wanda', got importance={importance!r}"
        )
    if scope == "global" and importance == "sparsegpt":
        raise ValueError(
            "prune: scope='global' is not supported with importance='sparsegpt' (its "
            "saliencies change as earlier rows are pruned); use scope='layer'"
        )
    if scope == "global" and comparison == "output":
        raise ValueError("prune: scope='global' cannot be combined with comparison='output'")
    options = {
        "damp": check_damp("prune", damp),
        "block_size": check_block_size("prune", block_size),
    }
    name = f"prune({float(fraction)!r}, scope={scope})"
    if importance != "magnitude":
        name = f"prune({float(fraction)!r}, scope={scope}, importance={importance})"

    def prepare(key, data):
        del key  # deterministic
        if importance == "magnitude":
            return {}
        return require_data(name, f"importance={importance!r}", data)

    def check(entry, weight, by_path):
        """``(gram, count)``: the leaf's Gram (data-aware) and its layer-scope count."""
        gram = None
        if importance != "magnitude":
            option = f"importance={importance!r}"
            gram = leaf_gram(name, option, entry.path, by_path, tuple(weight.shape))
        return gram, math.floor(fraction * math.prod(weight.shape))

    def global_counts(items):
        """One threshold over every selected leaf: each leaf's count under it."""
        # Lazy over streamed leaves (compress_file): each pass loads them one at a time.
        weights = lazy_map(lambda item: item.weight, items)
        grams = [item.plan[0] for item in items]
        if any(is_traced(w) for w in weights) or any(
            g is not None and is_traced(g[0]) for g in grams
        ):
            raise ValueError(
                "prune: scope='global' needs concrete arrays, since each leaf's storage "
                "size depends on the data; call it outside jax.jit or use scope='layer'"
            )
        if importance == "wanda":
            scores = [
                wanda_scores(unsharded(_view(w, g)).reshape(g.rows, g.cols), unsharded(g.gram))
                for w, g in zip(weights, grams, strict=True)
            ]
            counts = global_pruned_counts(scores, float(fraction))
        else:
            counts = global_pruned_counts(weights, float(fraction))
        return [(gram, count) for gram, count in zip(grams, counts, strict=True)]

    def step(item, key) -> tuple[Sparse, PruneStats]:
        """One selected leaf pruned: ``(Sparse, leaf stats)``."""
        del key
        weight, (gram, count) = item.weight, item.plan
        leaf_stats: PruneStats = {"pruned": count, "size": math.prod(weight.shape)}
        if importance == "magnitude":
            sparse = magnitude_sparse(weight, count)
            if scope == "global":
                sparse, leaf_stats["pruned"] = keep_one_per_output(
                    weight, sparse, count, outputs_first=item.entry.trailing_inputs > 0
                )
            return sparse, leaf_stats
        sparse, extra = _data_aware_leaf(
            _view(weight, gram),
            gram.gram,
            fan_in=gram.fan_in,
            count=count,
            importance=importance,
            comparison=comparison,
            fraction=fraction,
            options=options,
        )
        if "factorized" in extra:
            check_factorized(name, item.entry.path, extra, damp)
        if scope == "global":
            _refuse_empty_output(name, item.entry.path, sparse)
        if gram.trailing:
            sparse = from_leading(sparse, gram.fan_in)
        leaf_stats.update(extra)
        return sparse, leaf_stats

    return per_leaf(
        name,
        where,
        prepare=prepare,
        check=check,
        plan=global_counts if scope == "global" else None,
        step=step,
        progress=progress,
    )
