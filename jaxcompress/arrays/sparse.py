"""Sparse: kept values plus a bit-packed keep-mask."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from jaxcompress.arrays.base import (
    CompressedArray,
    as_dense,
    is_compressed,
    leaf_nbytes,
    with_shardings,
)
from jaxcompress.core.mesh import sharding_for, unsharded


def _sparse_pytree(cls: type) -> type:
    return jax.tree_util.register_dataclass(
        cls, data_fields=["values", "mask"], meta_fields=["shape", "dtype"]
    )


@_sparse_pytree
@dataclasses.dataclass(frozen=True, repr=False)
class Sparse(CompressedArray):
    """An unstructured-sparse leaf: kept values plus a bit-packed mask.

    Attributes:
        values: the kept entries in row-major order, shape ``(nnz,)``. It may itself
            be a compressed leaf (for example clustered values), so zeros stay exact.
        mask: the keep-mask packed 8 entries per byte along the last axis
            (little bit order), shape ``(*shape[:-1], ceil(shape[-1] / 8))``, uint8.
            Packing along the last axis keeps the mask laid out like the dense
            array, so it shards the same way.
        shape: the dense shape (static).
        dtype: the dense dtype (static).

    ``nbytes`` is ``values`` bytes plus one bit per entry for the mask (each row
    padded to whole bytes).

    Example:
        >>> import jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> w = jnp.array([[1.0, -4.0, 2.0, 0.5], [3.0, -0.1, 5.0, 6.0]])
        >>> s = jc.prune(0.5)({"w": w})[0]["w"]
        >>> s.values.tolist(), s.nbytes
        ([-4.0, 3.0, 5.0, 6.0], 18)
        >>> s.materialize().tolist()
        [[0.0, -4.0, 0.0, 0.0], [3.0, 0.0, 5.0, 6.0]]
    """

    values: Any
    mask: jax.Array
    shape: tuple[int, ...]
    dtype: np.dtype

    kind = "sparse"

    @property
    def nnz(self) -> int:
        """Number of kept entries (static)."""
        return int(self.values.shape[0])

    @property
    def density(self) -> float:
        """Fraction of entries kept."""
        return self.nnz / self.size if self.size else 0.0

    @property
    def nbytes(self) -> int:
        return leaf_nbytes(self.values) + leaf_nbytes(self.mask)

    def keep_mask(self) -> jax.Array:
        """The unpacked boolean keep-mask, shaped like the dense array."""
        last = self.shape[-1]
        bits = jnp.unpackbits(self.mask, axis=-1, count=last, bitorder="little")
        return bits.astype(jnp.bool_)

    def materialize(self) -> jax.Array:
        keep = unsharded(self.keep_mask()).reshape(-1)
        values = unsharded(as_dense(self.values)).astype(self.dtype)
        if values.shape[0] == 0:
            return jnp.zeros(self.shape, self.dtype)
        # Entry i of the dense array is the (number of kept entries before i)-th value.
        position = jnp.cumsum(keep, dtype=jnp.int32) - 1
        gathered = jnp.take(values, jnp.maximum(position, 0), mode="clip")
        dense = jnp.where(keep, gathered, jnp.zeros((), self.dtype))
        return dense.reshape(self.shape)

    def layout_child(self) -> jax.Array:
        return self.mask

    def child_shardings(self, reference: NamedSharding) -> Sparse:
        # The kept values, compressed or not, stand for a flat dense vector: split over
        # the weight's mesh axes where its length divides.
        values = sharding_for(self.values.shape, reference)
        if is_compressed(self.values):
            values = self.values.child_shardings(values)
        return with_shardings(self, values=values, mask=sharding_for(self.mask.shape, reference))

    def values_to_compress(self, transform: str, path: str) -> Any:
        # The kept values are compressed instead of the leaf, so the zeros stay exact.
        if is_compressed(self.values):
            raise TypeError(
                f"{transform}: leaf {path!r} is Sparse with already compressed values "
                f"({type(self.values).__name__}); materialize it first"
            )
        return self.values

    def __repr__(self) -> str:
        return f"Sparse(shape={self.shape}, dtype={np.dtype(self.dtype).name}, nnz={self.nnz})"
