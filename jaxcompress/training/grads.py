"""``jax.grad`` for compressed trees: differentiate the floating children only.

A compressed tree mixes float children (codebooks, scales, kept values, factors) with
integer ones (cluster indices, codes, packed masks), and models such as equinox
modules hold non-array leaves (activation functions). ``jax.grad`` refuses both. The
functions here differentiate only the floating-point arrays, as ``eqx.filter_grad``
does, and fill the rest of the gradient tree so it has the parameters' structure:

* an integer array gets a ``float0`` zero, as ``jax.grad(..., allow_int=True)`` gives
  it, which :func:`jaxcompress.training.clustered` turns into a zero update;
* any other leaf (a function, a Python number, ``None``) gets ``None``, which
  ``optax.apply_updates`` leaves untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _is_floating(leaf: Any) -> bool:
    return isinstance(leaf, jax.Array | np.ndarray | np.generic) and jnp.issubdtype(
        leaf.dtype, jnp.inexact
    )


def _split_floating(tree: Any) -> tuple[Any, Any]:
    """``(floating, rest)``, each with ``None`` where the other has a leaf."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    floating = [leaf if _is_floating(leaf) else None for leaf in leaves]
    rest = [None if _is_floating(leaf) else leaf for leaf in leaves]
    return jax.tree_util.tree_unflatten(treedef, floating), jax.tree_util.tree_unflatten(
        treedef, rest
    )


def _merge(floating: Any, rest: Any) -> Any:
    """Inverse of :func:`_split_floating` (compressed leaves are split, not kept whole)."""
    return jax.tree.map(lambda f, r: r if f is None else f, floating, rest, is_leaf=_is_none)


def _is_none(leaf: Any) -> bool:
    return leaf is None


def _frozen_gradient(leaf: Any) -> Any:
    if isinstance(leaf, jax.Array | np.ndarray | np.generic):
        return np.zeros(np.shape(leaf), jax.dtypes.float0)
    return None


def _full_gradient(grads: Any, rest: Any) -> Any:
    """The floating gradients, with float0 zeros or ``None`` for the other leaves."""
    return _merge(grads, jax.tree.map(_frozen_gradient, rest))


def value_and_grad(
    fun: Callable[..., Any],
    argnums: int | Sequence[int] = 0,
    has_aux: bool = False,
) -> Callable[..., Any]:
    """``jax.value_and_grad`` over the floating leaves of compressed or equinox trees.

    Same arguments and return structure as :func:`jax.value_and_grad`. The arguments
    named by ``argnums`` may hold compressed leaves and non-array leaves; only their
    floating-point arrays are differentiated (a :class:`~jaxcompress.Clustered`
    leaf's codebook, a :class:`~jaxcompress.Quantized` leaf's scales, a
    :class:`~jaxcompress.Sparse` leaf's kept values, both factors of a
    :class:`~jaxcompress.LowRank` leaf). Integer arrays (indices, codes, masks) get a
    ``float0`` zero and other leaves ``None``, so the gradient has the parameters'
    structure and feeds :func:`jaxcompress.training.clustered` (or any optax
    optimizer, where the tree has no integer leaf) directly. Works under ``jax.jit``
    and ``eqx.filter_jit``.

    Args:
        fun: the function to differentiate; it returns a scalar (or ``(scalar, aux)``
            with ``has_aux``).
        argnums: which positional argument(s) to differentiate.
        has_aux: whether ``fun`` returns ``(value, aux)``.

    Returns:
        A function returning ``(value, grads)`` (``((value, aux), grads)`` with
        ``has_aux``); ``grads`` is a tuple when ``argnums`` is a sequence.

    Example:
        >>> import jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> params, _ = jc.cluster(k=2)({"w": jnp.array([[0.0, 1.0], [1.1, 0.1]])})
        >>> loss = lambda p: jnp.sum(jc.materialize(p)["w"])
        >>> value, grads = jc.training.value_and_grad(loss)(params)
        >>> grads["w"].codebook.tolist(), grads["w"].indices.dtype
        ([2.0, 2.0], dtype([('float0', 'V')]))
    """
    single = isinstance(argnums, int)
    nums = (argnums,) if isinstance(argnums, int) else tuple(argnums)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        parts = [_split_floating(args[i]) for i in nums]

        def on_floating(*floating: Any) -> Any:
            full = list(args)
            for i, part, (_, rest) in zip(nums, floating, parts, strict=True):
                full[i] = _merge(part, rest)
            return fun(*full, **kwargs)

        value, grads = jax.value_and_grad(
            on_floating, argnums=tuple(range(len(nums))), has_aux=has_aux
        )(*(floating for floating, _ in parts))
        full = tuple(_full_gradient(g, rest) for g, (_, rest) in zip(grads, parts, strict=True))
        return value, full[0] if single else full

    return wrapped


def grad(
    fun: Callable[..., Any],
    argnums: int | Sequence[int] = 0,
    has_aux: bool = False,
) -> Callable[..., Any]:
    """``jax.grad`` over the floating leaves of compressed or equinox trees.

    See :func:`value_and_grad` for what is differentiated and what the other leaves
    get. Returns ``grads`` (``(grads, aux)`` with ``has_aux``), like :func:`jax.grad`.

    Example:
        >>> import jax
        >>> import jax.numpy as jnp
        >>> import optax
        >>> import jaxcompress as jc
        >>> params, _ = jc.cluster(k=2)({"w": jnp.array([[0.0, 1.0], [1.1, 0.1]])})
        >>> target = jnp.array([[0.5, 1.0], [1.0, 0.5]])
        >>> loss = lambda p: jnp.sum(jnp.square(jc.materialize(p)["w"] - target))
        >>> tx = jc.training.clustered(optax.sgd(0.1))
        >>> updates, _ = tx.update(jc.training.grad(loss)(params), tx.init(params), params)
        >>> new = optax.apply_updates(params, updates)
        >>> bool((new["w"].indices == params["w"].indices).all()), bool(loss(new) < loss(params))
        (True, True)
    """
    value_and_grad_fun = value_and_grad(fun, argnums, has_aux)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        value, grads = value_and_grad_fun(*args, **kwargs)
        return (grads, value[1]) if has_aux else grads

    return wrapped
