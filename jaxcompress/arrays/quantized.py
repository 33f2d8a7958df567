"""Quantized: bit-packed unsigned integer codes plus per-group scales (and zero points)."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from jaxcompress.arrays.base import CompressedArray, leaf_nbytes, with_shardings
from jaxcompress.core.bitpack import pack, unpack
from jaxcompress.core.mesh import (
    input_scale_spec,
    named_like,
    scale_spec,
    sharding_for,
    unsharded,
)


def _quantized_pytree(cls: type) -> type:
    return jax.tree_util.register_dataclass(
        cls,
        data_fields=["codes", "scale", "zero_point", "input_scale"],
        meta_fields=["shape", "dtype", "bits", "axis", "group_size"],
    )


def group_layout(
    shape: tuple[int, ...], axis: int | None, group_size: int | None
) -> tuple[int, int, int]:
    """``(groups, group_size, channels)`` of the canonical ``(G, g, C)`` view of a weight.

    The channel axis (if any) is moved last and the other axes are flattened
    row-major into the contracted dimension ``K``, which is split into ``G``
    contiguous groups of ``g``. Per-channel is ``G == 1``; per-tensor is ``C == 1``.
    When ``g`` does not divide ``K`` the last group is shorter, ``K - (G - 1) g``
    entries: ``G = ceil(K / g)``, and the view is padded to ``G g`` (see
    :func:`to_groups`). A ``g`` of ``K`` or more is one group of ``K``, as per channel.

    Example:
        >>> group_layout((3, 3, 8, 16), -1, 24), group_layout((64, 32), None, None)
        ((3, 24, 16), (1, 2048, 1))
        >>> group_layout((10, 4), -1, 4), group_layout((10, 4), -1, 64)  # 4 + 4 + 2; all 10
        ((3, 4, 4), (1, 10, 4))
    """
    channels = 1 if axis is None else shape[axis]
    contracted = math.prod(shape) // channels
    size = contracted if group_size is None else min(group_size, contracted)
    return -(-contracted // size), size, channels


def ragged(shape: tuple[int, ...], axis: int | None, group_size: int | None) -> int:
    """How many padding entries per channel the ``(G, g, C)`` view adds (0: ``g`` divides ``K``).

    Example:
        >>> ragged((10, 4), -1, 4), ragged((8, 4), -1, 4), ragged((3, 4), -1, 8)
        (2, 0, 0)
    """
    groups, size, channels = group_layout(shape, axis, group_size)
    return groups * size - math.prod(shape) // channels


def to_groups(x: jax.Array, axis: int | None, group_size: int | None, *, fill=0) -> jax.Array:
    """The canonical ``(G, g, C)`` view of ``x`` (see :func:`group_layout`).

    When ``g`` does not divide ``K``, the last group is padded at its end with
    ``fill``; :func:`from_groups` drops the padding again, and :func:`group_mask`
    says which entries are real.

    Example:
        >>> import jax.numpy as jnp
        >>> to_groups(jnp.arange(8.0).reshape(4, 2), -1, 2)[:, :, 0].tolist()
        [[0.0, 2.0], [4.0, 6.0]]
        >>> to_groups(jnp.arange(3.0).reshape(3, 1), -1, 2)[:, :, 0].tolist()
        [[0.0, 1.0], [2.0, 0.0]]
    """
    shape = tuple(x.shape)
    groups, size, channels = group_layout(shape, axis, group_size)
    pad = ragged(shape, axis, group_size)
    moved = x if axis is None else jnp.moveaxis(x, axis, -1)
    try:
        flat = moved.reshape(groups * size - pad, channels)
    except Exception:  # jax raises a private ShardingTypeError here
        # Explicit mesh axes refuse a reshape that splits or merges a sharded dimension
        # unevenly; then the leaf is replicated first (a gather).
        flat = unsharded(moved).reshape(groups * size - pad, channels)
    if pad:
        flat = jnp.pad(unsharded(flat), ((0, pad), (0, 0)), constant_values=fill)
    try:
        return flat.reshape(groups, size, channels)
    except Exception:  # as above
        return unsharded(flat).reshape(groups, size, channels)


def group_mask(shape: tuple[int, ...], axis: int | None, group_size: int | None) -> np.ndarray:
    """Which entries of the ``(G, g, 1)`` view of ``shape`` are real (not padding).

    Example:
        >>> group_mask((3, 1), -1, 2)[:, :, 0].tolist()
        [[True, True], [True, False]]
    """
    groups, size, _ = group_layout(shape, axis, group_size)
    real = groups * size - ragged(shape, axis, group_size)
    return (np.arange(groups * size) < real).reshape(groups, size, 1)


def from_groups(x: jax.Array, shape: tuple[int, ...], axis: int | None) -> jax.Array:
    """Inverse of :func:`to_groups`: the ``(G, g, C)`` view back in ``shape``.

    Padding at the end of the last group (``G g`` beyond ``K``) is dropped.

    Example:
        >>> import jax.numpy as jnp
        >>> w = jnp.arange(8.0).reshape(4, 2)
        >>> bool((from_groups(to_groups(w, 0, 2), (4, 2), 0) == w).all())
        True
        >>> w = jnp.arange(6.0).reshape(3, 2)
        >>> bool((from_groups(to_groups(w, -1, 2), (3, 2), -1) == w).all())
        True
    """
    channels = 1 if axis is None else shape[axis]
    contracted = math.prod(shape) // channels
    if x.shape[0] * x.shape[1] != contracted:
        x = unsharded(x).reshape(-1, x.shape[-1])[:contracted]
    if axis is None:
        return x.reshape(shape)
    moved = tuple(np.delete(np.asarray(shape), axis)) + (shape[axis],)
    return jnp.moveaxis(x.reshape(moved), -1, axis)


def broadcast_shape(shape: tuple[int, ...], axis: int | None) -> tuple[int, ...]:
    """Shape of a per-channel (or per-tensor) statistic that broadcasts against ``shape``.

    Example:
        >>> broadcast_shape((3, 3, 8, 16), -1), broadcast_shape((4, 2), None)
        ((1, 1, 1, 16), (1, 1))
    """
    out = [1] * len(shape)
    if axis is not None:
        out[axis] = shape[axis]
    return tuple(out)


def decode(
    codes: jax.Array,
    scale: jax.Array,
    zero_point: jax.Array | None,
    *,
    shape: tuple[int, ...],
    axis: int | None,
    group_size: int | None,
    bits: int,
    dtype,
) -> jax.Array:
    """Dense values of unpacked codes: ``(code - zero_point) * scale``, in float32, as ``dtype``.

    The one decoder, shared by :meth:`Quantized.materialize` and
    :func:`jaxcompress.training.fake_quant`, so both give bit-identical values.

    Args:
        codes: unsigned codes shaped ``shape`` (any integer or float dtype).
        scale: ``(G, C)`` scales (see :func:`group_layout`).
        zero_point: ``(G, C)`` zero points, or ``None`` for symmetric codes.
        shape: the dense shape.
        axis: the channel axis or ``None``.
        group_size: the group size or ``None``.
        bits: bits per code.
        dtype: the dense dtype.

    Example:
        >>> import jax.numpy as jnp
        >>> decode(jnp.array([[1, 2, 3]], jnp.uint8), jnp.ones((1, 1)), None, shape=(1, 3),
        ...        axis=None, group_size=None, bits=2, dtype=jnp.float32).tolist()
        [[-1.0, 0.0, 1.0]]
    """
    codes = codes.astype(jnp.float32)
    scale = scale.astype(jnp.float32)
    if zero_point is None:
        zero = jnp.full(scale.shape, 2 ** (bits - 1), jnp.float32)
    else:
        zero = zero_point.astype(jnp.float32)
    groups, _, _ = group_layout(shape, axis, group_size)
    if groups == 1:
        # One scale per channel broadcasts directly: no reshape of the codes.
        target = broadcast_shape(shape, axis)
        dense = (codes - zero.reshape(target)) * scale.reshape(target)
    else:
        view = to_groups(codes, axis, group_size)
        dense = (view - zero[:, None, :]) * scale[:, None, :]
        dense = from_groups(dense, shape, axis)
    return dense.astype(dtype)


def grid_codes(view: jax.Array, scale: jax.Array, zero: jax.Array, *, bits: int, round_fn=None):
    """Codes of the ``(G, g, C)`` view ``view`` on the grid of ``(G, C)`` ``scale`` and ``zero``.

    ``round(view / scale + zero)`` clipped to ``[0, 2**bits - 1]``, as float32. A zero
    scale (an all-zero group) divides by 1 instead; callers keep such groups' codes.
    ``round_fn`` replaces ``jnp.round`` (a straight-through rounding for training).

    Example:
        >>> import jax.numpy as jnp
        >>> view = jnp.array([[[-3.0], [0.4], [9.0]]])
        >>> grid_codes(view, jnp.ones((1, 1)), jnp.full((1, 1), 2.0), bits=2)[0, :, 0].tolist()
        [0.0, 2.0, 3.0]
    """
    rounding = jnp.round if round_fn is None else round_fn
    scale = scale.astype(jnp.float32)
    safe = jnp.where(scale == 0, 1.0, scale)
    # The zero point is added before rounding: an asymmetric one may be fractional.
    codes = rounding(view.astype(jnp.float32) / safe[:, None, :] + zero[:, None, :])
    return jnp.clip(codes, 0, 2**bits - 1)


def zero_points(scale: jax.Array, zero_point: jax.Array | None, bits: int) -> jax.Array:
    """The ``(G, C)`` zero points as float32: the stored ones, or ``2**(bits - 1)`` if symmetric.

    Example:
        >>> import jax.numpy as jnp
        >>> zero_points(jnp.ones((1, 2)), None, 4).tolist()
        [[8.0, 8.0]]
    """
    if zero_point is None:
        return jnp.full(scale.shape, 2 ** (bits - 1), jnp.float32)
    return zero_point.astype(jnp.float32)


def scale_inputs(dense: jax.Array, input_scale: jax.Array) -> jax.Array:
    """``dense`` (float32) times per-input-feature scales along its leading axes.

    ``input_scale`` has the shape of ``dense``'s first ``input_scale.ndim`` axes, or
    as many axes as ``dense`` with 1 on its output axes (a weight stored output first:
    ``(1, in)`` for an ``(out, in)`` one), so it broadcasts as it is. It is
    one float32 multiplication (correctly rounded on every backend, unlike a division),
    so :meth:`Quantized.materialize`, the AWQ search of :func:`jaxcompress.quantize`
    and any reader of a saved file give the same bits.

    Example:
        >>> import jax.numpy as jnp
        >>> scale_inputs(jnp.ones((2, 3)), jnp.array([1.0, 0.25])).tolist()
        [[1.0, 1.0, 1.0], [0.25, 0.25, 0.25]]
    """
    # Replicated first: it broadcasts against the dense array's own layout on any mesh.
    r = unsharded(input_scale).astype(jnp.float32)
    r = r.reshape(tuple(r.shape) + (1,) * (dense.ndim - r.ndim))
    return dense.astype(jnp.float32) * r


@_quantized_pytree
@dataclasses.dataclass(frozen=True, repr=False)
class Quantized(CompressedArray):
    """A linearly quantized leaf: bit-packed unsigned codes plus scales.

    Attributes:
        codes: unsigned ``bits``-bit codes laid out like the dense array and packed
            along the last axis with :func:`jaxcompress.bitpack.pack`, uint8 of shape
            ``(*shape[:-1], ceil(shape[-1] * bits / 8))``. Laid out like the dense array,
            they shard the same way.
        scale: one step size per (group, channel), shape ``(G, C)``, in the scale dtype
            (see :func:`group_layout`; per-tensor is ``(1, 1)``, per-channel ``(1, C)``).
        zero_point: ``None`` for symmetric quantization, whose implicit zero point is
            ``2**(bits - 1)``; else a (possibly fractional) zero point per scale, same
            shape and dtype as ``scale``.
        shape: the dense shape (static).
        dtype: the dense dtype (static).
        bits: bits per code, 2 to 8 (static).
        axis: the channel axis (non-negative) or ``None`` for per-tensor (static).
        group_size: entries per group along the contracted dimension, or ``None``
            for one group per channel (static). It need not divide the entries per
            channel ``K``: the last group is then shorter (``K - (G - 1) g`` entries)
            and its scale comes from those entries alone. Only real entries have codes
            (they are laid out like the dense array), so nothing is stored for the
            padding of the ``(G, g, C)`` view.
        input_scale: ``None``, or one positive factor ``r_i`` per input feature,
            shaped like the weight's leading (fan-in) axes, ``shape[:k]`` with
            ``1 <= k < ndim`` (a Dense ``(in, out)`` kernel's rows), in the scale
            dtype. A weight stored output first (equinox's ``(out, in)``) keeps them
            shaped ``(1, …, 1, *in)``, as many axes as the weight with 1 on its output
            axes. Entry ``(i, ...)`` decodes as ``(code - zero_point) * scale * r_i``.
            AWQ (:func:`jaxcompress.quantize` with ``method="awq"``) stores
            ``r = 1 / s``: the codes encode ``diag(s) W``.

    An entry decodes as ``(code - zero_point) * scale`` (times its input scale, when
    there is one), computed in float32 and cast to ``dtype``. ``nbytes`` is the packed
    codes plus the scales, zero points and input scales.

    Symmetric codes use all ``2**bits`` values: ``code - 2**(bits - 1)`` runs from
    ``-2**(bits - 1)`` to ``2**(bits - 1) - 1``, code ``2**(bits - 1)`` is an exact zero,
    and a negative scale mirrors the grid, so the extra level falls on the side of the
    group's largest magnitude (for int4 a step of ``max|w| / 8``, not ``/ 7``). Files
    written before this grid use codes ``1`` to ``2**bits - 1`` with positive scales and
    decode as before.

    Example:
        >>> import jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> w = jnp.array([[1.0, -2.0], [0.5, 4.0]])
        >>> q = jc.quantize(4, axis=None, where="w")({"w": w})[0]["w"]
        >>> q
        Quantized(shape=(2, 2), dtype=float32, bits=4, axis=None, group_size=None)
        >>> import numpy as np
        >>> q.nbytes, q.scale.tolist()  # 4.0 is the largest magnitude: code 0, step 4 / 8
        (6, [[-0.5]])
        >>> np.asarray(q.materialize()).tolist()
        [[1.0, -2.0], [0.5, 4.0]]
    """

    codes: jax.Array
    scale: jax.Array
    zero_point: jax.Array | None
    shape: tuple[int, ...]
    dtype: np.dtype
    bits: int
    axis: int | None
    group_size: int | None
    input_scale: jax.Array | None = None

    kind = "quantized"

    @property
    def symmetric(self) -> bool:
        """Whether codes are centred on the implicit zero point ``2**(bits - 1)``."""
        return self.zero_point is None

    @property
    def nbytes(self) -> int:
        total = leaf_nbytes(self.codes) + leaf_nbytes(self.scale)
        total += 0 if self.zero_point is None else leaf_nbytes(self.zero_point)
        return total + (0 if self.input_scale is None else leaf_nbytes(self.input_scale))

    def unpacked_codes(self) -> jax.Array:
        """The unsigned codes as uint8, shaped like the dense array."""
        return unpack(self.codes, self.bits, self.shape[-1])

    def materialize(self) -> jax.Array:
        scaled = self.input_scale is not None
        dense = decode(
            self.unpacked_codes(),
            self.scale,
            self.zero_point,
            shape=self.shape,
            axis=self.axis,
            group_size=self.group_size,
            bits=self.bits,
            dtype=jnp.float32 if scaled else self.dtype,
        )
        if self.input_scale is None:
            return dense
        return scale_inputs(dense, self.input_scale).astype(self.dtype)

    def layout_child(self) -> jax.Array:
        return self.codes

    def child_shardings(self, reference: NamedSharding) -> Quantized:
        # Codes follow the weight; (G, C) scales put C on the channel axis' mesh axes
        # and G on the leading other axis'; AWQ's input scales follow the fan-in axes.
        scale_shape = tuple(self.scale.shape)
        scale = named_like(reference, scale_spec(self.shape, self.axis, scale_shape, reference))
        inputs = None
        if self.input_scale is not None:
            input_shape = tuple(self.input_scale.shape)
            inputs = named_like(reference, input_scale_spec(input_shape, reference))
        return with_shardings(
            self,
            codes=sharding_for(self.codes.shape, reference),
            scale=scale,
            zero_point=None if self.zero_point is None else scale,
            input_scale=inputs,
        )

    def __repr__(self) -> str:
        extra = ""
        if self.input_scale is not None:
            extra = f", input_scale={tuple(self.input_scale.shape)}"
        return (
            f"Quantized(shape={self.shape}, dtype={np.dtype(self.dtype).name}, "
            f"bits={self.bits}, axis={self.axis}, group_size={self.group_size}{extra})"
        )


def requantize(leaf: Quantized, target: jax.Array, *, scale: jax.Array | None = None) -> Quantized:
    """``target`` coded on ``leaf``'s own grid: same metadata, codes rounded again.

    ``target`` is the dense array before any AWQ input scales (``(code - zero) * scale``
    for the leaf itself). ``scale`` replaces the leaf's scales (same shape; stored in
    the leaf's scale dtype); the zero points stay. Codes are rounded to the nearest
    level and clipped to the ``bits``-bit range; a group with a zero scale keeps its
    codes (nothing can be coded there).

    Example:
        >>> import jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> q = jc.quantize(4, axis=None, where="w")({"w": jnp.array([[1.0, -2.0]])})[0]["w"]
        >>> requantize(q, jnp.array([[0.26, 9.0]])).materialize().tolist()  # step 0.25
        [[0.25, 1.75]]
    """
    shape, axis, group_size = tuple(leaf.shape), leaf.axis, leaf.group_size
    stored = leaf.scale if scale is None else scale.astype(leaf.scale.dtype)
    scale32 = stored.astype(jnp.float32)
    zero = zero_points(scale32, leaf.zero_point, leaf.bits)
    codes = grid_codes(to_groups(target, axis, group_size), scale32, zero, bits=leaf.bits)
    old = to_groups(leaf.unpacked_codes().astype(jnp.float32), axis, group_size)
    codes = jnp.where((scale32 == 0)[:, None, :], old, codes)
    dense_codes = from_groups(codes, shape, axis)
    return dataclasses.replace(
        leaf, codes=pack(dense_codes.astype(jnp.uint8), leaf.bits), scale=stored
    )
