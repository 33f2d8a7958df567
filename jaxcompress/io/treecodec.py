"""Pytrees to JSON header nodes plus buffers, and back, with no pickle.

Containers (dict, ``FrozenDict``, ``nnx.State``, list, tuple, ``None``, and the
``nnx`` variable types) become JSON nodes with their children; array leaves become
``{"type": "array", dtype, shape, buffer}``; compressed leaves record their static
fields and store their children as arrays, code streams or masks
(:mod:`jaxcompress.io.streams`). An array split over devices, a leaf or a child, is
stored shard by shard instead (a ``blocks`` node, :mod:`jaxcompress.io.shards`), so
nothing is gathered to save it and each device reads back only its block. Decoding
rebuilds only types from a fixed list, checks every field and every child's shape
against the leaf's metadata, and raises
:class:`~jaxcompress.io.errors.FileFormatError` naming the leaf path otherwise.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.arrays import Clustered, CompressedArray, LowRank, Quantized, Sparse
from jaxcompress.arrays.lowrank import matrix_shape
from jaxcompress.arrays.quantized import group_layout
from jaxcompress.io import shards, streams
from jaxcompress.io.errors import FileFormatError

# Only these dtypes are ever read back: no object or structured dtypes.
_DTYPES = {
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
_VARIABLES = ("Param", "BatchStat", "Cache", "Variable")  # the nnx variable classes saved
_CONTAINERS = "dict, FrozenDict, nnx.State, list, tuple, None, nnx.Param/BatchStat/Cache/Variable"

AddBuffer = Callable[[Any], int]
GetBuffer = Callable[[Any, str], memoryview]
Place = Callable[[np.ndarray, str, Any], Any]


def _join(path: str, key: Any) -> str:
    return f"{path}/{key}" if path else str(key)


def _dtype_name(dtype: Any, path: str) -> str:
    name = np.dtype(dtype).name
    if name not in _DTYPES:
        raise TypeError(f"{path}: cannot save dtype {name}; supported: {sorted(_DTYPES)}")
    return name


def _array_node(x: Any, add: AddBuffer, path: str) -> dict[str, Any]:
    if shards.is_split(x):
        _dtype_name(x.dtype, path)
        return shards.blocks_node(x, add, path, entropy=False)
    array = np.ascontiguousarray(np.asarray(x))
    name = _dtype_name(array.dtype, path)
    return {"type": "array", "dtype": name, "shape": list(array.shape), "buffer": add(array)}


def _stream_node(record: dict[str, Any], payload: Any, add: AddBuffer) -> dict[str, Any]:
    return {**record, "buffer": add(payload)}


def _code_stream(packed: Any, add: AddBuffer, path: str, entropy: bool, encode: Callable) -> dict:
    """A bit-packed child's node: shard by shard where it is split, else one stream."""
    if shards.is_split(packed):
        return shards.blocks_node(packed, add, path, entropy=entropy)
    return _stream_node(*encode(np.asarray(packed)), add)


def _compressed_node(leaf: CompressedArray, add: AddBuffer, path: str, entropy: bool) -> dict:
    common = {"shape": list(leaf.shape), "dtype": _dtype_name(leaf.dtype, path)}
    if isinstance(leaf, Sparse):
        mask = _code_stream(
            leaf.mask,
            add,
            path,
            entropy,
            lambda packed: streams.encode_mask(packed, shape=leaf.shape, entropy=entropy),
        )
        values = encode_node(leaf.values, add, _join(path, "values"), entropy=entropy)
        return {
            "type": "sparse",
            **common,
            "nnz": leaf.nnz,
            "mask": mask,
            "values": values,
        }
    if isinstance(leaf, Clustered):
        indices = _code_stream(
            leaf.indices,
            add,
            path,
            entropy,
            lambda packed: streams.encode_codes(
                packed, bits=leaf.bits, shape=leaf.shape, entropy=entropy
            ),
        )
        return {
            "type": "clustered",
            **common,
            "bits": leaf.bits,
            "indices": indices,
            "codebook": _array_node(leaf.codebook, add, _join(path, "codebook")),
        }
    if isinstance(leaf, Quantized):
        codes = _code_stream(
            leaf.codes,
            add,
            path,
            entropy,
            lambda packed: streams.encode_codes(
                packed, bits=leaf.bits, shape=leaf.shape, entropy=entropy
            ),
        )
        zero = leaf.zero_point
        node = {
            "type": "quantized",
            **common,
            "bits": leaf.bits,
            "axis": leaf.axis,
            "group_size": leaf.group_size,
            "codes": codes,
            "scale": _array_node(leaf.scale, add, _join(path, "scale")),
            "zero_point": None if zero is None else _array_node(zero, add, _join(path, "zero")),
        }
        if leaf.input_scale is not None:  # AWQ; absent otherwise, so other files are unchanged
            node["input_scale"] = _array_node(leaf.input_scale, add, _join(path, "input_scale"))
            # Its own type, so a reader that predates input scales refuses the node
            # instead of decoding the codes without them.
            node["type"] = "quantized_input_scaled"
        return node
    if isinstance(leaf, LowRank):
        return {
            "type": "lowrank",
            **common,
            "fan_in_axes": leaf.fan_in_axes,
            "u": _array_node(leaf.u, add, _join(path, "u")),
            "v": _array_node(leaf.v, add, _join(path, "v")),
        }
    raise TypeError(f"{path}: cannot save compressed leaf type {type(leaf).__name__}")


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
        return _array_node(tree, add, path)
    raise TypeError(
        f"{path or 'tree'}: cannot save a {type(tree).__name__}; supported: arrays, "
        f"compressed leaves and {_CONTAINERS}"
    )


def _encode_container(tree, add, path, entropy, on_leaf) -> dict[str, Any] | None:
    """The node of a container (children encoded), or ``None`` for a leaf."""

    def child(value: Any, key: Any) -> Any:
        return encode_node(value, add, _join(path, key), entropy=entropy, on_leaf=on_leaf)

    # flax loads only when used: if it is not loaded, no tree holds its types.
    nnx, flax_core = sys.modules.get("flax.nnx"), sys.modules.get("flax.core")
    mappings: dict[type, str] = {dict: "dict"}
    if flax_core is not None:
        mappings[flax_core.FrozenDict] = "frozendict"
    if nnx is not None:
        mappings[nnx.State] = "state"
    if nnx is not None and isinstance(tree, nnx.Variable):
        kind = type(tree).__name__
        if kind not in _VARIABLES:
            raise TypeError(f"{path}: cannot save nnx variable type {kind}")
        value = encode_node(tree.get_value(), add, path, entropy=entropy, on_leaf=on_leaf)
        return {"type": "variable", "class": kind, "value": value}
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
    return None


# ---------------------------------------------------------------- decoding


def _fail(path: str, message: str) -> FileFormatError:
    return FileFormatError(f"{path or 'tree'}: {message}")


def _field(node: dict, name: str, path: str, check: Callable[[Any], bool], what: str) -> Any:
    value = node.get(name)
    if not check(value):
        raise _fail(path, f"field {name!r} must be {what}, got {value!r}")
    return value


def _is_int(value: Any, low: int = 0) -> bool:
    return type(value) is int and value >= low


def _shape(node: dict, path: str, name: str = "shape") -> tuple[int, ...]:
    shape = _field(
        node,
        name,
        path,
        lambda s: isinstance(s, list) and len(s) <= 32 and all(_is_int(d) for d in s),
        "a list of non-negative integers",
    )
    return tuple(shape)


def _dtype(node: dict, path: str) -> np.dtype:
    name = _field(
        node,
        "dtype",
        path,
        lambda d: isinstance(d, str) and d in _DTYPES,
        f"one of {sorted(_DTYPES)}",
    )
    return _DTYPES[name]


def _read_array(node: Any, get: GetBuffer, path: str) -> np.ndarray | shards.BlockSource:
    if not isinstance(node, dict) or node.get("type") not in ("array", "blocks"):
        raise _fail(path, "expected an array node")
    shape, dtype = _shape(node, path), _dtype(node, path)
    if node["type"] == "blocks":
        return shards.read_blocks(node, get, path, dtype=dtype, shape=shape)
    data = get(node.get("buffer"), path)
    expected = math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise _fail(path, f"array buffer has {len(data)} bytes, shape {shape} needs {expected}")
    return np.frombuffer(data, dtype).reshape(shape)


def _expect_shape(array: np.ndarray, shape: tuple[int, ...], path: str, what: str) -> None:
    if tuple(array.shape) != tuple(shape):
        raise _fail(path, f"{what} has shape {tuple(array.shape)}, expected {tuple(shape)}")


def _bits(node: dict, path: str) -> int:
    return _field(node, "bits", path, lambda b: _is_int(b, 1) and b <= 8, "an integer 1 to 8")


def _dense_header(node: dict, path: str) -> tuple[tuple[int, ...], np.dtype]:
    shape, dtype = _shape(node, path), _dtype(node, path)
    if not shape or 0 in shape:
        raise _fail(path, f"a compressed leaf needs a non-empty shape, got {shape}")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise _fail(path, f"a compressed leaf has a floating dtype, got {dtype}")
    return shape, dtype


def _stream(node: dict, name: str, path: str) -> dict:
    return _field(node, name, path, lambda r: isinstance(r, dict), "a stream record")


def _packed_blocks(record: dict, get: GetBuffer, path: str, packed_shape: tuple[int, ...]):
    return shards.read_blocks(record, get, path, dtype=np.dtype(np.uint8), shape=packed_shape)


def _decode_codes(
    record: dict, get: GetBuffer, path: str, *, bits: int, shape: tuple[int, ...]
) -> np.ndarray | shards.BlockSource:
    """Bit-packed codes from one stream, or lazily from per-shard blocks."""
    if record.get("type") == "blocks":
        packed_shape = (*shape[:-1], math.ceil(shape[-1] * bits / 8))
        return _packed_blocks(record, get, path, packed_shape)
    return streams.decode_codes(
        record, get(record.get("buffer"), path), bits=bits, shape=shape, where=path
    )


def _decode_sparse(node, get, place, path):
    shape, dtype = _dense_header(node, path)
    size = math.prod(shape)
    nnz = _field(node, "nnz", path, lambda n: _is_int(n) and n <= size, f"an integer 0 to {size}")
    record = _stream(node, "mask", path)
    if record.get("type") == "blocks":
        # Stored shard by shard: the kept count is not checked, as that would read
        # every block (other processes' included); each block has its CRC.
        mask = _packed_blocks(record, get, path, (*shape[:-1], math.ceil(shape[-1] / 8)))
    else:
        mask = streams.decode_mask(
            record, get(record.get("buffer"), path), shape=shape, nnz=nnz, where=path
        )
    values_path = _join(path, "values")
    values_node = _field(node, "values", path, lambda v: isinstance(v, dict), "a leaf node")
    if values_node.get("type") in ("array", "blocks"):
        values = _read_array(values_node, get, values_path)
        if values.dtype != dtype:
            raise _fail(values_path, f"dtype {values.dtype} differs from the leaf's {dtype}")
        values = place(values, path, node)
    elif values_node.get("type") in ("clustered", "quantized", "quantized_input_scaled"):
        values = decode_node(values_node, get, place, values_path)
    else:
        raise _fail(values_path, "sparse values must be an array, clustered or quantized node")
    if tuple(values.shape) != (nnz,):
        raise _fail(values_path, f"has shape {tuple(values.shape)}, expected ({nnz},)")
    return Sparse(values=values, mask=place(mask, path, node), shape=shape, dtype=dtype)


def _decode_clustered(node, get, place, path):
    shape, dtype = _dense_header(node, path)
    bits = _bits(node, path)
    codebook = _read_array(node.get("codebook"), get, _join(path, "codebook"))
    k = codebook.shape[-1] if codebook.ndim else 0
    if (
        codebook.ndim not in (1, 2)
        or not 1 <= k <= 2**bits
        or (codebook.ndim == 2 and codebook.shape[0] != shape[-1])
    ):
        raise _fail(path, f"codebook shape {codebook.shape} does not fit {bits}-bit indices")
    record = _stream(node, "indices", path)
    indices = _decode_codes(record, get, path, bits=bits, shape=shape)
    # Indices stored shard by shard are not all read here (other processes hold some).
    if (
        k < 2**bits
        and isinstance(indices, np.ndarray)
        and streams.unpack_bits(indices, bits, shape[-1]).max(initial=0) >= k
    ):
        raise _fail(path, f"an index points past the {k}-entry codebook")
    return Clustered(
        indices=place(indices, path, node),
        codebook=place(codebook, path, node),
        shape=shape,
        dtype=dtype,
        bits=bits,
    )


def _decode_quantized(node, get, place, path):
    shape, dtype = _dense_header(node, path)
    bits = _bits(node, path)
    axis = _field(
        node,
        "axis",
        path,
        lambda a: a is None or (_is_int(a) and a < len(shape)),
        "None or an axis",
    )
    channels = 1 if axis is None else shape[axis]
    contracted = math.prod(shape) // channels
    group_size = _field(
        node,
        "group_size",
        path,
        lambda g: g is None or (_is_int(g, 1) and contracted % g == 0),
        f"None or a positive divisor of {contracted}",
    )
    groups, _, channels = group_layout(shape, axis, group_size)
    scale = _read_array(node.get("scale"), get, _join(path, "scale"))
    _expect_shape(scale, (groups, channels), path, "scale")
    zero = node.get("zero_point")
    if zero is not None:
        zero = _read_array(zero, get, _join(path, "zero_point"))
        _expect_shape(zero, scale.shape, path, "zero_point")
        zero = place(zero, path, node)
    inputs = node.get("input_scale")
    if (node.get("type") == "quantized_input_scaled") != (inputs is not None):
        raise _fail(path, "input_scale must be present exactly in a quantized_input_scaled node")
    if inputs is not None:
        inputs = _input_scale(inputs, get, path, shape)
        inputs = place(inputs, path, node)
    codes = _decode_codes(_stream(node, "codes", path), get, path, bits=bits, shape=shape)
    return Quantized(
        codes=place(codes, path, node),
        scale=place(scale, path, node),
        zero_point=zero,
        shape=shape,
        dtype=dtype,
        bits=bits,
        axis=axis,
        group_size=group_size,
        input_scale=inputs,
    )


def _input_scale(node: Any, get: GetBuffer, path: str, shape: tuple[int, ...]) -> np.ndarray:
    """AWQ's input scales: the weight's leading axes, floating, finite and positive."""
    inputs = _read_array(node, get, _join(path, "input_scale"))
    if not 1 <= inputs.ndim < len(shape) or tuple(inputs.shape) != shape[: inputs.ndim]:
        raise _fail(
            path,
            f"input_scale has shape {tuple(inputs.shape)}, expected the leading axes of {shape}",
        )
    if not jnp.issubdtype(inputs.dtype, jnp.floating):
        raise _fail(path, f"input_scale has dtype {inputs.dtype}; it must be floating-point")
    values = np.asarray(inputs).astype(np.float32)
    if not (np.isfinite(values).all() and (values > 0).all()):
        raise _fail(path, "input_scale must be finite and positive")
    return inputs


def _decode_lowrank(node, get, place, path):
    shape, dtype = _dense_header(node, path)
    fan_in_axes = _field(
        node,
        "fan_in_axes",
        path,
        lambda a: _is_int(a, 1) and a < len(shape),
        f"an integer 1 to {len(shape) - 1} for shape {shape}",
    )
    m, n = matrix_shape(shape, fan_in_axes)
    factors = {}
    for name in ("u", "v"):
        factor = _read_array(node.get(name), get, _join(path, name))
        if not jnp.issubdtype(factor.dtype, jnp.floating):
            raise _fail(path, f"{name} has dtype {factor.dtype}; factors are floating-point")
        factors[name] = factor
    u, v = factors["u"], factors["v"]
    if u.ndim != 2 or u.shape[0] != m or u.shape[1] < 1:
        raise _fail(path, f"u has shape {tuple(u.shape)}, expected ({m}, rank >= 1)")
    _expect_shape(v, (u.shape[1], n), path, "v")
    return LowRank(
        u=place(u, _join(path, "u"), node),
        v=place(v, _join(path, "v"), node),
        shape=shape,
        dtype=dtype,
        fan_in_axes=fan_in_axes,
    )


_COMPRESSED = {
    "sparse": _decode_sparse,
    "clustered": _decode_clustered,
    "quantized": _decode_quantized,
    "quantized_input_scaled": _decode_quantized,
    "lowrank": _decode_lowrank,
}


def _items(node: dict, path: str, keyed: bool) -> list:
    items = node.get("items")
    if not isinstance(items, list):
        raise _fail(path, "container node has no item list")
    if keyed and not all(
        isinstance(i, list) and len(i) == 2 and type(i[0]) in (str, int) for i in items
    ):
        raise _fail(path, "mapping items must be [key, node] pairs with str or int keys")
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
        raise _fail(path, f"expected a node object, got {type(node).__name__}")
    kind = node.get("type")
    if not isinstance(kind, str):
        raise _fail(path, f"node type {kind!r} is not a string")
    if kind in ("dict", "frozendict", "state"):
        children = {}
        for key, child in _items(node, path, keyed=True):
            if key in children:
                raise _fail(path, f"duplicate key {key!r}")
            children[key] = decode_node(child, get, place, _join(path, key), on_leaf=on_leaf)
        if kind == "dict":
            return children
        from flax import nnx  # optional: only trees saved from flax name these kinds
        from flax.core import FrozenDict

        return {"frozendict": FrozenDict, "state": nnx.State}[kind](children)
    if kind in ("list", "tuple"):
        children = [
            decode_node(child, get, place, _join(path, i), on_leaf=on_leaf)
            for i, child in enumerate(_items(node, path, keyed=False))
        ]
        return children if kind == "list" else tuple(children)
    if kind == "variable":
        name = node.get("class")
        if name not in _VARIABLES:
            raise _fail(path, f"unknown nnx variable class {node.get('class')!r}")
        from flax import nnx  # optional: only trees saved from flax hold variables

        cls = getattr(nnx, name)
        return cls(decode_node(node.get("value"), get, place, path, on_leaf=on_leaf))
    if kind == "none":
        return None
    leaf = _decode_leaf(node, kind, get, place, path)
    if on_leaf is not None:
        on_leaf(path)
    return leaf


def _decode_leaf(node: dict, kind: Any, get: GetBuffer, place: Place, path: str) -> Any:
    if kind == "scalar":
        value = node.get("value")
        if type(value) not in (bool, int, float):
            raise _fail(path, f"scalar value {value!r} is not a number")
        return value
    if kind in ("array", "blocks"):
        return place(_read_array(node, get, path), path, node)
    if kind in _COMPRESSED:
        return _COMPRESSED[kind](node, get, place, path)
    raise _fail(path, f"unknown node type {kind!r}")


def leaf_nodes(node: Any, path: str = "") -> list[tuple[str, dict]]:
    """``(path, node)`` of every array or compressed leaf node, in tree order.

    Example:
        >>> leaf_nodes({"type": "dict", "items": [["w", {"type": "array"}]]})
        [('w', {'type': 'array'})]
    """
    if not isinstance(node, dict):
        return []
    kind = node.get("type")
    if kind in ("array", "blocks", *_COMPRESSED):
        return [(path, node)]
    if kind == "variable":
        return leaf_nodes(node.get("value"), path)
    items = node.get("items")
    if not isinstance(items, list):
        return []
    keyed = kind in ("dict", "frozendict", "state")
    found = []
    for index, item in enumerate(items):
        key, child = (
            (item[0], item[1])
            if keyed and isinstance(item, list) and len(item) == 2
            else (index, item)
        )
        found.extend(leaf_nodes(child, _join(path, key)))
    return found
