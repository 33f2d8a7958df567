"""Running compressed pytrees: dense reconstruction and storage accounting."""

from __future__ import annotations

from typing import Any

import jax

from jaxcompress.arrays import is_compressed, leaf_nbytes
from jaxcompress.core.mesh import named_sharding_of, place_like


def _materialize_leaf(leaf: Any) -> Any:
    if not is_compressed(leaf):
        return leaf
    dense = leaf.materialize()
    # The dense array goes back where the weight lived before compression.
    return place_like(dense, named_sharding_of(leaf.layout_child()))


def materialize(tree: Any) -> Any:
    """Replaces every compressed leaf with the dense array it stands for.

    Uncompressed leaves pass through untouched and the structure is kept, so the
    result feeds straight into the model's ``apply``. Works under ``jit``; outside
    ``jit``, a leaf compressed from a sharded weight comes back with that sharding.

    Args:
        tree: any pytree, possibly holding compressed leaves.

    Returns:
        The same structure with dense arrays only.

    Example:
        >>> import jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> pruned, _ = jc.prune(0.5)({"w": jnp.array([[1.0, -3.0], [2.0, 0.5]])})
        >>> jc.materialize(pruned)["w"].tolist()
        [[0.0, -3.0], [2.0, 0.0]]
    """
    return jax.tree.map(_materialize_leaf, tree, is_leaf=is_compressed)


def nbytes(tree: Any) -> int:
    """True storage bytes of a pytree: compressed leaves count their packed children.

    Example:
        >>> import jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> params = {"w": jnp.ones((8, 8)), "b": jnp.ones(8)}
        >>> jc.nbytes(params)
        288
        >>> jc.nbytes(jc.prune(0.75)(params)[0])  # 16 kept floats + an 8x8 bit mask + bias
        104
    """
    leaves = jax.tree_util.tree_leaves(tree, is_leaf=is_compressed)
    return sum(leaf_nbytes(leaf) for leaf in leaves)
