"""Serving layouts: compressed matrices stored output-major for fast inference.

:class:`Quantized` and :class:`Clustered` keep their codes laid out like the dense
weight ``(K, N)`` (inputs first), which is what saving, sharding and materializing
want. Integer and blocked matrix products want the transpose, ``(N, K)``: each output
channel's codes contiguous along the contracted axis. Measured on this project's
2-core CPU (AVX-512 VNNI), an int8 ``(64, 4096) x (4096, 4096)`` product took 3.7 ms
with ``(N, K)`` codes, 6.0 ms with ``(K, N)`` codes and 43 ms when the transpose was
done inside ``jit`` (dense float32: 6.8 ms). So the transpose is done once, by
:func:`to_serving`, not on every call.

Both classes are compressed leaves: ``materialize`` gives the same dense array as
the leaf they came from, so any code path that does not know them still works.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxcompress.arrays.base import CompressedArray, leaf_nbytes, with_shardings
from jaxcompress.arrays.clustered import Clustered
from jaxcompress.arrays.quantized import Quantized, group_layout
from jaxcompress.core.mesh import fitting, merged_entry, named_like


def output_major_specs(
    reference: NamedSharding,
    shape: tuple[int, ...],
    rows: int,
    columns: int,
    *,
    outputs_first: bool = False,
) -> tuple[PartitionSpec, Any]:
    """The spec of ``(N, K)`` output-major codes, and the mesh entry of their rows.

    Rows (output channels) take the dense weight's last-axis entry (first-axis entry
    with ``outputs_first``), columns the mesh axes of its other (fan-in) axes, each
    where it divides evenly.

    Example:
        >>> import jax
        >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        >>> mesh = Mesh(jax.devices()[:1], ("x",))
        >>> output_major_specs(NamedSharding(mesh, P(None, "x")), (8, 4), 4, 8)
        (P('x', None), 'x')
    """
    spec = tuple(reference.spec) + (None,) * (len(shape) - len(reference.spec))
    channel, fan_in = (spec[0], spec[1:]) if outputs_first else (spec[-1], spec[:-1])
    row_entry = fitting(reference.mesh, channel, rows)
    return PartitionSpec(row_entry, fitting(reference.mesh, merged_entry(fan_in), columns)), channel


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["codes", "scale", "offset"],
    meta_fields=["shape", "dtype", "bits", "packed", "outputs_first", "group_size"],
)
@dataclasses.dataclass(frozen=True, repr=False)
class QuantizedMatrix(CompressedArray):
    """Linear codes of a ``(K, N)`` matrix view, stored output-major as signed integers.

    The dense weight is ``(…, N)``, inputs first (a linen kernel), or with
    ``outputs_first`` ``(N, …)``, used as ``x @ W.T`` (an equinox ``(out, in)``
    weight); ``K`` is the product of its other axes, row-major, either way.

    ``W[k, n] = (q[n, k] - offset[g, n]) * scale[g, n]`` for ``k`` in group ``g``.
    Codes of up to 4 bits are packed two per byte, biased by 8: byte ``j`` of a row
    holds ``q[j] + 8`` in its low nibble and ``q[j + K/2] + 8`` in its high nibble, so
    each half of the row unpacks to a contiguous half of the contracted axis.

    Attributes:
        codes: ``(N, K)`` int8, or ``(N, K // 2)`` uint8 when ``packed``.
        scale: ``(G, N)`` float32 scales.
        offset: ``(G, N)`` float32 zero-point offsets, or ``None`` (symmetric codes).
        shape: the dense shape (static); ``K`` is the product of all but its output axis.
        dtype: the dense dtype (static).
        bits: bits per code (static).
        packed: whether two codes share a byte (static).
        outputs_first: whether the output axis is the dense shape's first, not its
            last (static).
        group_size: ``None`` when the ``G`` groups split ``K`` evenly; else the
            entries per group, the last group being shorter (``K - (G - 1) g``), as
            the :class:`Quantized` leaf it came from (static).

    Example:
        >>> import jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> w = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)
        >>> leaf = jc.quantize(bits=8, axis=-1)({"w": w})[0]["w"]
        >>> serving = to_serving(leaf)
        >>> serving.codes.shape, bool(jnp.all(serving.materialize() == leaf.materialize()))
        ((3, 4), True)
    """

    codes: jax.Array
    scale: jax.Array
    offset: jax.Array | None
    shape: tuple[int, ...]
    dtype: np.dtype
    bits: int
    packed: bool
    outputs_first: bool = False
    group_size: int | None = None

    kind = "quantized_matrix"

    @property
    def nbytes(self) -> int:
        extra = 0 if self.offset is None else leaf_nbytes(self.offset)
        return leaf_nbytes(self.codes) + leaf_nbytes(self.scale) + extra

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """``(K, N)``."""
        if self.outputs_first:
            return math.prod(self.shape[1:]), self.shape[0]
        return math.prod(self.shape[:-1]), self.shape[-1]

    @property
    def input_axes(self) -> tuple[int, ...]:
        """The axes of the dense shape a product contracts, in order."""
        ndim = len(self.shape)
        return tuple(range(1, ndim)) if self.outputs_first else tuple(range(ndim - 1))

    @property
    def groups(self) -> int:
        """``G``, the number of scale groups along ``K``."""
        return int(self.scale.shape[0])

    @property
    def group(self) -> int:
        """``g``, the entries of ``K`` per scale group (the last group may have fewer)."""
        if self.group_size is not None:
            return self.group_size
        return self.matrix_shape[0] // self.groups

    def signed_codes(self) -> jax.Array:
        """The ``(N, K)`` int8 codes, unpacked."""
        if not self.packed:
            return self.codes
        return jnp.concatenate(unpack_nibbles(self.codes), axis=1)

    def materialize(self) -> jax.Array:
        k, n = self.matrix_shape
        codes = grouped_rows(self.signed_codes().astype(jnp.float32), self.groups, self.group)
        offset = 0.0 if self.offset is None else self.offset.T[:, :, None]
        dense = ((codes - offset) * self.scale.T[:, :, None]).reshape(n, -1)[:, :k]
        dense = dense if self.outputs_first else dense.T
        return dense.reshape(self.shape).astype(self.dtype)

    def layout_child(self) -> jax.Array:
        return self.codes

    def child_shardings(self, reference: NamedSharding) -> QuantizedMatrix:
        # (G, N) scales (and offsets) follow the output channels, the codes' rows.
        code_spec, channel = output_major_specs(
            reference, self.shape, *self.codes.shape, outputs_first=self.outputs_first
        )
        channels = fitting(reference.mesh, channel, self.scale.shape[1])
        scale = named_like(reference, PartitionSpec(None, channels))
        return with_shardings(
            self,
            codes=named_like(reference, code_spec),
            scale=scale,
            offset=None if self.offset is None else scale,
        )

    def __repr__(self) -> str:
        first = ", outputs_first=True" if self.outputs_first else ""
        return (
            f"QuantizedMatrix(shape={self.shape}, bits={self.bits}, groups={self.groups}, "
            f"packed={self.packed}{first})"
        )


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["indices", "codebook"],
    meta_fields=["shape", "dtype", "bits"],
)
@dataclasses.dataclass(frozen=True, repr=False)
class ClusteredMatrix(CompressedArray):
    """Cluster indices of a ``(K, N)`` matrix view, stored output-major as uint8.

    Attributes:
        indices: ``(N, K)`` uint8 codebook indices.
        codebook: ``(k,)`` shared, or ``(N, k)`` per output channel.
        shape: the dense shape (static).
        dtype: the dense dtype (static).
        bits: index bits of the source leaf (static).

    Example:
        >>> import jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> w = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)
        >>> leaf = jc.cluster(k=4)({"w": w})[0]["w"]
        >>> serving = to_serving(leaf)
        >>> serving.indices.shape, bool(jnp.all(serving.materialize() == leaf.materialize()))
        ((3, 4), True)
    """

    indices: jax.Array
    codebook: jax.Array
    shape: tuple[int, ...]
    dtype: np.dtype
    bits: int

    kind = "clustered_matrix"

    @property
    def nbytes(self) -> int:
        return leaf_nbytes(self.indices) + leaf_nbytes(self.codebook)

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """``(K, N)``."""
        return math.prod(self.shape[:-1]), self.shape[-1]

    @property
    def input_axes(self) -> tuple[int, ...]:
        """The axes of the dense shape a product contracts, in order."""
        return tuple(range(len(self.shape) - 1))

    def materialize(self) -> jax.Array:
        dense_t = lookup(self.codebook, self.indices)
        return dense_t.T.reshape(self.shape).astype(self.dtype)

    def layout_child(self) -> jax.Array:
        return self.indices

    def child_shardings(self, reference: NamedSharding) -> ClusteredMatrix:
        # A per-channel codebook follows the output channels; a shared one is replicated.
        code_spec, channel = output_major_specs(reference, self.shape, *self.indices.shape)
        book = PartitionSpec()
        if self.codebook.ndim == 2:
            book = PartitionSpec(fitting(reference.mesh, channel, self.codebook.shape[0]), None)
        return with_shardings(
            self, indices=named_like(reference, code_spec), codebook=named_like(reference, book)
        )

    def __repr__(self) -> str:
        return f"ClusteredMatrix(shape={self.shape}, k={self.codebook.shape[-1]})"


def grouped_rows(rows: jax.Array, groups: int, size: int) -> jax.Array:
    """``(B, K)`` rows as ``(B, G, g)`` scale groups, zero-padded at the end when ``G g > K``.

    A short last group's padding multiplies nothing real: callers drop it with
    ``[..., :K]`` after flattening, or sum it as zeros.

    Example:
        >>> import jax.numpy as jnp
        >>> grouped_rows(jnp.arange(3.0)[None], 2, 2).tolist()
        [[[0.0, 1.0], [2.0, 0.0]]]
    """
    pad = groups * size - rows.shape[1]
    if pad:
        rows = jnp.pad(rows, ((0, 0), (0, pad)))
    return rows.reshape(rows.shape[0], groups, size)


def unpack_nibbles(packed: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Signed codes ``(first half, second half)`` of a packed uint8 array, as int8.

    Example:
        >>> import jax.numpy as jnp
        >>> low, high = unpack_nibbles(jnp.array([0x9F], jnp.uint8))  # nibbles 15 and 9
        >>> low.tolist(), high.tolist()
        ([7], [1])
    """
    eight = jnp.int8(8)
    low = (packed & jnp.uint8(0xF)).astype(jnp.int8) - eight
    high = jnp.right_shift(packed, jnp.uint8(4)).astype(jnp.int8) - eight
    return low, high


def lookup(codebook: jax.Array, indices: jax.Array) -> jax.Array:
    """Codebook values of ``(N, k)`` indices, with a shared or per-row codebook.

    Example:
        >>> import jax.numpy as jnp
        >>> lookup(jnp.array([0.5, 2.0]), jnp.array([[1, 0]], jnp.uint8)).tolist()
        [[2.0, 0.5]]
    """
    idx = indices.astype(jnp.int32)
    if codebook.ndim == 1:
        return jnp.take(codebook, idx, mode="clip")
    return jnp.take_along_axis(codebook, idx, axis=1, mode="clip")


def _pack_nibbles(signed: jax.Array) -> jax.Array:
    half = signed.shape[1] // 2
    biased = (signed + jnp.int8(8)).astype(jnp.uint8)
    return biased[:, :half] | jnp.left_shift(biased[:, half:], jnp.uint8(4))


def servable(leaf: object) -> bool:
    """Whether :func:`to_serving` has a layout for ``leaf``.

    That is a :class:`Quantized` leaf with channels on its last axis, or on its first
    (an output-first weight such as equinox's ``(out, in)``), or one scale for the
    whole tensor, and no AWQ ``input_scale``, or a :class:`Clustered` leaf, of rank 2
    or more. (An AWQ leaf is served by materializing it, which is exact.)

    Example:
        >>> import jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> servable(jc.quantize(bits=8, axis=-1)({"w": jnp.ones((4, 4))})[0]["w"])
        True
    """
    if isinstance(leaf, Quantized):
        if leaf.input_scale is not None:
            return False
        ndim = len(leaf.shape)
        per_tensor = leaf.axis is None and leaf.group_size is None
        end = leaf.axis is not None and leaf.axis % ndim in (0, ndim - 1)
        return ndim >= 2 and (per_tensor or end)
    return isinstance(leaf, Clustered) and len(leaf.shape) >= 2


def to_serving(leaf: Quantized | Clustered) -> QuantizedMatrix | ClusteredMatrix:
    """The output-major serving layout of a quantized or clustered weight.

    Run it once, outside ``jit`` or inside: it reorders the codes, it does not
    change any value. :func:`jaxcompress.accelerate` does it for a whole pytree with
    ``prepare``.

    Args:
        leaf: a leaf for which :func:`servable` is true.

    Returns:
        A :class:`QuantizedMatrix` or :class:`ClusteredMatrix` that materializes to
        the same dense array.

    Raises:
        ValueError: when the leaf has no serving layout.

    Example:
        >>> import jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> leaf = jc.quantize(bits=4, axis=-1)({"w": jnp.ones((8, 2))})[0]["w"]
        >>> to_serving(leaf).codes.shape  # 4-bit codes, two per byte
        (2, 4)
    """
    if not servable(leaf):
        raise ValueError(f"no serving layout for {leaf!r}")
    k = math.prod(leaf.shape[:-1])
    n = leaf.shape[-1]
    if isinstance(leaf, Clustered):
        indices = leaf.codes().reshape(k, n).T
        return ClusteredMatrix(indices, leaf.codebook, leaf.shape, leaf.dtype, leaf.bits)
    half = 2 ** (leaf.bits - 1)
    signed = leaf.unpacked_codes().astype(jnp.int16) - half
    # Scales along the first axis: the weight is stored output first, already (N, K).
    first = leaf.axis == 0
    if first:
        n, k = leaf.shape[0], math.prod(leaf.shape[1:])
        signed = signed.reshape(n, k).astype(jnp.int8)
    else:
        signed = signed.reshape(k, n).T.astype(jnp.int8)
    groups, _, _ = group_layout(leaf.shape, leaf.axis, leaf.group_size)
    scale = jnp.broadcast_to(leaf.scale.astype(jnp.float32), (groups, n))
    offset = None
    if leaf.zero_point is not None:
        offset = jnp.broadcast_to(leaf.zero_point.astype(jnp.float32) - half, (groups, n))
    packed = leaf.bits <= 4 and k % 2 == 0
    codes = _pack_nibbles(signed) if packed else signed
    # A size that does not divide K (a short last group) cannot be read off G and K,
    # even when G happens to divide K (K = 300 in 5 groups of 64, the last of 44).
    size = group_layout(leaf.shape, leaf.axis, leaf.group_size)[1]
    return QuantizedMatrix(
        codes,
        scale,
        offset,
        leaf.shape,
        leaf.dtype,
        leaf.bits,
        packed,
        first,
        group_size=None if size * groups == k else size,
    )


def clustered_on_int8_grid(leaf: Clustered) -> QuantizedMatrix:
    """A clustered weight re-expressed as 8-bit codes: each centroid rounded to an int8 grid.

    The grid step is ``max|codebook| / 127`` (per output channel for per-channel
    codebooks), so every weight moves by at most half a step. This trades exactness
    (and half the memory of 4-bit indices) for the integer-dot route: XLA looks up a
    codebook on the fly far slower than it multiplies int8 codes.

    Example:
        >>> import jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> w = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)
        >>> leaf = jc.cluster(k=4)({"w": w})[0]["w"]
        >>> grid = clustered_on_int8_grid(leaf)
        >>> bool(jnp.max(jnp.abs(grid.materialize() - leaf.materialize())) <= 0.5 / 127)
        True
    """
    k = math.prod(leaf.shape[:-1])
    n = leaf.shape[-1]
    codebook = leaf.codebook.astype(jnp.float32)
    peak = jnp.max(jnp.abs(codebook), axis=-1, keepdims=True)
    step = jnp.where(peak > 0, peak / 127.0, jnp.ones_like(peak))
    table = jnp.clip(jnp.round(codebook / step), -127, 127).astype(jnp.int8)
    codes = lookup(table, leaf.codes().reshape(k, n).T)
    scale = jnp.broadcast_to(step.reshape(1, -1), (1, n))
    return QuantizedMatrix(codes, scale, None, leaf.shape, leaf.dtype, 8, False)


def channel_error(exact: jax.Array, approx: jax.Array) -> float:
    """The largest relative L2 change of an output channel: ``max_n ||a_n - e_n|| / ||e_n||``.

    ``exact`` and ``approx`` are dense weights of one shape, inputs first (channels on
    the last axis); a channel
    that is zero in both counts 0, one zero only in ``exact`` infinity. Concrete
    arrays only (it returns a Python float): :func:`clustered_on_int8_grid`'s
    callers use it to decide whether the grid is close enough.

    Example:
        >>> import jax.numpy as jnp
        >>> channel_error(jnp.array([[3.0, 1.0], [4.0, 0.0]]), jnp.array([[3.0, 1.0], [4.5, 0.0]]))
        0.1
    """
    e = np.asarray(exact, np.float64).reshape(-1, np.shape(exact)[-1])
    a = np.asarray(approx, np.float64).reshape(e.shape)
    change = np.linalg.norm(a - e, axis=0)
    norm = np.linalg.norm(e, axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(change == 0, 0.0, change / norm)
    return float(ratio.max(initial=0.0))


def uniform_codebook_as_quantized(
    leaf: Clustered, *, tolerance: float = 1e-6
) -> QuantizedMatrix | None:
    """A clustered weight whose codebook is evenly spaced, as exact linear codes.

    A sorted codebook ``c_j = c_0 + j * step`` (one, or one per output channel) makes
    ``W = c_0 + index * step``, which is linear quantization with scale ``step`` and a
    zero point, so it can take the integer route without the int8-grid rounding of
    :func:`clustered_on_int8_grid`. Needs a concrete codebook (call it outside ``jit``).

    Args:
        leaf: a :class:`Clustered` leaf for which :func:`servable` is true.
        tolerance: how far (relative to the largest centroid) a spacing may stray.

    Returns:
        The :class:`QuantizedMatrix`, or ``None`` when the codebook is not uniform.

    Example:
        >>> import jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> w = jnp.array([[0.0, 0.5], [1.0, 1.5]])
        >>> leaf = jc.cluster(k=4)({"w": w})[0]["w"]  # the four values are evenly spaced
        >>> q = uniform_codebook_as_quantized(leaf)
        >>> uneven = jc.cluster(k=3)({"w": jnp.array([[0.0, 1.0], [3.0, 3.0]])})[0]["w"]
        >>> q.materialize().tolist(), uniform_codebook_as_quantized(uneven)
        ([[0.0, 0.5], [1.0, 1.5]], None)
    """
    codebook = np.asarray(leaf.codebook, np.float64)
    rows = codebook.reshape(-1, codebook.shape[-1])
    if rows.shape[1] < 2:
        return None
    steps = np.diff(rows, axis=1)
    step = steps.mean(axis=1)
    scale_of = np.maximum(np.abs(rows).max(axis=1), 1e-30)
    if (step <= 0).any() or (
        np.abs(steps - step[:, None]).max(axis=1) > tolerance * scale_of
    ).any():
        return None
    k = math.prod(leaf.shape[:-1])
    n = leaf.shape[-1]
    half = 2 ** (leaf.bits - 1)
    signed = (leaf.codes().astype(jnp.int16) - half).reshape(k, n).T.astype(jnp.int8)
    offset = -rows[:, 0] / step - half
    scale = np.broadcast_to(step.astype(np.float32).reshape(1, -1), (1, n))
    offset = np.broadcast_to(offset.astype(np.float32).reshape(1, -1), (1, n))
    packed = leaf.bits <= 4 and k % 2 == 0
    codes = _pack_nibbles(signed) if packed else signed
    return QuantizedMatrix(
        codes, jnp.asarray(scale), jnp.asarray(offset), leaf.shape, leaf.dtype, leaf.bits, packed
    )
