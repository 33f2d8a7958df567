"""LowRank: a weight stored as the product of two thin factors."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxcompress.arrays.base import CompressedArray, leaf_nbytes, with_shardings
from jaxcompress.core.mesh import (
    devices_along,
    merged_entry,
    named_like,
    named_sharding_of,
    sharding_for,
    unsharded,
)


def _lowrank_pytree(cls: type) -> type:
    return jax.tree_util.register_dataclass(
        cls, data_fields=["u", "v"], meta_fields=["shape", "dtype", "fan_in_axes"]
    )


def matrix_shape(shape: tuple[int, ...], fan_in_axes: int) -> tuple[int, int]:
    """``(m, n)`` of the matrix view of a weight whose first ``fan_in_axes`` axes are inputs.

    Example:
        >>> matrix_shape((3, 3, 16, 32), 3), matrix_shape((64, 10), 1)
        ((144, 32), (64, 10))
    """
    return math.prod(shape[:fan_in_axes]), math.prod(shape[fan_in_axes:])


def factor_shardings(
    reference: NamedSharding, shape: tuple[int, ...], fan_in_axes: int
) -> tuple[NamedSharding, NamedSharding]:
    """Reference shardings for ``u`` and ``v`` of a weight placed by ``reference``.

    ``u``'s rows (the flattened fan-in axes) take the mesh axes that shard the
    weight's fan-in axes and ``v``'s columns those that shard its fan-out axes; the
    rank axis is never split. Pass each to :func:`jaxcompress.sharding.place_like`,
    which drops an axis that does not divide evenly.

    Example:
        >>> import jax
        >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        >>> mesh = Mesh(jax.devices()[:1], ("x",))
        >>> u, v = factor_shardings(NamedSharding(mesh, P("x", None)), (4, 3), 1)
        >>> u.spec, v.spec
        (P('x', None), P(None, None))
    """
    spec = tuple(reference.spec) + (None,) * (len(shape) - len(reference.spec))
    rows, columns = merged_entry(spec[:fan_in_axes]), merged_entry(spec[fan_in_axes:])
    return (
        named_like(reference, PartitionSpec(rows, None)),
        named_like(reference, PartitionSpec(None, columns)),
    )


def dense_spec(
    u_spec: PartitionSpec, v_spec: PartitionSpec, mesh, shape: tuple[int, ...], fan_in_axes: int
) -> PartitionSpec:
    """The dense weight's spec recovered from its factors' (inverse of :func:`factor_shardings`).

    ``u``'s row entry goes on the first fan-in axis it divides evenly and ``v``'s
    column entry on the first fan-out axis it divides; for a 2-D weight this is
    exactly the weight's spec.

    Example:
        >>> import jax
        >>> import numpy as np
        >>> from jax.sharding import Mesh, PartitionSpec as P
        >>> mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("x", "y"))
        >>> dense_spec(P("x", None), P(None, "y"), mesh, (3, 3, 8, 16), 3)
        P('x', None, None, 'y')
    """
    kept: list = [None] * len(shape)
    row = u_spec[0] if len(u_spec) else None
    column = v_spec[1] if len(v_spec) > 1 else None
    for entry, axes in ((row, range(fan_in_axes)), (column, range(fan_in_axes, len(shape)))):
        if entry is None:
            continue
        devices = devices_along(mesh, entry)
        for axis in axes:
            if shape[axis] % devices == 0:
                kept[axis] = entry
                break
    return PartitionSpec(*kept)


@_lowrank_pytree
@dataclasses.dataclass(frozen=True, repr=False)
class LowRank(CompressedArray):
    """A weight ``W`` (viewed as an ``m x n`` matrix) stored as ``u @ v``.

    The matrix view flattens the first ``fan_in_axes`` axes (the contracted input
    features, row-major) into ``m`` and the rest into ``n``: a Dense kernel
    ``(in, out)`` has ``fan_in_axes=1``; a conv kernel ``(h, w, in, out)`` has
    ``fan_in_axes=3`` (``m = h * w * in``, the im2col patch); an attention output
    projection ``(heads, head_dim, features)`` has ``fan_in_axes=2``.

    Applied to an input ``x`` with ``m`` features, ``(x @ u) @ v`` costs
    ``r * (m + n)`` multiply-adds per row instead of ``m * n``.

    Attributes:
        u: the input-side factor, shape ``(m, r)``.
        v: the output-side factor, shape ``(r, n)``.
        shape: the dense shape (static).
        dtype: the dense dtype (static).
        fan_in_axes: how many leading axes of ``shape`` are inputs (static); for a
            weight stored output first (equinox's ``(out, in)``, factorized by a
            whitened :func:`jaxcompress.low_rank`) they are its outputs, and
            :func:`jaxcompress.accelerate` applies it as ``(x @ vᵀ) @ uᵀ``.

    Example:
        >>> import jax.numpy as jnp
        >>> leaf = LowRank(u=jnp.ones((4, 1)), v=jnp.arange(3.0)[None, :], shape=(4, 3),
        ...                dtype=jnp.float32, fan_in_axes=1)
        >>> leaf.rank, leaf.nbytes, leaf.materialize()[0].tolist()
        (1, 28, [0.0, 1.0, 2.0])
    """

    u: jax.Array
    v: jax.Array
    shape: tuple[int, ...]
    dtype: np.dtype
    fan_in_axes: int

    kind = "lowrank"

    @property
    def rank(self) -> int:
        """The number of columns of ``u`` (static)."""
        return int(self.u.shape[-1])

    @property
    def nbytes(self) -> int:
        return leaf_nbytes(self.u) + leaf_nbytes(self.v)

    def materialize(self) -> jax.Array:
        # float64 stays float64; HIGHEST keeps accelerators from rounding to bfloat16 passes.
        compute = jnp.float64 if np.dtype(self.dtype) == np.float64 else jnp.float32
        product = jnp.matmul(
            unsharded(self.u).astype(compute),
            unsharded(self.v).astype(compute),
            precision=jax.lax.Precision.HIGHEST,
        )
        return product.reshape(self.shape).astype(self.dtype)

    def layout_child(self) -> jax.Array:
        # Neither factor is laid out like the dense array, so an empty placeholder
        # carries the dense spec recovered from the factors' shardings.
        u_sharding, v_sharding = named_sharding_of(self.u), named_sharding_of(self.v)
        if u_sharding is None or v_sharding is None or u_sharding.mesh != v_sharding.mesh:
            return self.u
        spec = dense_spec(
            u_sharding.spec, v_sharding.spec, u_sharding.mesh, self.shape, self.fan_in_axes
        )
        empty = jnp.zeros((0,) * len(self.shape), self.dtype)
        return jax.device_put(empty, NamedSharding(u_sharding.mesh, spec))

    def child_shardings(self, reference: NamedSharding) -> LowRank:
        u_reference, v_reference = factor_shardings(reference, self.shape, self.fan_in_axes)
        return with_shardings(
            self,
            u=sharding_for(self.u.shape, u_reference),
            v=sharding_for(self.v.shape, v_reference),
        )

    def __repr__(self) -> str:
        return f"LowRank(shape={self.shape}, dtype={np.dtype(self.dtype).name}, rank={self.rank})"
