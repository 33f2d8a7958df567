"""SparseGPT (Frantar & Alistarh 2023): prune the rows of a matrix view with error feedback.

See :mod:`jaxcompress.numerics.obs` for the sweep; here each row is pruned, with the
entries chosen per block by OBS saliency or N:M along the rows.
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction

import jax
import jax.numpy as jnp
from jax import lax

from jaxcompress.numerics.obs import (
    block_padding,
    damped_inverse_factor,
    dot,
    relative_output_error,
    sweep,
)
from jaxcompress.numerics.select import nm_keep_mask, rank_keep


def prefix_counts(sparsity: Fraction, row_counts: list[int], n: int) -> list[int]:
    """Prune counts per chunk of rows that add up to exactly ``floor(sparsity * m * n)``.

    Chunk ``k`` (``row_counts[k]`` rows of ``n`` entries) prunes
    ``floor(s · R_{k+1} · n) − floor(s · R_k · n)`` where ``R_k`` is the number of rows
    before it, so every chunk prunes ``floor`` or ``ceil`` of its own share.

    Example:
        >>> prefix_counts(Fraction(1, 2), [3, 3], 1), prefix_counts(Fraction(1, 2), [1] * 4, 3)
        ([1, 2], [1, 2, 1, 2])
    """
    counts, before, done = [], 0, 0
    for rows in row_counts:
        done += rows
        total = math.floor(sparsity * done * n)
        counts.append(total - before)
        before = total
    return counts


@functools.partial(jax.jit, static_argnames=("block_size", "nm"))
def sparsegpt(
    matrix: jax.Array,
    gram: jax.Array,
    block_counts: jax.Array | None,
    *,
    damp: float | jax.Array,
    block_size: int,
    nm: tuple[int, int] | None = None,
) -> tuple[jax.Array, jax.Array, dict]:
    """SparseGPT on an ``(m, n)`` matrix view: ``(values, keep, stats)``.

    Rows are swept in blocks of ``min(block_size, m)`` (the last block padded).
    When block ``k`` starts, its ``block_counts[k]`` entries with the lowest
    ``W_ij² / U_ii²`` (the OBS saliency, ``U_ii² = [H⁻¹]_ii`` after the earlier
    rows; dead inputs score 0) are chosen for pruning, over all its rows and outputs,
    ties in row-major order. Then each row is pruned and its error fed forward.

    With ``nm=(N, M)`` (``M`` dividing ``m``) the mask is N:M along the rows instead,
    as SparseGPT does for semi-structured sparsity: when the sweep reaches the first
    row of each run of ``M`` rows, each output column keeps the ``N`` of those rows
    with the highest saliency, scored on the current, error-updated weights (ties
    keep the lower row); ``block_counts`` is then unused (pass ``None``).

    Returns:
        ``values``: the updated weights (float32, zero where pruned); ``keep``: the
        boolean mask; ``stats``: ``{"damping", "factorized", "relative_output_error"}``
        (``λ`` added to the diagonal, whether the Cholesky factors are finite).

    Example:
        >>> import jax.numpy as jnp
        >>> w = jnp.array([[1.0, -2.0], [3.0, 0.5]])
        >>> values, keep, _ = sparsegpt(w, jnp.eye(2), jnp.array([2]), damp=0.0, block_size=128)
        >>> keep.tolist(), values.tolist()
        ([[False, True], [True, False]], [[0.0, -2.0], [3.0, 0.0]])
        >>> _, keep, _ = sparsegpt(w, jnp.eye(2), None, damp=0.0, block_size=128, nm=(1, 2))
        >>> keep.tolist()
        [[False, True], [True, False]]
    """
    w = matrix.astype(jnp.float32)
    m, n = w.shape
    block, padded = block_padding(m, block_size)
    upper, damping, dead = damped_inverse_factor(gram, damp, padded)
    w_padded = jnp.zeros((padded, n), jnp.float32).at[:m].set(w)
    dead_padded = jnp.zeros((padded,), bool).at[:m].set(dead)
    real = jnp.arange(padded) < m
    diagonal = jnp.diagonal(upper)
    counts = None if nm is not None else jnp.asarray(block_counts)

    def block_fn(start, w, carry):
        values, keep = carry
        rows = lax.dynamic_slice_in_dim(w, start, block, axis=0)
        d = lax.dynamic_slice_in_dim(diagonal, start, block)
        is_real = lax.dynamic_slice_in_dim(real, start, block)
        is_dead = lax.dynamic_slice_in_dim(dead_padded, start, block)
        score = jnp.square(rows) / jnp.square(d)[:, None]
        score = jnp.where(is_dead[:, None], 0.0, score)
        score = jnp.where(is_real[:, None], score, jnp.inf)
        chosen = rank_keep(score, counts[start // block])
        return values, lax.dynamic_update_slice_in_dim(keep, chosen, start, axis=0)

    def choose_run(args):
        kept, run = nm
        r, err, u_block, w, keep = args
        rows = lax.dynamic_slice_in_dim(w, r, run, axis=0)
        rows = rows - dot(lax.dynamic_slice_in_dim(u_block, r, run, axis=1).T, err)
        d = lax.dynamic_slice_in_dim(diagonal, r, run)
        score = jnp.square(rows) / jnp.square(d)[:, None]
        score = jnp.where(lax.dynamic_slice_in_dim(dead_padded, r, run)[:, None], 0.0, score)
        return lax.dynamic_update_slice_in_dim(keep, nm_keep_mask(score, kept, run), r, axis=0)

    def row_fn(r, w_row, err, u_block, w, carry):
        values, keep = carry
        if nm is not None:
            starts = (r % nm[1] == 0) & (r < m)
            keep = lax.cond(starts, choose_run, lambda args: args[-1], (r, err, u_block, w, keep))
        q = jnp.where(lax.dynamic_index_in_dim(keep, r, axis=0, keepdims=False), w_row, 0.0)
        return q, (lax.dynamic_update_index_in_dim(values, q, r, axis=0), keep)

    start = (jnp.zeros((padded, n), jnp.float32), jnp.ones((padded, n), bool))
    chooser = None if nm is not None else block_fn
    values, keep = sweep(w_padded, upper, block, row_fn, start, chooser)
    values, keep = values[:m], keep[:m]
    stats = {
        "damping": damping,
        "factorized": jnp.all(jnp.isfinite(upper)),
        "relative_output_error": relative_output_error(w, values, gram),
    }
    return values, keep, stats
