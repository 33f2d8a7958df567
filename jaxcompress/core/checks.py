"""Checks shared by every layer.

The checks of a leaf selected for compression know the compressed leaf types, so
they live above them, in :mod:`jaxcompress.arrays.checks`.
"""

from __future__ import annotations

from typing import Any

import jax


def is_traced(x: Any) -> bool:
    """Whether ``x`` is a tracer (its values are unknown until the traced function runs).

    Example:
        >>> import jax
        >>> import jax.numpy as jnp
        >>> seen = []
        >>> _ = jax.jit(lambda x: seen.append(is_traced(x)) or x)(jnp.ones(2))
        >>> is_traced(jnp.ones(2)), seen
        (False, [True])
    """
    return isinstance(x, jax.core.Tracer)
