"""1-D k-means on sorted values or on a fine histogram, for :func:`jaxcompress.cluster`.

In one dimension every k-means cluster is a contiguous run of the sorted data, so
one sort plus prefix sums turn a Lloyd iteration into ``k - 1`` binary searches:
``O(k log n)`` per iteration, never an ``n x k`` distance matrix. Large leaves skip
the sort: Lloyd runs on an equal-width histogram, then one exact step on all values.
"""

from __future__ import annotations

from typing import TypedDict, Unpack

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, PartitionSpec

# "optimal" runs its exact DP on at most this many weighted points (bins).
OPTIMAL_POINTS = 2048
# Prefix sums are taken in blocks so float32 rounding does not grow with n.
_BLOCK = 128
# "lloyd" with a "linear" or "density" init iterates on a histogram of this many
# equal-width bins once a leaf has more than HISTOGRAM_MIN values (no sort of n).
HISTOGRAM_BINS = 2**14
HISTOGRAM_MIN = 4 * HISTOGRAM_BINS
_HISTOGRAM_INITS = ("linear", "density")
# Assigning n values to k centroids: a lookup table of this many bins gives each
# value the boundaries below its bin, then at most _ASSIGN_SPAN comparisons finish.
_ASSIGN_BINS = 2048
_ASSIGN_SPAN = 2


class FitOptions(TypedDict):
    """The options of :func:`fit` and the weighted fit, checked by :func:`jaxcompress.cluster`."""

    k: int
    init: str
    method: str
    max_iter: int
    tol: float
    codebook_dtype: np.dtype


def _sort_floats(x: jax.Array) -> jax.Array:
    """Sorts float32 values as order-preserving int32 keys (several times faster on CPU)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.int32)
    # Negative floats order backwards by bit pattern; flipping their low 31 bits fixes that.
    flip = jnp.int32(0x7FFFFFFF)
    keys = jnp.where(bits < 0, bits ^ flip, bits)
    keys = jax.lax.sort(keys, is_stable=False)
    return jax.lax.bitcast_convert_type(jnp.where(keys < 0, keys ^ flip, keys), jnp.float32)


def prefix_sum(x: jax.Array) -> jax.Array:
    """``[0, x0, x0 + x1, ...]`` (length ``n + 1``), summed blockwise for accuracy.

    Within blocks of 128 it is a product with a triangular matrix; block totals are
    summed the same way, level by level. This keeps float32 rounding from growing
    with ``n`` and compiles to a few matmuls instead of a long associative scan.

    Example:
        >>> import jax.numpy as jnp
        >>> prefix_sum(jnp.array([1.0, 2.0, 3.0])).tolist()
        [0.0, 1.0, 3.0, 6.0]
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
        offsets = prefix_sum(within[:, -1])[:-1]
        total = (within + offsets[:, None]).reshape(-1)[:n]
    return jnp.concatenate([jnp.zeros((1,), x.dtype), total])


def bin_width(low: jax.Array, high: jax.Array, bins: int) -> jax.Array:
    """The width of ``bins`` equal bins over ``[low, high]``, never below the smallest
    normal float.

    XLA on CPU flushes subnormal floats to zero, so a width of ``range / bins`` for a
    range below ``bins`` times the smallest normal float would divide by zero (the
    histogram then made NaN centroids on values of about 1e-36).

    Example:
        >>> import jax.numpy as jnp
        >>> float(bin_width(jnp.float32(0.0), jnp.float32(1.0), 4))
        0.25
        >>> float(bin_width(jnp.float32(0.0), jnp.float32(1e-36), 2**14)) > 0
        True
    """
    return jnp.maximum((high - low) / bins, jnp.finfo(jnp.result_type(low)).tiny)


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


def lloyd(
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

    Example:
        >>> import jax.numpy as jnp
        >>> y = jnp.array([0.0, 0.1, 2.0, 2.1])
        >>> centroids, iterations = lloyd(y, prefix_sum(y), y[jnp.array([0, 3])], 100, 0.0)
        >>> [round(c, 3) for c in centroids.tolist()], int(iterations)
        ([0.05, 2.05], 2)
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


def kmeans_plus_plus(
    sorted_y: jax.Array, k: int, key: jax.Array, sorted_w: jax.Array | None = None
) -> jax.Array:
    """1-D k-means++ seeding: each new centroid drawn with probability ~ w · D(x)^2.

    Without ``sorted_w`` every point weighs 1 (plain k-means++).

    Example:
        >>> import jax
        >>> import jax.numpy as jnp
        >>> kmeans_plus_plus(jnp.array([0.0, 0.1, 2.0, 2.1]), 2, jax.random.key(0)).shape
        (2,)
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


def initial_centroids(sorted_y: jax.Array, k: int, init: str, key: jax.Array | None):
    """``k`` starting centroids of sorted data for ``init`` (a key for the random ones).

    Example:
        >>> import jax.numpy as jnp
        >>> y = jnp.array([0.0, 0.1, 2.0, 2.1])
        >>> [round(c, 3) for c in initial_centroids(y, 2, "density", None).tolist()]
        [0.1, 2.0]
    """
    n = sorted_y.shape[0]
    low, high = sorted_y[0], sorted_y[-1]
    if init == "linear":
        steps = jnp.arange(k, dtype=sorted_y.dtype) / (k - 1)
        return low + (high - low) * steps
    if init == "density":
        # Evenly spaced on the CDF: the (i + 1/2)/k quantiles.
        quantile = (jnp.arange(k, dtype=jnp.float32) + 0.5) / k
        return sorted_y[jnp.round(quantile * (n - 1)).astype(jnp.int32)]
    # The random inits draw with a key; jaxcompress.cluster requires key= for them.
    assert key is not None
    if init == "random":
        chosen = jax.random.choice(key, n, (k,), replace=n < k)
        return jnp.sort(sorted_y[chosen])
    return kmeans_plus_plus(sorted_y, k, key)


def _weighted_points(sorted_y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The data as at most ``OPTIMAL_POINTS`` weighted points, sorted.

    Small inputs are used as they are (weight 1 each). Larger ones are binned into
    equal-width bins, each bin standing for its points by their mean and count.
    """
    n = sorted_y.shape[0]
    if n <= OPTIMAL_POINTS:
        return sorted_y, jnp.ones_like(sorted_y)
    bins = OPTIMAL_POINTS
    low, high = sorted_y[0], sorted_y[-1]
    width = bin_width(low, high, bins)
    which = jnp.clip(jnp.floor((sorted_y - low) / width), 0, bins - 1).astype(jnp.int32)
    counts = jax.ops.segment_sum(jnp.ones_like(sorted_y), which, bins, indices_are_sorted=True)
    sums = jax.ops.segment_sum(sorted_y, which, bins, indices_are_sorted=True)
    centers = low + (jnp.arange(bins, dtype=sorted_y.dtype) + 0.5) * width
    means = jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0), centers)
    return means, counts


def _optimal_centroids(sorted_y: jax.Array, k: int) -> jax.Array:
    """Exact weighted 1-D k-means of :func:`_weighted_points` by dynamic programming."""
    return optimal_of_points(*_weighted_points(sorted_y), k)


def optimal_of_points(points: jax.Array, weights: jax.Array, k: int) -> jax.Array:
    """Exact k-means of sorted ``points`` with ``weights`` (sorted centroids).

    ``best[j][i]`` is the least cost of the first ``i`` points in ``j`` clusters;
    clusters are contiguous runs (allowed empty), so
    ``best[j][i] = min_m best[j-1][m] + cost(m, i)``, an ``O(k P^2)`` vectorized DP
    on prefix sums of ``w``, ``w x`` and ``w x²``.

    Example:
        >>> import jax.numpy as jnp
        >>> y = jnp.array([0.0, 0.1, 2.0, 2.1])
        >>> [round(c, 3) for c in optimal_of_points(y, jnp.ones(4), 2).tolist()]
        [0.05, 2.05]
    """
    count = points.shape[0]
    w = prefix_sum(weights)
    s1 = prefix_sum(weights * points)
    s2 = prefix_sum(weights * points * points)
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


def exact_codebook(sorted_x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The distinct values, padded to ``k`` with the largest; and how many there are.

    Example:
        >>> import jax.numpy as jnp
        >>> codebook, distinct = exact_codebook(jnp.array([1.0, 1.0, 3.0]), 4)
        >>> codebook.tolist(), int(distinct)
        ([1.0, 3.0, 3.0, 3.0], 2)
    """
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
    prefix = prefix_sum(sorted_y)
    tolerance = tol * (sorted_y[-1] - sorted_y[0])
    if method == "optimal":
        start = _optimal_centroids(sorted_y, k)
    else:
        start = initial_centroids(sorted_y, k, init, key)
    centroids, iterations = lloyd(sorted_y, prefix, start, max_iter, tolerance)
    centroids = centroids + shift
    exact, distinct = exact_codebook(sorted_x, k)
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
    axes: list[str] = []
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


def valid_entries(x: jax.Array, count: jax.Array | None) -> jax.Array:
    """1 for real entries, 0 for padding: the first ``count`` entries of a 1-D ``x`` are real.

    Example:
        >>> import jax.numpy as jnp
        >>> valid_entries(jnp.zeros(4), jnp.int32(3)).tolist()
        [1.0, 1.0, 1.0, 0.0]
    """
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
    width = bin_width(low, high, bins)

    def block_sums(block, low, width):
        which, offset = _bin_of(block, low, width, bins)
        # Counts and offsets in one scatter (one pass over the values).
        valid = valid_entries(block, count)
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
        codes = assign_fast(block, centroids, low, high)
        # Sums and counts in one scatter (one pass over the values).
        valid = valid_entries(block, count)
        both = jnp.stack([(block - shift) * valid, valid], axis=-1)
        sums = jnp.zeros((k, 2), block.dtype).at[codes].add(both, mode="promise_in_bounds")
        return (sums[:, 0], sums[:, 1]), (), ()

    (sums, sizes), _, _ = _reduce_blocks(block_sums, x, centroids, low, high, shift)
    return sums, sizes


def assign_blocks(x: jax.Array, codebook: jax.Array, low: jax.Array, high: jax.Array, count=None):
    """Nearest codebook index of each value (uint8, shaped and sharded like ``x``) and the
    squared error of the clustered ``x``; shard by shard where ``x`` is split over
    ``Explicit`` mesh axes (jax refuses a table lookup indexed by a sharded array there).

    Example:
        >>> import jax.numpy as jnp
        >>> x, codebook = jnp.array([0.0, 0.4, 1.0]), jnp.array([0.0, 1.0])
        >>> codes, error = assign_blocks(x, codebook, jnp.min(x), jnp.max(x))
        >>> codes.tolist(), round(float(error), 3)
        ([0, 0, 1], 0.16)
    """

    def assign(block, codebook, low, high):
        codes = assign_fast(block, codebook, low, high)
        approx = jnp.take(codebook.astype(jnp.float32), codes)
        valid = valid_entries(block, count)
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
    bins = HISTOGRAM_BINS
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
        prefix = prefix_sum(counts * y)
        weight_prefix = prefix_sum(counts)
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
        centroids, iterations = lloyd(y, prefix, start, max_iter, tolerance, weight_prefix, grid)
        centroids = centroids + shift

        # One exact Lloyd step on all values: assign, then each cluster's exact mean.
        # Both halves can only lower the error of the binned centroids.
        sums, sizes = _cluster_sums(x, centroids, low, high, shift, count)
        means = jnp.where(sizes > 0, sums / jnp.maximum(sizes, 1.0) + shift, centroids)
        return jnp.sort(jnp.sort(means).astype(codebook_dtype)), iterations

    codebook, iterations = jax.lax.cond(exact, distinct_values, binned, x)
    return codebook, iterations, occupied


def uses_histogram(n: int, method: str, init: str) -> bool:
    """Whether :func:`fit` takes the histogram path for ``n`` values with these options.

    Example:
        >>> uses_histogram(10**6, "lloyd", "linear"), uses_histogram(10**6, "optimal", "linear")
        (True, False)
    """
    return method == "lloyd" and init in _HISTOGRAM_INITS and n > HISTOGRAM_MIN


def fit(
    x: jax.Array,
    key: jax.Array | None,
    *,
    histogram: bool | None = None,
    count: jax.Array | None = None,
    **options: Unpack[FitOptions],
):
    """Clusters the float32 array ``x``; returns codebook, iterations, distinct count.

    ``histogram=None`` picks the histogram path for large leaves (see
    :func:`uses_histogram`). The sorted path needs ``x`` 1-D; the histogram path takes
    any shape, and a 1-D ``x`` whose entries after the first ``count`` are padding.
    ``options`` are the :class:`FitOptions`.

    Example:
        >>> import jax.numpy as jnp
        >>> import numpy as np
        >>> codebook, iterations, distinct = fit(jnp.array([0.0, 0.1, 2.0, 2.1]), None, k=2,
        ...     init="linear", method="lloyd", max_iter=100, tol=1e-6,
        ...     codebook_dtype=np.dtype("float32"))
        >>> [round(c, 3) for c in codebook.tolist()], int(distinct)
        ([0.05, 2.05], 4)
    """
    if histogram is None:
        histogram = uses_histogram(x.size, options["method"], options["init"])
    if histogram:
        return _fit_histogram(x, key, count=count, **options)
    return _fit_sorted(x, key, **options)


def assign_fast(
    values: jax.Array, centroids: jax.Array, low: jax.Array, high: jax.Array
) -> jax.Array:
    """Nearest of the sorted ``centroids`` for each value, in ``O(n)``; int32.

    Exactly ``searchsorted(midpoints, values, side="right")``: a table over
    ``_ASSIGN_BINS`` equal-width bins of ``[low, high]`` holds how many midpoints lie
    surely below each bin, and ``_ASSIGN_SPAN`` comparisons add those inside it.
    Where some bin holds more midpoints than that, it falls back to a binary search.

    Example:
        >>> import jax.numpy as jnp
        >>> x = jnp.array([0.0, 0.4, 1.0])
        >>> assign_fast(x, jnp.array([0.0, 1.0]), jnp.min(x), jnp.max(x)).tolist()
        [0, 0, 1]
    """
    centroids = centroids.astype(jnp.float32)
    boundaries = (centroids[:-1] + centroids[1:]) * 0.5
    bins, span = _ASSIGN_BINS, _ASSIGN_SPAN
    width = bin_width(low, high, bins)
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


def assign(values: jax.Array, codebook: jax.Array) -> jax.Array:
    """Index of the nearest centroid in the sorted ``codebook`` for each of ``values`` (uint8).

    Example:
        >>> import jax.numpy as jnp
        >>> assign(jnp.array([0.0, 0.4, 1.0]), jnp.array([0.0, 1.0])).tolist()
        [0, 0, 1]
    """
    centroids = codebook.astype(jnp.float32)
    boundaries = (centroids[:-1] + centroids[1:]) * 0.5
    return jnp.searchsorted(boundaries, values, side="right").astype(jnp.uint8)
