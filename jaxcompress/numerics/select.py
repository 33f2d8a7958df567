"""Choosing which entries to keep: the lowest scores pruned, or N of every M rows.

Ties always go in index order, so masks are reproducible bit for bit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _int_dtype():
    return jnp.int64 if jax.config.x64_enabled else jnp.int32


def rank_keep(scores: jax.Array, count: jax.Array | int, axis: int | None = None) -> jax.Array:
    """Keeps all but the ``count`` lowest scores (stable: ties pruned in index order).

    ``axis=None`` ranks the flattened array (row-major); an axis ranks along it, with
    ``count`` broadcasting against the other axes.

    Example:
        >>> import jax.numpy as jnp
        >>> rank_keep(jnp.array([3.0, 1.0, 1.0, 2.0]), 2).tolist()
        [True, False, False, True]
        >>> rank_keep(jnp.array([[1.0, 2.0], [0.0, 3.0]]), 1, axis=0).tolist()
        [[True, False], [False, True]]
    """
    if axis is None:
        flat = scores.reshape(-1)
        order = jnp.argsort(flat, stable=True)
        index = jnp.arange(flat.shape[0], dtype=_int_dtype())
        rank = jnp.zeros(flat.shape, _int_dtype()).at[order].set(index)
        return (rank >= jnp.asarray(count, _int_dtype())).reshape(scores.shape)
    order = jnp.argsort(scores, axis=axis, stable=True)
    rank = jnp.argsort(order, axis=axis, stable=True).astype(_int_dtype())
    return rank >= jnp.asarray(count, _int_dtype())


def nm_keep_mask(scores: jax.Array, n: int, m: int) -> jax.Array:
    """Keep-mask of a ``(K, C)`` score matrix: the ``n`` best of every ``m`` rows per column.

    Ties go to the lower row index, as in :func:`jaxcompress.prune`. A NaN score ranks
    above every other (as in :func:`jaxcompress.prune`'s magnitude keys), so a NaN
    weight is kept rather than zeroed.

    Example:
        >>> import jax.numpy as jnp
        >>> nm_keep_mask(jnp.array([[1.0], [4.0], [3.0], [3.0]]), 2, 4)[:, 0].tolist()
        [False, True, True, False]
    """
    rows, columns = scores.shape
    grouped = scores.reshape(rows // m, m, columns)
    descending = jnp.where(jnp.isnan(grouped), -jnp.inf, -grouped)
    order = jnp.argsort(descending, axis=1, stable=True)
    rank = jnp.argsort(order, axis=1, stable=True)
    return (rank < n).reshape(rows, columns)
