"""Wanda (Sun et al. 2023): prune by ``|W_ij| · √G_ii``, no weight update.

The score of ``W_ij`` in a weight's ``(m, n)`` matrix view is the weight's magnitude
times its input's RMS (``G`` the input Gram, see :mod:`jaxcompress.numerics.obs`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcompress.numerics.select import rank_keep


def wanda_scores(matrix: jax.Array, gram: jax.Array) -> jax.Array:
    """Wanda's importance ``|W_ij| · √G_ii`` of an ``(m, n)`` matrix view, in float32.

    With unit activation norms (``diag G = 1``) the scores are exactly ``|W|``.

    Example:
        >>> import jax.numpy as jnp
        >>> w = jnp.array([[1.0, -2.0], [3.0, 1.0]])
        >>> wanda_scores(w, jnp.diag(jnp.array([4.0, 1.0]))).tolist()
        [[2.0, 4.0], [3.0, 1.0]]
    """
    norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram).astype(jnp.float32), 0.0))
    return jnp.abs(matrix.astype(jnp.float32)) * norms[:, None]


def wanda_keep(
    matrix: jax.Array, gram: jax.Array, counts: jax.Array | int, *, comparison: str
) -> jax.Array:
    """Wanda's keep-mask of an ``(m, n)`` matrix view; works under ``jit``.

    ``comparison="layer"`` prunes the ``counts`` (a scalar) lowest scores of the whole
    matrix; ``"output"`` prunes ``counts[j]`` lowest scores in each output column ``j``.
    Ties are pruned in index order (row-major, or down the column).

    Example:
        >>> import jax.numpy as jnp
        >>> w = jnp.array([[1.0, -2.0], [3.0, 1.0]])
        >>> wanda_keep(w, jnp.eye(2), 2, comparison="layer").tolist()
        [[False, True], [True, False]]
        >>> wanda_keep(w, jnp.diag(jnp.array([16.0, 1.0])), jnp.array([1, 1]),
        ...            comparison="output").tolist()
        [[True, True], [False, False]]
    """
    scores = wanda_scores(matrix, gram)
    if comparison == "layer":
        return rank_keep(scores, counts)
    return rank_keep(scores, jnp.asarray(counts)[None, :], axis=0)
