"""Weight-only int8 and packed int4 products ``x @ W`` for a :class:`QuantizedMatrix` ``W``.

Each ``(bn, bk)`` tile of codes is read once, turned into floats in fast memory
(nibbles unpacked for int4) and multiplied with the matching ``(bm, bk)`` tile of
``x``; the tile's scale is applied to that partial product, and its zero point as
``sum(x) * offset * scale``:

    ``x · ((q - o) s) = s (x · q) - s o sum(x)`` for each scale group,

so the dense matrix never exists and the dot sees exact integer-valued operands. A
tile lies inside one scale group (its width divides the group size), except on TPU
for groups of 32 or 64, where a 128-wide tile holds several groups and each group's
columns of ``x`` are masked in turn. Accumulation is in float32; the result has
``x``'s dtype.

Packed codes hold ``K/2`` bytes per output channel: the low nibbles are the first
half of the contracted axis, the high nibbles the second half. ``x`` is split into
the same two halves, so a byte tile feeds two products, one per half; with several
scale groups, ``K/2`` must then be a multiple of the group size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from jaxcompress.arrays.serving import QuantizedMatrix
from jaxcompress.runtime.pallas.common import (
    code_layout,
    compute_dtype,
    dot_nt,
    next_power_of_2,
    pad_to,
    round_up,
    target_of,
)

__all__ = ["QuantizedTiles", "plan_quantized", "quantized_matmul"]


@dataclasses.dataclass(frozen=True)
class QuantizedTiles:
    """How one product is tiled (all static).

    Attributes:
        target: ``"gpu"`` or ``"tpu"``.
        packed: whether the codes are int4 nibbles, two per byte.
        width: columns of the codes array (``K``, or ``K/2`` packed).
        group: columns per scale group within a half, or ``None`` for one group.
        bm: rows of ``x`` per tile.
        bn: output channels per tile.
        bk: contracted columns per tile.
        per_tile: scale groups per tile (more than one only on TPU, for small groups).
    """

    target: str
    packed: bool
    width: int
    group: int | None
    bm: int
    bn: int
    bk: int
    per_tile: int = 1

    @property
    def name(self) -> str:
        """The kernel's name, such as ``"pallas_int4_g128_gpu"``."""
        groups = "pc" if self.group is None else f"g{self.group}"
        return f"pallas_int{4 if self.packed else 8}_{groups}_{self.target}"


def _largest_power_of_2_dividing(n: int, cap: int) -> int:
    size = 1
    while size * 2 <= cap and n % (size * 2) == 0:
        size *= 2
    return size


def plan_quantized(leaf: QuantizedMatrix, rows: int, platform: str) -> QuantizedTiles | str:
    """The tiling of ``x @ leaf`` for ``rows`` rows of ``x``, or why no kernel fits.

    Example:
        >>> import jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> from jaxcompress.arrays.serving import to_serving
        >>> q = jc.quantize(bits=4, axis=-1, group_size=128)
        >>> leaf = to_serving(q({"w": jnp.ones((512, 256))})[0]["w"])
        >>> plan_quantized(leaf, 8, "cuda").name, plan_quantized(leaf, 8, "cpu")
        ('pallas_int4_g128_gpu', 'no Pallas kernel for platform cpu')
    """
    target = target_of(platform)
    if target is None:
        return f"no Pallas kernel for platform {platform}"
    layout = code_layout(leaf)
    if isinstance(layout, str):
        return layout
    width, group = layout
    k, n = leaf.matrix_shape
    per_tile = 1
    if target == "gpu":
        bm = min(64, max(16, next_power_of_2(rows)))
        bn = min(64 if rows <= 16 else 128, max(16, next_power_of_2(n)))
        if group is None:
            bk = min(128, max(16, next_power_of_2(width)))
        else:
            bk = _largest_power_of_2_dividing(group, 128)
            if bk < 16:
                return f"group size {group} has no power-of-two tile of 16 or more"
    else:
        bm = min(256, round_up(rows, 16))
        bn = 256 if n >= 256 else 128
        if group is None:
            bk = 512 if width % 512 == 0 else 256 if width % 256 == 0 else 128
        elif group % 128 == 0:
            bk = _largest_power_of_2_dividing(group, 512)
        elif 128 % group == 0 and group >= 8:
            bk, per_tile = 128, 128 // group
        else:
            return f"group size {group} neither divides nor is a multiple of 128"
    return QuantizedTiles(target, leaf.packed, width, group, bm, bn, bk, per_tile)


def _unpacked(codes: jax.Array, packed: bool, dtype: jnp.dtype) -> list[jax.Array]:
    """The tile's codes as floats: one array, or the low and the high nibbles."""
    wide = codes.astype(jnp.int32)  # 8-bit vector arithmetic is not on every chip
    if not packed:
        return [wide.astype(dtype)]
    return [((wide & 15) - 8).astype(dtype), (jnp.right_shift(wide, 4) - 8).astype(dtype)]


def _tile_product(
    xs: list[jax.Array],
    qs: list[jax.Array],
    scale_of: Callable[[int, int], jax.Array],
    offset_of: Callable[[int, int], jax.Array] | None,
    tiles: QuantizedTiles,
) -> jax.Array:
    """``sum over halves p and tile groups j of s (x_j · q) - s o sum(x_j)``, ``(bm, bn)``."""
    total = None
    for p, (x, q) in enumerate(zip(xs, qs, strict=True)):
        column_group = None
        if tiles.per_tile > 1:
            assert tiles.group is not None
            column_group = lax.div(lax.broadcasted_iota(jnp.int32, x.shape, 1), tiles.group)
        for j in range(tiles.per_tile):
            xj = x if column_group is None else jnp.where(column_group == j, x, jnp.zeros_like(x))
            part = dot_nt(xj, q) * scale_of(p, j)
            if offset_of is not None:
                sums = jnp.sum(xj.astype(jnp.float32), axis=1, keepdims=True)
                part = part - sums * offset_of(p, j)
            total = part if total is None else total + part
    assert total is not None
    return total


def _gpu_kernel(*refs, tiles: QuantizedTiles, parts: int, has_offset: bool, steps: int):
    xs = refs[:parts]
    codes_ref = refs[parts]
    scales = refs[parts + 1 : 2 * parts + 1]
    offsets = refs[2 * parts + 1 : 3 * parts + 1] if has_offset else ()
    out_ref = refs[-1]
    dtype = compute_dtype(xs[0].dtype)
    bk, group = tiles.bk, tiles.group or tiles.width

    def step(t, acc):
        columns = pl.ds(pl.multiple_of(t * bk, bk), bk)
        row = lax.div(t * bk, group)  # the one scale group of this tile
        x_tiles = [x_ref[:, columns] for x_ref in xs]
        q_tiles = _unpacked(codes_ref[:, columns], tiles.packed, dtype)
        offset_of = (lambda p, j: offsets[p][row]) if has_offset else None
        return acc + _tile_product(x_tiles, q_tiles, lambda p, j: scales[p][row], offset_of, tiles)

    acc = jnp.zeros(out_ref.shape, jnp.float32)
    out_ref[...] = lax.fori_loop(0, steps, step, acc).astype(out_ref.dtype)


def _tpu_kernel(*refs, tiles: QuantizedTiles, parts: int, has_offset: bool, steps: int):
    xs = refs[:parts]
    codes_ref = refs[parts]
    scales = refs[parts + 1 : 2 * parts + 1]
    offsets = refs[2 * parts + 1 : 3 * parts + 1] if has_offset else ()
    out_ref, acc_ref = refs[-2], refs[-1]
    t = pl.program_id(2)

    @pl.when(t == 0)
    def _():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    dtype = compute_dtype(xs[0].dtype)
    q_tiles = _unpacked(codes_ref[...], tiles.packed, dtype)
    offset_of = (lambda p, j: offsets[p][j]) if has_offset else None
    acc_ref[...] += _tile_product(
        [x_ref[...] for x_ref in xs], q_tiles, lambda p, j: scales[p][j], offset_of, tiles
    )

    @pl.when(t == steps - 1)
    def _():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def _halves(array: jax.Array, parts: int, groups: int) -> list[jax.Array]:
    """Per-half ``(G, N)`` rows: the same rows for one group, else the first and last half."""
    if parts == 1 or groups == 1:
        return [array] * parts
    return [array[: groups // 2], array[groups // 2 :]]


def quantized_matmul(
    x: jax.Array, leaf: QuantizedMatrix, *, platform: str, interpret: bool = False
) -> jax.Array:
    """``x`` times the leaf's ``(K, N)`` matrix, dequantized tile by tile in a Pallas kernel.

    Args:
        x: ``(M, K)`` floating activations.
        leaf: the weight; its ``(K, N)`` view is ``matrix_shape`` (for an
            ``outputs_first`` leaf that is the transpose of its dense ``(N, K)``).
        platform: ``"cuda"``, ``"rocm"`` or ``"tpu"``, whose kernel is built.
        interpret: run the kernel in Pallas's interpreter (any backend, slow).

    Returns:
        ``(M, N)`` in ``x``'s dtype.

    Raises:
        ValueError: when no kernel fits (see :func:`plan_quantized`) or ``x`` does
            not match.

    Example:
        >>> import jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> from jaxcompress.arrays.serving import to_serving
        >>> w = jnp.linspace(-1.0, 1.0, 64 * 32).reshape(64, 32)
        >>> leaf = to_serving(jc.quantize(bits=4, axis=-1, group_size=32)({"w": w})[0]["w"])
        >>> x = jnp.ones((2, 64))
        >>> y = quantized_matmul(x, leaf, platform="cuda", interpret=True)
        >>> bool(jnp.allclose(y, x @ leaf.materialize(), atol=1e-4))
        True
    """
    if x.ndim != 2 or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be a 2-D floating array, got {x.dtype} {x.shape}")
    k, n = leaf.matrix_shape
    if x.shape[1] != k:
        raise ValueError(f"x has {x.shape[1]} columns; the leaf's matrix is ({k}, {n})")
    tiles = plan_quantized(leaf, x.shape[0], platform)
    if isinstance(tiles, str):
        raise ValueError(f"no Pallas kernel for {leaf!r}: {tiles}")
    rows = x.shape[0]
    bm, bn, bk = tiles.bm, tiles.bn, tiles.bk
    m_pad, n_pad, k_pad = round_up(rows, bm), round_up(n, bn), round_up(tiles.width, bk)
    group = tiles.group or k_pad  # one group spans every (padded) column
    g_pad = -(-k_pad // group)
    parts = 2 if tiles.packed else 1

    out_dtype = x.dtype
    x = x.astype(compute_dtype(x.dtype))
    xs = [x] if parts == 1 else [x[:, : tiles.width], x[:, tiles.width :]]
    xs = [pad_to(part, (m_pad, k_pad)) for part in xs]
    codes = pad_to(leaf.codes, (n_pad, k_pad))

    def rows_of(values: jax.Array) -> list[jax.Array]:
        # (G, 1, N): one (1, bn) row per group, a block shape both backends tile.
        halves = _halves(values.astype(jnp.float32), parts, leaf.groups)
        return [pad_to(h, (g_pad, n_pad)).reshape(g_pad, 1, n_pad) for h in halves]

    scales = rows_of(leaf.scale)
    offsets = [] if leaf.offset is None else rows_of(leaf.offset * leaf.scale)
    inputs = [*xs, codes, *scales, *offsets]
    has_offset = leaf.offset is not None
    out_shape = jax.ShapeDtypeStruct((m_pad, n_pad), out_dtype)
    steps = k_pad // bk
    if tiles.target == "gpu":
        row_spec = pl.BlockSpec((bm, k_pad), lambda i, j: (i, 0))
        group_spec = pl.BlockSpec((g_pad, 1, bn), lambda i, j: (0, 0, j))
        call = pl.pallas_call(
            lambda *refs: _gpu_kernel(
                *refs, tiles=tiles, parts=parts, has_offset=has_offset, steps=steps
            ),
            out_shape=out_shape,
            grid=(m_pad // bm, n_pad // bn),
            in_specs=[
                *[row_spec] * parts,
                pl.BlockSpec((bn, k_pad), lambda i, j: (j, 0)),
                *[group_spec] * (len(scales) + len(offsets)),
            ],
            out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
            compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=3),
            interpret=interpret,
            name=tiles.name,
        )
    else:
        per_tile = tiles.per_tile
        x_spec = pl.BlockSpec((bm, bk), lambda i, j, t: (i, t))
        group_spec = pl.BlockSpec(
            (per_tile, 1, bn), lambda i, j, t: (lax.div(t * bk, group * per_tile), 0, j)
        )
        call = pl.pallas_call(
            lambda *refs: _tpu_kernel(
                *refs, tiles=tiles, parts=parts, has_offset=has_offset, steps=steps
            ),
            out_shape=out_shape,
            grid=(m_pad // bm, n_pad // bn, steps),
            in_specs=[
                *[x_spec] * parts,
                pl.BlockSpec((bn, bk), lambda i, j, t: (j, t)),
                *[group_spec] * (len(scales) + len(offsets)),
            ],
            out_specs=pl.BlockSpec((bm, bn), lambda i, j, t: (i, j)),
            scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
            compiler_params=pltpu.CompilerParams(
                dimension_semantics=("parallel", "parallel", "arbitrary")
            ),
            interpret=interpret,
            name=tiles.name,
        )
    return call(*inputs)[:rows, :n]
