"""Loading into a template: the file gives the arrays, ``like=`` everything else.

A file stores no code, so an equinox module (its class, activation functions, static
fields) is saved as its array leaves by path, and :func:`jaxcompress.load` rebuilds it
from a template of the same structure: the original model, or shapes only from
``eqx.filter_eval_shape``. Each of the template's arrays is replaced by the file's
leaf at the same path (a compressed leaf where one was saved), after checking that the
paths, dense shapes and dtypes agree.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from jaxcompress.arrays import is_compressed
from jaxcompress.arrays.tree import is_array_leaf
from jaxcompress.core.paths import path_to_str
from jaxcompress.io import nodes
from jaxcompress.io.treecodec import SavedModule

__all__ = ["fill_template", "refuse_saved_modules"]


def _is_saved_leaf(leaf: Any) -> bool:
    return isinstance(leaf, SavedModule) or is_compressed(leaf)


def _saved_arrays(tree: Any) -> dict[str, Any]:
    """Every array or compressed leaf of a loaded tree by path, modules' leaves included."""
    found, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_saved_leaf)
    arrays = {}
    for key, leaf in found:
        if isinstance(leaf, SavedModule):
            for path, value in leaf.leaves.items():
                arrays[nodes.join(path_to_str(key), path)] = value
        elif is_array_leaf(leaf):
            arrays[path_to_str(key)] = leaf
    return arrays


def refuse_saved_modules(tree: Any, path: Any) -> None:
    """Raises if ``tree`` holds a module, which only a template can rebuild."""
    found, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_saved_leaf)
    for key, leaf in found:
        if isinstance(leaf, SavedModule):
            where = path_to_str(key) or "the tree"
            raise ValueError(
                f"{path}: {where} is an equinox module ({leaf.class_name}); the file holds "
                "its arrays only, so load it into a module of the same structure with "
                "like=, for example jc.load(path, like=model) or "
                "like=eqx.filter_eval_shape(Model, ..., key=...)"
            )


def _describe(leaf: Any) -> str:
    return f"{tuple(np.shape(leaf))} {np.dtype(leaf.dtype).name}"


def fill_template(tree: Any, like: Any, path: Any) -> Any:
    """``like`` with each array leaf replaced by ``tree``'s leaf at the same path.

    Raises:
        ValueError: the paths of the arrays differ, or a leaf's shape or dtype does,
            naming the paths.
    """
    saved = _saved_arrays(tree)
    found, treedef = jax.tree_util.tree_flatten_with_path(like, is_leaf=is_compressed)
    wanted = {path_to_str(key): leaf for key, leaf in found if is_array_leaf(leaf)}
    missing, extra = sorted(wanted.keys() - saved.keys()), sorted(saved.keys() - wanted.keys())
    if missing or extra:
        raise ValueError(
            f"{path}: like= does not match the file's arrays: the file lacks {missing}, "
            f"like= lacks {extra}"
        )
    for leaf_path, leaf in wanted.items():
        if _describe(leaf) != _describe(saved[leaf_path]):
            raise ValueError(
                f"{path}: {leaf_path} is {_describe(saved[leaf_path])} in the file but "
                f"{_describe(leaf)} in like="
            )
    leaves = [saved[path_to_str(key)] if is_array_leaf(leaf) else leaf for key, leaf in found]
    return jax.tree_util.tree_unflatten(treedef, leaves)
