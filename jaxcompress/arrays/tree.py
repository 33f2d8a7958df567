"""Whole pytrees: dense reconstruction, storage accounting, and array/non-array split.

Models such as equinox modules hold non-array leaves (activation functions, ints,
``None``) next to their weights. :func:`split_arrays` and :func:`combine` separate the
two so that ``jit``, tracing and the file format see arrays only, and put them back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

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


def is_array_leaf(leaf: Any) -> bool:
    """Whether a leaf is array data: a jax or numpy array, a stand-in, or compressed.

    Python scalars, functions and other objects are not: like equinox's
    ``is_array``, they are treated as part of the model's structure.

    Example:
        >>> import jax.numpy as jnp
        >>> is_array_leaf(jnp.ones(2)), is_array_leaf(jnp.tanh), is_array_leaf(3)
        (True, False, False)
    """
    return is_compressed(leaf) or isinstance(
        leaf, jax.Array | np.ndarray | np.generic | jax.ShapeDtypeStruct
    )


def split_arrays(tree: Any) -> tuple[Any, Any]:
    """Splits a pytree into ``(arrays, rest)``, each with ``None`` where the other has a leaf.

    Compressed leaves count as arrays and stay whole. Both halves keep the tree's
    structure (and its key paths), so ``combine(arrays, rest)`` rebuilds the tree,
    also after a transform replaced leaves of ``arrays``. This is ``eqx.partition``
    with :func:`is_array_leaf`, without needing equinox.

    Example:
        >>> import jax.numpy as jnp
        >>> arrays, rest = split_arrays({"w": jnp.ones(2), "act": jnp.tanh, "n": 3})
        >>> arrays["act"] is None, rest["w"] is None, rest["n"]
        (True, True, 3)
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree, is_leaf=is_compressed)
    arrays = [leaf if is_array_leaf(leaf) else None for leaf in leaves]
    rest = [None if is_array_leaf(leaf) else leaf for leaf in leaves]
    return jax.tree_util.tree_unflatten(treedef, arrays), jax.tree_util.tree_unflatten(
        treedef, rest
    )


def combine(arrays: Any, rest: Any) -> Any:
    """Inverse of :func:`split_arrays`: each leaf from ``arrays``, or ``rest`` where it is ``None``.

    Example:
        >>> import jax.numpy as jnp
        >>> tree = {"w": jnp.ones(2), "act": jnp.tanh}
        >>> combine(*split_arrays(tree))["act"] is jnp.tanh
        True
    """
    return jax.tree.map(
        lambda a, r: r if a is None else a,
        arrays,
        rest,
        is_leaf=lambda x: x is None or is_compressed(x),
    )


def on_arrays(fn: Callable[..., Any], rest: Any) -> Callable[..., Any]:
    """``fn(params, *args)`` as a function of the array half of ``params`` only.

    The returned function rebuilds the full tree with ``rest`` before calling ``fn``,
    so tracing it (``jit``, ``make_jaxpr``) sees array inputs only.

    Example:
        >>> import jax.numpy as jnp
        >>> arrays, rest = split_arrays({"w": jnp.ones(2), "act": jnp.tanh})
        >>> apply = on_arrays(lambda p, x: p["act"](x * p["w"]), rest)
        >>> apply(arrays, jnp.zeros(2)).tolist()
        [0.0, 0.0]
    """

    def apply(arrays: Any, *args: Any, **kwargs: Any) -> Any:
        return fn(combine(arrays, rest), *args, **kwargs)

    return apply
