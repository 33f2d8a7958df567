"""Checkpoints opened for reading one leaf at a time, for :func:`jaxcompress.compress_file`.

A :class:`Source` is the checkpoint's tree structure with each leaf replaced by an
integer marker (its position in the file's own order) plus one loader per marker.
Only the loaded leaf is in memory where the format allows it:

- safetensors, one file or a sharded ``*.safetensors.index.json``: memory-mapped,
  one tensor copied out at a time.
- ``.jxc``: memory-mapped, one leaf decoded at a time (its buffers' CRCs checked).
- flax msgpack: the format has no index of its records, and flax's array records are
  msgpack extension values, so the file is read whole (as ``read_msgpack`` does);
  each leaf is let go once it has been compressed.
- orbax: restored whole (``StandardCheckpointer().restore``), then let go leaf by
  leaf; orbax restores a partial tree only through its own target/partial-restore
  machinery, which differs between orbax versions, so it is not used here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.arrays import is_compressed
from jaxcompress.io import container, shards, treecodec
from jaxcompress.io.checkpoints import EXPECTED, read_orbax
from jaxcompress.io.errors import FileFormatError
from jaxcompress.io.interop import (
    SafetensorsReader,
    nest_names,
    read_msgpack,
    safetensors_index,
)

INDEX_SUFFIX = ".safetensors.index.json"


@dataclasses.dataclass
class Source:
    """A checkpoint read leaf by leaf.

    Attributes:
        kind: ``"safetensors"``, ``"safetensors-index"``, ``"jxc"``, ``"msgpack"`` or ``"orbax"``.
        skeleton: the tree with every leaf replaced by its marker ``0 .. n-1`` (file order).
        shapes: ``(shape, dtype)`` of each leaf by marker (``None`` for a non-array leaf).
        load: ``load(marker, keep=False)``, the leaf as
            :func:`~jaxcompress.io.checkpoints.read_checkpoint` would give it. A source
            read whole lets the leaf go unless ``keep`` (a planning pass).
        fingerprint: what identifies the input (path, size, modification time of each file).
    """

    kind: str
    skeleton: Any
    shapes: list[tuple[tuple[int, ...], np.dtype] | None]
    load: Callable[..., Any]
    fingerprint: list[list[Any]]


def _fingerprint(paths: list[Path]) -> list[list[Any]]:
    rows = []
    for path in paths:
        info = path.stat()
        rows.append([str(path.resolve()), info.st_size, info.st_mtime_ns])
    return rows


def fingerprint_digest(rows: list[list[Any]]) -> str:
    """A short hash of a :attr:`Source.fingerprint`, for journal records.

    Example:
        >>> len(fingerprint_digest([["a", 1, 2]]))
        16
    """
    return hashlib.sha256(repr(rows).encode()).hexdigest()[:16]


def _shape_dtype(leaf: Any) -> tuple[tuple[int, ...], np.dtype] | None:
    if isinstance(leaf, (np.ndarray, np.generic, jax.Array)) or is_compressed(leaf):
        return tuple(leaf.shape), np.dtype(leaf.dtype)
    return None


def _in_memory(kind: str, tree: Any, paths: list[Path]) -> Source:
    """A source over a tree read whole: each leaf is dropped once it is loaded."""
    leaves, treedef = jax.tree_util.tree_flatten(tree, is_leaf=is_compressed)
    skeleton = jax.tree_util.tree_unflatten(treedef, list(range(len(leaves))))
    shapes = [_shape_dtype(leaf) for leaf in leaves]
    held: list[Any] = list(leaves)
    del tree, leaves

    def load(marker: int, keep: bool = False) -> Any:
        leaf = held[marker]
        if not keep:
            held[marker] = None
        return leaf

    return Source(kind, skeleton, shapes, load, _fingerprint(paths))


@contextlib.contextmanager
def _safetensors(shards_names: dict[Path, list[str] | None], kind: str, index: Path | None):
    with contextlib.ExitStack() as stack:
        flat: dict[str, int] = {}
        where: list[tuple[SafetensorsReader, str]] = []
        for shard, names in shards_names.items():
            reader = stack.enter_context(SafetensorsReader(shard))
            for name in reader.names if names is None else names:
                if name not in reader:
                    raise FileFormatError(
                        f"{index}: tensor {name!r} is listed for {shard.name} but is not in it"
                    )
                flat[name] = len(where)
                where.append((reader, name))
        skeleton = nest_names(index or next(iter(shards_names)), flat)
        shapes: list[tuple[tuple[int, ...], np.dtype] | None] = [
            reader.shape_dtype(name) for reader, name in where
        ]
        paths = [*shards_names, *([index] if index is not None else [])]

        def load(marker: int, keep: bool = False) -> np.ndarray:
            reader, name = where[marker]
            return reader.load(name)

        yield Source(kind, skeleton, shapes, load, _fingerprint(paths))


def _leaf_and_scalar_nodes(root: Any) -> list[tuple[str, dict]]:
    """Every leaf node and scalar node of a header tree, in tree order."""
    found: list[tuple[str, dict]] = []
    leaf_ids = {id(node) for _, node in treecodec.leaf_nodes(root)}

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            if id(node) in leaf_ids or node.get("type") == "scalar":
                found.append((path, node))
                return
            kind = node.get("type")
            if kind == "variable":
                walk(node.get("value"), path)
                return
            keyed = kind in ("dict", "frozendict", "state", "module")
            for index, item in enumerate(node.get("items") or []):
                if keyed and isinstance(item, list) and len(item) == 2:
                    walk(item[1], f"{path}/{item[0]}" if path else str(item[0]))
                else:
                    walk(item, f"{path}/{index}" if path else str(index))

    walk(root, "")
    return found


@contextlib.contextmanager
def _jxc(path: Path) -> Iterator[Source]:
    header, body, _ = container.read_container(path)
    if header.get("format") != "jaxcompress":
        raise FileFormatError(f"{path}: header format is {header.get('format')!r}")
    if header.get("parts", 1) != 1:
        raise FileFormatError(f"{path}: a multi-process file; compress_file reads single files")
    root = header.get("tree")
    originals = _leaf_and_scalar_nodes(root)
    ids = {id(node) for _, node in originals}
    counter = iter(range(len(originals)))

    def replace(node: Any) -> Any:
        if isinstance(node, dict):
            if id(node) in ids:
                return {"type": "scalar", "value": next(counter)}
            if node.get("type") == "module":
                raise FileFormatError(
                    f"{path}: holds an equinox module; compress_file reads plain trees only "
                    "(load it with jaxcompress.load(path, like=...) and compress it in memory)"
                )
            return {key: replace(value) for key, value in node.items()}
        if isinstance(node, list):
            return [replace(value) for value in node]
        return node

    skeleton = treecodec.decode_node(replace(root), _no_buffers, _no_place)

    def get(index: Any, where: str) -> memoryview:
        return container.buffer_view(path, header, body, index, where=where)

    def place(array: Any, where: str, node: dict) -> jax.Array:
        return jnp.asarray(np.array(array))  # as load() places a leaf with no sharding

    def load(marker: int, keep: bool = False) -> Any:
        where, node = originals[marker]
        return treecodec.decode_node(node, get, place, where)

    shapes = [
        (tuple(node["shape"]), np.dtype(node.get("dtype", "float32")))
        if isinstance(node.get("shape"), list)
        else None
        for _, node in originals
    ]
    with shards.reading(shards.PartReader(path, parts=1, save_id=None)):
        yield Source("jxc", skeleton, shapes, load, _fingerprint([path]))


def _no_buffers(index: Any, where: str) -> memoryview:
    raise AssertionError(f"{where}: a marker tree reads no buffer")


def _no_place(array: Any, where: str, node: dict) -> Any:
    raise AssertionError(f"{where}: a marker tree places no array")


@contextlib.contextmanager
def open_source(path: str | os.PathLike) -> Iterator[Source]:
    """Opens the checkpoint at ``path`` for reading leaf by leaf.

    The format is recognized as :func:`~jaxcompress.io.checkpoints.read_checkpoint`
    recognizes it, plus a sharded safetensors checkpoint's ``*.safetensors.index.json``.

    Raises:
        FileFormatError: the path holds none of the supported formats.
        FileNotFoundError: nothing is at ``path``.

    Example:
        >>> import os, tempfile
        >>> import numpy as np
        >>> import jaxcompress as jc
        >>> path = os.path.join(tempfile.mkdtemp(), "m.safetensors")
        >>> jc.export_dense(path, {"a": {"w": np.ones((2, 3), np.float32)}, "b": np.zeros(2)})
        >>> with open_source(path) as source:
        ...     source.skeleton, source.load(0).shape
        ({'a': {'w': 0}, 'b': 1}, (2, 3))
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_dir():
        yield _in_memory("orbax", read_orbax(path), [p for p in path.rglob("*") if p.is_file()])
        return
    with open(path, "rb") as handle:
        head = handle.read(len(container.MAGIC))
    if head == container.MAGIC or path.suffix == ".jxc":
        with _jxc(path) as source:
            yield source
    elif path.name.endswith(INDEX_SUFFIX):
        shard_map: dict[Path, list[str] | None] = {
            Path(shard): names for shard, names in safetensors_index(path).items()
        }
        with _safetensors(shard_map, "safetensors-index", path) as source:
            yield source
    elif path.suffix == ".safetensors":
        with _safetensors({path: None}, "safetensors", None) as source:
            yield source
    elif path.suffix == ".msgpack":
        yield _in_memory("msgpack", read_msgpack(path), [path])
    else:
        raise FileFormatError(f"{path}: not a checkpoint; expected {EXPECTED}")
