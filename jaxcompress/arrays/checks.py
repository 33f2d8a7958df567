"""Checks of a leaf selected for compression: clear errors naming the path and the transform.

They live with the leaves because a selected leaf may already be compressed: each
leaf type says what of it may still be compressed
(:meth:`~jaxcompress.arrays.base.CompressedArray.values_to_compress`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.arrays.base import already_compressed, is_compressed
from jaxcompress.core.checks import is_traced

# One compiled program per shape and dtype, not two op-by-op ones (isfinite, then all).
_all_finite_compiled = jax.jit(lambda x: jnp.isfinite(x).all())


def _all_finite(leaf: Any) -> bool:
    """Whether every entry of a concrete ``leaf`` is finite.

    A leaf in host memory (numpy, or a jax array on CPU devices only) is read in place by
    numpy, which compiles nothing (a yes/no answer, so exactly the compiled one's);
    others run one compiled program, so an accelerator's leaf never crosses to the host.
    """
    if isinstance(leaf, np.ndarray):
        return bool(np.isfinite(leaf).all())
    if (
        isinstance(leaf, jax.Array)
        and leaf.is_fully_addressable
        and all(getattr(device, "platform", None) == "cpu" for device in leaf.devices())
    ):
        return bool(np.isfinite(np.asarray(leaf)).all())
    return bool(_all_finite_compiled(leaf))


def check_selected_leaf(transform: str, path: str, leaf: Any) -> jax.Array:
    """Returns ``leaf`` as an array, or raises if ``transform`` cannot compress it.

    Example:
        >>> import jax.numpy as jnp
        >>> check_selected_leaf("prune", "w", jnp.ones(2)).tolist()
        [1.0, 1.0]
        >>> check_selected_leaf("prune", "w", jnp.zeros(()))
        Traceback (most recent call last):
        ...
        ValueError: prune: where= selected scalar leaf 'w'; it has no entries to compress
    """
    if is_compressed(leaf):
        raise already_compressed(transform, path, leaf)
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
    if not is_traced(leaf) and not _all_finite(leaf):
        raise ValueError(f"{transform}: leaf {path!r} contains NaN or Inf values")
    return leaf


def check_values_to_compress(transform: str, path: str, leaf: Any) -> jax.Array:
    """The array a value compressor (quantize, cluster) works on, checked.

    A dense leaf is checked as it is; a compressed leaf gives its
    :meth:`~jaxcompress.arrays.base.CompressedArray.values_to_compress` (a ``Sparse``
    leaf its kept values, so the zeros stay exact) or raises a ``TypeError`` naming
    the path.

    Example:
        >>> import jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> pruned = jc.prune(0.5)({"w": jnp.array([[1.0, -4.0], [3.0, 0.5]])})[0]["w"]
        >>> check_values_to_compress("quantize", "w", pruned).tolist()
        [-4.0, 3.0]
    """
    if is_compressed(leaf):
        leaf = leaf.values_to_compress(transform, path)
    return check_selected_leaf(transform, path, leaf)
