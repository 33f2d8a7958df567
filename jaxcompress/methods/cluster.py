"""Weight sharing by 1-D k-means into :class:`~jaxcompress.Clustered` leaves.

Everything here works on sorted values. In one dimension every k-means cluster is
a contiguous run of the sorted data, so one sort plus prefix sums turn a Lloyd
iteration into ``k - 1`` binary searches: ``O(k log n)`` per iteration, never an
``n x k`` distance matrix.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import numbers
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, PartitionSpec

from jaxcompress.arrays import Clustered, Sparse
from jaxcompress.calibration.calibrate import InputStats
from jaxcompress.core.bitpack import pack, packed_length
from jaxcompress.core.checks import is_traced
from jaxcompress.core.mesh import place_like, unsharded
from jaxcompress.core.paths import path_to_str
from jaxcompress.numerics.data_aware import (
    _relative_output_error,
    check_block_size,
    check_damp,
    leaf_gram,
    mesh_scope,
    require_data,
)
from jaxcompress.transforms.base import Transform
from jaxcompress.transforms.engine import per_leaf, require_factorized
from jaxcompress.transforms.filters import Filter, kernels
from jaxcompress.transforms.stats import ClusterStats

_INITS = ("linear", "density", "kmeans++", "random")
_METHODS = ("lloyd", "optimal", "gptq")
_WEIGHTS = (None, "hessian", "fisher")
_KEYED_INITS = ("kmeans++", "random")
# "optimal" runs its exact DP on at most this many weighted points (bins).
_OPTIMAL_POINTS = 2048
# Prefix sums are taken in blocks so float32 rounding does not grow with n.
_BLOCK = 128
# "lloyd" with a "linear" or "density" init iterates on a histogram of this many
# equal-width bins once a leaf has more than _HISTOGRAM_MIN values (no sort of n).
_HISTOGRAM_BINS = 2**14
_HISTOGRAM_MIN = 4 * _HISTOGRAM_BINS
_HISTOGRAM_INITS = ("linear", "density")
# Assigning n values to k centroids: a lookup table of this many bins gives each
# value the boundaries below its bin, then at most _ASSIGN_SPAN comparisons finish.
_ASSIGN_BINS = 2048
_ASSIGN_SPAN = 2


def _sort_floats(x: jax.Array) -> jax.Array:
    """Sorts float32 values as order-preserving int32 keys (several times faster on CPU)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.int32)
    # Negative floats order backwards by bit pattern; flipping their low 31 bits fixes that.
    flip = jnp.int32(0x7FFFFFFF)
    keys = jnp.where(bits < 0, bits ^ flip, bits)
    keys = jax.lax.sort(keys, is_stable=False)
    return jax.lax.bitcast_convert_type(jnp.where(keys < 0, keys ^ flip, keys), jnp.float32)


def _prefix_sum(x: jax.Array) -> jax.Array:
    """``[0, x0, x0 + x1, ...]`` (length ``n + 1``), summed blockwise for accuracy.

    Within blocks of 128 it is a product with a triangular matrix; block totals are
    summed the same way, level by level. This keeps float32 rounding from growing
    with ``n`` and compiles to a few matmuls instead of a long associative scan.
    """
    n = x.shape[0]
    if n <= _BLOCK:
        upper = jnp.triu(jnp.ones((n, n), x.dtype))
        total = jnp.matmul(x, upper, precision=jax.lax.Precision.HIGHEST)
    else:
        blocks = -(-n // _BLOCK)
        padded = jnp.pad(x, (0, blocks * _BLOCK - n)).reshape(blocks, _BLOCK)
        upper = jnp.triu(jnp.ones((_BLOCK, _BLOCK), x.dtype))
        within = jnp.matmul(padded, upper, precision=jax.lax.Precision.HIGHEST)
        offsets = _prefix_sum(within[:, -1])[:-1]
        total = (within + offsets[:, None]).reshape(-1)[:n]
    return jnp.concatenate([jnp.zeros((1,), x.dtype), total])


def _segment_edges(sorted_y: jax.Array, centroids: jax.Array) -> jax.Array:
    """Start of each cluster's run in ``sorted_y`` (``k + 1`` edges, first 0, last n)."""
    n = sorted_y.shape[0]
    boundaries = (centroids[:-1] + centroids[1:]) * 0.5
    inner = jnp.searchsorted(sorted_y, boundaries, side="left").astype(jnp.int32)
    return jnp.concatenate([jnp.zeros((1,), jnp.int32), inner, jnp.full((1,), n, jnp.int32)])


def _bin_edges(
    points: jax.Array, centroids: jax.Array, grid: tuple[jax.Array, jax.Array]
) -> jax.Array:
    """Like :func:`_segment_edges` for histogram bin means (``O(k)``, no search).

    The bins below a boundary's bin lie below it; its own bin goes to the side its
    mean is on (rounding at bin edges may move a bin's mass to its neighbor's side).
    """
    bins = points.shape[0]
    start, width = grid
    boundaries = (centroids[:-1] + centroids[1:]) * 0.5
    which = jnp.clip(jnp.floor((boundaries - start) / width), 0, bins - 1).astype(jnp.int32)
    inner = which + (points[which] < boundaries).astype(jnp.int32)
    return jnp.concatenate([jnp.zeros((1,), jnp.int32), inner, jnp.full((1,), bins, jnp.int32)])


def _lloyd(
    sorted_y: jax.Array,
    prefix: jax.Array,
    init: jax.Array,
    max_iter: int,
    tol: jax.Array,
    weight_prefix: jax.Array | None = None,
    grid: tuple[jax.Array, jax.Array] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """1-D Lloyd on sorted data; returns sorted centroids and the iteration count.

    ``prefix`` holds prefix sums of the (weighted) values; with ``weight_prefix``
    (prefix sums of the weights) the points are weighted, else each counts once.
    With ``grid = (y0, w)``, point ``j`` lies in ``[y0 + j w, y0 + (j + 1) w]`` (the bin
    means of :func:`_histogram`), so a boundary's run edge is found by arithmetic
    instead of a binary search.
    """

    n = sorted_y.shape[0]

    def step(state):
        centroids, iteration, _ = state
        if grid is None:
            edges = _segment_edges(sorted_y, centroids)
        else:
            edges = _bin_edges(sorted_y, centroids, grid)
        if weight_prefix is None:
            counts = (edges[1:] - edges[:-1]).astype(sorted_y.dtype)
        else:
            counts = weight_prefix[edges[1:]] - weight_prefix[edges[:-1]]
        sums = prefix[edges[1:]] - prefix[edges[:-1]]
        # An empty cluster keeps its old centroid instead of becoming 0 / 0 ...
        # (weighted counts may be below 1; integer counts divide as they are).
        means = sums / jnp.where(counts > 0, counts, 1.0)
        updated = jnp.where(counts > 0, means, centroids)
        # ... except that one empty centroid per iteration moves into the widest heavy
        # cluster, between its mean and its farther end (as scikit-learn relocates
        # empty clusters). A centroid with no points costs nothing where it was, so
        # this can only lower the error; it rescues linear inits on heavy tails.
        first = sorted_y[jnp.minimum(edges[:-1], n - 1)]
        last = sorted_y[jnp.maximum(edges[1:] - 1, 0)]
        spread = jnp.where(counts > 1, counts * jnp.square(last - first), 0.0)
        widest = jnp.argmax(spread)
        far = jnp.where(last[widest] - means[widest] > means[widest] - first[widest], last, first)
        empty = counts == 0
        relocate = jnp.any(empty) & (spread[widest] > 0)
        moved = updated.at[jnp.argmax(empty)].set((means[widest] + far[widest]) * 0.5)
        updated = jnp.sort(jnp.where(relocate, moved, updated))
        move = jnp.max(jnp.abs(updated - centroids))
        return updated, iteration + 1, move

    def keep_going(state):
        _, iteration, move = state
        return (iteration < max_iter) & (move > tol)

    state = (init, jnp.zeros((), jnp.int32), jnp.full((), jnp.inf, sorted_y.dtype))
    centroids, iterations, _ = jax.lax.while_loop(keep_going, step, state)
    return centroids, iterations


def _kmeans_plus_plus(
    sorted_y: jax.Array, k: int, key: jax.Array, sorted_w: jax.Array | None = None
) -> jax.Array:
    """1-D k-means++ seeding: each new centroid drawn with probability ~ w · D(x)^2.

    Without ``sorted_w`` every point weighs 1 (plain k-means++).
    """
    n = sorted_y.shape[0]
    first_key, rest_key = jax.random.split(key)
    first = sorted_y[jax.random.randint(first_key, (), 0, n)]
    centroids = jnp.full((k,), first)

    def pick(i, state):
        centroids, distance2 = state
        mass = distance2 if sorted_w is None else sorted_w * distance2
        total = jnp.sum(mass)
        u = jax.random.uniform(jax.random.fold_in(rest_key, i), (), sorted_y.dtype) * total
        index = jnp.searchsorted(jnp.cumsum(mass), u, side="right")
        chosen = sorted_y[jnp.clip(index, 0, n - 1)]
        return centroids.at[i].set(chosen), jnp.minimum(distance2, jnp.square(sorted_y - chosen))

    distance2 = jnp.square(sorted_y - first)
    centroids, _ = jax.lax.fori_loop(1, k, pick, (centroids, distance2))
    return jnp.sort(centroids)


def _initial_centroids(sorted_y: jax.Array, k: int, init: str, key: jax.Array | None):
    n = sorted_y.shape[0]
    low, high = sorted_y[0], sorted_y[-1]
    if init == "linear":
        steps = jnp.arange(k, dtype=sorted_y.dtype) / (k - 1)
        return low + (high - low) * steps
    if init == "density":
        # Evenly spaced on the CDF: the (i + 1/2)/k quantiles.
        quantile = (jnp.arange(k, dtype=jnp.float32) + 0.5) / k
        return sorted_y[jnp.round(quantile * (n - 1)).astype(jnp.int32)]
    if init == "random":
        chosen = jax.random.choice(key, n, (k,), replace=n < k)
        return jnp.sort(sorted_y[chosen])
    return _kmeans_plus_plus(sorted_y, k, key)


def _weighted_points(sorted_y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The data as at most ``_OPTIMAL_POINTS`` weighted points, sorted.

    Small inputs are used as they are (weight 1 each). Larger ones are binned into
    equal-width bins, each bin standing for its points by their mean and count.
    """
    n = sorted_y.shape[0]
    if n <= _OPTIMAL_POINTS:
        return sorted_y, jnp.ones_like(sorted_y)
    bins = _OPTIMAL_POINTS
    low, high = sorted_y[0], sorted_y[-1]
    width = jnp.maximum(high - low, jnp.finfo(sorted_y.dtype).tiny) / bins
    which = jnp.clip(jnp.floor((sorted_y - low) / width), 0, bins - 1).astype(jnp.int32)
    counts = jax.ops.segment_sum(jnp.ones_like(sorted_y), which, bins, indices_are_sorted=True)
    sums = jax.ops.segment_sum(sorted_y, which, bins, indices_are_sorted=True)
    centers = low + (jnp.arange(bins, dtype=sorted_y.dtype) + 0.5) * width
    means = jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0), centers)
    return means, counts


def _optimal_centroids(sorted_y: jax.Array, k: int) -> jax.Array:
    """Exact weighted 1-D k-means of :func:`_weighted_points` by dynamic programming."""
    return _optimal_of_points(*_weighted_points(sorted_y), k)


def _optimal_of_points(points: jax.Array, weights: jax.Array, k: int) -> jax.Array:
    """Exact k-means of sorted ``points`` with ``weights`` (sorted centroids).

    ``best[j][i]`` is the least cost of the first ``i`` points in ``j`` clusters;
    clusters are contiguous runs (allowed empty), so
    ``best[j][i] = min_m best[j-1][m] + cost(m, i)``, an ``O(k P^2)`` vectorized DP
    on prefix sums of ``w``, ``w x`` and ``w x²``.
    """
    count = points.shape[0]
    w = _prefix_sum(weights)
    s1 = _prefix_sum(weights * points)
    s2 = _prefix_sum(weights * points * points)
    # cost[m, i]: squared error of points m..i-1 around their weighted mean.
    dw = w[None, :] - w[:, None]
    d1 = s1[None, :] - s1[:, None]
    d2 = s2[None, :] - s2[:, None]
    cost = jnp.maximum(d2 - jnp.square(d1) / jnp.maximum(dw, jnp.finfo(points.dtype).tiny), 0.0)
    cost = jnp.where(dw > 0, cost, 0.0)
    start = jnp.arange(count + 1)
    cost = jnp.where(start[:, None] <= start[None, :], cost, jnp.inf)

    def layer(j, state):
        best, choices = state
        total = best[:, None] + cost
        choice = jnp.argmin(total, axis=0).astype(jnp.int32)
        return jnp.min(total, axis=0), choices.at[j].set(choice)

    choices = jnp.zeros((k, count + 1), jnp.int32)
    _, choices = jax.lax.fori_loop(1, k, layer, (cost[0], choices))

    def back(end, j):
        begin = choices[j, end]
        return begin, begin

    # Walk the choices back from the last point to find each cluster's first point.
    _, begins = jax.lax.scan(back, jnp.int32(count), jnp.arange(k - 1, 0, -1))
    edges = jnp.concatenate(
        [jnp.zeros((1,), jnp.int32), begins[::-1], jnp.full((1,), count, jnp.int32)]
    )
    mass = w[edges[1:]] - w[edges[:-1]]
    # An empty cluster gets a point at its position, which keeps the order.
    fallback = points[jnp.clip(edges[:-1], 0, count - 1)]
    means = (s1[edges[1:]] - s1[edges[:-1]]) / jnp.maximum(mass, jnp.finfo(points.dtype).tiny)
    return jnp.sort(jnp.where(mass > 0, means, fallback))


def _exact_codebook(sorted_x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The distinct values, padded to ``k`` with the largest; and how many there are."""
    new = jnp.concatenate([jnp.ones((1,), jnp.bool_), sorted_x[1:] != sorted_x[:-1]])
    distinct = jnp.sum(new, dtype=jnp.int32)
    # The k smallest first occurrences are the distinct values when there are <= k.
    firsts = jnp.where(new, sorted_x, jnp.inf)
    smallest = -jax.lax.top_k(-firsts, min(k, sorted_x.shape[0]))[0]
    smallest = jnp.pad(smallest, (0, k - smallest.shape[0]), constant_values=jnp.inf)
    return jnp.where(jnp.isinf(smallest), sorted_x[-1], smallest), distinct


def _fit_sorted(
    x: jax.Array,
    key: jax.Array | None,
    *,
    k: int,
    init: str,
    method: str,
    max_iter: int,
    tol: float,
    codebook_dtype: np.dtype,
):
    """Clusters the 1-D float32 array ``x`` on its sorted values (exact prefix sums)."""
    sorted_x = _sort_floats(x)
    n = sorted_x.shape[0]
    # Work around the median so prefix sums stay small relative to cluster means.
    shift = sorted_x[n // 2]
    sorted_y = sorted_x - shift
    prefix = _prefix_sum(sorted_y)
    tolerance = tol * (sorted_y[-1] - sorted_y[0])
    if method == "optimal":
        start = _optimal_centroids(sorted_y, k)
    else:
        start = _initial_centroids(sorted_y, k, init, key)
    centroids, iterations = _lloyd(sorted_y, prefix, start, max_iter, tolerance)
    centroids = centroids + shift
    exact, distinct = _exact_codebook(sorted_x, k)
    # Fewer distinct values than k: store them all, so every value is exact.
    codebook = jnp.where(distinct <= k, exact, centroids).astype(codebook_dtype)
    return jnp.sort(codebook), iterations, distinct


def _split_over(x: jax.Array):
    """``(mesh, spec, axes)`` where ``x``'s type is split over ``Explicit`` mesh axes, else None.

    Under ``jit`` only ``Explicit`` axes show in a traced array's type; ``Auto``
    shardings are left to XLA's partitioner.
    """
    sharding = jax.typeof(x).sharding
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or not any(t == AxisType.Explicit for t in mesh.axis_types):
        return None
    axes = []
    for entry in sharding.spec:
        if entry is not None:
            axes.extend(entry if isinstance(entry, tuple) else (entry,))
    if not axes:
        return None
    return mesh, sharding.spec, tuple(axes)


def _reduce_blocks(fn, x: jax.Array, *operands: jax.Array):
    """``fn(x, *operands)`` for an ``fn`` returning ``(sums, mins, maxs)`` reductions of ``x``.

    Each is a tuple of arrays that sum (or take the min or max) over ``x``'s
    entries. Where ``x`` is split over ``Explicit`` mesh axes, every shard reduces
    its own block and ``psum``/``pmin``/``pmax`` combine them: the weight is never
    gathered (jax refuses a scatter into a sharded operand there anyway). Otherwise
    ``fn`` sees all of ``x`` and XLA partitions it, as it does for ``Auto`` meshes.
    The ``operands`` (small, replicated) are passed to every shard whole.
    """
    split = _split_over(x)
    if split is None:
        return fn(x, *operands)
    mesh, spec, axes = split

    def local(block, *operands):
        sums, mins, maxs = fn(block, *operands)
        return (
            jax.lax.psum(sums, axes),
            jax.lax.pmin(mins, axes),
            jax.lax.pmax(maxs, axes),
        )

    in_specs = (spec,) + (PartitionSpec(),) * len(operands)
    return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=PartitionSpec())(
        x, *operands
    )


def _bin_of(x: jax.Array, low: jax.Array, width: jax.Array, bins: int):
    """Each value's bin (int32, shaped like ``x``) and its offset within it (0 to 1)."""
    position = (x - low) / width
    which = jnp.clip(jnp.floor(position), 0, bins - 1)
    offset = jnp.clip(position - which, 0.0, 1.0)
    return which.astype(jnp.int32), offset


def _valid(x: jax.Array, count: jax.Array | None) -> jax.Array:
    """1 for real entries, 0 for padding: the first ``count`` entries of a 1-D ``x`` are real."""
    if count is None:
        return jnp.ones_like(x)
    return (jnp.arange(x.shape[0]) < count).astype(x.dtype)


def _histogram(x: jax.Array, bins: int, count: jax.Array | None = None):
    """Equal-width histogram of ``x`` (any shape) in one pass: each bin's mean and count.

    Returns ``(points, counts, low, high, width)``: the bins' means (an empty bin
    gets its center, so ``points`` is sorted), their counts, the data's min and
    max, and the bin width.
    Means are kept as offsets within their bin, so they are accurate to float32
    rounding of the bin width rather than of the values. ``x`` is never flattened:
    a sharded ``x`` is binned shard by shard (:func:`_reduce_blocks`).
    """
    low, high = jnp.min(x), jnp.max(x)
    width = jnp.maximum(high - low, jnp.finfo(x.dtype).tiny) / bins

    def block_sums(block, low, width):
        which, offset = _bin_of(block, low, width, bins)
        # Counts and offsets in one scatter (one pass over the values).
        valid = _valid(block, count)
        both = jnp.stack([valid, offset * valid], axis=-1)
        sums = jnp.zeros((bins, 2), block.dtype).at[which].add(both, mode="promise_in_bounds")
        return (sums[:, 0], sums[:, 1]), (), ()

    (counts, offsets), _, _ = _reduce_blocks(block_sums, x, low, width)
    within = jnp.where(counts > 0, offsets / jnp.maximum(counts, 1.0), 0.5)
    points = low + (jnp.arange(bins, dtype=x.dtype) + within) * width
    return points, counts, low, high, width


def _bin_ranges(x: jax.Array, low: jax.Array, width: jax.Array, bins: int):
    """Each bin's smallest and largest value (``inf`` and ``-inf`` where empty)."""

    def block_ranges(block, low, width):
        which, _ = _bin_of(block, low, width, bins)
        smallest = jnp.full((bins,), jnp.inf, block.dtype)
        largest = jnp.full((bins,), -jnp.inf, block.dtype)
        smallest = smallest.at[which].min(block, mode="promise_in_bounds")
        largest = largest.at[which].max(block, mode="promise_in_bounds")
        return (), (smallest,), (largest,)

    _, (smallest,), (largest,) = _reduce_blocks(block_ranges, x, low, width)
    return smallest, largest


def _cluster_sums(x: jax.Array, centroids: jax.Array, low, high, shift, count=None):
    """Each value's nearest centroid; per cluster the sum of ``x - shift`` and the count."""
    k = centroids.shape[0]

    def block_sums(block, centroids, low, high, shift):
        codes = _assign_fast(block, centroids, low, high)
        # Sums and counts in one scatter (one pass over the values).
        valid = _valid(block, count)
        both = jnp.stack([(block - shift) * valid, valid], axis=-1)
        sums = jnp.zeros((k, 2), block.dtype).at[codes].add(both, mode="promise_in_bounds")
        return (sums[:, 0], sums[:, 1]), (), ()

    (sums, sizes), _, _ = _reduce_blocks(block_sums, x, centroids, low, high, shift)
    return sums, sizes


def _assign_blocks(x: jax.Array, codebook: jax.Array, low: jax.Array, high: jax.Array, count=None):
    """Nearest codebook index of each value (uint8, shaped and sharded like ``x``) and the
    squared error of the clustered ``x``; shard by shard where ``x`` is split over
    ``Explicit`` mesh axes (jax refuses a table lookup indexed by a sharded array there)."""

    def assign(block, codebook, low, high):
        codes = _assign_fast(block, codebook, low, high)
        approx = jnp.take(codebook.astype(jnp.float32), codes)
        valid = _valid(block, count)
        # Padding gets code 0, so its packed bits are the zeros an unpadded row ends with.
        codes = jnp.where(valid > 0, codes, 0)
        return codes.astype(jnp.uint8), jnp.sum(jnp.square(block - approx) * valid)

    split = _split_over(x)
    if split is None:
        return assign(x, codebook, low, high)
    mesh, spec, axes = split

    def local(block, codebook, low, high):
        codes, error = assign(block, codebook, low, high)
        return codes, jax.lax.psum(error, axes)

    replicated = PartitionSpec()
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(spec, replicated, replicated, replicated),
        out_specs=(spec, replicated),
    )(x, codebook, low, high)


def _fit_histogram(
    x: jax.Array,
    key: jax.Array | None,
    *,
    k: int,
    init: str,
    method: str,
    max_iter: int,
    tol: float,
    codebook_dtype: np.dtype,
    count: jax.Array | None = None,
):
    """Lloyd on a fine histogram of ``x``, then one exact Lloyd step on all of ``x``.

    ``O(n)`` for the histogram, ``O(k log B)`` per iteration on the ``B`` bins, and
    ``O(n)`` for the exact step; nothing sorts, flattens or gathers the ``n``
    values, which may have any shape and sharding (see :func:`_reduce_blocks`).

    Exact codebooks come from the histogram alone: when at most ``k`` bins are
    occupied and each holds a single value (its min equals its max), those values
    are all the distinct values, and they (sorted, padded with the largest) are
    the codebook. Distinct values that share a bin (closer than
    ``(max - min) / B``) go through the binned Lloyd instead.
    """
    del key, method  # always "lloyd" with a deterministic init here
    bins = _HISTOGRAM_BINS
    points, counts, low, high, width = _histogram(x, bins, count)
    occupied = jnp.sum(counts > 0, dtype=jnp.int32)

    def single_valued(x):
        # Only worth a pass over x when few bins are occupied.
        smallest, largest = _bin_ranges(x, low, width, bins)
        return jnp.all((counts == 0) | (smallest == largest)), smallest

    def not_single_valued(x):
        return jnp.zeros((), jnp.bool_), jnp.full((bins,), jnp.inf, x.dtype)

    exact, smallest = jax.lax.cond(occupied <= k, single_valued, not_single_valued, x)

    def distinct_values(x):
        del x
        which = jnp.nonzero(counts > 0, size=k, fill_value=bins - 1)[0]
        found = jnp.arange(k, dtype=jnp.int32) < occupied
        codebook = jnp.where(found, smallest[which], high).astype(codebook_dtype)
        return jnp.sort(codebook), jnp.zeros((), jnp.int32)

    def binned(x):
        shift = (low + high) * 0.5
        y = points - shift
        prefix = _prefix_sum(counts * y)
        weight_prefix = _prefix_sum(counts)
        if init == "linear":
            # Identical to the sorted path: evenly spaced between the data's min and max.
            steps = jnp.arange(k, dtype=y.dtype) / (k - 1)
            start = (low - shift) + (high - low) * steps
        else:
            # The (i + 1/2)/k quantiles, each as the mean of the bin holding that rank.
            n = x.size if count is None else count.astype(jnp.float32)
            quantile = (jnp.arange(k, dtype=jnp.float32) + 0.5) / k
            rank = jnp.round(quantile * (n - 1))
            cumulative = weight_prefix[1:]
            start = y[jnp.clip(jnp.searchsorted(cumulative, rank, side="right"), 0, bins - 1)]
        tolerance = tol * (high - low)
        grid = (low - shift, width)
        centroids, iterations = _lloyd(y, prefix, start, max_iter, tolerance, weight_prefix, grid)
        centroids = centroids + shift

        # One exact Lloyd step on all values: assign, then each cluster's exact mean.
        # Both halves can only lower the error of the binned centroids.
        sums, sizes = _cluster_sums(x, centroids, low, high, shift, count)
        means = jnp.where(sizes > 0, sums / jnp.maximum(sizes, 1.0) + shift, centroids)
        return jnp.sort(jnp.sort(means).astype(codebook_dtype)), iterations

    codebook, iterations = jax.lax.cond(exact, distinct_values, binned, x)
    return codebook, iterations, occupied


def _uses_histogram(n: int, method: str, init: str) -> bool:
    return method == "lloyd" and init in _HISTOGRAM_INITS and n > _HISTOGRAM_MIN


def _fit(
    x: jax.Array,
    key: jax.Array | None,
    *,
    histogram: bool | None = None,
    count: jax.Array | None = None,
    **options,
):
    """Clusters the float32 array ``x``; returns codebook, iterations, distinct count.

    ``histogram=None`` picks the histogram path for large leaves (see :func:`cluster`).
    The sorted path needs ``x`` 1-D; the histogram path takes any shape, and a 1-D
    ``x`` whose entries after the first ``count`` are padding.
    """
    if histogram is None:
        histogram = _uses_histogram(x.size, options["method"], options["init"])
    if histogram:
        return _fit_histogram(x, key, count=count, **options)
    return _fit_sorted(x, key, **options)


def _assign_fast(
    values: jax.Array, centroids: jax.Array, low: jax.Array, high: jax.Array
) -> jax.Array:
    """Nearest of the sorted ``centroids`` for each value, in ``O(n)``; int32.

    Exactly ``searchsorted(midpoints, values, side="right")``: a table over
    ``_ASSIGN_BINS`` equal-width bins of ``[low, high]`` holds how many midpoints lie
    surely below each bin, and ``_ASSIGN_SPAN`` comparisons add those inside it.
    Where some bin holds more midpoints than that, it falls back to a binary search.
    """
    centroids = centroids.astype(jnp.float32)
    boundaries = (centroids[:-1] + centroids[1:]) * 0.5
    bins, span = _ASSIGN_BINS, _ASSIGN_SPAN
    width = jnp.maximum(high - low, jnp.finfo(jnp.float32).tiny) / bins
    edges = low + jnp.arange(bins + 1, dtype=jnp.float32) * width
    # A margin covers rounding in the bin index of values near an edge.
    margin = width * 0.01
    below = jnp.searchsorted(boundaries, edges[:-1] - margin, side="left").astype(jnp.int32)
    upto = jnp.searchsorted(boundaries, edges[1:] + margin, side="right").astype(jnp.int32)
    padded = jnp.concatenate([boundaries, jnp.full((span,), jnp.inf, jnp.float32)])

    def table(values):
        which = jnp.clip(jnp.floor((values - low) / width), 0, bins - 1).astype(jnp.int32)
        base = below[which]
        code = base
        for step in range(span):
            code = code + (values >= padded[base + step]).astype(jnp.int32)
        return code

    def search(values):
        # searchsorted(boundaries, values, side="right") as k - 1 fused comparisons:
        # a binary search would carry two value-sized index arrays through its loop.
        code = jnp.zeros(values.shape, jnp.int32)
        for j in range(boundaries.shape[0]):
            code = code + (values >= boundaries[j]).astype(jnp.int32)
        return code

    return jax.lax.cond(jnp.max(upto - below) <= span, table, search, values)


def _assign(values: jax.Array, codebook: jax.Array) -> jax.Array:
    """Index of the nearest centroid in the sorted ``codebook`` for each of ``values``."""
    centroids = codebook.astype(jnp.float32)
    boundaries = (centroids[:-1] + centroids[1:]) * 0.5
    return jnp.searchsorted(boundaries, values, side="right").astype(jnp.uint8)


def cluster_array(
    weight: jax.Array,
    *,
    k: int,
    init: str = "linear",
    per_channel: bool = False,
    method: str = "lloyd",
    max_iter: int = 1000,
    tol: float = 1e-6,
    codebook_dtype: jax.typing.DTypeLike = jnp.float32,
    key: jax.Array | None = None,
    weights: jax.Array | None = None,
    gram: jax.Array | None = None,
    damp: float | jax.Array = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    count: jax.Array | None = None,
) -> tuple[Clustered, dict]:
    """Clusters one array into a :class:`~jaxcompress.Clustered` leaf.

    The arguments are those of :func:`cluster`, already validated, plus the data:
    ``weights`` (shaped like ``weight``) are each entry's sensitivity for weighted
    k-means (see :mod:`jaxcompress.weighted_kmeans`); ``gram`` is the ``(m, m)`` input
    Gram of ``weight``'s matrix view ``weight.reshape(m, -1)``, which
    ``method="gptq"`` sweeps (and which adds ``"relative_output_error"`` to the
    stats). ``count`` (histogram path only) says that a 1-D ``weight`` holds ``count``
    real values followed by padding copies of its first value; the padding changes
    nothing but the shape, and gets code 0. Works under ``jit``.

    Returns:
        ``(leaf, stats)`` with stats ``{"k", "inertia", "relative_error",
        "iterations", "distinct"}`` (arrays, except ``k``); with ``weights`` also
        ``"weighted_relative_error"``, with ``gram`` ``"relative_output_error"``, with
        ``method="gptq"`` ``"damping"`` and ``"factorized"``.

    Example:
        >>> import jax.numpy as jnp
        >>> leaf, stats = cluster_array(jnp.array([[0.0, 0.1], [2.0, 2.1]]), k=2)
        >>> [round(c, 3) for c in leaf.codebook.tolist()], int(stats["iterations"]) > 0
        ([0.05, 2.05], True)
        >>> leaf, _ = cluster_array(jnp.array([[0.0, 0.1], [2.0, 2.1]]), k=2,
        ...                         weights=jnp.array([[1.0, 3.0], [1.0, 1.0]]))
        >>> [round(c, 3) for c in leaf.codebook.tolist()]
        [0.075, 2.05]
    """
    shape = tuple(weight.shape)
    per_channel = per_channel and len(shape) >= 2
    gptq = method == "gptq"
    # GPTQ fits its codebook as method="lloyd" does, then sweeps the rows.
    fit_method = "lloyd" if gptq else method
    data_aware = gptq or weights is not None
    histogram = (
        not per_channel and not data_aware and _uses_histogram(math.prod(shape), method, init)
    )
    if not histogram:
        # Sorting (and per-channel regrouping) needs the leaf in one piece.
        weight = unsharded(weight)
    values = weight.astype(jnp.float32)
    bits = max(1, (k - 1).bit_length())
    options = dict(
        k=k,
        init=init,
        method=fit_method,
        max_iter=max_iter,
        tol=tol,
        codebook_dtype=np.dtype(codebook_dtype),
    )
    fit = functools.partial(_fit, **options)
    if weights is not None:
        # Imported here: weighted_kmeans builds on this module.
        from jaxcompress.numerics.weighted_kmeans import fit_weighted

        weights = unsharded(weights).astype(jnp.float32).reshape(shape)
        weighted_fit = functools.partial(fit_weighted, **options)

    def fit_one(x, w, key):
        return fit(x, key) if w is None else weighted_fit(x, w, key)

    with mesh_scope(weight) if data_aware else contextlib.nullcontext():
        if per_channel:
            channels = values.reshape(-1, shape[-1]).T
            keys = None if key is None else jax.random.split(key, shape[-1])
            channel_weights = None if weights is None else weights.reshape(-1, shape[-1]).T
            if method == "optimal":
                # The DP holds a P x P table; one channel at a time bounds the memory.
                codebook, iterations, distinct = jax.lax.map(
                    lambda a: fit_one(*a), (channels, channel_weights, keys)
                )
            else:
                codebook, iterations, distinct = jax.vmap(fit_one)(channels, channel_weights, keys)
            iterations, distinct = jnp.max(iterations), jnp.min(distinct)
        elif histogram:
            # Kept in its own shape (and sharding): nothing here flattens or gathers it.
            codebook, iterations, distinct = fit(values, key, histogram=True, count=count)
        elif weights is None:
            codebook, iterations, distinct = fit(values.reshape(-1), key, histogram=False)
        else:
            codebook, iterations, distinct = weighted_fit(
                values.reshape(-1), weights.reshape(-1), key
            )
        extra = {}
        if gptq:
            from jaxcompress.numerics.weighted_kmeans import codebook_gptq

            codes, approx, extra = codebook_gptq(
                values.reshape(gram.shape[0], -1),
                unsharded(gram),
                codebook,
                damp=damp,
                block_size=block_size,
                act_order=act_order,
            )
            codes, approx = codes.reshape(shape), approx.reshape(shape)
        elif per_channel:
            codes = jax.vmap(_assign)(channels, codebook).T.reshape(shape)
            channel = jnp.arange(shape[-1], dtype=jnp.int32)
            flat = codes.reshape(-1, shape[-1]).astype(jnp.int32)
            approx = codebook.astype(jnp.float32)[channel[None, :], flat].reshape(shape)
        elif histogram:
            low, high = jnp.min(values), jnp.max(values)
            codes, inertia = _assign_blocks(values, codebook, low, high, count)
        else:
            codes = _assign(values, codebook)
            approx = jnp.take(codebook.astype(jnp.float32), codes.astype(jnp.int32))
    if not histogram:
        inertia = jnp.sum(jnp.square(values - approx))
    squares = jnp.square(values)
    if count is not None:
        squares = squares * _valid(values, count)
    norm = jnp.sqrt(jnp.sum(squares))
    relative = jnp.where(norm > 0, jnp.sqrt(inertia) / jnp.maximum(norm, 1e-30), 0.0)
    leaf = Clustered(pack(codes, bits), codebook, shape, np.dtype(weight.dtype), bits)
    stats = {
        "k": k,
        "inertia": inertia,
        "relative_error": relative,
        "iterations": iterations,
        "distinct": distinct,
    }
    if weights is not None:
        w = jnp.maximum(weights, 0.0)
        total = jnp.sum(w * jnp.square(values))
        safe = jnp.where(total > 0, total, 1.0)
        error = jnp.sum(w * jnp.square(values - approx))
        stats["weighted_relative_error"] = jnp.where(total > 0, jnp.sqrt(error / safe), 0.0)
    if gram is not None and not gptq:
        m = gram.shape[0]
        stats["relative_output_error"] = _relative_output_error(
            values.reshape(m, -1), approx.reshape(m, -1), unsharded(gram)
        )
    return leaf, {**stats, **extra}


# Compiled once per shape and options, so eager calls do not retrace the loops;
# under an outer jit it is simply inlined.
_cluster_compiled = jax.jit(
    cluster_array,
    static_argnames=(
        "k",
        "init",
        "per_channel",
        "method",
        "max_iter",
        "tol",
        "codebook_dtype",
        "block_size",
        "act_order",
    ),
)


def _bucket(n: int) -> int:
    """``n`` rounded up to one of 8 lengths per power of two (at most 1/8 more)."""
    step = 1 << max(0, n.bit_length() - 4)
    return -(-n // step) * step


def _pads_to_bucket(weight, sparse, data_args, options) -> bool:
    """Whether a Sparse leaf's kept values go through the histogram path padded.

    Under a global threshold every leaf keeps a different count of values, and
    compiling the clustering once per count dominated big models; padded to a few
    bucket lengths, leaves share programs. Only eager, unsharded, plain histogram runs.
    """
    return (
        sparse is not None
        and not data_args
        and not is_traced(weight)
        and len(getattr(weight, "sharding", None).device_set) == 1
        and _uses_histogram(weight.shape[0], options["method"], options["init"])
        and _bucket(weight.shape[0]) != weight.shape[0]
    )


def _cluster_padded(values: jax.Array, options: dict, key) -> tuple[Clustered, dict]:
    """:func:`cluster_array` on 1-D ``values`` padded to a bucket length, then cut back."""
    n = values.shape[0]
    padded = _pad_with_first(values, size=_bucket(n))
    leaf, stats = _cluster_compiled(padded, **options, key=key, count=jnp.int32(n))
    indices = jax.lax.slice(leaf.indices, (0,), (packed_length(n, leaf.bits),))
    return dataclasses.replace(leaf, indices=indices, shape=(n,)), stats


@functools.partial(jax.jit, static_argnames=("size",))
def _pad_with_first(values: jax.Array, *, size: int) -> jax.Array:
    """``values`` then copies of its first value up to ``size``, as one program.

    Every kept count needs its own program; one (not three eager ops) holds less
    compiled code per leaf.
    """
    n = values.shape[0]
    return jnp.concatenate([values, jnp.broadcast_to(values[:1], (size - n,))])


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"cluster: {name} must be an integer, got {value!r}")
    return int(value)


def _replicated(x: jax.Array, reference) -> jax.Array:
    """Codebooks are tiny and read by every shard: replicate them on the weight's mesh."""
    if reference is None:
        return x
    return place_like(x, jax.sharding.NamedSharding(reference.mesh, jax.sharding.PartitionSpec()))


def _placed(leaf: Clustered, reference) -> Clustered:
    return Clustered(
        place_like(leaf.indices, reference),
        _replicated(leaf.codebook, reference),
        leaf.shape,
        leaf.dtype,
        leaf.bits,
    )


def _data_leaves(data: Any) -> dict[str, Any]:
    """The leaves of a ``data=`` pytree by path, :class:`InputStats` kept whole."""
    flat, _ = jax.tree_util.tree_flatten_with_path(
        data, is_leaf=lambda x: isinstance(x, InputStats)
    )
    return {path_to_str(path): leaf for path, leaf in flat}


def _leaf_gram(name: str, option: str, path: str, found: Any, by_path: dict, shape) -> jax.Array:
    """The Gram of leaf ``path`` from calibration statistics (``found`` is what ``data=``
    holds at that path), with errors naming it."""
    if found is not None and not isinstance(found, InputStats):
        raise ValueError(
            f"{name}: {option} reads calibration statistics (InputStats from "
            f"jaxcompress.calibrate) for leaf {path!r}, but data= holds an array of shape "
            f"{tuple(getattr(found, 'shape', ()))} there; a per-weight Fisher diagonal goes "
            "with weights='fisher'"
        )
    gram, _, _, _ = leaf_gram(name, option, path, by_path, shape)
    return gram


def _fisher_weights(name: str, path: str, found: Any, shape) -> jax.Array:
    """The Fisher diagonal of leaf ``path`` from ``data=``, checked against its shape."""
    if found is None:
        raise ValueError(
            f"{name}: weights='fisher' but data= has no Fisher diagonal for leaf {path!r}; "
            "give an array shaped like it (see jaxcompress.fisher_diagonal) or "
            "exclude it with where="
        )
    if isinstance(found, InputStats):
        raise ValueError(
            f"{name}: weights='fisher' needs the Fisher diagonal of leaf {path!r} (an array "
            f"of its shape {tuple(shape)}), but data= holds calibration statistics "
            "(InputStats) there; those are for weights='hessian' and method='gptq'"
        )
    found_shape = tuple(getattr(found, "shape", ()))
    if found_shape != tuple(shape) or not jnp.issubdtype(
        getattr(found, "dtype", np.float32), jnp.number
    ):
        raise ValueError(
            f"{name}: the Fisher diagonal in data= for leaf {path!r} has shape {found_shape}, "
            f"but the leaf has shape {tuple(shape)}; it needs one value per weight"
        )
    if not is_traced(found) and not bool(jnp.all(jnp.isfinite(found) & (found >= 0))):
        raise ValueError(
            f"{name}: the Fisher diagonal of leaf {path!r} has NaN, Inf or negative values"
        )
    return jnp.asarray(found)


def _kept(values: jax.Array, sparse: Sparse) -> jax.Array:
    """The entries of ``values`` (shaped like ``sparse``) at its kept positions, in order."""
    keep = sparse.keep_mask().reshape(-1)
    (index,) = jnp.nonzero(keep, size=sparse.nnz, fill_value=0)
    return unsharded(values).reshape(-1)[index]


def fisher_diagonal(
    loss_fn: Callable[[Any, Any], jax.Array], params: Any, batches: Iterable[Any]
) -> Any:
    """The per-weight Fisher diagonal for ``cluster(weights="fisher")``: mean squared gradients.

    For each batch, ``jax.grad(loss_fn)(params, batch)`` is squared entry by entry;
    the result is the mean over the batches, laid out like ``params`` (float32). With
    one example per batch this is the empirical Fisher diagonal ``E[g²]`` (SqueezeLLM's
    sensitivity); larger batches square each batch's mean gradient. The gradient is
    compiled once per batch shape.

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar``.
        params: the parameter pytree (linen params, ``nnx.State``, dict) of floats.
        batches: an iterable of batches, each passed to ``loss_fn`` as it is (an
            array, a tuple of inputs and labels, ...).

    Returns:
        A pytree like ``params`` of float32 arrays: pass it as ``data=``.

    Raises:
        ValueError: ``batches`` is empty.

    Example:
        >>> import jax.numpy as jnp
        >>> params = {"w": jnp.array([[1.0, 2.0], [3.0, 4.0]])}
        >>> batches = [jnp.array([[1.0, 0.0]]), jnp.array([[0.0, 2.0]])]
        >>> loss = lambda p, x: jnp.sum(x @ p["w"])
        >>> fisher_diagonal(loss, params, batches)["w"].tolist()
        [[0.5, 0.5], [2.0, 2.0]]
    """
    grad = jax.jit(jax.grad(loss_fn))
    total, count = None, 0
    for batch in batches:
        squared = jax.tree.map(lambda g: jnp.square(g.astype(jnp.float32)), grad(params, batch))
        total = squared if total is None else jax.tree.map(jnp.add, total, squared)
        count += 1
    if total is None:
        raise ValueError("fisher_diagonal: batches is empty; give at least one batch")
    return jax.tree.map(lambda t: t / np.float32(count), total)


def cluster(
    bits: int | None = None,
    *,
    k: int | None = None,
    init: str = "linear",
    per_channel: bool = False,
    method: str = "lloyd",
    max_iter: int = 1000,
    tol: float = 1e-6,
    codebook_dtype: jax.typing.DTypeLike = jnp.float32,
    weights: str | None = None,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    where: Filter = kernels,
    progress: bool = False,
) -> Transform:
    """Weight sharing: 1-D k-means of each selected leaf into a codebook and indices.

    Each selected leaf becomes a :class:`~jaxcompress.Clustered` leaf: ``ceil(log2 k)``
    -bit indices, bit-packed, plus a sorted codebook. A selected
    :class:`~jaxcompress.Sparse` leaf (from :func:`jaxcompress.prune`) has only its
    kept values clustered and stays sparse, so its zeros stay exact:
    ``chain(prune(0.9), cluster(bits=5))`` is Deep Compression's first two stages.

    ``method="lloyd"`` sorts the values once, takes prefix sums, and iterates
    ``k - 1`` binary searches for the midpoints between centroids plus prefix-sum
    differences: ``O(k log n)`` per iteration after an ``O(n log n)`` sort. It
    stops when no centroid moves more than ``tol * (max - min)`` or after
    ``max_iter`` iterations. An empty cluster never yields NaN: it keeps its
    centroid, or (one per iteration) moves into the widest populated cluster, which
    can only lower the error.

    Leaves of more than 65536 values with a ``"linear"`` or ``"density"`` init skip
    the sort: one pass bins them into ``B = 16384`` equal-width bins of width
    ``h = (max - min) / B``, Lloyd runs on the bins' means (weighted by their
    counts), then one exact Lloyd step on all values (assign, exact cluster means)
    and the final assignment. Each value is within ``h`` of its bin's mean, so the
    binned codebook's root-mean-square error on the data is at most its error on
    the bins plus ``h``; the exact step and reassignment can only lower it. Its
    ``"distinct"`` stat is then the number of occupied bins (a lower bound). This
    path keeps the leaf in its shape and never gathers a sharded leaf: on
    ``Explicit`` mesh axes each shard bins its block and ``psum``/``pmin``/``pmax``
    combine them; ``Auto`` shardings are partitioned by XLA. Its codes come out
    sharded like the leaf. (Partitioned sums round differently, so a sharded leaf's
    codebook matches an unsharded run's to float32 rounding.) Per-channel codebooks
    and the sorted path reshard a sharded leaf to replicated first.

    ``method="optimal"`` finds the globally optimal k-means of a weighted version of
    the data by an exact dynamic program, then polishes with Lloyd on the full data
    (which only lowers the error). Up to 2048 values the DP runs on the values
    themselves and the result is exact. Larger leaves are binned into 2048
    equal-width bins of width ``h``, each standing for its points by their mean;
    moving every point by at most ``h`` changes the root-mean-square error of any
    codebook by at most ``h``, so before the polish
    ``rms_error <= optimal_rms_error + 2 h`` (``h = (max - min) / 2048``). It ignores
    ``init``. Its DP costs ``O(k * 2048^2)`` time and ``O(2048^2)`` memory.

    ``weights=`` makes it sensitivity-weighted k-means (SqueezeLLM): the codebook
    minimizes ``Σ s_ij (w_ij − ŵ_ij)²``. Assignments stay nearest-centroid, so
    clusters are still runs of the sorted values and a centroid is its run's
    ``Σ s w / Σ s`` from weighted prefix sums (``"optimal"``: the same DP on prefix
    sums of ``s``, ``s w``, ``s w²``); weighted leaves always take the sorted path.
    ``s`` comes from ``data=``: ``"hessian"`` weighs every entry of row ``i`` of the
    ``(m, n)`` matrix view (input feature ``i``; ``m`` the fan-in read off the
    statistics, as for GPTQ) by ``G_ii``, the diagonal of its input Gram from
    :func:`jaxcompress.calibrate` (the OBS/GPTQ Hessian diagonal); ``"fisher"``
    reads, for each leaf, an array of its shape holding the per-weight Fisher
    diagonal (mean squared gradient), e.g. from :func:`fisher_diagonal`. Weights
    are rescaled first (:func:`jaxcompress.weighted_kmeans.normalized_weights`), so
    uniform weights give exactly plain k-means' codebook and indices. ``"linear"``
    and ``"random"`` inits ignore the weights; ``"density"`` takes weighted quantiles
    and ``"kmeans++"`` draws with probability ``~ s · D²``.

    ``method="gptq"`` (GPTQ with codebook rounding) first fits the codebook as
    ``"lloyd"`` does (with ``init`` and ``weights``), then sweeps the ``m`` rows of
    the matrix view in blocks of ``block_size`` as :func:`jaxcompress.quantize`'s
    GPTQ does, rounding each entry to its nearest codebook entry (its channel's, per
    channel) instead of to a uniform grid and feeding each row's error into the rows
    not yet rounded through the upper Cholesky factor of
    ``(G + damp · mean(diag G) · I)⁻¹``. It needs ``data=`` calibration statistics,
    lowers the layer's output error ``‖X W − X Ŵ‖`` rather than the weight error,
    and keeps the layout and ``nbytes`` of plain clustering. With a diagonal Gram it
    is plain nearest-centroid assignment of the fitted codebook.

    A leaf with at most ``k`` distinct values gets those values as its codebook
    (padded with the largest), so it is reconstructed exactly, and its stats get a
    ``"note"`` (outside ``jit``). On the histogram path this is decided from the
    histogram alone: at most ``k`` occupied bins, each holding a single value
    (``"iterations"`` is then 0). Distinct values closer than ``h`` can share a bin;
    such a leaf gets the binned Lloyd codebook instead, which need not be exact.

    Args:
        bits: index width, 1 to 8; ``k = 2**bits``. Give exactly one of ``bits``, ``k``.
        k: number of clusters, 2 to 256.
        init: Lloyd's starting centroids. ``"linear"`` (evenly spaced between min
            and max, Deep Compression's best), ``"density"`` (evenly spaced
            quantiles), ``"kmeans++"`` (1-D k-means++ seeding, ``O(n k)``) or
            ``"random"`` (``k`` values drawn without replacement). The last two need
            ``key=``.
        per_channel: one codebook per output channel (the last axis), of shape
            ``(channels, k)``. Leaves with one dimension use one codebook.
        method: ``"lloyd"``, ``"optimal"`` or ``"gptq"`` (needs ``data=``
            calibration statistics; not with a ``Sparse`` leaf or ``weights="fisher"``).
        max_iter: most Lloyd iterations.
        tol: stop when the largest centroid move is at most ``tol * (max - min)``.
        codebook_dtype: the dtype the codebook is stored in; indices are assigned to
            the nearest stored centroid.
        weights: ``None`` (plain k-means), ``"hessian"`` (each weight by its input's
            ``G_ii``; ``data=`` from :func:`jaxcompress.calibrate`) or ``"fisher"``
            (``data=`` a pytree like the params holding each selected leaf's Fisher
            diagonal, see :func:`fisher_diagonal`). A ``Sparse`` leaf's kept values
            take the weights at their positions.
        damp: GPTQ's damping, relative to the mean diagonal of the Gram; the absolute
            ``λ`` added is reported in the stats. ``0`` needs a positive definite Gram.
        block_size: GPTQ's rows per block of lazy updates (the result does not depend
            on it beyond float rounding).
        act_order: GPTQ only: round the rows in order of decreasing ``diag(G)``.
        where: which leaves to cluster; by default floating leaves with ndim >= 2.

        progress: show a bar on stderr, by leaf and bytes, while it runs (not under
            ``jit``).
    Returns:
        A transform ``tx(params, *, key=None, data=None)`` returning
        ``(compressed, stats)``; ``stats`` maps each clustered leaf path to
        ``{"k", "inertia", "relative_error", "iterations", "distinct"}`` (plus
        ``"note"`` where there is something to say); with ``weights`` also
        ``"weighted_relative_error"`` (``√(Σ s e² / Σ s w²)``); with calibration
        statistics (``"hessian"``, GPTQ) ``"relative_output_error"``
        (``√(tr(Eᵀ G E) / tr(Wᵀ G W))``); with GPTQ ``"damp"``, ``"damping"`` (the ``λ``
        added) and ``"factorized"`` (whether the Cholesky factor was finite).

    Raises:
        ValueError: neither or both of ``bits`` and ``k``, ``k`` outside 2..256,
            ``bits`` outside 1..8, an unknown ``init``, ``method`` or ``weights``,
            ``method="gptq"`` with ``weights="fisher"``, ``act_order`` without GPTQ,
            bad ``damp`` or ``block_size``, a missing ``key`` for a random init, a
            selected scalar, empty or non-finite leaf; with ``weights`` or GPTQ: no
            ``data=``, no statistics (or Fisher diagonal) for a selected leaf, the
            wrong kind of them, statistics whose feature size fits no fan-in of the
            leaf, a Fisher diagonal of another shape, or (outside ``jit``) non-finite
            statistics or a Gram not positive definite after damping.
        TypeError: a selected integer leaf, a compressed leaf other than ``Sparse``,
            or a ``Sparse`` leaf with GPTQ.

    Example:
        >>> import jax
        >>> import jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> w = jax.random.normal(jax.random.key(0), (64, 32))
        >>> clustered, stats = jax.jit(jc.cluster(bits=4))({"dense": {"kernel": w}})
        >>> leaf = clustered["dense"]["kernel"]
        >>> leaf.codebook.shape, leaf.indices.shape, leaf.nbytes  # 64 * 16 + 16 * 4
        ((16,), (64, 16), 1088)
        >>> float(stats["dense/kernel"]["relative_error"]) < 0.15
        True
        >>> pruned, _ = jc.chain(jc.prune(0.9), jc.cluster(bits=5))({"w": w})
        >>> type(pruned["w"].values).__name__
        'Clustered'

        GPTQ with codebook rounding (here on a Hessian-weighted codebook), from the
        calibration statistics of a layer with correlated inputs:

        >>> model = lambda p, x: x @ p["dense"]["kernel"]
        >>> x = jax.random.normal(jax.random.key(1), (256, 8)) @ jax.random.normal(
        ...     jax.random.key(2), (8, 64))
        >>> params = {"dense": {"kernel": w}}
        >>> data = jc.calibrate(model, params, [x])
        >>> tx = jc.cluster(bits=3, method="gptq", weights="hessian")
        >>> gptq, gptq_stats = tx(params, data=data)
        >>> plain, _ = jc.cluster(bits=3)(params)
        >>> gptq["dense"]["kernel"].nbytes == plain["dense"]["kernel"].nbytes
        True
        >>> error = lambda t: float(jnp.linalg.norm(model(jc.materialize(t), x) - x @ w))
        >>> error(gptq) < error(plain)
        True

        Fisher-weighted (SqueezeLLM) from squared gradients:

        >>> from jaxcompress import fisher_diagonal
        >>> loss = lambda p, x: jnp.mean(jnp.square(model(p, x)))
        >>> fisher = fisher_diagonal(loss, params, [x[:128], x[128:]])
        >>> squeezed, stats = jc.cluster(bits=3, weights="fisher")(params, data=fisher)
        >>> sorted(stats["dense/kernel"])
        ['distinct', 'inertia', 'iterations', 'k', 'relative_error', 'weighted_relative_error']
    """
    if (bits is None) == (k is None):
        raise ValueError(f"cluster: give exactly one of bits and k, got bits={bits!r}, k={k!r}")
    if bits is not None:
        bits = _check_positive_int("bits", bits)
        if not 1 <= bits <= 8:
            raise ValueError(f"cluster: bits must be from 1 to 8, got {bits!r}")
        k = 2**bits
    k = _check_positive_int("k", k)
    if not 2 <= k <= 256:
        raise ValueError(f"cluster: k must be from 2 to 256 (8-bit indices), got k={k!r}")
    if init not in _INITS:
        raise ValueError(f"cluster: init must be one of {_INITS}, got {init!r}")
    if method not in _METHODS:
        raise ValueError(f"cluster: method must be one of {_METHODS}, got {method!r}")
    if weights not in _WEIGHTS:
        raise ValueError(f"cluster: weights must be one of {_WEIGHTS}, got {weights!r}")
    if method == "gptq" and weights == "fisher":
        raise ValueError(
            "cluster: method='gptq' reads calibration statistics from data= and "
            "weights='fisher' reads Fisher diagonals from it; one data= cannot hold both, "
            "so use weights='hessian' (or None) with GPTQ"
        )
    if not isinstance(act_order, bool | np.bool_):
        raise ValueError(f"cluster: act_order must be a bool, got {act_order!r}")
    if act_order and method != "gptq":
        raise ValueError("cluster: act_order=True only applies to method='gptq'")
    damp_value = check_damp("cluster", damp)
    block_size = check_block_size("cluster", block_size)
    max_iter = _check_positive_int("max_iter", max_iter)
    if max_iter < 1:
        raise ValueError(f"cluster: max_iter must be at least 1, got {max_iter!r}")
    if not isinstance(tol, numbers.Real) or not tol >= 0:
        raise ValueError(f"cluster: tol must be a non-negative number, got {tol!r}")
    dtype = np.dtype(codebook_dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"cluster: codebook_dtype must be floating, got {dtype.name}")
    needs_key = method != "optimal" and init in _KEYED_INITS
    name = f"cluster(k={k}, init={init}, method={method}, per_channel={per_channel})"
    if weights is not None:
        name = name[:-1] + f", weights={weights})"
    if act_order:
        name = name[:-1] + ", act_order=True)"
    gptq = method == "gptq"
    # The option that needs calibration statistics, for error messages.
    stats_option = "method='gptq'" if gptq else "weights='hessian'"
    needs_stats = gptq or weights == "hessian"
    options = dict(
        k=k,
        init=init,
        per_channel=per_channel,
        method=method,
        max_iter=max_iter,
        tol=float(tol),
        codebook_dtype=dtype,
    )
    if gptq:
        options.update(block_size=block_size, act_order=bool(act_order))

    def prepare(key, data):
        """``(by_path, found)``: the calibration statistics and ``data=`` leaves by path."""
        if needs_key and key is None:
            raise ValueError(f"cluster: init={init!r} draws random centroids; pass key=")
        if weights == "fisher" and data is None:
            raise ValueError(
                f"{name}: weights='fisher' needs data=, a pytree laid out like the params "
                "holding each selected leaf's Fisher diagonal (an array of the leaf's shape; "
                "see jaxcompress.fisher_diagonal)"
            )
        by_path = require_data(name, stats_option, data) if needs_stats else {}
        found = _data_leaves(data) if needs_stats or weights is not None else {}
        return by_path, found

    def check(entry, values, context):
        """Checks one selected leaf's data: ``(sparse, gram, weights)``."""
        by_path, found = context
        sparse = entry.leaf if isinstance(entry.leaf, Sparse) else None
        if gptq and sparse is not None:
            raise TypeError(
                f"{name}: leaf {entry.path!r} is Sparse; GPTQ needs the dense matrix "
                "(its kept values have no row layout): use method='lloyd' for it "
                "(exclude it with where=) or cluster before pruning"
            )
        shape = tuple(entry.leaf.shape)
        gram = None
        if needs_stats:
            gram = _leaf_gram(name, stats_option, entry.path, found.get(entry.path), by_path, shape)
        leaf_weights = None
        if weights == "hessian":
            diagonal = jnp.maximum(jnp.diagonal(gram).astype(jnp.float32), 0.0)
            m = diagonal.shape[0]
            leaf_weights = jnp.broadcast_to(diagonal[:, None], (m, math.prod(shape) // m))
            leaf_weights = leaf_weights.reshape(shape)
        elif weights == "fisher":
            leaf_weights = _fisher_weights(name, entry.path, found.get(entry.path), shape)
        return sparse, gram, leaf_weights

    def step(item, leaf_key) -> tuple[Clustered, ClusterStats]:
        """One checked leaf clustered: ``(Clustered, leaf stats)``."""
        weight, (sparse, gram, leaf_weights) = item.weight, item.plan
        data_args = {}
        if leaf_weights is not None:
            if sparse is not None:
                leaf_weights = _kept(leaf_weights, sparse)
            data_args["weights"] = leaf_weights
        if gram is not None and sparse is None:
            data_args["gram"] = gram
        if gptq:
            data_args["damp"] = jnp.float32(damp_value)
        leaf_options = {**options, "per_channel": per_channel and sparse is None}
        if _pads_to_bucket(weight, sparse, data_args, leaf_options):
            clustered, leaf_stats = _cluster_padded(weight, leaf_options, leaf_key)
        else:
            clustered, leaf_stats = _cluster_compiled(
                weight, **leaf_options, key=leaf_key, **data_args
            )
        if gptq:
            require_factorized(name, item.entry.path, leaf_stats["factorized"], damp)
            leaf_stats["damp"] = damp_value
        distinct = leaf_stats["distinct"]
        if not isinstance(distinct, jax.core.Tracer) and int(distinct) < k:
            leaf_stats["note"] = f"{int(distinct)} distinct values < k={k}: exact codebook"
        return clustered, leaf_stats

    return per_leaf(
        name,
        where,
        prepare=prepare,
        check=check,
        step=step,
        place=_placed,
        progress=progress,
        nests_in_sparse=True,
    )
