"""Filters: which leaves of a pytree a transform touches.

A filter is one of:

* a regex string, searched (``re.search``) against the leaf path ``a/b/kernel``;
* a predicate ``(path, leaf) -> bool``;
* a tuple of filters, which selects a leaf when any of them does.

Paths join the pytree keys with ``/``. nnx's trailing ``value`` attribute is
dropped, so a linen ``params`` dict and an ``nnx.State`` of the same model give
the same paths.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp

from jaxcompress.arrays import is_compressed

Predicate = Callable[[str, Any], bool]
Filter = str | Predicate | tuple["Filter", ...]


def compile_filter(where: Filter) -> Predicate:
    """Turns any accepted filter form into a ``(path, leaf) -> bool`` predicate.

    Args:
        where: a regex string, a predicate, or a tuple of filters.

    Returns:
        A predicate over ``(path, leaf)``.

    Raises:
        TypeError: if ``where`` is none of the accepted forms.
        ValueError: if a regex string does not compile.

    Example:
        >>> select = compile_filter(("bias", kernels))
        >>> import jax.numpy as jnp
        >>> select("dense/bias", jnp.zeros(3)), select("dense/scale", jnp.zeros(3))
        (True, False)
    """
    if isinstance(where, str):
        try:
            pattern = re.compile(where)
        except re.error as error:
            raise ValueError(
                f"where={where!r} is not a valid regular expression: {error}"
            ) from None
        return lambda path, leaf: pattern.search(path) is not None
    if isinstance(where, tuple):
        parts = [compile_filter(part) for part in where]
        return lambda path, leaf: any(part(path, leaf) for part in parts)
    if callable(where):
        return where
    raise TypeError(
        "where= must be a regex string, a (path, leaf) -> bool predicate or a tuple of them; "
        f"got {type(where).__name__}"
    )


def _is_floating(leaf: Any) -> bool:
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.floating)


def kernels(path: str, leaf: Any) -> bool:
    """Selects floating-point leaves with two or more dimensions (weight matrices, convs).

    Biases, norm scales and other 1-D leaves are left alone.

    Example:
        >>> import jax.numpy as jnp
        >>> kernels("dense/kernel", jnp.zeros((4, 3))), kernels("dense/bias", jnp.zeros(3))
        (True, False)
    """
    return _is_floating(leaf) and len(getattr(leaf, "shape", ())) >= 2


def floating(path: str, leaf: Any) -> bool:
    """Selects every floating-point leaf with at least one dimension.

    Example:
        >>> import jax.numpy as jnp
        >>> floating("dense/bias", jnp.zeros(3)), floating("step", jnp.zeros((), jnp.int32))
        (True, False)
    """
    return _is_floating(leaf) and len(getattr(leaf, "shape", ())) >= 1


def dense_only(path: str, leaf: Any) -> bool:
    """Selects leaves that are not already compressed.

    Example:
        >>> import jax.numpy as jnp
        >>> dense_only("w", jnp.zeros((2, 2)))
        True
    """
    return not is_compressed(leaf)


def nothing(path: str, leaf: Any) -> bool:
    """Selects no leaf.

    Example:
        >>> import jax.numpy as jnp
        >>> nothing("w", jnp.zeros((2, 2)))
        False
    """
    return False


def everything(path: str, leaf: Any) -> bool:
    """Selects every leaf.

    Example:
        >>> import jax.numpy as jnp
        >>> everything("w", jnp.zeros((2, 2)))
        True
    """
    return True


def not_(where: Filter) -> Predicate:
    """Selects the leaves that ``where`` does not select.

    Example:
        >>> import jax.numpy as jnp
        >>> not_("bias")("dense/bias", jnp.zeros(3)), not_("bias")("dense/kernel", jnp.zeros(3))
        (False, True)
    """
    select = compile_filter(where)
    return lambda path, leaf: not select(path, leaf)


def all_of(*wheres: Filter) -> Predicate:
    """Selects the leaves that every one of ``wheres`` selects.

    Example:
        >>> import jax.numpy as jnp
        >>> all_of(kernels, "dense1")("dense1/kernel", jnp.zeros((4, 3)))
        True
        >>> all_of(kernels, "dense1")("dense2/kernel", jnp.zeros((4, 3)))
        False
    """
    selects = [compile_filter(where) for where in wheres]
    return lambda path, leaf: all(select(path, leaf) for select in selects)
