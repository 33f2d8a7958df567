"""Clustered: bit-packed cluster indices plus a small codebook (weight sharing)."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxcompress.arrays.base import CompressedArray, with_shardings
from jaxcompress.core.bitpack import unpack
from jaxcompress.core.mesh import named_like, sharding_for, unsharded


def _clustered_pytree(cls: type) -> type:
    return jax.tree_util.register_dataclass(
        cls, data_fields=["indices", "codebook"], meta_fields=["shape", "dtype", "bits"]
    )


@_clustered_pytree
@dataclasses.dataclass(frozen=True, repr=False)
class Clustered(CompressedArray):
    """A weight-shared leaf: every entry is one of ``k`` codebook values.

    Attributes:
        indices: cluster indices of ``bits`` bits each, bit-packed along the last axis
            with :func:`jaxcompress.bitpack.pack`; shape
            ``(*shape[:-1], ceil(shape[-1] * bits / 8))``, uint8. Packing along the
            last axis keeps the indices laid out like the dense array.
        codebook: the centroids, shape ``(k,)`` for one codebook per tensor or
            ``(shape[-1], k)`` for one per output channel (last axis); sorted ascending.
        shape: the dense shape (static).
        dtype: the dense dtype (static).
        bits: bits per index, ``ceil(log2 k)`` (static).

    ``nbytes`` is the packed indices plus the codebook in its own dtype.

    Example:
        >>> import jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> w = jnp.array([[0.1, 0.9, 0.1, 1.0], [0.0, 0.9, 1.1, 0.0]])
        >>> c = jc.cluster(k=2)({"w": w})[0]["w"]
        >>> c.k, c.bits, c.nbytes  # 2 rows of 4 one-bit indices + 2 float32 centroids
        (2, 1, 10)
        >>> [round(v, 3) for v in c.codebook.tolist()]
        [0.05, 0.975]
        >>> c.codes().tolist()
        [[0, 1, 0, 1], [0, 1, 1, 0]]
    """

    indices: jax.Array
    codebook: jax.Array
    shape: tuple[int, ...]
    dtype: np.dtype
    bits: int

    kind = "clustered"

    @property
    def k(self) -> int:
        """Codebook size (static)."""
        return int(self.codebook.shape[-1])

    @property
    def per_channel(self) -> bool:
        """Whether each output channel (last axis) has its own codebook."""
        return len(self.codebook.shape) == 2

    @property
    def nbytes(self) -> int:
        codebook_bytes = math.prod(self.codebook.shape) * np.dtype(self.codebook.dtype).itemsize
        return math.prod(self.indices.shape) * np.dtype(self.indices.dtype).itemsize + (
            codebook_bytes
        )

    def codes(self) -> jax.Array:
        """The unpacked cluster indices, shaped like the dense array, as uint8.

        Example:
            >>> import jax.numpy as jnp
            >>> import jaxcompress as jc
            >>> c = jc.cluster(k=2)({"w": jnp.array([[0.0, 1.0], [1.0, 0.0]])})[0]["w"]
            >>> c.codes().tolist()
            [[0, 1], [1, 0]]
        """
        # Unpacking regroups bytes along the last axis, so it needs that axis whole.
        return unpack(unsharded(self.indices), self.bits, self.shape[-1])

    def materialize(self) -> jax.Array:
        codes = self.codes().astype(jnp.int32)
        codebook = unsharded(self.codebook)
        if self.per_channel:
            channel = jnp.arange(self.shape[-1], dtype=jnp.int32)
            flat = codes.reshape(-1, self.shape[-1])
            dense = codebook[channel[None, :], flat].reshape(self.shape)
        else:
            dense = jnp.take(codebook, codes, mode="clip")
        return dense.astype(self.dtype)

    def layout_child(self) -> jax.Array:
        return self.indices

    def child_shardings(self, reference: NamedSharding) -> Clustered:
        # Indices are laid out like the weight; the small codebook is replicated.
        return with_shardings(
            self,
            indices=sharding_for(self.indices.shape, reference),
            codebook=named_like(reference, PartitionSpec()),
        )

    def __repr__(self) -> str:
        scope = "per_channel" if self.per_channel else "per_tensor"
        return (
            f"Clustered(shape={self.shape}, dtype={np.dtype(self.dtype).name}, k={self.k}, "
            f"bits={self.bits}, {scope})"
        )
