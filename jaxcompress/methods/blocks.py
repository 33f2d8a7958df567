"""Block sparsity: whole ``bk × bn`` tiles of a weight's matrix view are kept or zeroed.

Scattered zeros (unstructured pruning) shrink a file but rarely a matrix multiply:
the hardware still loads and multiplies every tile that holds one nonzero. Block-sparse
GPU and TPU kernels skip whole tiles of zeros instead, so zeroing weights a tile at a
time is what turns sparsity into speed. The tiles lie on the weight's matrix view
``(K, N)`` (all axes but the last flattened row-major: a Dense kernel's ``(in, out)``, a
conv kernel's ``(h * w * in, out)``), the layout those kernels contract over. The result
is an ordinary :class:`~jaxcompress.Sparse` leaf.
"""

from __future__ import annotations

import functools
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.arrays import Sparse
from jaxcompress.arrays.leading import from_leading, leading_shape, to_leading
from jaxcompress.core.checks import is_traced
from jaxcompress.core.mesh import unsharded
from jaxcompress.methods.prune import check_sparsity, pruned_count, sparse_from_mask
from jaxcompress.transforms.base import Transform
from jaxcompress.transforms.engine import Unfit, per_leaf
from jaxcompress.transforms.filters import Filter, kernels
from jaxcompress.transforms.stats import BlockStats

__all__ = ["block_keep_mask", "prune_blocks"]

_IMPORTANCES = ("l2", "l1", "max")
_SCOPES = ("layer", "global")


def _check_block(block: object) -> tuple[int, int]:
    if (
        not isinstance(block, (tuple, list))
        or len(block) != 2
        or not all(isinstance(b, numbers.Integral) and not isinstance(b, bool) for b in block)
        or not all(b > 0 for b in block)
    ):
        raise ValueError(f"prune_blocks: block must be a tuple of two positive ints, got {block!r}")
    return int(block[0]), int(block[1])


def _check_importance(importance: object) -> str:
    if importance not in _IMPORTANCES:
        raise ValueError(
            f"prune_blocks: importance must be one of {_IMPORTANCES}, got {importance!r}"
        )
    return importance


def _matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    return math.prod(shape[:-1]), shape[-1]


def _tiles_fit(shape: tuple[int, ...], block: tuple[int, int]) -> bool:
    rows, columns = _matrix_shape(shape)
    return rows % block[0] == 0 and columns % block[1] == 0


def _tile_scores(weight: jax.Array, block: tuple[int, int], importance: str) -> jax.Array:
    """The ``(K / bk, N / bn)`` float32 scores of the tiles of ``weight``'s matrix view."""
    bk, bn = block
    rows, columns = _matrix_shape(tuple(weight.shape))
    # Tiling needs the whole leaf in one piece.
    matrix = unsharded(weight).reshape(rows, columns).astype(jnp.float32)
    tiles = matrix.reshape(rows // bk, bk, columns // bn, bn)
    if importance == "l2":
        return jnp.sqrt(jnp.sum(jnp.square(tiles), axis=(1, 3)))
    if importance == "l1":
        return jnp.sum(jnp.abs(tiles), axis=(1, 3))
    return jnp.max(jnp.abs(tiles), axis=(1, 3))


def _normalised(scores: jax.Array, block: tuple[int, int], importance: str) -> jax.Array:
    """Per-element tile scores (mean ``|w|``, RMS, max), comparable across tile sizes."""
    elements = block[0] * block[1]
    if importance == "l1":
        return scores / jnp.float32(elements)
    if importance == "l2":
        return scores / jnp.float32(math.sqrt(elements))
    return scores


def _expand(tile_keep: jax.Array, shape: tuple[int, ...], block: tuple[int, int]) -> jax.Array:
    """A per-tile mask ``(K / bk, N / bn)`` as an entry mask shaped like the weight."""
    bk, bn = block
    kt, nt = tile_keep.shape
    entries = jnp.broadcast_to(tile_keep[:, None, :, None], (kt, bk, nt, bn))
    return entries.reshape(shape)


def block_keep_mask(
    weight: jax.Array,
    num_pruned: int | jax.Array,
    *,
    block: tuple[int, int] = (4, 4),
    importance: str = "l2",
) -> jax.Array:
    """The keep-mask zeroing the ``num_pruned`` lowest-scoring tiles of ``weight``.

    ``weight``'s matrix view ``(K, N)`` (all axes but the last flattened) is cut into
    ``block = (bk, bn)`` tiles, scored by ``importance`` and ranked; ties go to the
    lower row-major tile index. ``num_pruned`` counts tiles and may be traced.

    Args:
        weight: a floating-point array whose ``K`` is a multiple of ``bk`` and ``N``
            of ``bn``.
        num_pruned: how many tiles to zero, ``0 <= num_pruned <= K * N / (bk * bn)``.
        block: the tile shape ``(bk, bn)``.
        importance: ``"l2"`` (Frobenius norm), ``"l1"`` (sum of ``|w|``) or ``"max"``
            (largest ``|w|``) of each tile.

    Returns:
        A boolean array shaped like ``weight``, constant on every tile.

    Raises:
        ValueError: a bad block or importance, or a shape the block does not tile.

    Example:
        >>> import jax.numpy as jnp
        >>> w = jnp.array([[1.0, 1.0, 5.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
        >>> block_keep_mask(w, 1, block=(2, 2)).astype(int).tolist()
        [[0, 0, 1, 1], [0, 0, 1, 1]]
    """
    block = _check_block(block)
    importance = _check_importance(importance)
    shape = tuple(weight.shape)
    if not shape or not _tiles_fit(shape, block):
        raise ValueError(
            f"block_keep_mask: a weight of shape {shape} is not tiled by block {block}"
        )
    scores = _tile_scores(weight, block, importance)
    order = jnp.argsort(scores.reshape(-1), stable=True)
    rank = jnp.argsort(order, stable=True)
    tile_keep = (rank >= jnp.asarray(num_pruned, rank.dtype)).reshape(scores.shape)
    return _expand(tile_keep, shape, block)


# Per-leaf programs, cached by shape: eager calls compile one program per leaf shape,
# not one per primitive; inside a caller's jit they inline.
@functools.partial(jax.jit, static_argnames=("block", "importance", "nnz"))
def _layer_sparse(weight, num_pruned, *, block, importance, nnz):
    keep = block_keep_mask(weight, num_pruned, block=block, importance=importance)
    return sparse_from_mask(weight, keep, nnz)


@functools.partial(jax.jit, static_argnames=("block", "importance"))
def _global_scores(weight, *, block, importance):
    return _normalised(_tile_scores(weight, block, importance), block, importance)


@functools.partial(jax.jit, static_argnames=("block", "nnz"))
def _tile_sparse(weight, tile_keep, *, block, nnz):
    return sparse_from_mask(weight, _expand(tile_keep, tuple(weight.shape), block), nnz)


def _global_tile_keeps(scores: list[jax.Array], total_pruned: int) -> list[np.ndarray]:
    """Per-leaf tile keep-masks from one ranking of all tiles (ties: leaf, then tile order)."""
    if not scores:
        return []
    flat = np.concatenate([np.asarray(s, np.float32).reshape(-1) for s in scores])
    keep = np.ones(flat.shape, bool)
    keep[np.argsort(flat, kind="stable")[:total_pruned]] = False
    bounds = np.cumsum([0] + [s.size for s in scores])
    return [
        keep[start:stop].reshape(s.shape)
        for s, start, stop in zip(scores, bounds[:-1], bounds[1:], strict=True)
    ]


def prune_blocks(
    sparsity: float,
    *,
    block: tuple[int, int] = (4, 4),
    importance: str = "l2",
    scope: str = "layer",
    where: Filter = kernels,
    progress: bool = False,
) -> Transform:
    """Block sparsity: zeroes whole ``block = (bk, bn)`` tiles of each selected weight.

    Each selected leaf's matrix view ``(K, N)`` (all axes but the last flattened
    row-major: a Dense ``(in, out)`` kernel as it is, a conv HWIO kernel as
    ``(h * w * in, out)``; an equinox layer's weight, stored output first, seen inputs
    first: ``(out, in)`` as ``(in, out)``, ``(out, in, h, w)`` as ``(in * h * w, out)``)
    is cut into ``bk × bn`` tiles, which are kept or zeroed
    whole, lowest score first (ties by row-major tile index).

    Args:
        sparsity: fraction of tiles to zero, in ``[0, 1)``.
        block: the tile shape ``(bk, bn)``; every selected leaf's ``K`` must be a
            multiple of ``bk`` and its ``N`` of ``bn``.
        importance: a tile's score: ``"l2"`` (its Frobenius norm), ``"l1"`` (the sum of
            ``|w|``) or ``"max"`` (the largest ``|w|``).
        scope: ``"layer"`` zeroes exactly ``floor(sparsity * tiles)`` tiles of each
            leaf and runs under ``jit``. ``"global"`` ranks the tiles of all selected
            leaves together on per-element scores (RMS for ``"l2"``, mean ``|w|`` for
            ``"l1"``, the max for ``"max"``) and zeroes exactly
            ``floor(sparsity * total_tiles)`` of them (ties by leaf order, then tile
            order); each leaf's storage size then depends on the data, so it needs
            concrete arrays: call it outside ``jit``.
        where: which leaves; by default floating leaves with ndim >= 2. Under the
            default filter, a leaf the block does not tile is skipped (left dense,
            stats ``{"skipped": reason}``, one warning per call; a global ranking
            leaves it out); a filter of your own that selects such a leaf raises.
        progress: show a bar on stderr, by leaf and bytes, while it runs (not under
            ``jit``).

    Returns:
        A transform returning ``(compressed, stats)``: each selected leaf becomes a
        :class:`~jaxcompress.Sparse` leaf placed like the input; stats give
        ``pruned`` (zeroed values), ``size``, ``blocks_pruned``, ``blocks`` and
        ``block`` per leaf path.

    Raises:
        ValueError: sparsity outside ``[0, 1)``, a bad block, importance or scope, a
            leaf your own ``where`` selects that the block does not tile (named with
            its shape), NaN or Inf values,
            or ``scope="global"`` under ``jit``.
        TypeError: a non-numeric sparsity, or a selected integer, boolean or
            already-compressed leaf.

    Example:
        >>> import jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> w = jnp.array([[1.0, 1.0, 5.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
        >>> sparse, stats = prune_blocks(0.5, block=(2, 2))({"w": w})
        >>> jc.materialize(sparse)["w"].tolist()
        [[0.0, 0.0, 5.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
        >>> stats["w"]["blocks_pruned"], stats["w"]["pruned"], sparse["w"].nnz
        (1, 4, 4)
    """
    try:
        fraction = check_sparsity(sparsity)
    except (TypeError, ValueError) as error:
        message = str(error).removeprefix("prune: ")
        raise type(error)(f"prune_blocks: {message}") from None
    block = _check_block(block)
    importance = _check_importance(importance)
    if scope not in _SCOPES:
        raise ValueError(f"prune_blocks: scope must be one of {_SCOPES}, got {scope!r}")
    bk, bn = block
    name = (
        f"prune_blocks({float(fraction)!r}, block=({bk}, {bn}), importance={importance}, "
        f"scope={scope})"
    )

    tile_size = bk * bn

    def check(entry, weight, context):
        """``(None, layer-scope count of tiles to zero, trailing inputs)``, tiling checked.

        A weight stored output first (an equinox layer's ``(out, in)``) is tiled seen
        inputs first, so its tiles lie on the same ``(K, N)`` view as a linen kernel's.
        """
        del context
        trailing = entry.trailing_inputs or None
        shape = tuple(weight.shape)
        view = shape if trailing is None else leading_shape(shape, trailing)
        if not _tiles_fit(view, block):
            rows, columns = _matrix_shape(view)
            raise Unfit(
                f"{name}: leaf {entry.path!r} of shape {shape} has the matrix "
                f"view ({rows}, {columns}), which block {block} does not tile ({rows} rows "
                f"must be a multiple of {bk} and {columns} columns of {bn})"
            )
        return None, pruned_count(float(fraction), math.prod(shape) // tile_size), trailing

    def inputs_first(item) -> jax.Array:
        trailing = item.plan[2]
        return item.weight if trailing is None else to_leading(item.weight, trailing)

    def global_tiles(items):
        """One ranking of the tiles of every selected leaf: ``(tile keep-mask, count)``."""
        # One pass over the items (a streamed source loads each leaf per pass).
        weights, trailing = [], []
        for item in items:
            weights.append(inputs_first(item))
            trailing.append(item.plan[2])
        if any(is_traced(w) for w in weights):
            raise ValueError(
                f"{name}: scope='global' needs concrete arrays, since each leaf's storage "
                "size depends on the data; call it outside jax.jit or use scope='layer'"
            )
        scores = [_global_scores(w, block=block, importance=importance) for w in weights]
        total = sum(int(s.size) for s in scores)
        tile_keeps = _global_tile_keeps(scores, pruned_count(float(fraction), total))
        return [
            (keep, int(keep.size - keep.sum()), inputs)
            for keep, inputs in zip(tile_keeps, trailing, strict=True)
        ]

    def step(item, key) -> tuple[Sparse, BlockStats]:
        del key
        (tile_keep, count, trailing), weight = item.plan, inputs_first(item)
        size = math.prod(weight.shape)
        nnz = size - count * tile_size
        if tile_keep is None:
            sparse = _layer_sparse(weight, count, block=block, importance=importance, nnz=nnz)
        else:
            sparse = _tile_sparse(weight, jnp.asarray(tile_keep), block=block, nnz=nnz)
        if trailing is not None:
            sparse = from_leading(sparse, trailing)
        leaf_stats: BlockStats = {
            "pruned": count * tile_size,
            "size": size,
            "blocks_pruned": count,
            "blocks": size // tile_size,
            "block": block,
        }
        return sparse, leaf_stats

    return per_leaf(
        name,
        where,
        check=check,
        plan=global_tiles if scope == "global" else None,
        step=step,
        progress=progress,
        default_where=kernels,
    )
