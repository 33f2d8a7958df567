"""Equinox layers' size fields brought in line with their thinned weights.

An equinox module is a pytree, so :func:`jaxcompress.prune_units` already returns one
with smaller arrays; but its static fields (``Linear.out_features``,
``Conv.out_channels``, ``MultiheadAttention.num_heads``, ...) still name the old sizes,
and some layers read them when called (attention splits heads by ``num_heads``). This
module rewrites those fields from the new array shapes.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Iterator
from typing import Any

import jax

from jaxcompress.arrays.leading import is_equinox_module
from jaxcompress.core.paths import path_to_str

__all__ = ["resize_equinox"]

# (parameter path, axis) -> the new size of each row-major factor of that axis
FactorSizes = Callable[[str, int], tuple[int, ...]]


def _join(*parts: str) -> str:
    return "/".join(part for part in parts if part)


def _modules(node: Any, path: str) -> Iterator[tuple[str, Any]]:
    """Every equinox module under ``node`` with its parameter path prefix, children first."""
    for field in dataclasses.fields(node):
        if field.metadata.get("static", False):
            continue
        value = getattr(node, field.name, None)
        found, _ = jax.tree_util.tree_flatten_with_path(value, is_leaf=is_equinox_module)
        for sub_path, sub in found:
            if is_equinox_module(sub):
                yield from _modules(sub, _join(path, field.name, path_to_str(sub_path)))
    yield path, node


def _set(module: Any, **fields: Any) -> None:
    for name, value in fields.items():
        # Static fields are frozen dataclass fields; the module is a fresh copy (built by
        # unflattening the thinned tree), so setting them changes no caller's object.
        object.__setattr__(module, name, value)


def _size(current: Any, new: int) -> Any:
    return current if current == "scalar" else new


def _resize(eqx: Any, module: Any, path: str, factor_sizes: FactorSizes) -> None:
    nn = eqx.nn
    if isinstance(module, nn.Linear):
        out_features, in_features = module.weight.shape
        _set(
            module,
            in_features=_size(module.in_features, in_features),
            out_features=_size(module.out_features, out_features),
        )
    elif isinstance(module, nn.Conv | nn.ConvTranspose):
        # Both store (out, in // groups, *kernel).
        _set(
            module,
            out_channels=module.weight.shape[0],
            in_channels=module.weight.shape[1] * module.groups,
        )
    elif isinstance(module, nn.LayerNorm | nn.RMSNorm) and module.weight is not None:
        _set(module, shape=tuple(module.weight.shape))
    elif isinstance(module, nn.MLP):
        hidden = [layer.out_features for layer in module.layers[:-1]]
        _set(
            module,
            in_size=module.layers[0].in_features,
            out_size=module.layers[-1].out_features,
            width_size=max(hidden, default=module.width_size),
        )
    elif isinstance(module, nn.MultiheadAttention):
        query = factor_sizes(_join(path, "query_proj", "weight"), 0)
        value = factor_sizes(_join(path, "value_proj", "weight"), 0)
        # The projections' output axis is (heads, head dimension) once the call reshapes it.
        heads = query[0] if len(query) == 2 else module.num_heads
        _set(
            module,
            num_heads=heads,
            query_size=module.query_proj.in_features,
            key_size=module.key_proj.in_features,
            value_size=module.value_proj.in_features,
            output_size=module.output_proj.out_features,
            qk_size=module.query_proj.out_features // heads,
            vo_size=(value[1] if len(value) == 2 else module.value_proj.out_features // heads),
        )


def resize_equinox(module: Any, factor_sizes: FactorSizes) -> Any:
    """``module`` (a fresh copy) with every known layer's size fields set from its arrays.

    Args:
        module: an equinox module holding thinned arrays, built by unflattening (so no
            other object shares its nodes).
        factor_sizes: for a parameter path and axis, the new size of each row-major
            factor the traced program splits that axis into (attention's heads and
            head dimension).

    Returns:
        ``module`` itself, its ``Linear``, ``Conv``, ``ConvTranspose``, ``LayerNorm``,
        ``RMSNorm``, ``MLP`` and ``MultiheadAttention`` nodes' size fields updated.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import equinox as eqx
        >>> layer = eqx.nn.Linear(4, 3, key=jax.random.key(0))
        >>> thin = jax.tree.map(lambda w: w[:2], layer)  # a fresh copy, 2 outputs
        >>> resize_equinox(thin, lambda path, axis: ()).out_features
        2
    """
    eqx = sys.modules["equinox"]
    for path, node in _modules(module, ""):
        _resize(eqx, node, path, factor_sizes)
    return module
