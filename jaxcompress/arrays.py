"""Compressed leaves: array-like containers that hold only what they need.

Each compressed leaf is a frozen dataclass registered as a pytree. Its array
children (values, packed masks, ...) are pytree children so the leaf moves through
``jit``, ``device_put`` and ``tree_map`` like any array; its shape and dtype are
static metadata. ``nbytes`` is the true storage cost of the children.

Constructors never validate: unflattening calls them with tracers and
placeholders. Validation lives in the factory functions (for example
:func:`jaxcompress.prune`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.sharding import unsharded


class CompressedArray:
    """Base class of every compressed leaf.

    Subclasses provide ``shape``, ``dtype``, :meth:`materialize` and ``nbytes``.
    Traversals in this library treat instances as leaves (see :func:`is_compressed`).

    Example:
        >>> import jaxcompress as jc
        >>> issubclass(jc.Sparse, jc.CompressedArray)
        True
    """

    kind: str = "compressed"
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def ndim(self) -> int:
        """Number of dimensions of the dense array this leaf stands for."""
        return len(self.shape)

    @property
    def size(self) -> int:
        """Number of entries of the dense array this leaf stands for."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """True storage bytes of this leaf's children."""
        raise NotImplementedError

    def materialize(self) -> jax.Array:
        """Returns the dense array this leaf stands for."""
        raise NotImplementedError

    def layout_child(self) -> jax.Array:
        """A child laid out like the dense array; its sharding is the dense array's."""
        raise NotImplementedError


def is_compressed(x: Any) -> bool:
    """Says whether ``x`` is a compressed leaf.

    Use it as ``is_leaf=`` in your own tree traversals so compressed leaves are
    handled whole instead of being split into their children.

    Example:
        >>> import jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> params = {"kernel": jnp.arange(1.0, 9.0).reshape(2, 4)}
        >>> pruned, _ = jc.prune(0.5)(params)
        >>> jc.is_compressed(pruned["kernel"]), jc.is_compressed(params["kernel"])
        (True, False)
    """
    return isinstance(x, CompressedArray)


def leaf_nbytes(x: Any) -> int:
    """Storage bytes of one leaf: compressed, array or Python scalar."""
    if is_compressed(x):
        return x.nbytes
    if hasattr(x, "dtype") and hasattr(x, "shape"):
        return math.prod(x.shape) * np.dtype(x.dtype).itemsize
    return np.asarray(x).nbytes


def as_dense(x: Any) -> Any:
    """Materializes ``x`` if it is compressed, else returns it unchanged."""
    return x.materialize() if is_compressed(x) else x


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

    def __repr__(self) -> str:
        return f"Sparse(shape={self.shape}, dtype={np.dtype(self.dtype).name}, nnz={self.nnz})"
