"""Pytree key paths as the ``a/b/kernel`` strings that filters match."""

from __future__ import annotations

from typing import Any

import jax


def path_to_str(key_path: tuple[Any, ...]) -> str:
    """Turns a jax key path into the ``a/b/kernel`` form that filters match.

    Example:
        >>> from jax.tree_util import DictKey, GetAttrKey
        >>> path_to_str((DictKey("dense1"), DictKey("kernel"), GetAttrKey("value")))
        'dense1/kernel'
    """
    parts = []
    for entry in key_path:
        if isinstance(entry, jax.tree_util.DictKey):
            parts.append(str(entry.key))
        elif isinstance(entry, jax.tree_util.GetAttrKey):
            parts.append(entry.name)
        elif isinstance(entry, jax.tree_util.SequenceKey):
            parts.append(str(entry.idx))
        elif isinstance(entry, jax.tree_util.FlattenedIndexKey):
            parts.append(str(entry.key))
        else:
            parts.append(str(entry))
    # nnx Variables expose their array as `.value`; users think of the variable.
    if parts and parts[-1] == "value" and isinstance(key_path[-1], jax.tree_util.GetAttrKey):
        parts.pop()
    return "/".join(parts)
