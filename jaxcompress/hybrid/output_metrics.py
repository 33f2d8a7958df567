"""How far a compressed model's outputs are from the dense model's: the losses ``auto`` measures.

Each metric takes ``(dense_out, out)`` (arrays or matching pytrees of arrays; for a
pytree the leaves' values are summed) and returns a scalar that is ``0`` when they
are equal. Computed in float32, under ``jit``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["METRICS", "cosine", "kl", "mse", "resolve_metric"]

Metric = Callable[[Any, Any], jax.Array]


def _float(x: Any) -> jax.Array:
    return jnp.asarray(x).astype(jnp.float32)


def _cosine_leaf(dense: jax.Array, out: jax.Array) -> jax.Array:
    a, b = _float(dense), _float(out)
    if a.ndim == 0:
        a, b = a[None], b[None]
    dot = jnp.sum(a * b, axis=-1)
    norms = jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1)
    # Equal rows cost exactly 0 (rounding in the norms would leave ~1e-8); a zero row
    # facing a different one has no direction, so it counts as orthogonal.
    same = jnp.all(a == b, axis=-1)
    cos = jnp.where(norms > 0, dot / jnp.where(norms > 0, norms, 1.0), 0.0)
    cos = jnp.where(same, 1.0, cos)
    return jnp.mean(1.0 - cos)


def _mse_leaf(dense: jax.Array, out: jax.Array) -> jax.Array:
    return jnp.mean((_float(dense) - _float(out)) ** 2)


def _kl_leaf(dense: jax.Array, out: jax.Array) -> jax.Array:
    log_p = jax.nn.log_softmax(_float(dense), axis=-1)
    log_q = jax.nn.log_softmax(_float(out), axis=-1)
    return jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1))


def _summed(leaf_metric: Callable[[jax.Array, jax.Array], jax.Array]) -> Metric:
    def metric(dense_out: Any, out: Any) -> jax.Array:
        values = jax.tree.leaves(jax.tree.map(leaf_metric, dense_out, out))
        return jnp.sum(jnp.stack(values))

    return metric


cosine = _summed(_cosine_leaf)
cosine.__doc__ = """Mean ``1 - cos`` between matching rows (the last axis) of the outputs.

Example:
    >>> import jax.numpy as jnp
    >>> float(cosine(jnp.array([[1.0, 0.0]]), jnp.array([[0.0, 2.0]])))
    1.0
"""
mse = _summed(_mse_leaf)
mse.__doc__ = """Mean squared difference of the outputs.

Example:
    >>> import jax.numpy as jnp
    >>> float(mse(jnp.array([1.0, 2.0]), jnp.array([1.0, 4.0])))
    2.0
"""
kl = _summed(_kl_leaf)
kl.__doc__ = """Mean ``KL(softmax(dense_out) || softmax(out))`` over the last axis (logits).

Example:
    >>> import jax.numpy as jnp
    >>> float(kl(jnp.array([[0.0, 1.0]]), jnp.array([[0.0, 1.0]])))
    0.0
"""

METRICS: dict[str, Metric] = {"cosine": cosine, "mse": mse, "kl": kl}


def resolve_metric(metric: str | Callable[[Any, Any], Any]) -> Metric:
    """``metric`` as a function: a name of :data:`METRICS`, or a callable as it is.

    Example:
        >>> resolve_metric("mse") is mse
        True
    """
    if isinstance(metric, str):
        if metric not in METRICS:
            raise ValueError(
                f"auto: metric must be one of {sorted(METRICS)} or a callable, got {metric!r}"
            )
        return METRICS[metric]
    if not callable(metric):
        raise TypeError(
            f"auto: metric must be one of {sorted(METRICS)} or a callable "
            f"metric(dense_out, out) -> scalar, got {type(metric).__name__}"
        )
    return metric
