"""N:M semi-structured sparsity: in every run of M inputs of an output, N are kept.

The runs lie along the contracted axis of the weight's matrix view ``(K, N_out)``
(all axes but the last flattened row-major: a Dense kernel's ``in`` axis, a conv
kernel's ``h * w * in`` patch), which is the layout sparse tensor cores (2:4 on NVIDIA
Ampere and later) accelerate. The result is an ordinary :class:`~jaxcompress.Sparse`
leaf holding exactly ``size * N / M`` values.
"""

from __future__ import annotations

import functools
import math
import re

import jax
import jax.numpy as jnp

from jaxcompress._validate import check_selected_leaf
from jaxcompress.data_aware import leaf_gram, require_data, wanda_scores
from jaxcompress.filters import Filter, kernels
from jaxcompress.prune import sparse_from_mask
from jaxcompress.sharding import named_sharding_of, place_like, unsharded
from jaxcompress.transforms import Transform, select_leaves

__all__ = ["nm_keep_mask", "prune_nm"]

_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def _parse(pattern: str) -> tuple[int, int]:
    match = _PATTERN.match(pattern) if isinstance(pattern, str) else None
    if match is None:
        raise ValueError(f"prune_nm: pattern must look like '2:4', got {pattern!r}")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ValueError(f"prune_nm: pattern {pattern!r} needs 0 < N < M")
    return n, m


def nm_keep_mask(scores: jax.Array, n: int, m: int) -> jax.Array:
    """Keep-mask of a ``(K, C)`` score matrix: the ``n`` best of every ``m`` rows per column.

    Ties go to the lower row index, as in :func:`jaxcompress.prune`.

    Example:
        >>> import jax.numpy as jnp
        >>> nm_keep_mask(jnp.array([[1.0], [4.0], [3.0], [3.0]]), 2, 4)[:, 0].tolist()
        [False, True, True, False]
    """
    rows, columns = scores.shape
    grouped = scores.reshape(rows // m, m, columns)
    order = jnp.argsort(-grouped, axis=1, stable=True)
    rank = jnp.argsort(order, axis=1, stable=True)
    return (rank < n).reshape(rows, columns)


def prune_nm(
    pattern: str = "2:4", *, importance: str = "magnitude", where: Filter = kernels
) -> Transform:
    """N:M sparsity along the contracted axis (``"2:4"``: 2 of every 4 inputs kept).

    Args:
        pattern: ``"N:M"`` with ``0 < N < M``.
        importance: ``"magnitude"`` (``|w|``) or ``"wanda"`` (``|w| · ‖x‖``, which needs
            ``data=`` from :func:`jaxcompress.calibrate`).
        where: which leaves; by default floating leaves with ndim >= 2.

    Returns:
        A transform returning ``(compressed, stats)``: each selected leaf becomes a
        :class:`~jaxcompress.Sparse` leaf; stats give ``pruned``, ``size``, ``n`` and
        ``m`` per leaf. It runs under ``jit``.

    Raises:
        ValueError: a malformed pattern, an unknown importance, a leaf whose
            contracted size is not a multiple of ``M`` (named), or ``wanda`` without
            matching ``data=``.

    Example:
        >>> import jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> w = jnp.arange(1.0, 17.0).reshape(8, 2)
        >>> sparse, stats = jc.prune_nm("2:4")({"w": w})
        >>> jc.materialize(sparse)["w"][:, 0].tolist()
        [0.0, 0.0, 5.0, 7.0, 0.0, 0.0, 13.0, 15.0]
        >>> stats["w"]["pruned"], sparse["w"].nnz
        (8, 8)
    """
    n, m = _parse(pattern)
    if importance not in ("magnitude", "wanda"):
        raise ValueError(f"prune_nm: importance must be 'magnitude' or 'wanda', got {importance!r}")
    name = f"prune_nm({pattern!r}, importance={importance})"

    def apply(params, *, key=None, data=None):
        by_path = require_data(name, "importance='wanda'", data) if importance == "wanda" else {}
        selected, entries, treedef = select_leaves(params, where)
        weights = [check_selected_leaf(name, entry.path, entry.leaf) for entry in selected]
        for entry, weight in zip(selected, weights, strict=True):
            rows = math.prod(weight.shape[:-1])
            if rows % m:
                raise ValueError(
                    f"{name}: leaf {entry.path!r} of shape {tuple(weight.shape)} contracts "
                    f"{rows} inputs, not a multiple of M={m}"
                )
        leaves = [entry.leaf for entry in entries]
        stats = {}
        for entry, weight in zip(selected, weights, strict=True):
            shape = tuple(weight.shape)
            matrix = unsharded(weight).reshape(math.prod(shape[:-1]), shape[-1])
            if importance == "wanda":
                gram, fan_in, _, _ = leaf_gram(
                    name, "importance='wanda'", entry.path, by_path, shape
                )
                if fan_in != len(shape) - 1:
                    raise ValueError(
                        f"{name}: leaf {entry.path!r} is contracted over its first {fan_in} "
                        "axes; N:M runs need every axis but the last"
                    )
                scores = wanda_scores(matrix, unsharded(gram))
            else:
                scores = jnp.abs(matrix.astype(jnp.float32))
            keep = nm_keep_mask(scores, n, m).reshape(shape)
            size = math.prod(shape)
            sparse = sparse_from_mask(weight, keep, size * n // m)
            reference = named_sharding_of(weight)
            leaves[entry.index] = jax.tree.map(
                functools.partial(place_like, reference=reference), sparse
            )
            stats[entry.path] = {"pruned": size - size * n // m, "size": size, "n": n, "m": m}
        return jax.tree_util.tree_unflatten(treedef, leaves), stats

    return Transform(apply, name)
