"""The base of every compressed leaf, and helpers that treat leaves uniformly.

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
from typing import TYPE_CHECKING, Any, TypeVar

import jax
import numpy as np
from jax.sharding import NamedSharding

from jaxcompress.core.mesh import sharding_for

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

# Every compressed leaf type is a dataclass (the base class is not one).
LeafT = TypeVar("LeafT", bound="DataclassInstance")


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

    def child_shardings(self, reference: NamedSharding) -> Any:
        """This leaf with each array child replaced by its ``NamedSharding``.

        ``reference`` places the dense array this leaf stands for; each child goes
        where it sits with the part of the weight it encodes. This base rule gives
        every child :func:`jaxcompress.core.mesh.spec_for`; leaf types whose children
        are not laid out like the weight override it.

        Example:
            >>> import jax
            >>> import jax.numpy as jnp
            >>> import jaxcompress as jc
            >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
            >>> mesh = Mesh(jax.devices()[:1], ("x",))
            >>> leaf = jc.prune(0.5)({"w": jnp.ones((4, 8))})[0]["w"]
            >>> leaf.child_shardings(NamedSharding(mesh, P(None, "x"))).mask.spec
            P(None, 'x')
        """
        return jax.tree.map(lambda child: sharding_for(child.shape, reference), self)

    def values_to_compress(self, transform: str, path: str) -> Any:
        """The values a value compressor (quantize, cluster) may compress in place of this leaf.

        Raises:
            TypeError: naming ``path``, for a leaf that holds nothing further to compress.

        Example:
            >>> import jax.numpy as jnp
            >>> import jaxcompress as jc
            >>> w = jnp.array([[1.0, -4.0], [3.0, 0.5]])
            >>> jc.prune(0.5)({"w": w})[0]["w"].values_to_compress("quantize", "w").tolist()
            [-4.0, 3.0]
        """
        raise already_compressed(transform, path, self)


def with_shardings(leaf: LeafT, **shardings: Any) -> LeafT:
    """``leaf`` with the named children replaced by their shardings.

    :meth:`CompressedArray.child_shardings` gives ``jax.device_put`` the leaf's pytree
    with a ``NamedSharding`` in place of each array child, so those fields hold
    shardings where their annotations say arrays; this replaces them unchecked.

    Example:
        >>> import jax
        >>> import jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        >>> replicated = NamedSharding(Mesh(jax.devices()[:1], ("x",)), P())
        >>> leaf = jc.prune(0.5)({"w": jnp.ones((4, 8))})[0]["w"]
        >>> with_shardings(leaf, values=replicated, mask=replicated).mask.spec
        P()
    """
    return dataclasses.replace(leaf, **shardings)


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


def already_compressed(transform: str, path: str, leaf: Any) -> TypeError:
    """The error for a compressed leaf that ``transform`` was asked to compress again.

    Example:
        >>> import jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> leaf = jc.prune(0.5)({"w": jnp.ones((2, 2))})[0]["w"]
        >>> str(already_compressed("prune", "w", leaf)).split(";")[0]
        "prune: leaf 'w' is already compressed (Sparse)"
    """
    return TypeError(
        f"{transform}: leaf {path!r} is already compressed ({type(leaf).__name__}); "
        "exclude it with where= or materialize it first"
    )


def as_dense(x: Any) -> Any:
    """Materializes ``x`` if it is compressed, else returns it unchanged."""
    return x.materialize() if is_compressed(x) else x
