"""Weight-only int8 and packed int4 ``x @ W`` on Hopper (sm_90) in Pallas's Mosaic GPU backend.

This is the preferred ``"cuda"`` body of :mod:`.quantized`'s kernel family, for
bfloat16 and float16 activations. It lowers to the ``mosaic_gpu_v2`` custom call,
which :func:`jax.export.export` accepts without disabled checks (Triton's call needs
them). Mosaic GPU has no general ``dot`` inside a kernel, only Hopper's ``wgmma``,
which takes a left operand from memory, and its right one, from shared memory in a
swizzled layout; so each tile of codes is dequantized in registers and written to
shared memory in the activation's dtype before the ``wgmma``:

    ``w[n, k] = q[n, k] s[n] - o[n] s[n]`` for the scale group of ``k``,

rounded once to 16 bits (as ``materialize`` in that dtype would), with float32
accumulation. The weights are the ``wgmma``'s left operand (``(bn, bk)``, 64 output
channels per warpgroup) and the activations its right one, transposed by the wrapper
to ``(K, M)`` (``y^T = W^T x^T``): at small batches ``M`` is the ``wgmma``'s narrow
``N`` axis (16 and up) instead of rows padded to 64. A ``(N/bn, M/bm)`` grid of
blocks each pipelines its ``K`` tiles (``emit_pipeline``: TMA copies of the ``x``
tile, the codes tile and one scale row per operand, 2 or 3 deep) and writes a
``(bn, bm)`` tile of ``y^T``.

Float32 activations are refused: ``wgmma`` reads TF32 operands only K-major, which
for ``x`` needs a transposed shared-memory ref, and the Mosaic GPU interpreter (the
only check this has without a GPU) has no rule for a transposed ``wgmma`` operand;
the Triton kernel runs them in full float32.

Packed codes hold the first half of ``K`` in their low nibbles and the second half in
their high ones (as in :mod:`.quantized`): a byte tile feeds two ``wgmma`` calls, one
per half of ``x``.

In Pallas's Mosaic GPU interpreter (``interpret=True``; CPU) the same body runs with
one difference: register layouts are hints the interpreter has no rule for, so the
scale row's layout cast is skipped there.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxcompress.arrays.serving import QuantizedMatrix
from jaxcompress.runtime.pallas.common import code_layout, next_power_of_2, pad_to, round_up

__all__ = ["MosaicTiles", "mosaic_quantized_matmul", "plan_mosaic_quantized"]

# Hopper's shared memory per block is 227 KiB; leave room for barriers and spills.
_SMEM_BUDGET = 200 * 1024
_BN = 64  # output channels per block: one warpgroup's wgmma rows
_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_ITEMSIZE = 2


@dataclasses.dataclass(frozen=True)
class MosaicTiles:
    """How one product is tiled for Mosaic GPU (all static).

    Attributes:
        packed: whether the codes are int4 nibbles, two per byte.
        width: columns of the codes array (``K``, or ``K/2`` packed).
        group: columns per scale group within a half, or ``None`` for one group.
        bm: rows of ``x`` per block (the ``wgmma``'s N, 16 to 128).
        bn: output channels per block (the ``wgmma``'s M).
        bk: contracted columns per pipeline step.
    """

    packed: bool
    width: int
    group: int | None
    bm: int
    bn: int
    bk: int

    @property
    def name(self) -> str:
        """The kernel's name, such as ``"pallas_int4_g128_mgpu"``."""
        groups = "pc" if self.group is None else f"g{self.group}"
        return f"pallas_int{4 if self.packed else 8}_{groups}_mgpu"

    @property
    def swizzle(self) -> int:
        """Bytes of the shared-memory swizzle both ``wgmma`` operands share (32 to 128)."""
        return min(128, _ITEMSIZE * min(self.bm, self.bk))

    @property
    def stages(self) -> int | None:
        """Pipeline depth (3 or 2) that fits shared memory, or ``None``."""
        parts = 2 if self.packed else 1
        # Per step: x tiles, the codes tile, scale and offset rows (float32).
        per_step = (
            parts * self.bk * self.bm * _ITEMSIZE + self.bn * self.bk + 2 * parts * 4 * self.bn
        )
        # Once: the dequantized tiles and the output tile.
        fixed = parts * self.bn * self.bk * _ITEMSIZE + self.bn * self.bm * _ITEMSIZE
        for stages in (3, 2):
            if fixed + stages * per_step <= _SMEM_BUDGET:
                return stages
        return None


def _largest_power_of_2_dividing(n: int, cap: int) -> int:
    size = 1
    while size * 2 <= cap and n % (size * 2) == 0:
        size *= 2
    return size


def plan_mosaic_quantized(
    leaf: QuantizedMatrix, rows: int, platform: str, *, dtype: jnp.dtype | None = None
) -> MosaicTiles | str:
    """The Mosaic GPU tiling of ``x @ leaf`` for ``rows`` rows of ``x``, or why it does not fit.

    Args:
        leaf: the weight in the serving layout.
        rows: rows of ``x``.
        platform: only ``"cuda"`` has Mosaic GPU (Hopper); others get a reason.
        dtype: the activations' dtype; ``None`` (not known yet) plans for a 16-bit
            one. Others than bfloat16 and float16 get a reason.

    Example:
        >>> import jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> from jaxcompress.arrays.serving import to_serving
        >>> q = jc.quantize(bits=4, axis=-1, group_size=128)
        >>> leaf = to_serving(q({"w": jnp.ones((512, 256))})[0]["w"])
        >>> plan_mosaic_quantized(leaf, 8, "cuda").name
        'pallas_int4_g128_mgpu'
        >>> plan_mosaic_quantized(leaf, 8, "rocm")
        'Mosaic GPU targets cuda (Hopper) only, not rocm'
    """
    if platform != "cuda":
        return f"Mosaic GPU targets cuda (Hopper) only, not {platform}"
    if dtype is not None and jnp.dtype(dtype) not in _DTYPES:
        return (
            f"{jnp.dtype(dtype).name} activations: Mosaic GPU's wgmma here takes bfloat16 "
            "or float16 (float32 would run as TF32 from a transposed operand)"
        )
    layout = code_layout(leaf)
    if isinstance(layout, str):
        return layout
    width, group = layout
    k, n = leaf.matrix_shape
    if group is None:
        bk = 128
    else:
        # A swizzled int8 tile of codes is at least 32 bytes wide.
        bk = _largest_power_of_2_dividing(group, 128)
        if bk < 32:
            return f"group size {group} has no power-of-two tile of 32 or more for Mosaic GPU"
    bm = min(128, max(16, next_power_of_2(rows)))
    if bm == 128:
        bk = min(bk, 64)  # keeps a 3-deep pipeline of (bk, 128) x tiles in shared memory
    tiles = MosaicTiles(leaf.packed, width, group, bm, _BN, bk)
    if tiles.stages is None:
        return f"tiles {(bm, _BN, bk)} overflow shared memory"
    return tiles


def _wide_transforms(tiles: MosaicTiles) -> tuple[plgpu.TilingTransform, plgpu.SwizzleTransform]:
    """The shared-memory layout ``wgmma`` reads its 16-bit operands in."""
    return (
        plgpu.TilingTransform((8, tiles.swizzle // _ITEMSIZE)),
        plgpu.SwizzleTransform(tiles.swizzle),
    )


def _row_layout(row: jax.Array, interpret: bool) -> jax.Array:
    """A ``(bn,)`` row in the layout that broadcasts along a ``wgmma`` tile's columns."""
    if interpret:  # the interpreter has no rule for layout casts (they change no value)
        return row
    return plgpu.layout_cast(row, plgpu.Layout.WGMMA.reduce(1))


def _dequantized(
    codes: jax.Array, scale: jax.Array, offset: jax.Array | None, dtype: jnp.dtype
) -> jax.Array:
    """``codes * scale - offset`` over a ``(bn, bk)`` tile, rows scaled, in ``dtype``."""
    shape = codes.shape
    w = codes.astype(jnp.float32) * lax.broadcast_in_dim(scale, shape, (0,))
    if offset is not None:
        w = w - lax.broadcast_in_dim(offset, shape, (0,))
    return w.astype(dtype)


def _nibbles(codes: jax.Array, packed: bool) -> list[jax.Array]:
    """The tile's codes as integers: one array, or the low and the high nibbles."""
    wide = codes.astype(jnp.int32)
    if not packed:
        return [wide]
    return [(wide & 15) - 8, lax.shift_right_logical(wide, 4) - 8]


def _kernel(*refs, tiles: MosaicTiles, parts: int, has_offset: bool, interpret: bool):
    n_in = parts * (3 if has_offset else 2) + 1
    gmem, out_gmem, scratch = refs[:n_in], refs[n_in], refs[n_in + 1 :]
    w_smems, o_smem = scratch[:parts], scratch[parts]
    dtype = w_smems[0].dtype
    bm, bn, bk = tiles.bm, tiles.bn, tiles.bk
    group = tiles.group or tiles.width
    steps = gmem[0].shape[0] // bk
    wide = _wide_transforms(tiles)
    byte_swizzle = min(128, bk)
    narrow = (plgpu.TilingTransform((8, byte_swizzle)), plgpu.SwizzleTransform(byte_swizzle))
    pid_n, pid_m = lax.axis_index("n"), lax.axis_index("m")

    def body(acc, _, *smem):
        xs, codes = smem[:parts], smem[parts]
        scales = smem[parts + 1 : 2 * parts + 1]
        offsets = smem[2 * parts + 1 :] if has_offset else (None,) * parts
        for p, q in enumerate(_nibbles(codes[...], tiles.packed)):
            scale = _row_layout(scales[p][0], interpret)
            offset = None if offsets[p] is None else _row_layout(offsets[p][0], interpret)
            w_smems[p][...] = _dequantized(q, scale, offset, dtype)
        plgpu.commit_smem()  # the register stores must reach the async proxy wgmma reads
        for p in range(parts):
            plgpu.wgmma(acc, w_smems[p], xs[p])
        plgpu.wgmma_wait(0)  # the next step overwrites w_smems

    row_spec = plgpu.BlockSpec((1, bn), lambda t: (lax.div(t * bk, group), pid_n))
    in_specs = [
        *[plgpu.BlockSpec((bk, bm), lambda t: (t, pid_m), transforms=wide)] * parts,
        plgpu.BlockSpec((bn, bk), lambda t: (pid_n, t), transforms=narrow),
        *[row_spec] * (len(gmem) - parts - 1),
    ]

    def run(acc):
        plgpu.emit_pipeline(
            functools.partial(body, acc),
            grid=(steps,),
            in_specs=in_specs,
            max_concurrent_steps=tiles.stages or 2,
        )(*gmem)
        o_smem[...] = acc[...].astype(o_smem.dtype)

    # The accumulator lives in registers, scoped apart from the shared-memory scratch.
    pl.run_scoped(run, plgpu.ACC((bn, bm), jnp.float32))
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, out_gmem.at[pl.ds(pid_n * bn, bn), pl.ds(pid_m * bm, bm)])
    plgpu.wait_smem_to_gmem(0)


def _interpret_params() -> object:
    # Not re-exported by jax.experimental.pallas.mosaic_gpu in jax 0.10.2.
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams()


def _halves(array: jax.Array, parts: int, groups: int) -> list[jax.Array]:
    """Per-half ``(G, N)`` rows: the same rows for one group, else the first and last half."""
    if parts == 1 or groups == 1:
        return [array] * parts
    return [array[: groups // 2], array[groups // 2 :]]


def mosaic_quantized_matmul(
    x: jax.Array, leaf: QuantizedMatrix, *, platform: str = "cuda", interpret: bool = False
) -> jax.Array:
    """``x`` times the leaf's ``(K, N)`` matrix in a Mosaic GPU (Hopper ``wgmma``) kernel.

    Args:
        x: ``(M, K)`` bfloat16 or float16 activations.
        leaf: the weight; its ``(K, N)`` view is ``matrix_shape``.
        platform: ``"cuda"`` (the only platform with Mosaic GPU).
        interpret: run in Pallas's Mosaic GPU interpreter on CPU (slow).

    Returns:
        ``(M, N)`` in ``x``'s dtype.

    Raises:
        ValueError: when the kernel does not fit (see :func:`plan_mosaic_quantized`) or
            ``x`` does not match.

    Example:
        >>> import jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> from jaxcompress.arrays.serving import to_serving
        >>> w = jnp.linspace(-1.0, 1.0, 64 * 64).reshape(64, 64)
        >>> leaf = to_serving(jc.quantize(bits=8, axis=-1)({"w": w})[0]["w"])
        >>> x = jnp.ones((2, 64), jnp.bfloat16)
        >>> y = mosaic_quantized_matmul(x, leaf, interpret=True)
        >>> want = x.astype(jnp.float32) @ leaf.materialize()
        >>> y.dtype, bool(jnp.allclose(y.astype(jnp.float32), want, atol=0.1))
        (dtype(bfloat16), True)
    """
    if x.ndim != 2 or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be a 2-D floating array, got {x.dtype} {x.shape}")
    k, n = leaf.matrix_shape
    if x.shape[1] != k:
        raise ValueError(f"x has {x.shape[1]} columns; the leaf's matrix is ({k}, {n})")
    tiles = plan_mosaic_quantized(leaf, x.shape[0], platform, dtype=x.dtype)
    if isinstance(tiles, str):
        raise ValueError(f"no Mosaic GPU kernel for {leaf!r}: {tiles}")
    rows = x.shape[0]
    bm, bn, bk = tiles.bm, tiles.bn, tiles.bk
    m_pad, n_pad, k_pad = round_up(rows, bm), round_up(n, bn), round_up(tiles.width, bk)
    group = tiles.group or k_pad
    g_pad = -(-k_pad // group)
    parts = 2 if tiles.packed else 1

    dtype = x.dtype
    xs = [x] if parts == 1 else [x[:, : tiles.width], x[:, tiles.width :]]
    # (K, M): the wgmma's right operand, rows of K.
    xts = [pad_to(part, (m_pad, k_pad)).T for part in xs]
    codes = pad_to(leaf.codes, (n_pad, k_pad))

    def rows_of(values: jax.Array) -> list[jax.Array]:
        halves = _halves(values.astype(jnp.float32), parts, leaf.groups)
        return [pad_to(h, (g_pad, n_pad)) for h in halves]

    scales = rows_of(leaf.scale)
    offsets = [] if leaf.offset is None else rows_of(leaf.offset * leaf.scale)
    wide = _wide_transforms(tiles)
    call = plgpu.kernel(
        functools.partial(
            _kernel,
            tiles=tiles,
            parts=parts,
            has_offset=leaf.offset is not None,
            interpret=interpret,
        ),
        out_type=jax.ShapeDtypeStruct((n_pad, m_pad), dtype),
        scratch_types=[
            *[plgpu.SMEM((bn, bk), dtype, transforms=wide)] * parts,
            plgpu.SMEM((bn, bm), dtype),
        ],
        grid=(n_pad // bn, m_pad // bm),
        grid_names=("n", "m"),
        kernel_name=tiles.name,
        interpret=_interpret_params() if interpret else None,
    )
    return call(*xts, codes, *scales, *offsets).T[:rows, :n]
