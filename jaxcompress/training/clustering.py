"""Centroid fine-tuning of clustered weights (Deep Compression, Han et al. 2016).

The parameters stay compressed during training: a :class:`~jaxcompress.Clustered`
leaf (alone or as the values of a :class:`~jaxcompress.Sparse` leaf) is a pytree whose
children are the packed uint8 indices and the float codebook. The loss materializes
the tree, so differentiating it gives the codebook the gradient of a gather, which is
exactly the per-cluster sum of the weight gradients. :func:`clustered` then freezes
every integer child (indices, masks) and hands the float leaves to the inner optimizer.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax


class ClusteredState(NamedTuple):
    """State of :func:`clustered`: the inner optimizer's state over the float leaves.

    Attributes:
        inner: the wrapped transformation's state, for a tree in which every integer
            leaf (cluster indices, sparsity masks) is replaced by ``None``.
    """

    inner: Any


def _is_none(leaf: Any) -> bool:
    return leaf is None


def _is_trainable(leaf: Any) -> bool:
    # float0 (jax.grad's cotangent of an integer input), integer leaves, None (the
    # gradient of a non-array leaf) and non-array leaves (an equinox activation) are frozen.
    if not isinstance(leaf, jax.Array | np.ndarray | np.generic | float):
        return False
    return jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)


def _trainable_view(tree: Any) -> tuple[Any, list[bool], Any, list[Any]]:
    """``tree`` with frozen leaves replaced by ``None``; also the mask, treedef, leaves.

    ``None`` counts as a leaf, so a gradient with ``None`` for a non-array parameter
    flattens like the parameters themselves.
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree, is_leaf=_is_none)
    keep = [_is_trainable(leaf) for leaf in leaves]
    view = [leaf if k else None for leaf, k in zip(leaves, keep, strict=True)]
    return jax.tree_util.tree_unflatten(treedef, view), keep, treedef, leaves


def _frozen_update(grad: Any, param: Any) -> jax.Array | None:
    """A zero update in the parameter's own dtype, so ``apply_updates`` leaves it as is."""
    if grad is None:
        return None  # a non-array leaf: apply_updates keeps a None update's parameter
    reference = grad if param is None else param
    dtype = jnp.result_type(reference)
    if dtype == jax.dtypes.float0:
        dtype = jnp.uint8  # indices and masks are uint8 throughout the library
    return jnp.zeros(jnp.shape(reference), dtype)


def clustered(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """Centroid fine-tuning: trains codebooks, keeps cluster indices (and masks) fixed.

    The parameter pytree holds :class:`~jaxcompress.Clustered` leaves (or
    ``Sparse(values=Clustered)`` from ``jc.chain(jc.prune(...), jc.cluster(...))``)
    next to ordinary dense leaves. The loss calls :func:`jaxcompress.materialize`,
    and the gradient is taken with :func:`jaxcompress.training.grad` (or
    :func:`~jaxcompress.training.value_and_grad`), which differentiates the floating
    children only and gives the uint8 indices and masks ``float0`` zeros, and
    non-array leaves (an equinox module's activation) ``None``. Plain
    ``jax.grad(loss)`` refuses the uint8 children; ``jax.grad(loss, allow_int=True)``
    gives the same result on a tree of arrays only.
    Through the gather in ``materialize``, each centroid's gradient is the sum of the
    gradients of the weights assigned to it, as in Deep Compression.

    The wrapper gives ``inner`` only the floating-point leaves (codebooks and any
    dense leaves such as biases; integer leaves become ``None``), and returns a zero
    update, in the parameter's dtype, for every integer leaf. So ``optax.apply_updates``
    (or a linen ``TrainState.apply_gradients``) keeps the indices, and with them the
    cluster assignment and pruned zeros, bit-for-bit unchanged. Codebooks are not
    re-sorted after updates.

    Args:
        inner: the optimizer for the trainable (floating-point) leaves, e.g.
            ``optax.sgd(1e-2)``.

    Returns:
        An ``optax.GradientTransformation``; ``update`` accepts ``params=None`` unless
        ``inner`` needs the parameters.

    Example:
        >>> import jax
        >>> import jax.numpy as jnp
        >>> import optax
        >>> import jaxcompress as jc
        >>> w = jnp.array([[0.0, 1.0], [1.1, 0.1]])
        >>> params = jc.cluster(k=2)({"w": w})[0]
        >>> target = jnp.array([[0.5, 1.0], [1.0, 0.5]])
        >>> def loss(p):
        ...     return jnp.sum(jnp.square(jc.materialize(p)["w"] - target))
        >>> tx = jc.training.clustered(optax.sgd(0.1))
        >>> state = tx.init(params)
        >>> grads = jc.training.grad(loss)(params)
        >>> updates, state = tx.update(grads, state, params)
        >>> new = optax.apply_updates(params, updates)
        >>> bool((new["w"].indices == params["w"].indices).all())
        True
        >>> float(loss(new)) < float(loss(params))
        True
    """

    def init_fn(params: Any) -> ClusteredState:
        return ClusteredState(inner=inner.init(_trainable_view(params)[0]))

    def update_fn(
        updates: Any, state: ClusteredState, params: Any = None
    ) -> tuple[Any, ClusteredState]:
        grads, keep, treedef, grad_leaves = _trainable_view(updates)
        if params is None:
            trainable_params, param_leaves = None, [None] * len(grad_leaves)
        else:
            param_leaves = treedef.flatten_up_to(params)
            trainable_params = jax.tree_util.tree_unflatten(
                treedef, [p if k else None for p, k in zip(param_leaves, keep, strict=True)]
            )
        inner_updates, inner_state = inner.update(grads, state.inner, trainable_params)
        # Up to the gradient's structure: a None child inside a leaf (a symmetric
        # Quantized leaf's zero point) is structure, not a frozen leaf's placeholder.
        inner_leaves = treedef.flatten_up_to(inner_updates)
        leaves = [
            u if k else _frozen_update(g, p)
            for u, k, g, p in zip(inner_leaves, keep, grad_leaves, param_leaves, strict=True)
        ]
        return jax.tree_util.tree_unflatten(treedef, leaves), ClusteredState(inner=inner_state)

    return optax.GradientTransformation(init_fn, update_fn)
