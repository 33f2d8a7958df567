"""JSON header nodes of a saved tree: their fields, their arrays, and the leaf codec interface.

:mod:`jaxcompress.io.treecodec` walks the containers; each compressed leaf type has
a :class:`LeafCodec` (in :mod:`jaxcompress.io.codecs`) that writes its node and
reads it back with the helpers here. Reading checks every field and raises
:class:`~jaxcompress.io.errors.FileFormatError` naming the leaf path.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxcompress.io import shards, streams
from jaxcompress.io.errors import FileFormatError

# Only these dtypes are ever read back: no object or structured dtypes.
DTYPES = {
    name: jnp.dtype(name)
    for name in [
        "bool",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "float16",
        "float32",
        "float64",
        "bfloat16",
        "complex64",
        "complex128",
        "float8_e4m3fn",
        "float8_e5m2",
    ]
}

AddBuffer = Callable[[Any], int]
GetBuffer = Callable[[Any, str], memoryview]
# An array as read from a file: a host array, or a split one decoded block by block.
Stored = np.ndarray | shards.BlockSource
Place = Callable[[Stored, str, Any], Any]


@dataclasses.dataclass(frozen=True)
class Encoding:
    """What a leaf codec needs to write a node.

    Attributes:
        add: stores a payload and returns its buffer index.
        entropy: whether code streams and masks may be entropy coded.
        encode: ``encode(tree, path)`` writes a nested tree (a ``Sparse`` leaf's values).
    """

    add: AddBuffer
    entropy: bool
    encode: Callable[[Any, str], Any]


@dataclasses.dataclass(frozen=True)
class Decoding:
    """What a leaf codec needs to read a node back.

    Attributes:
        get: ``get(index, path)`` returns a checked buffer.
        place: ``place(array, path, leaf_node)`` turns a host array into the returned one.
        decode: ``decode(node, path)`` reads a nested node (a ``Sparse`` leaf's values).
        value_types: the compressed node types that may hold a ``Sparse`` leaf's values.
    """

    get: GetBuffer
    place: Place
    decode: Callable[[Any, str], Any]
    value_types: frozenset[str]


@dataclasses.dataclass(frozen=True)
class LeafCodec:
    """How one compressed leaf type is written to a header node and read back.

    Attributes:
        leaf_type: the compressed leaf class.
        node_types: the node ``type`` strings it reads (the first one is the usual one).
        encode: ``encode(leaf, encoding, path)`` returns the node.
        decode: ``decode(node, decoding, path)`` returns the leaf, after checking
            every field and child against the leaf's metadata.
        holds_sparse_values: whether it may stand for a ``Sparse`` leaf's kept values.
    """

    leaf_type: type
    node_types: tuple[str, ...]
    encode: Callable[[Any, Encoding, str], dict[str, Any]]
    decode: Callable[[dict[str, Any], Decoding, str], Any]
    holds_sparse_values: bool = False


def join(path: str, key: Any) -> str:
    """The path of ``key`` under ``path``.

    Example:
        >>> join("dense", "kernel"), join("", 0)
        ('dense/kernel', '0')
    """
    return f"{path}/{key}" if path else str(key)


# ---------------------------------------------------------------- writing


def dtype_name(dtype: Any, path: str) -> str:
    """The stored name of ``dtype``; a ``TypeError`` naming ``path`` if it cannot be saved.

    Example:
        >>> dtype_name(np.float32, "w")
        'float32'
    """
    name = np.dtype(dtype).name
    if name not in DTYPES:
        raise TypeError(f"{path}: cannot save dtype {name}; supported: {sorted(DTYPES)}")
    return name


def array_node(x: Any, add: AddBuffer, path: str) -> dict[str, Any]:
    """The node of an array: one buffer, or shard by shard where it is split over devices.

    Example:
        >>> array_node(np.zeros(3, np.float32), lambda data: 0, "w")
        {'type': 'array', 'dtype': 'float32', 'shape': [3], 'buffer': 0}
    """
    if shards.is_split(x):
        dtype_name(x.dtype, path)
        return shards.blocks_node(x, add, path, entropy=False)
    # Not np.ascontiguousarray: it makes a 0-d array (a step counter) 1-d.
    array = np.asarray(x, order="C")
    name = dtype_name(array.dtype, path)
    return {"type": "array", "dtype": name, "shape": list(array.shape), "buffer": add(array)}


def code_stream(
    packed: Any,
    add: AddBuffer,
    path: str,
    entropy: bool,
    encode: Callable[[np.ndarray], tuple[dict[str, Any], Any]],
) -> dict[str, Any]:
    """A bit-packed child's node: shard by shard where it is split, else one stream.

    ``encode(packed)`` returns the stream's record and payload
    (:func:`jaxcompress.io.streams.encode_codes` or ``encode_mask``).

    Example:
        >>> record = lambda packed: ({"type": "raw"}, packed)
        >>> code_stream(np.zeros(2, np.uint8), lambda data: 7, "w", False, record)
        {'type': 'raw', 'buffer': 7}
    """
    if shards.is_split(packed):
        return shards.blocks_node(packed, add, path, entropy=entropy)
    record, payload = encode(np.asarray(packed))
    return {**record, "buffer": add(payload)}


def dense_fields(leaf: Any, path: str) -> dict[str, Any]:
    """The ``shape`` and ``dtype`` fields every compressed leaf node starts with.

    Example:
        >>> import jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> dense_fields(jc.prune(0.5)({"w": jnp.ones((2, 2))})[0]["w"], "w")
        {'shape': [2, 2], 'dtype': 'float32'}
    """
    return {"shape": list(leaf.shape), "dtype": dtype_name(leaf.dtype, path)}


# ---------------------------------------------------------------- reading


def fail(path: str, message: str) -> FileFormatError:
    """The error for a bad node at ``path``.

    Example:
        >>> str(fail("w", "no codes"))
        'w: no codes'
    """
    return FileFormatError(f"{path or 'tree'}: {message}")


def field(node: dict, name: str, path: str, check: Callable[[Any], bool], what: str) -> Any:
    """``node[name]`` if ``check`` accepts it, else a :class:`FileFormatError` saying ``what``.

    Example:
        >>> field({"bits": 4}, "bits", "w", lambda b: b in (4, 8), "4 or 8")
        4
    """
    value = node.get(name)
    if not check(value):
        raise fail(path, f"field {name!r} must be {what}, got {value!r}")
    return value


def is_int(value: Any, low: int = 0) -> bool:
    """Whether ``value`` is an ``int`` (not a ``bool``) of at least ``low``.

    Example:
        >>> is_int(3), is_int(True), is_int(0, 1)
        (True, False, False)
    """
    return type(value) is int and value >= low


def shape_field(node: dict, path: str, name: str = "shape") -> tuple[int, ...]:
    """A shape field: a list of at most 32 non-negative integers.

    Example:
        >>> shape_field({"shape": [2, 3]}, "w")
        (2, 3)
    """
    shape = field(
        node,
        name,
        path,
        lambda s: isinstance(s, list) and len(s) <= 32 and all(is_int(d) for d in s),
        "a list of non-negative integers",
    )
    return tuple(shape)


def dtype_field(node: dict, path: str) -> np.dtype:
    """The ``dtype`` field, one of :data:`DTYPES`.

    Example:
        >>> dtype_field({"dtype": "float32"}, "w")
        dtype('float32')
    """
    name = field(
        node,
        "dtype",
        path,
        lambda d: isinstance(d, str) and d in DTYPES,
        f"one of {sorted(DTYPES)}",
    )
    return DTYPES[name]


def bits_field(node: dict, path: str) -> int:
    """The ``bits`` field of a code stream: an integer 1 to 8.

    Example:
        >>> bits_field({"bits": 3}, "w")
        3
    """
    return field(node, "bits", path, lambda b: is_int(b, 1) and b <= 8, "an integer 1 to 8")


def stream_field(node: dict, name: str, path: str) -> dict:
    """A stream record field (a JSON object).

    Example:
        >>> stream_field({"codes": {"type": "raw"}}, "codes", "w")
        {'type': 'raw'}
    """
    return field(node, name, path, lambda r: isinstance(r, dict), "a stream record")


def dense_header(node: dict, path: str) -> tuple[tuple[int, ...], np.dtype]:
    """A compressed leaf's dense ``(shape, dtype)``: non-empty and floating.

    Example:
        >>> dense_header({"shape": [2, 2], "dtype": "float32"}, "w")
        ((2, 2), dtype('float32'))
    """
    shape, dtype = shape_field(node, path), dtype_field(node, path)
    if not shape or 0 in shape:
        raise fail(path, f"a compressed leaf needs a non-empty shape, got {shape}")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise fail(path, f"a compressed leaf has a floating dtype, got {dtype}")
    return shape, dtype


def read_array(node: Any, get: GetBuffer, path: str) -> Stored:
    """The array of an ``array`` node (its buffer's size checked) or a ``blocks`` node.

    Example:
        >>> node = {"type": "array", "dtype": "uint8", "shape": [2], "buffer": 0}
        >>> read_array(node, lambda index, path: memoryview(b"ab"), "w").tolist()
        [97, 98]
    """
    if not isinstance(node, dict) or node.get("type") not in ("array", "blocks"):
        raise fail(path, "expected an array node")
    shape, dtype = shape_field(node, path), dtype_field(node, path)
    if node["type"] == "blocks":
        return shards.read_blocks(node, get, path, dtype=dtype, shape=shape)
    data = get(node.get("buffer"), path)
    expected = math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise fail(path, f"array buffer has {len(data)} bytes, shape {shape} needs {expected}")
    return np.frombuffer(data, dtype).reshape(shape)


def expect_shape(array: Any, shape: tuple[int, ...], path: str, what: str) -> None:
    """Raises naming ``what`` unless ``array`` has ``shape``.

    Example:
        >>> expect_shape(np.zeros((1, 2)), (1, 2), "w", "scale")
    """
    if tuple(array.shape) != tuple(shape):
        raise fail(path, f"{what} has shape {tuple(array.shape)}, expected {tuple(shape)}")


def packed_blocks(
    record: dict, get: GetBuffer, path: str, packed_shape: tuple[int, ...]
) -> shards.BlockSource:
    """A bit-packed child stored shard by shard, read lazily block by block."""
    return shards.read_blocks(record, get, path, dtype=np.dtype(np.uint8), shape=packed_shape)


def read_codes(
    record: dict, get: GetBuffer, path: str, *, bits: int, shape: tuple[int, ...]
) -> Stored:
    """Bit-packed codes from one stream, or lazily from per-shard blocks."""
    if record.get("type") == "blocks":
        packed_shape = (*shape[:-1], math.ceil(shape[-1] * bits / 8))
        return packed_blocks(record, get, path, packed_shape)
    return streams.decode_codes(
        record, get(record.get("buffer"), path), bits=bits, shape=shape, where=path
    )
