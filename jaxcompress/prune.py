"""Unstructured magnitude pruning into :class:`~jaxcompress.Sparse` leaves."""

from __future__ import annotations

import functools
import math
import numbers
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress._validate import check_selected_leaf, is_traced
from jaxcompress.arrays import Sparse
from jaxcompress.filters import Filter, kernels
from jaxcompress.sharding import named_sharding_of, place_like, unsharded
from jaxcompress.transforms import Transform, select_leaves

_SCOPES = ("layer", "global")


def _check_sparsity(sparsity: object) -> Fraction:
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
    return math.floor(_check_sparsity(sparsity) * size)


def _int_dtype():
    return jnp.int64 if jax.config.x64_enabled else jnp.int32


def magnitude_keep_mask(weight: jax.Array, num_pruned: int | jax.Array) -> jax.Array:
    """The keep-mask zeroing the ``num_pruned`` smallest-magnitude entries of ``weight``.

    Ties are broken deterministically: among equal magnitudes the entry with the
    lower row-major index is pruned first. ``num_pruned`` may be traced (for example a
    count from a sparsity schedule inside a jitted training step), since the mask is
    read off each entry's magnitude rank rather than sliced by the count.

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
    keep, _ = _keep_and_order(weight, num_pruned)
    return keep


def _keep_and_order(weight: jax.Array, num_pruned: int | jax.Array):
    size = math.prod(weight.shape)
    # Ranking needs the whole leaf in one piece.
    weight = unsharded(weight)
    order = jnp.argsort(jnp.abs(weight.reshape(-1)), stable=True)
    # The inverse permutation gives each entry its rank; the lowest ranks are pruned.
    rank = jnp.zeros((size,), _int_dtype()).at[order].set(jnp.arange(size, dtype=_int_dtype()))
    keep = rank >= jnp.asarray(num_pruned, _int_dtype())
    return keep.reshape(weight.shape), order


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
    kept_index = jnp.flatnonzero(keep.reshape(-1), size=nnz)
    mask = jnp.packbits(keep, axis=-1, bitorder="little")
    return Sparse(weight.reshape(-1)[kept_index], mask, tuple(weight.shape), np.dtype(weight.dtype))


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
    keep = magnitude_keep_mask(weight, num_pruned)
    return sparse_from_mask(weight, keep, size - num_pruned)


@jax.jit
def _global_threshold_counts(sorted_magnitudes: list[jax.Array], total_pruned: jax.Array):
    """Per-leaf counts below and at the global magnitude threshold.

    Binary search over float32 bit patterns (ordered like the non-negative
    floats they encode) for the smallest ``t`` with ``#{|w| <= t} >= total_pruned``.
    Each leaf is only searched, never concatenated with the others.
    """

    def count_at_most(bits):
        threshold = jax.lax.bitcast_convert_type(bits, jnp.float32)
        return sum(
            jnp.searchsorted(m, threshold, side="right").astype(_int_dtype())
            for m in sorted_magnitudes
        )

    def step(_, bounds):
        low, high = bounds
        middle = low + (high - low) // 2
        enough = count_at_most(middle) >= total_pruned
        return jnp.where(enough, low, middle + 1), jnp.where(enough, middle, high)

    infinity_bits = jnp.uint32(0x7F800000)
    low, _ = jax.lax.fori_loop(0, 32, step, (jnp.uint32(0), infinity_bits))
    threshold = jax.lax.bitcast_convert_type(low, jnp.float32)
    below = [jnp.searchsorted(m, threshold, side="left") for m in sorted_magnitudes]
    at_most = [jnp.searchsorted(m, threshold, side="right") for m in sorted_magnitudes]
    return threshold, below, at_most


def global_counts(weights: list[jax.Array], total_pruned: int | jax.Array) -> list[jax.Array]:
    """Per-weight prune counts from one global magnitude threshold; works under ``jit``.

    Exactly ``total_pruned`` entries are pruned over all weights (which may be traced).
    Entries tied at the threshold are pruned in leaf order, then row-major order
    (within a leaf, :func:`magnitude_keep_mask` breaks the ties).

    Example:
        >>> import jax.numpy as jnp
        >>> [int(c) for c in global_counts([jnp.array([1.0, 2.0]), jnp.array([1.0, 9.0])], 2)]
        [1, 1]
    """
    magnitudes = [jnp.sort(jnp.abs(unsharded(w)).reshape(-1).astype(jnp.float32)) for w in weights]
    total = jnp.asarray(total_pruned, _int_dtype())
    _, below, at_most = _global_threshold_counts(magnitudes, total)
    below = [count.astype(_int_dtype()) for count in below]
    at_most = [count.astype(_int_dtype()) for count in at_most]
    ties_left = total - sum(below)
    counts = []
    # Ties at the threshold go to the earlier leaves first.
    for strictly_below, at_or_below in zip(below, at_most, strict=True):
        from_ties = jnp.minimum(at_or_below - strictly_below, ties_left)
        ties_left = ties_left - from_ties
        counts.append(strictly_below + from_ties)
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


def prune(sparsity: float, *, scope: str = "layer", where: Filter = kernels) -> Transform:
    """Unstructured magnitude pruning.

    Each selected leaf becomes a :class:`~jaxcompress.Sparse` leaf holding its kept
    values and a bit-packed mask.

    Args:
        sparsity: fraction of entries to zero, in ``[0, 1)``.
        scope: ``"layer"`` zeroes exactly ``floor(sparsity * n)`` entries of each
            selected leaf. ``"global"`` applies one magnitude threshold across all
            selected leaves, zeroing exactly ``floor(sparsity * total)`` entries in all;
            it needs concrete arrays (each leaf's storage size depends on the data),
            so call it outside ``jit``.
        where: which leaves to prune; by default :func:`jaxcompress.filters.kernels`
            (floating leaves with ndim >= 2), so biases and norms are left alone.

    Returns:
        A transform returning ``(compressed, stats)``, where ``stats`` maps each
        pruned leaf path to ``{"pruned": count, "size": n}``.

    Raises:
        ValueError: sparsity outside ``[0, 1)``, an unknown scope, a selected scalar,
            zero-size or non-finite leaf, or global scope under ``jit``.
        TypeError: a selected integer, boolean or already-compressed leaf.

    Example:
        >>> import jax
        >>> import jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> params = {"dense": {"kernel": jnp.arange(12.0).reshape(3, 4), "bias": jnp.ones(4)}}
        >>> pruned, stats = jax.jit(jc.prune(0.5))(params)
        >>> pruned["dense"]["kernel"].nnz, int(stats["dense/kernel"]["pruned"])
        (6, 6)
    """
    fraction = _check_sparsity(sparsity)
    if scope not in _SCOPES:
        raise ValueError(f"prune: scope must be one of {_SCOPES}, got {scope!r}")
    name = f"prune({float(fraction)!r}, scope={scope})"

    def apply(params, *, key=None, data=None):
        selected, entries, treedef = select_leaves(params, where)
        weights = [check_selected_leaf(name, entry.path, entry.leaf) for entry in selected]
        if scope == "global":
            if any(is_traced(w) for w in weights):
                raise ValueError(
                    "prune: scope='global' needs concrete arrays, since each leaf's storage "
                    "size depends on the data; call it outside jax.jit or use scope='layer'"
                )
            counts = global_pruned_counts(weights, float(fraction))
        else:
            counts = [math.floor(fraction * math.prod(w.shape)) for w in weights]
        leaves = [entry.leaf for entry in entries]
        stats = {}
        for entry, weight, count in zip(selected, weights, counts, strict=True):
            sparse = magnitude_sparse(weight, count)
            reference = named_sharding_of(weight)
            leaves[entry.index] = jax.tree.map(
                functools.partial(place_like, reference=reference), sparse
            )
            stats[entry.path] = {"pruned": count, "size": math.prod(weight.shape)}
        return jax.tree_util.tree_unflatten(treedef, leaves), stats

    return Transform(apply, name)
