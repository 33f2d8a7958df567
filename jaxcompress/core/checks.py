"""Checks shared by transforms: clear errors naming the leaf path and the argument."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.arrays import Sparse, is_compressed


def is_traced(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def check_selected_leaf(transform: str, path: str, leaf: Any) -> jax.Array:
    """Returns ``leaf`` as an array, or raises if ``transform`` cannot compress it."""
    if is_compressed(leaf):
        raise TypeError(
            f"{transform}: leaf {path!r} is already compressed ({type(leaf).__name__}); "
            "exclude it with where= or materialize it first"
        )
    dtype = getattr(leaf, "dtype", None)
    if dtype is None:
        leaf = jnp.asarray(leaf)
        dtype = leaf.dtype
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"{transform}: where= selected leaf {path!r} of dtype {np.dtype(dtype).name}; "
            "only floating-point leaves can be compressed"
        )
    shape = tuple(leaf.shape)
    if len(shape) == 0:
        raise ValueError(
            f"{transform}: where= selected scalar leaf {path!r}; it has no entries to compress"
        )
    if 0 in shape:
        raise ValueError(f"{transform}: where= selected zero-size leaf {path!r} of shape {shape}")
    if not is_traced(leaf) and not bool(jnp.isfinite(leaf).all()):
        raise ValueError(f"{transform}: leaf {path!r} contains NaN or Inf values")
    return leaf


def check_values_to_compress(transform: str, path: str, leaf: Any) -> jax.Array:
    """The array a value compressor (quantize, cluster) works on, checked.

    A dense leaf is checked as it is; for a ``Sparse`` leaf its kept values are, so
    the zeros stay exact. Any other compressed leaf, or a ``Sparse`` whose values are
    already compressed, is refused with a ``TypeError`` naming the path.
    """
    if isinstance(leaf, Sparse):
        if is_compressed(leaf.values):
            raise TypeError(
                f"{transform}: leaf {path!r} is Sparse with already compressed values "
                f"({type(leaf.values).__name__}); materialize it first"
            )
        return check_selected_leaf(transform, path, leaf.values)
    return check_selected_leaf(transform, path, leaf)
