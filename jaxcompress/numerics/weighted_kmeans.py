"""Sensitivity-weighted 1-D k-means and GPTQ with codebook rounding, for ``cluster``.

**Weighted k-means** (SqueezeLLM, Kim et al. 2023) minimizes ``Σ w_i (x_i − c_{a(i)})²``
over the codebook ``c`` and the assignment ``a``. The weights do not change which
centroid is nearest, so in one dimension every cluster is still a contiguous run of
the sorted values, cut at the midpoints between centroids; only a cluster's centroid
changes, to its weighted mean ``Σ w x / Σ w``. Sorting the values once (carrying
their weights) and taking prefix sums of ``w`` and ``w · x`` keeps a Lloyd iteration
at ``O(k log n)``, as for plain k-means; the exact dynamic program of
``method="optimal"`` runs on prefix sums of ``w``, ``w · x`` and ``w · x²``.

Weights are first rescaled (:func:`normalized_weights`): divided by their maximum,
then multiplied by a power of two that brings their mean near 1. The objective does
not change, and uniform weights become exactly 1, so every sum is then the same float
as plain k-means computes: uniform weights give exactly plain k-means' codebook.

**GPTQ with codebook rounding** (:func:`codebook_gptq`): the rows of a weight's
``(m, n)`` matrix view are swept as by GPTQ (:mod:`jaxcompress.numerics.obs`, whose
sweep and damped inverse Cholesky factor it reuses), but each row is rounded to the
nearest codebook entry instead of to a uniform grid.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.numerics.kmeans1d import (
    OPTIMAL_POINTS,
    assign,
    bin_width,
    exact_codebook,
    initial_centroids,
    kmeans_plus_plus,
    lloyd,
    optimal_of_points,
    prefix_sum,
)
from jaxcompress.numerics.obs import (
    block_padding,
    damped_inverse_factor,
    relative_output_error,
    sweep,
)


def normalized_weights(w: jax.Array) -> jax.Array:
    """``w`` rescaled to a maximum near its count's share: float32, same shape, same minimizer.

    Negative weights count as 0. ``w / max(w)`` is multiplied by ``2**e`` (exact) with
    ``e`` the integer nearest ``log2(n / Σ (w / max w))``, so the mean weight is within
    a factor √2 of 1 and a cluster's total weight reads roughly as a point count.
    Uniform weights become exactly 1; all-zero weights become 1 (plain k-means).

    Example:
        >>> import jax.numpy as jnp
        >>> normalized_weights(jnp.array([3.0, 3.0, 3.0])).tolist()
        [1.0, 1.0, 1.0]
        >>> normalized_weights(jnp.array([4.0, 1.0, 1.0, 0.0])).tolist()
        [2.0, 0.5, 0.5, 0.0]
    """
    w = jnp.maximum(w.astype(jnp.float32), 0.0)
    top = jnp.max(w)
    scaled = jnp.where(top > 0, w / jnp.where(top > 0, top, 1.0), 1.0)
    total = jnp.sum(scaled)
    exponent = jnp.round(jnp.log2(scaled.size / total)).astype(jnp.int32)
    return jnp.ldexp(scaled, exponent)


def sort_with_weights(x: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``x`` sorted ascending (1-D float32) and ``w`` permuted alike.

    Sorts order-preserving int32 keys of the floats, as :mod:`jaxcompress.numerics.kmeans1d`
    does, so the sorted values are bit for bit those of plain k-means.

    Example:
        >>> import jax.numpy as jnp
        >>> xs, ws = sort_with_weights(jnp.array([0.5, -1.0, 2.0]), jnp.array([1.0, 2.0, 3.0]))
        >>> xs.tolist(), ws.tolist()
        ([-1.0, 0.5, 2.0], [2.0, 1.0, 3.0])
    """
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    flip = jnp.int32(0x7FFFFFFF)
    keys = jnp.where(bits < 0, bits ^ flip, bits)
    keys, w = jax.lax.sort((keys, w), num_keys=1, is_stable=False)
    values = jax.lax.bitcast_convert_type(jnp.where(keys < 0, keys ^ flip, keys), jnp.float32)
    return values, w


def _weighted_rank(weight_prefix: jax.Array, rank: jax.Array) -> jax.Array:
    """The sorted index holding weighted rank ``rank`` (first point whose running total
    of weights exceeds it); with unit weights, index ``rank`` itself."""
    n = weight_prefix.shape[0] - 1
    index = jnp.searchsorted(weight_prefix[1:], rank, side="right")
    return jnp.clip(index, 0, n - 1)


def weighted_initial_centroids(
    sorted_y: jax.Array,
    sorted_w: jax.Array,
    weight_prefix: jax.Array,
    k: int,
    init: str,
    key: jax.Array | None,
) -> jax.Array:
    """Starting centroids for weighted Lloyd on sorted values.

    ``"linear"`` and ``"random"`` ignore the weights (evenly spaced between min and
    max; ``k`` values drawn uniformly); ``"density"`` takes the weighted
    ``(i + 1/2)/k`` quantiles and ``"kmeans++"`` draws with probability
    ``~ w · D(x)²``. With unit weights each is exactly its plain version.

    Example:
        >>> import jax.numpy as jnp
        >>> y, w = jnp.array([0.0, 1.0, 2.0, 3.0]), jnp.array([0.1, 0.1, 0.1, 3.7])
        >>> prefix = jnp.cumsum(jnp.concatenate([jnp.zeros(1), w]))
        >>> weighted_initial_centroids(y, w, prefix, 2, "density", None).tolist()
        [3.0, 3.0]
    """
    if init == "density":
        n = sorted_y.shape[0]
        quantile = (jnp.arange(k, dtype=jnp.float32) + 0.5) / k
        # Ranks in units of the mean weight (the total is n for unit weights).
        rank = jnp.round(quantile * (n - 1)) * (weight_prefix[-1] / n)
        return sorted_y[_weighted_rank(weight_prefix, rank)]
    if init == "kmeans++":
        # It draws with a key; jaxcompress.cluster requires key= for it.
        assert key is not None
        return kmeans_plus_plus(sorted_y, k, key, sorted_w)
    return initial_centroids(sorted_y, k, init, key)


def weighted_points(sorted_y: jax.Array, sorted_w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The weighted data as at most 2048 weighted points, sorted, for the exact DP.

    Small inputs are used as they are; larger ones are binned into 2048 equal-width
    bins, each standing for its points by their weighted mean and total weight.

    Example:
        >>> import jax.numpy as jnp
        >>> points, mass = weighted_points(jnp.array([0.0, 1.0]), jnp.array([2.0, 1.0]))
        >>> points.tolist(), mass.tolist()
        ([0.0, 1.0], [2.0, 1.0])
    """
    n = sorted_y.shape[0]
    if n <= OPTIMAL_POINTS:
        return sorted_y, sorted_w
    bins = OPTIMAL_POINTS
    low, high = sorted_y[0], sorted_y[-1]
    width = bin_width(low, high, bins)
    which = jnp.clip(jnp.floor((sorted_y - low) / width), 0, bins - 1).astype(jnp.int32)
    mass = jax.ops.segment_sum(sorted_w, which, bins, indices_are_sorted=True)
    sums = jax.ops.segment_sum(sorted_w * sorted_y, which, bins, indices_are_sorted=True)
    centers = low + (jnp.arange(bins, dtype=sorted_y.dtype) + 0.5) * width
    means = jnp.where(mass > 0, sums / jnp.where(mass > 0, mass, 1.0), centers)
    return means, mass


def fit_weighted(
    x: jax.Array,
    w: jax.Array,
    key: jax.Array | None,
    *,
    k: int,
    init: str,
    method: str,
    max_iter: int,
    tol: float,
    codebook_dtype: np.dtype,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Weighted 1-D k-means of ``x`` with weights ``w`` (both 1-D): codebook, iterations, distinct.

    ``method="lloyd"`` starts from :func:`weighted_initial_centroids`; ``"optimal"``
    from the exact DP on :func:`weighted_points`. Lloyd then runs on the sorted values
    with weighted prefix sums (``centroid = Σ w x / Σ w`` of each cluster's run,
    boundaries at midpoints), stopping at ``max_iter`` or when no centroid moves more
    than ``tol * (max - min)``. A cluster of zero total weight keeps its centroid (or
    moves into the widest cluster). At most ``k`` distinct values: they are the codebook.

    Example:
        >>> import jax.numpy as jnp
        >>> x, w = jnp.array([0.0, 1.0, 10.0, 11.0]), jnp.array([1.0, 3.0, 1.0, 1.0])
        >>> codebook, _, _ = fit_weighted(x, w, None, k=2, init="linear", method="lloyd",
        ...                               max_iter=100, tol=0.0, codebook_dtype=jnp.float32)
        >>> [round(c, 4) for c in codebook.tolist()]  # 0 and 1 weighted 1 : 3
        [0.75, 10.5]
    """
    sorted_x, sorted_w = sort_with_weights(x, normalized_weights(w))
    weight_prefix = prefix_sum(sorted_w)
    # Work around the weighted median (the median for unit weights), as plain k-means.
    shift = sorted_x[_weighted_rank(weight_prefix, weight_prefix[-1] * 0.5)]
    sorted_y = sorted_x - shift
    prefix = prefix_sum(sorted_w * sorted_y)
    tolerance = tol * (sorted_y[-1] - sorted_y[0])
    if method == "optimal":
        start = optimal_of_points(*weighted_points(sorted_y, sorted_w), k)
    else:
        start = weighted_initial_centroids(sorted_y, sorted_w, weight_prefix, k, init, key)
    centroids, iterations = lloyd(sorted_y, prefix, start, max_iter, tolerance, weight_prefix)
    centroids = centroids + shift
    exact, distinct = exact_codebook(sorted_x, k)
    codebook = jnp.where(distinct <= k, exact, centroids).astype(codebook_dtype)
    return jnp.sort(codebook), iterations, distinct


def codebook_gptq(
    matrix: jax.Array,
    gram: jax.Array,
    codebook: jax.Array,
    *,
    damp: float | jax.Array,
    block_size: int,
    act_order: bool = False,
) -> tuple[jax.Array, jax.Array, dict]:
    """GPTQ on an ``(m, n)`` matrix view, rounding to a codebook: ``(codes, restored, stats)``.

    Row ``i`` (input feature ``i``) is rounded entry by entry to its nearest codebook
    entry, and its error ``(w_i − q_i) / U_ii`` is fed into the rows not yet rounded
    through row ``i`` of ``U``, the upper Cholesky factor of
    ``(G + damp · mean(diag G) · I)⁻¹``; rows go in blocks of ``block_size`` with lazy
    updates. This is :mod:`jaxcompress.numerics.obs`'s sweep with codebook rounding in
    place of the uniform grid. With a diagonal Gram no error moves, and the codes are
    exactly the nearest-entry assignment of ``matrix``.

    Args:
        matrix: the ``(m, n)`` weights.
        gram: the ``(m, m)`` second moment of the inputs.
        codebook: sorted ``(k,)``, or ``(C, k)`` with column ``j`` using row ``j % C``
            (one codebook per output channel, the last axis of the dense leaf).
        damp: ``λ = damp · mean(diag G)`` is added to the diagonal.
        block_size: rows per lazy-update block.
        act_order: round the rows in order of decreasing ``G_ii`` (codes come back in
            the natural order).

    Returns:
        ``codes``: uint8 ``(m, n)``; ``restored``: the codebook values they select
        (float32); ``stats``: ``{"damping", "factorized", "relative_output_error"}``.

    Example:
        >>> import jax.numpy as jnp
        >>> w = jnp.array([[0.7, -0.4], [0.6, 1.0]])
        >>> gram = jnp.array([[1.0, 0.9], [0.9, 1.0]])
        >>> codebook = jnp.array([-0.5, 0.0, 1.0])
        >>> codes, restored, _ = codebook_gptq(w, gram, codebook, damp=0.01, block_size=128)
        >>> codes.tolist(), restored.tolist()  # row 0 rounded up, so row 1 goes down
        ([[2, 0], [1, 2]], [[1.0, -0.5], [0.0, 1.0]])
        >>> codebook_gptq(w, jnp.eye(2), codebook, damp=0.01, block_size=128)[0].tolist()
        [[2, 0], [2, 2]]
    """
    w = matrix.astype(jnp.float32)
    m, n = w.shape
    centroids = codebook.astype(jnp.float32)
    if centroids.ndim == 1:

        def round_row(v):
            codes = assign(v, centroids)
            return codes, jnp.take(centroids, codes.astype(jnp.int32))

    else:
        columns = centroids[jnp.arange(n) % centroids.shape[0]]

        def round_row(v):
            codes = jax.vmap(assign)(v, columns)
            return codes, columns[jnp.arange(n), codes.astype(jnp.int32)]

    block, padded = block_padding(m, block_size)
    h = gram.astype(jnp.float32)
    order = None
    if act_order:
        order = jnp.argsort(-jnp.diagonal(h), stable=True)
        w, h = w[order], h[order][:, order]
    upper, damping, _ = damped_inverse_factor(h, damp, padded)
    w_padded = jnp.zeros((padded, n), jnp.float32).at[:m].set(w)

    def row_fn(r, w_row, err, u_block, w, codes):
        del err, u_block, w
        row_codes, q = round_row(w_row)
        return q, jax.lax.dynamic_update_index_in_dim(codes, row_codes, r, axis=0)

    codes = sweep(w_padded, upper, block, row_fn, jnp.zeros((padded, n), jnp.uint8))[:m]
    if order is not None:
        codes = codes[jnp.argsort(order)]
    flat = codes.astype(jnp.int32)
    if centroids.ndim == 1:
        restored = jnp.take(centroids, flat)
    else:
        restored = columns[jnp.arange(n)[None, :], flat]
    stats = {
        "damping": damping,
        "factorized": jnp.all(jnp.isfinite(upper)),
        "relative_output_error": relative_output_error(matrix.astype(jnp.float32), restored, gram),
    }
    return codes, restored, stats
