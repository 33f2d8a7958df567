"""Pytrees to JSON header nodes plus buffers, and back, with no pickle.

Containers (dict, ``FrozenDict``, ``nnx.State``, list, tuple, ``None``, and the
``nnx`` variable types) become JSON nodes with their children; array leaves become
``{"type": "array", dtype, shape, buffer}``; each compressed leaf type has its codec
in :mod:`jaxcompress.io.codecs`, which records the leaf's static fields and stores
its children as arrays, code streams or masks (:mod:`jaxcompress.io.streams`). An
array split over devices, a leaf or a child, is stored shard by shard instead (a
``blocks`` node, :mod:`jaxcompress.io.shards`), so nothing is gathered to save it
and each device reads back only its block. Decoding rebuilds only types from a fixed
list (the containers here and the codec table), checks every field and every child's
shape against the leaf's metadata, and raises
:class:`~jaxcompress.io.errors.FileFormatError` naming the leaf path otherwise.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxcompress.arrays import CompressedArray, is_compressed
from jaxcompress.arrays.tree import is_array_leaf
from jaxcompress.core.paths import path_to_str
from jaxcompress.io import codecs, nodes
from jaxcompress.io.nodes import AddBuffer, GetBuffer
from jaxcompress.io.nodes import Place as Place

_VARIABLES = ("Param", "BatchStat", "Cache", "Variable")  # the nnx variable classes saved
_CONTAINERS = (
    "dict, FrozenDict, nnx.State, list, tuple, None, nnx.Param/BatchStat/Cache/Variable, "
    "equinox modules"
)


@dataclasses.dataclass(frozen=True)
class SavedModule:
    """An equinox module read from a file: its class name and array leaves by path.

    The file holds no code, so the module itself (its structure, activation functions,
    static fields) comes back only from a template: ``jaxcompress.load(path, like=...)``.
    """

    class_name: str
    leaves: dict[str, Any]


def _compressed_node(leaf: CompressedArray, add: AddBuffer, path: str, entropy: bool) -> dict:
    codec = codecs.codec_for(type(leaf))
    if codec is None:
        raise TypeError(f"{path}: cannot save compressed leaf type {type(leaf).__name__}")

    def encode(tree: Any, child_path: str) -> Any:
        return encode_node(tree, add, child_path, entropy=entropy)

    return codec.encode(leaf, nodes.Encoding(add=add, entropy=entropy, encode=encode), path)


def _mapping_items(tree: Any, path: str) -> list[list[Any]]:
    # nnx.State wraps nested dicts in State on access; its raw mapping keeps them plain.
    nnx = sys.modules.get("flax.nnx")
    mapping = tree.raw_mapping if nnx is not None and isinstance(tree, nnx.State) else tree
    items = []
    for key, value in mapping.items():
        if type(key) not in (str, int):
            raise TypeError(f"{path}: cannot save a mapping key {key!r}; keys must be str or int")
        items.append([key, value])
    return items


def encode_node(
    tree: Any,
    add: AddBuffer,
    path: str = "",
    *,
    entropy: bool,
    on_leaf: Callable[[str], None] | None = None,
) -> Any:
    """The JSON node of ``tree``; array payloads go through ``add`` (returns an index).

    Example:
        >>> buffers = []
        >>> def add(data):
        ...     buffers.append(data)
        ...     return len(buffers) - 1
        >>> encode_node({"w": np.ones(2, np.float32)}, add, entropy=True)["items"]
        [['w', {'type': 'array', 'dtype': 'float32', 'shape': [2], 'buffer': 0}]]
    """
    node = _encode_container(tree, add, path, entropy, on_leaf)
    if node is not None:
        return node
    node = _encode_leaf(tree, add, path, entropy)
    if on_leaf is not None:
        on_leaf(path)
    return node


def _encode_leaf(tree: Any, add: AddBuffer, path: str, entropy: bool) -> dict[str, Any]:
    if isinstance(tree, CompressedArray):
        return _compressed_node(tree, add, path, entropy)
    if type(tree) in (bool, int, float):
        return {"type": "scalar", "value": tree}
    if isinstance(tree, (jax.Array, np.ndarray, np.generic)):
        return nodes.array_node(tree, add, path)
    raise TypeError(
        f"{path or 'tree'}: cannot save a {type(tree).__name__}; supported: arrays, "
        f"compressed leaves and {_CONTAINERS}"
    )


def _encode_container(tree, add, path, entropy, on_leaf) -> dict[str, Any] | None:
    """The node of a container (children encoded), or ``None`` for a leaf."""

    def child(value: Any, key: Any) -> Any:
        return encode_node(value, add, nodes.join(path, key), entropy=entropy, on_leaf=on_leaf)

    # flax loads only when used: if it is not loaded, no tree holds its types.
    nnx, flax_core = sys.modules.get("flax.nnx"), sys.modules.get("flax.core")
    mappings: dict[type, str] = {dict: "dict"}
    if flax_core is not None:
        mappings[flax_core.FrozenDict] = "frozendict"
    if nnx is not None:
        mappings[nnx.State] = "state"
    if nnx is not None and isinstance(tree, nnx.Variable):
        class_name = type(tree).__name__
        if class_name not in _VARIABLES:
            raise TypeError(f"{path}: cannot save nnx variable type {class_name}")
        value = encode_node(tree.get_value(), add, path, entropy=entropy, on_leaf=on_leaf)
        return {"type": "variable", "class": class_name, "value": value}
    if isinstance(tree, tuple(mappings)):
        kind = mappings.get(type(tree))
        if kind is None:
            raise TypeError(
                f"{path}: cannot save a {type(tree).__name__}; supported: {_CONTAINERS}"
            )
        items = [[key, child(value, key)] for key, value in _mapping_items(tree, path)]
        return {"type": kind, "items": items}
    if type(tree) in (list, tuple):
        children = [child(value, index) for index, value in enumerate(tree)]
        return {"type": type(tree).__name__, "items": children}
    if tree is None:
        return {"type": "none"}
    eqx = sys.modules.get("equinox")  # loaded if the tree holds equinox modules
    if eqx is not None and isinstance(tree, eqx.Module):
        # Only the array leaves, by path: functions and static fields are code, which
        # the format does not store; load rebuilds them from a template (like=).
        found, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_compressed)
        items = [
            [path_to_str(key), child(leaf, path_to_str(key))]
            for key, leaf in found
            if is_array_leaf(leaf)
        ]
        cls = type(tree)
        return {"type": "module", "class": f"{cls.__module__}.{cls.__qualname__}", "items": items}
    return None


# ---------------------------------------------------------------- decoding


def _items(node: dict, path: str, keyed: bool) -> list:
    items = node.get("items")
    if not isinstance(items, list):
        raise nodes.fail(path, "container node has no item list")
    if keyed and not all(
        isinstance(i, list) and len(i) == 2 and type(i[0]) in (str, int) for i in items
    ):
        raise nodes.fail(path, "mapping items must be [key, node] pairs with str or int keys")
    return items


def decode_node(
    node: Any,
    get: GetBuffer,
    place: Place,
    path: str = "",
    *,
    on_leaf: Callable[[str], None] | None = None,
) -> Any:
    """Inverse of :func:`encode_node`.

    ``get(index, path)`` returns a checked buffer; ``place(array, path, leaf_node)``
    turns a host array into the returned array (for example on a sharding).

    Example:
        >>> buffers = []
        >>> def add(data):
        ...     buffers.append(memoryview(np.ascontiguousarray(data)).cast("B"))
        ...     return len(buffers) - 1
        >>> node = encode_node({"w": np.arange(3.0)}, add, entropy=True)
        >>> decode_node(node, lambda i, p: buffers[i], lambda a, p, n: a)["w"].tolist()
        [0.0, 1.0, 2.0]
    """
    if not isinstance(node, dict):
        raise nodes.fail(path, f"expected a node object, got {type(node).__name__}")
    kind = node.get("type")
    if not isinstance(kind, str):
        raise nodes.fail(path, f"node type {kind!r} is not a string")
    if kind in ("dict", "frozendict", "state"):
        children = {}
        for key, child in _items(node, path, keyed=True):
            if key in children:
                raise nodes.fail(path, f"duplicate key {key!r}")
            children[key] = decode_node(child, get, place, nodes.join(path, key), on_leaf=on_leaf)
        if kind == "dict":
            return children
        from flax import nnx  # only trees saved from flax name these kinds
        from flax.core import FrozenDict

        return {"frozendict": FrozenDict, "state": nnx.State}[kind](children)
    if kind in ("list", "tuple"):
        elements = [
            decode_node(child, get, place, nodes.join(path, i), on_leaf=on_leaf)
            for i, child in enumerate(_items(node, path, keyed=False))
        ]
        return elements if kind == "list" else tuple(elements)
    if kind == "variable":
        name = node.get("class")
        if not isinstance(name, str) or name not in _VARIABLES:
            raise nodes.fail(path, f"unknown nnx variable class {node.get('class')!r}")
        from flax import nnx  # only trees saved from flax hold variables

        cls = getattr(nnx, name)
        return cls(decode_node(node.get("value"), get, place, path, on_leaf=on_leaf))
    if kind == "none":
        return None
    if kind == "module":
        name = node.get("class")
        if not isinstance(name, str):
            raise nodes.fail(path, f"module class {name!r} is not a string")
        leaves = {}
        for key, child in _items(node, path, keyed=True):
            if key in leaves:
                raise nodes.fail(path, f"duplicate key {key!r}")
            leaves[key] = decode_node(child, get, place, nodes.join(path, key), on_leaf=on_leaf)
        return SavedModule(name, leaves)
    leaf = _decode_leaf(node, kind, get, place, path)
    if on_leaf is not None:
        on_leaf(path)
    return leaf


def _decode_leaf(node: dict, kind: Any, get: GetBuffer, place: Place, path: str) -> Any:
    if kind == "scalar":
        value = node.get("value")
        if type(value) not in (bool, int, float):
            raise nodes.fail(path, f"scalar value {value!r} is not a number")
        return value
    if kind in ("array", "blocks"):
        return place(nodes.read_array(node, get, path), path, node)
    codec = codecs.BY_NODE_TYPE.get(kind)
    if codec is not None:

        def decode(child: Any, child_path: str) -> Any:
            return decode_node(child, get, place, child_path)

        decoding = nodes.Decoding(
            get=get, place=place, decode=decode, value_types=codecs.SPARSE_VALUE_TYPES
        )
        return codec.decode(node, decoding, path)
    raise nodes.fail(path, f"unknown node type {kind!r}")


def leaf_nodes(node: Any, path: str = "") -> list[tuple[str, dict]]:
    """``(path, node)`` of every array or compressed leaf node, in tree order.

    Example:
        >>> leaf_nodes({"type": "dict", "items": [["w", {"type": "array"}]]})
        [('w', {'type': 'array'})]
    """
    if not isinstance(node, dict):
        return []
    kind = node.get("type")
    if kind in ("array", "blocks") or (isinstance(kind, str) and kind in codecs.BY_NODE_TYPE):
        return [(path, node)]
    if kind == "variable":
        return leaf_nodes(node.get("value"), path)
    items = node.get("items")
    if not isinstance(items, list):
        return []
    keyed = kind in ("dict", "frozendict", "state", "module")
    found = []
    for index, item in enumerate(items):
        key, child = (
            (item[0], item[1])
            if keyed and isinstance(item, list) and len(item) == 2
            else (index, item)
        )
        found.extend(leaf_nodes(child, nodes.join(path, key)))
    return found
