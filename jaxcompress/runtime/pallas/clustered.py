"""k-means codebook products ``x @ W`` for a :class:`ClusteredMatrix` ``W`` (3- and 4-bit indices).

The codebook, shared ``(k,)`` or one per output channel ``(N, k)``, sits in fast
memory beside the tile; each ``(bn, bk)`` tile of uint8 indices is turned into
weights by a chain of ``k`` selects (a gather is not a vector operation on either
backend) and multiplied with the matching ``(bm, bk)`` tile of ``x``, accumulating
in float32. An index past the codebook takes its last entry, as
:func:`~jaxcompress.arrays.serving.lookup` does. The weights are rounded to ``x``'s
dtype for the dot when that is a 16-bit float, as a dense product in that dtype
would be; the result has ``x``'s dtype.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from jaxcompress.arrays.serving import ClusteredMatrix
from jaxcompress.runtime.pallas.common import (
    compute_dtype,
    dot_nt,
    next_power_of_2,
    pad_to,
    round_up,
    target_of,
)

__all__ = ["MAX_ENTRIES", "ClusteredTiles", "clustered_matmul", "plan_clustered"]

# 4-bit indices; a longer select chain costs more than the memory it saves.
MAX_ENTRIES = 16


@dataclasses.dataclass(frozen=True)
class ClusteredTiles:
    """How one codebook product is tiled (all static).

    Attributes:
        target: ``"gpu"`` or ``"tpu"``.
        entries: codebook entries ``k``.
        per_channel: whether each output channel has its own codebook.
        bits: index bits of the leaf, for the name.
        bm: rows of ``x`` per tile.
        bn: output channels per tile.
        bk: contracted columns per tile.
    """

    target: str
    entries: int
    per_channel: bool
    bits: int
    bm: int
    bn: int
    bk: int

    @property
    def name(self) -> str:
        """The kernel's name, such as ``"pallas_kmeans4_shared_gpu"``."""
        book = "channel" if self.per_channel else "shared"
        return f"pallas_kmeans{self.bits}_{book}_{self.target}"


def plan_clustered(leaf: ClusteredMatrix, rows: int, platform: str) -> ClusteredTiles | str:
    """The tiling of ``x @ leaf`` for ``rows`` rows of ``x``, or why no kernel fits.

    Example:
        >>> import jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> from jaxcompress.arrays.serving import to_serving
        >>> leaf = to_serving(jc.cluster(k=16)({"w": jnp.ones((64, 32))})[0]["w"])
        >>> plan_clustered(leaf, 1, "tpu").name
        'pallas_kmeans4_shared_tpu'
    """
    target = target_of(platform)
    if target is None:
        return f"no Pallas kernel for platform {platform}"
    k, n = leaf.matrix_shape
    if tuple(leaf.indices.shape) != (n, k):
        return f"indices of shape {tuple(leaf.indices.shape)}, not ({n}, {k})"
    entries = int(leaf.codebook.shape[-1])
    if entries > MAX_ENTRIES:
        return f"a codebook of {entries} entries: the kernel takes up to {MAX_ENTRIES} (4 bits)"
    per_channel = leaf.codebook.ndim == 2
    if per_channel and leaf.codebook.shape[0] != n:
        return f"a per-channel codebook of {leaf.codebook.shape[0]} rows for {n} channels"
    bits = max(1, (entries - 1).bit_length())
    if target == "gpu":
        bm = min(64, max(16, next_power_of_2(rows)))
        bn = min(64 if rows <= 16 else 128, max(16, next_power_of_2(n)))
        bk = min(128, max(16, next_power_of_2(k)))
    else:
        bm = min(256, round_up(rows, 16))
        bn = 256 if n >= 256 else 128
        bk = 512 if k % 512 == 0 else 256 if k % 256 == 0 else 128
    return ClusteredTiles(target, entries, per_channel, bits, bm, bn, bk)


def _weights(indices: jax.Array, book: list[jax.Array], dtype: jnp.dtype) -> jax.Array:
    """A ``(bn, bk)`` tile of weights: ``book[c]`` (``(1, 1)`` or ``(bn, 1)``) where index ``c``."""
    wide = indices.astype(jnp.int32)
    weights = jnp.broadcast_to(book[-1], wide.shape)  # past the end: the last entry
    for c, value in enumerate(book[:-1]):
        weights = jnp.where(wide == c, value, weights)
    return weights.astype(dtype)


def _gpu_kernel(x_ref, idx_ref, book_ref, out_ref, *, tiles: ClusteredTiles, steps: int):
    bk = tiles.bk
    book = [book_ref[:, c : c + 1] for c in range(tiles.entries)]  # read once, not per step
    dtype = compute_dtype(x_ref.dtype)

    def step(t, acc):
        columns = pl.ds(pl.multiple_of(t * bk, bk), bk)
        weights = _weights(idx_ref[:, columns], book, dtype)
        return acc + dot_nt(x_ref[:, columns], weights)

    acc = jnp.zeros(out_ref.shape, jnp.float32)
    out_ref[...] = lax.fori_loop(0, steps, step, acc).astype(out_ref.dtype)


def _tpu_kernel(x_ref, idx_ref, book_ref, out_ref, acc_ref, *, tiles: ClusteredTiles, steps: int):
    t = pl.program_id(2)

    @pl.when(t == 0)
    def _():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    book = [book_ref[:, c : c + 1] for c in range(tiles.entries)]
    weights = _weights(idx_ref[...], book, compute_dtype(x_ref.dtype))
    acc_ref[...] += dot_nt(x_ref[...], weights)

    @pl.when(t == steps - 1)
    def _():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def clustered_matmul(
    x: jax.Array, leaf: ClusteredMatrix, *, platform: str, interpret: bool = False
) -> jax.Array:
    """``x`` times the leaf's ``(K, N)`` matrix, looked up tile by tile in a Pallas kernel.

    Args:
        x: ``(M, K)`` floating activations.
        leaf: the weight (``matrix_shape`` is its ``(K, N)`` view).
        platform: ``"cuda"``, ``"rocm"`` or ``"tpu"``, whose kernel is built.
        interpret: run the kernel in Pallas's interpreter (any backend, slow).

    Returns:
        ``(M, N)`` in ``x``'s dtype.

    Raises:
        ValueError: when no kernel fits (see :func:`plan_clustered`) or ``x`` does
            not match.

    Example:
        >>> import jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> from jaxcompress.arrays.serving import to_serving
        >>> w = jnp.linspace(-1.0, 1.0, 48 * 20).reshape(48, 20)
        >>> leaf = to_serving(jc.cluster(k=8, per_channel=True)({"w": w})[0]["w"])
        >>> x = jnp.ones((3, 48))
        >>> y = clustered_matmul(x, leaf, platform="tpu", interpret=True)
        >>> bool(jnp.allclose(y, x @ leaf.materialize(), atol=1e-4))
        True
    """
    if x.ndim != 2 or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be a 2-D floating array, got {x.dtype} {x.shape}")
    k, n = leaf.matrix_shape
    if x.shape[1] != k:
        raise ValueError(f"x has {x.shape[1]} columns; the leaf's matrix is ({k}, {n})")
    tiles = plan_clustered(leaf, x.shape[0], platform)
    if isinstance(tiles, str):
        raise ValueError(f"no Pallas kernel for {leaf!r}: {tiles}")
    rows, out_dtype = x.shape[0], x.dtype
    bm, bn, bk = tiles.bm, tiles.bn, tiles.bk
    m_pad, n_pad, k_pad = round_up(rows, bm), round_up(n, bn), round_up(k, bk)
    x = pad_to(x.astype(compute_dtype(x.dtype)), (m_pad, k_pad))
    indices = pad_to(leaf.indices, (n_pad, k_pad))
    book = leaf.codebook.astype(jnp.float32)
    book = pad_to(book, (n_pad, tiles.entries)) if tiles.per_channel else book.reshape(1, -1)
    book_rows = bn if tiles.per_channel else 1
    out_shape = jax.ShapeDtypeStruct((m_pad, n_pad), out_dtype)
    steps = k_pad // bk
    if tiles.target == "gpu":
        call = pl.pallas_call(
            lambda *refs: _gpu_kernel(*refs, tiles=tiles, steps=steps),
            out_shape=out_shape,
            grid=(m_pad // bm, n_pad // bn),
            in_specs=[
                pl.BlockSpec((bm, k_pad), lambda i, j: (i, 0)),
                pl.BlockSpec((bn, k_pad), lambda i, j: (j, 0)),
                pl.BlockSpec(
                    (book_rows, tiles.entries), lambda i, j: (j if tiles.per_channel else 0, 0)
                ),
            ],
            out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
            compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=3),
            interpret=interpret,
            name=tiles.name,
        )
    else:
        call = pl.pallas_call(
            lambda *refs: _tpu_kernel(*refs, tiles=tiles, steps=steps),
            out_shape=out_shape,
            grid=(m_pad // bm, n_pad // bn, steps),
            in_specs=[
                pl.BlockSpec((bm, bk), lambda i, j, t: (i, t)),
                pl.BlockSpec((bn, bk), lambda i, j, t: (j, t)),
                pl.BlockSpec(
                    (book_rows, tiles.entries),
                    lambda i, j, t: (j if tiles.per_channel else 0, 0),
                ),
            ],
            out_specs=pl.BlockSpec((bm, bn), lambda i, j, t: (i, j)),
            scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
            compiler_params=pltpu.CompilerParams(
                dimension_semantics=("parallel", "parallel", "arbitrary")
            ),
            interpret=interpret,
            name=tiles.name,
        )
    return call(x, indices, book)[:rows, :n]
