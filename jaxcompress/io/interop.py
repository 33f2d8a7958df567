"""Interop with other checkpoint formats: safetensors and flax msgpack.

:func:`read_safetensors` and :func:`write_safetensors` speak the `safetensors` file
format without needing the ``safetensors`` package: an 8-byte little-endian header
length ``N``, ``N`` bytes of UTF-8 JSON describing every tensor, then the raw
little-endian tensor bytes. :func:`read_msgpack` reads flax msgpack checkpoints and
:func:`export_dense` writes a (possibly compressed) parameter tree as a dense file any
PyTorch, Hugging Face or flax tool can load.

Every writer here is atomic: the file is written under a temporary name in the same
directory and moved into place only once complete, so a failure part way leaves an
existing file untouched and no temporary file behind. Every reader raises
:class:`~jaxcompress.io.errors.FileFormatError` naming the file (and the tensor) for a
file that is truncated, tampered with or foreign.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import mmap
import os
import secrets
import struct
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, BinaryIO

import jax
import ml_dtypes
import numpy as np

from jaxcompress.arrays import is_compressed
from jaxcompress.arrays.tree import materialize
from jaxcompress.io.errors import FileFormatError

if TYPE_CHECKING:
    from flax import nnx

PathLike = str | os.PathLike

# safetensors dtype code -> the dtype of its bytes on disk (little-endian where it matters).
_DISK_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("u1"),  # read as bytes, then any nonzero byte is True
}
# The in-memory (native byte order) dtype of each code, and its inverse.
_MEMORY_DTYPES: dict[str, np.dtype] = {
    code: (np.dtype(np.bool_) if code == "BOOL" else dtype.newbyteorder("="))
    for code, dtype in _DISK_DTYPES.items()
}
_CODES: dict[np.dtype, str] = {dtype: code for code, dtype in _MEMORY_DTYPES.items()}

_METADATA_KEY = "__metadata__"
# The reference implementation refuses headers above 100 MB; so does this one, which
# keeps a corrupt length from making the reader allocate gigabytes for "JSON".
_MAX_HEADER_BYTES = 100_000_000
_FORMATS = {".safetensors": "safetensors", ".msgpack": "msgpack"}


# --------------------------------------------------------------------------- helpers


def _fail(path: PathLike, message: str, tensor: str | None = None) -> FileFormatError:
    where = os.fspath(path) if tensor is None else f"{os.fspath(path)}: tensor {tensor!r}"
    return FileFormatError(f"{where}: {message}")


def _atomic_write(path: PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Runs ``write`` on a temporary file next to ``path``, then moves it over ``path``.

    On any exception (including KeyboardInterrupt) the temporary file is removed and
    whatever was at ``path`` before stays as it was.
    """
    target = os.path.abspath(os.fspath(path))
    directory, name = os.path.split(target)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        temp = os.path.join(directory, f".{name}.{secrets.token_hex(6)}.tmp")
        try:
            # Mode 0o666 lets the umask decide, as for any newly created file.
            fd = os.open(temp, flags, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    # Make the rename itself durable where the platform allows it.
    with contextlib.suppress(OSError, AttributeError):
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _variable_value(variable: nnx.Variable) -> Any:
    getter = getattr(variable, "get_value", None)
    return getter() if callable(getter) else variable.value


def _pure_dict(state: nnx.State) -> Any:
    from flax import nnx  # loaded already: only a tree with nnx wrappers gets here

    to_pure = getattr(nnx, "to_pure_dict", None)
    return to_pure(state) if callable(to_pure) else state.to_pure_dict()


def _is_wrapper(x: Any) -> bool:
    from flax import nnx  # loaded already: _strip_nnx runs this only if flax.nnx is

    return isinstance(x, (nnx.State, nnx.Variable)) or is_compressed(x)


def _unwrap(x: Any) -> Any:
    from flax import nnx  # loaded already: _strip_nnx runs this only if flax.nnx is

    if isinstance(x, nnx.State):
        return _strip_nnx(_pure_dict(x))
    if isinstance(x, nnx.Variable):
        return _strip_nnx(_variable_value(x))
    return x


def _strip_nnx(tree: Any) -> Any:
    """``tree`` with every ``nnx.State`` a plain dict and every ``nnx.Variable`` its value."""
    if "flax.nnx" not in sys.modules:  # flax loads only when used; unloaded, no tree holds nnx
        return tree
    return jax.tree.map(_unwrap, tree, is_leaf=_is_wrapper)


def _key_name(key: Any) -> str:
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One tensor to write: its path, its leaf (maybe compressed) and what it will be."""

    parts: tuple[str, ...]
    leaf: Any
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def name(self) -> str:
        return ".".join(self.parts)

    def dense(self) -> np.ndarray:
        """The dense numpy array of this leaf, checked against the promised dtype/shape."""
        array = np.asarray(materialize(self.leaf))
        if array.dtype != self.dtype or array.shape != self.shape:
            raise TypeError(
                f"tensor {self.name!r}: leaf of type {type(self.leaf).__name__} claims "
                f"{self.dtype.name}{list(self.shape)} but converts to "
                f"{array.dtype.name}{list(array.shape)}"
            )
        return array


def _safetensors_code(name: str, dtype: np.dtype) -> str:
    native = dtype if dtype.isnative else dtype.newbyteorder("=")
    code = _CODES.get(native)
    if code is None:
        accepted = ", ".join(sorted(d.name for d in _CODES))
        raise TypeError(f"tensor {name!r}: dtype {dtype} is not supported (accepted: {accepted})")
    return code


def _dense_entries(tree: Any, *, safetensors: bool) -> list[_Entry]:
    """The leaves of ``tree`` with their string paths, compressed ones not yet materialized."""
    plain = _strip_nnx(tree)
    leaves, _ = jax.tree_util.tree_flatten_with_path(plain, is_leaf=is_compressed)
    entries = []
    for path, leaf in leaves:
        parts = tuple(_key_name(key) for key in path)
        name = ".".join(parts)
        if is_compressed(leaf) or (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
            try:
                dtype = np.dtype(leaf.dtype)
            except TypeError as error:
                raise TypeError(f"tensor {name!r}: dtype {leaf.dtype} is not supported") from error
            shape = tuple(int(d) for d in leaf.shape)
        else:  # Python scalars and the like: convert now, they are small.
            leaf = np.asarray(leaf)
            dtype, shape = leaf.dtype, leaf.shape
        if safetensors:
            _safetensors_code(name, dtype)
        elif dtype.hasobject:
            raise TypeError(f"tensor {name!r}: {type(leaf).__name__} is not an array")
        entries.append(_Entry(parts, leaf, dtype, shape))
    return entries


def _nest(path: PathLike, flat: dict[str, np.ndarray]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for name, array in flat.items():
        *prefix, last = name.split(".")
        node = nested
        for i, part in enumerate(prefix):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                clash = ".".join(prefix[: i + 1])
                raise _fail(path, f"is both a tensor and a prefix of {name!r}", clash)
            node = child
        if last in node:  # only a dict can be there: tensor names are unique
            raise _fail(path, "is both a tensor and a prefix of other tensor names", name)
        node[last] = array
    return nested


# --------------------------------------------------------------------------- safetensors


def _parse_header(path: PathLike, mm: mmap.mmap | None, size: int) -> tuple[dict, int]:
    """The header JSON (duplicate keys refused) and the offset where tensor data begins."""
    if size < 8 or mm is None:
        raise _fail(path, f"truncated: {size} bytes, less than the 8-byte header length")
    (length,) = struct.unpack("<Q", mm[:8])
    if length > size - 8:
        raise _fail(path, f"header length {length} runs past the end of the {size}-byte file")
    if length > _MAX_HEADER_BYTES:
        raise _fail(path, f"header length {length} exceeds the {_MAX_HEADER_BYTES}-byte limit")

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key, value in pairs:
            if key in result:
                raise _fail(path, f"key {key!r} appears twice in one header object")
            result[key] = value
        return result

    try:
        text = mm[8 : 8 + length].decode("utf-8")
        header = json.loads(text, object_pairs_hook=no_duplicates)
    except FileFormatError:
        raise
    except (ValueError, RecursionError) as error:  # UnicodeDecodeError, JSONDecodeError
        raise _fail(path, f"header is not valid UTF-8 JSON ({error})") from error
    if not isinstance(header, dict):
        raise _fail(path, f"header is a JSON {type(header).__name__}, not an object")
    return header, 8 + length


def _check_metadata(path: PathLike, metadata: Any) -> dict[str, str]:
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _fail(path, f"{_METADATA_KEY} must map strings to strings, got {metadata!r}")
    return metadata


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


@dataclasses.dataclass(frozen=True)
class _TensorInfo:
    name: str
    code: str
    shape: tuple[int, ...]
    begin: int
    end: int


def _tensor_infos(path: PathLike, header: dict, data_size: int) -> list[_TensorInfo]:
    """Every tensor entry of ``header``, validated against itself and the data size."""
    infos = []
    for name, info in header.items():
        if name == _METADATA_KEY:
            continue
        if not isinstance(info, dict):
            raise _fail(path, f"entry is a JSON {type(info).__name__}, not an object", name)
        missing = {"dtype", "shape", "data_offsets"} - info.keys()
        if missing:
            raise _fail(path, f"entry lacks {sorted(missing)}", name)
        code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(code, str) or code not in _DISK_DTYPES:
            accepted = ", ".join(_DISK_DTYPES)
            raise _fail(path, f"unknown dtype {code!r} (accepted: {accepted})", name)
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise _fail(path, f"shape must be a list of non-negative integers, got {shape!r}", name)
        if not (
            isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
        ):
            raise _fail(path, f"data_offsets must be [begin, end], got {offsets!r}", name)
        begin, end = offsets
        if begin > end or end > data_size:
            raise _fail(
                path, f"data_offsets {offsets} fall outside the {data_size} bytes of data", name
            )
        expected = math.prod(shape) * _DISK_DTYPES[code].itemsize
        if end - begin != expected:
            raise _fail(
                path,
                f"data_offsets {offsets} span {end - begin} bytes but {code}{shape} "
                f"needs {expected}",
                name,
            )
        infos.append(_TensorInfo(name, code, tuple(shape), begin, end))
    previous: _TensorInfo | None = None
    for info in sorted((i for i in infos if i.end > i.begin), key=lambda i: (i.begin, i.end)):
        if previous is not None and info.begin < previous.end:
            raise _fail(
                path,
                f"data_offsets [{info.begin}, {info.end}] overlap tensor {previous.name!r} "
                f"at [{previous.begin}, {previous.end}]",
                info.name,
            )
        previous = info
    return infos


def _load_tensor(path: PathLike, mm: mmap.mmap | None, start: int, info: _TensorInfo):
    """A fresh native-order copy of one tensor."""
    try:  # allocate first: a bad shape (say, more than 64 dimensions) fails here
        out = np.empty(info.shape, _MEMORY_DTYPES[info.code])
    except (ValueError, OverflowError) as error:
        message = f"cannot build an array of shape {list(info.shape)} ({error})"
        raise _fail(path, message, info.name) from error
    if out.size:
        assert mm is not None  # only an empty file has no map, and _parse_header refused it
        # Nothing below can fail, so no traceback keeps this view of the map alive
        # (the map could not be closed while one exists).
        view = np.frombuffer(mm, _DISK_DTYPES[info.code], out.size, start + info.begin)
        if info.code == "BOOL":
            np.not_equal(view.reshape(info.shape), 0, out=out)
        else:
            out[...] = view.reshape(info.shape)
    return out


def _open_safetensors(path: PathLike, load: bool) -> tuple[dict, dict[str, np.ndarray]]:
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        # An empty file cannot be mapped; _parse_header reports it as truncated.
        maps = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        with maps if maps is not None else contextlib.nullcontext() as mm:
            header, start = _parse_header(path, mm, size)
            infos = _tensor_infos(path, header, size - start)
            metadata = _check_metadata(path, header.get(_METADATA_KEY, {}))
            tensors = {i.name: _load_tensor(path, mm, start, i) for i in infos} if load else {}
    return metadata, tensors


def read_safetensors(path: PathLike, *, nested: bool = True) -> dict[str, Any]:
    """Reads a ``.safetensors`` file into numpy arrays, without the safetensors package.

    The file is memory-mapped and each tensor copied out once, so nothing is read
    twice and the returned arrays own their memory (the map is closed on return).
    bfloat16 and float8 tensors come back as ``ml_dtypes`` arrays, which jax takes
    as they are. ``BOOL`` bytes read as ``byte != 0``. Everything in the header is
    checked: dtypes, shapes, offsets in range, sized ``prod(shape) * itemsize`` and
    not overlapping. Gaps between tensors and bytes after the last are tolerated.

    Args:
        path: the file to read.
        nested: split tensor names on ``"."`` into nested dicts
            (``"encoder.layer.0.weight"`` becomes
            ``{"encoder": {"layer": {"0": {"weight": ...}}}}``); ``False`` returns a
            flat ``{name: array}`` dict.

    Returns:
        The tensors, nested or flat. The optional ``__metadata__`` map is not among
        them; see :func:`read_safetensors_metadata`.

    Raises:
        FileFormatError: the file is truncated or its header is invalid; the message
            names the file and the offending tensor. Also when, with ``nested``, a name
            is both a tensor and a prefix of another (``"a"`` and ``"a.b"``).

    Example:
        >>> import os, tempfile
        >>> import numpy as np
        >>> from jaxcompress.io.interop import read_safetensors, write_safetensors
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = os.path.join(tmp, "model.safetensors")
        ...     write_safetensors(path, {"dense": {"bias": np.arange(3, dtype=np.int32)}})
        ...     nested, flat = read_safetensors(path), read_safetensors(path, nested=False)
        >>> nested["dense"]["bias"].tolist(), list(flat)
        ([0, 1, 2], ['dense.bias'])
    """
    _, tensors = _open_safetensors(path, load=True)
    return _nest(path, tensors) if nested else tensors


class SafetensorsReader:
    """One ``.safetensors`` file opened for reading a tensor at a time (memory-mapped).

    The header is parsed and checked on entry, as :func:`read_safetensors` checks it;
    :meth:`load` copies one tensor out of the map, so only that tensor's bytes are
    resident (plus the pages the kernel keeps cached). Use as a context manager.

    Example:
        >>> import os, tempfile
        >>> import numpy as np
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = os.path.join(tmp, "m.safetensors")
        ...     write_safetensors(path, {"a": np.arange(3, dtype=np.int32), "b": np.ones(2)})
        ...     with SafetensorsReader(path) as reader:
        ...         reader.names, reader.load("a").tolist(), reader.shape_dtype("b")
        (['a', 'b'], [0, 1, 2], ((2,), dtype('float64')))
    """

    def __init__(self, path: PathLike) -> None:
        self.path = path
        self._map: mmap.mmap | None = None
        self._start = 0
        self._infos: dict[str, _TensorInfo] = {}

    def __enter__(self) -> SafetensorsReader:
        with open(self.path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        try:
            header, self._start = _parse_header(self.path, self._map, size)
            infos = _tensor_infos(self.path, header, size - self._start)
            _check_metadata(self.path, header.get(_METADATA_KEY, {}))
        except BaseException:
            self.__exit__()
            raise
        self._infos = {info.name: info for info in infos}
        return self

    @property
    def names(self) -> list[str]:
        """The tensor names, in the header's order (as :func:`read_safetensors` returns them)."""
        return list(self._infos)

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def shape_dtype(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
        """The shape and in-memory dtype of tensor ``name``, read from the header."""
        info = self._infos[name]
        return info.shape, _MEMORY_DTYPES[info.code]

    def load(self, name: str) -> np.ndarray:
        """A fresh native-order copy of tensor ``name``.

        Read with ``readinto`` rather than through the map: pages of a map count in
        the process's resident size until unmapped, so reading a whole model through
        one would grow it with the model, not the largest tensor.
        """
        info = self._infos[name]
        disk = _DISK_DTYPES[info.code]
        if info.code == "BOOL" or disk != _MEMORY_DTYPES[info.code]:
            return _load_tensor(self.path, self._map, self._start, info)
        out = np.empty(info.shape, _MEMORY_DTYPES[info.code])
        with open(self.path, "rb") as handle:
            handle.seek(self._start + info.begin)
            if handle.readinto(out.reshape(-1).view(np.uint8).data) != out.nbytes:
                raise _fail(self.path, "the file ends inside this tensor", name)
        return out

    def __exit__(self, *exc_info: Any) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None


def nest_names(path: PathLike, flat: dict[str, Any]) -> dict[str, Any]:
    """``{"a.b": x}`` as ``{"a": {"b": x}}``, as :func:`read_safetensors` nests names.

    Raises:
        FileFormatError: a name is both a tensor and a prefix of another, naming ``path``.

    Example:
        >>> nest_names("m.safetensors", {"a.b": 1, "a.c": 2, "d": 3})
        {'a': {'b': 1, 'c': 2}, 'd': 3}
    """
    return _nest(path, flat)


def safetensors_index(path: PathLike) -> dict[str, list[str]]:
    """The shards of a sharded safetensors checkpoint: ``{shard file: [tensor names]}``.

    ``path`` is a Hugging Face ``*.safetensors.index.json``; its ``weight_map`` maps
    each tensor name to its shard file, relative to the index's directory. Shards
    come in the order they first appear in the map, and names in map order.

    Raises:
        FileFormatError: the index is not JSON or has no ``weight_map`` of strings.

    Example:
        >>> import json, os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "model.safetensors.index.json")
        >>> with open(path, "w") as f:
        ...     json.dump({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}, f)
        >>> [(os.path.basename(k), v) for k, v in safetensors_index(path).items()]
        [('s1.safetensors', ['a']), ('s2.safetensors', ['b'])]
    """
    try:
        with open(path, encoding="utf-8") as handle:
            index = json.load(handle)
    except (ValueError, UnicodeDecodeError) as error:
        raise _fail(path, f"is not a safetensors index ({error})") from error
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise _fail(path, "is not a safetensors index: no weight_map of names to shard files")
    directory = os.path.dirname(os.fspath(path))
    shards: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        if os.path.isabs(shard) or ".." in shard.replace("\\", "/").split("/"):
            raise _fail(path, f"shard file {shard!r} is outside the index's directory", name)
        shards.setdefault(os.path.join(directory, shard), []).append(name)
    return shards


def read_safetensors_index(path: PathLike) -> dict[str, Any]:
    """Reads a sharded safetensors checkpoint (its ``.index.json``) into nested dicts.

    Tensors are nested by name as :func:`read_safetensors` nests them, in the index's
    ``weight_map`` order. Every shard must hold the tensors the index gives it.

    Example:
        >>> import json, os, tempfile
        >>> import numpy as np
        >>> tmp = tempfile.mkdtemp()
        >>> write_safetensors(os.path.join(tmp, "s1.safetensors"), {"a": np.zeros(2)})
        >>> index = os.path.join(tmp, "model.safetensors.index.json")
        >>> with open(index, "w") as f:
        ...     json.dump({"weight_map": {"a": "s1.safetensors"}}, f)
        >>> read_safetensors_index(index)["a"].tolist()
        [0.0, 0.0]
    """
    flat: dict[str, np.ndarray] = {}
    for shard, names in safetensors_index(path).items():
        with SafetensorsReader(shard) as reader:
            for name in names:
                if name not in reader:
                    raise _fail(shard, "is listed in the index but not in its shard", name)
                flat[name] = reader.load(name)
    return _nest(path, flat)


def read_safetensors_metadata(path: PathLike) -> dict[str, str]:
    """Reads the ``__metadata__`` string map of a ``.safetensors`` file (``{}`` if none).

    The whole header is validated as in :func:`read_safetensors`, but no tensor data
    is copied.

    Args:
        path: the file to read.

    Returns:
        The metadata map.

    Raises:
        FileFormatError: the file is truncated or its header is invalid.

    Example:
        >>> import os, tempfile
        >>> import numpy as np
        >>> from jaxcompress.io.interop import read_safetensors_metadata, write_safetensors
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = os.path.join(tmp, "model.safetensors")
        ...     write_safetensors(path, {"w": np.zeros(2)}, metadata={"format": "np"})
        ...     read_safetensors_metadata(path)
        {'format': 'np'}
    """
    metadata, _ = _open_safetensors(path, load=False)
    return dict(metadata)


def write_safetensors(path: PathLike, tree: Any, *, metadata: dict[str, str] | None = None) -> None:
    """Writes a pytree of arrays as a ``.safetensors`` file, atomically.

    Nested dict keys (and sequence indices, dataclass field names) are joined with
    ``"."`` into tensor names. ``nnx.State`` and ``nnx.Variable`` wrappers are
    stripped, and compressed leaves are materialized with
    :func:`jaxcompress.materialize` one at a time as they are written, so
    only one dense tensor is in host memory at once. Tensors are stored in sorted
    name order, back to back, after a header padded with spaces to a multiple of 8.

    The file is written under a temporary name in the same directory and renamed
    over ``path`` only when complete: on any error the temporary file is removed and
    an existing file at ``path`` is left as it was.

    Args:
        path: the file to write.
        tree: nested dicts (or any pytree) of arrays, scalars or compressed leaves of
            a supported dtype: float64/32/16, bfloat16, float8_e4m3fn, float8_e5m2,
            (u)int8/16/32/64 and bool.
        metadata: an optional string-to-string map stored as ``__metadata__``.

    Raises:
        TypeError: a leaf has an unsupported dtype or is not an array, or
            ``metadata`` is not a string-to-string map.
        ValueError: two leaves get the same name, or a leaf is named
            ``"__metadata__"``.

    Example:
        >>> import os, tempfile
        >>> import jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> from jaxcompress.io.interop import read_safetensors, write_safetensors
        >>> pruned, _ = jc.prune(0.5)({"w": jnp.array([[1.0, -3.0], [2.0, 0.5]])})
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = os.path.join(tmp, "pruned.safetensors")
        ...     write_safetensors(path, pruned)
        ...     read_safetensors(path)["w"].tolist()
        [[0.0, -3.0], [2.0, 0.0]]
    """
    if metadata is not None and not (
        isinstance(metadata, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise TypeError(f"metadata must map strings to strings, got {metadata!r}")
    entries = sorted(_dense_entries(tree, safetensors=True), key=lambda e: e.name)
    header: dict[str, Any] = {}
    if metadata is not None:
        header[_METADATA_KEY] = dict(metadata)
    offset = 0
    for entry, following in zip(entries, entries[1:] + [None], strict=True):
        if entry.name == _METADATA_KEY:
            raise ValueError(f"a tensor cannot be named {_METADATA_KEY!r}")
        if following is not None and following.name == entry.name:
            raise ValueError(f"two leaves are both named {entry.name!r}")
        size = math.prod(entry.shape) * entry.dtype.itemsize
        header[entry.name] = {
            "dtype": _safetensors_code(entry.name, entry.dtype),
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)

    def write(handle: BinaryIO) -> None:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for entry in entries:
            array = entry.dense()
            disk = _DISK_DTYPES[_safetensors_code(entry.name, array.dtype)]
            raw = np.ascontiguousarray(array.astype(disk, copy=False)).reshape(-1)
            handle.write(raw.view(np.uint8).data)

    _atomic_write(path, write)


# --------------------------------------------------------------------------- msgpack


def _msgpack_leaves(path: PathLike, node: Any, where: str) -> Any:
    if isinstance(node, dict):
        result = {}
        for key, value in node.items():
            if isinstance(key, int) and not isinstance(key, bool):
                key = str(key)
            if not isinstance(key, str):
                raise _fail(path, f"{where or 'top level'}: key {key!r} is not a string")
            result[key] = _msgpack_leaves(path, value, f"{where}.{key}" if where else key)
        return result
    if isinstance(node, (list, tuple)):
        return [_msgpack_leaves(path, v, f"{where}.{i}") for i, v in enumerate(node)]
    if isinstance(node, np.ndarray):
        return np.array(node)  # own, writable memory instead of a view of the file bytes
    if isinstance(node, (np.generic, bool, int, float, complex)):
        array = np.asarray(node)
        if array.dtype == object:
            raise _fail(path, f"{where}: number {node!r} does not fit a numpy dtype")
        return array
    if node is None or isinstance(node, (str, bytes)):
        return node
    raise _fail(path, f"{where}: unexpected msgpack value of type {type(node).__name__}")


def read_msgpack(path: PathLike) -> dict[str, Any]:
    """Reads a flax msgpack checkpoint into nested dicts of numpy arrays.

    Reads files written by ``flax.serialization.to_bytes`` /
    ``flax.serialization.msgpack_serialize`` of a parameter dict (or by
    :func:`export_dense`). Arrays come back as writable numpy arrays (bfloat16 as
    ``ml_dtypes.bfloat16``), numeric scalars as 0-d arrays.

    Args:
        path: the file to read.

    Returns:
        The nested dict, keyed by strings.

    Raises:
        FileFormatError: the file is not msgpack, has trailing bytes, does not hold a
            dict at the top level, or holds values flax never writes.

    Example:
        >>> import os, tempfile
        >>> import numpy as np
        >>> from flax import serialization
        >>> from jaxcompress.io.interop import read_msgpack
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = os.path.join(tmp, "params.msgpack")
        ...     with open(path, "wb") as f:
        ...         _ = f.write(serialization.to_bytes({"dense": {"bias": np.ones(2)}}))
        ...     read_msgpack(path)["dense"]["bias"].tolist()
        [1.0, 1.0]
    """
    with open(path, "rb") as handle:
        data = handle.read()
    from flax import serialization  # loads on first use, not with `import jaxcompress`

    try:
        restored = serialization.msgpack_restore(data)
    except MemoryError:
        raise
    except Exception as error:  # msgpack and flax's decoders raise many kinds
        raise _fail(
            path, f"is not a flax msgpack checkpoint ({type(error).__name__}: {error})"
        ) from error
    if not isinstance(restored, dict):
        raise _fail(
            path,
            f"is not a flax msgpack checkpoint: it holds a {type(restored).__name__}, not a dict",
        )
    return _msgpack_leaves(path, restored, "")


# --------------------------------------------------------------------------- export


def _nested_dense(entries: list[_Entry]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for entry in entries:
        node = nested
        for i, part in enumerate(entry.parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"{'.'.join(entry.parts[: i + 1])!r} is both a leaf and a prefix")
        last = entry.parts[-1] if entry.parts else ""
        if last in node:
            raise ValueError(f"two leaves are both named {entry.name!r}")
        node[last] = entry.dense()
    return nested


def export_dense(path: PathLike, tree: Any, *, format: str | None = None) -> None:
    """Writes a (possibly compressed) pytree as a dense checkpoint other tools can load.

    Every compressed leaf is materialized (:func:`jaxcompress.materialize`)
    and ``nnx.State`` / ``nnx.Variable`` wrappers are stripped to plain dicts and
    arrays. The result is written atomically (see :func:`write_safetensors`) as
    safetensors (names joined with ``"."``) or as a flax msgpack checkpoint (nested
    dicts with string keys, readable with ``flax.serialization.msgpack_restore`` or
    :func:`read_msgpack`).

    Args:
        path: the file to write.
        tree: the parameter pytree: a linen ``params`` dict, an ``nnx.State``, ...
        format: ``"safetensors"`` or ``"msgpack"``; ``None`` infers it from the suffix
            of ``path`` (``.safetensors`` or ``.msgpack``).

    Raises:
        ValueError: the format is unknown or cannot be inferred.
        TypeError: a leaf has an unsupported dtype (see :func:`write_safetensors`).

    Example:
        >>> import os, tempfile
        >>> import jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> from jaxcompress.io.interop import export_dense, read_msgpack
        >>> params = {"dense": {"kernel": jnp.array([[0.1, 0.9], [0.8, 0.2]])}}
        >>> clustered, _ = jc.cluster(k=2)(params)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = os.path.join(tmp, "dense.msgpack")
        ...     export_dense(path, clustered)
        ...     kernel = read_msgpack(path)["dense"]["kernel"]
        >>> bool((kernel == jc.materialize(clustered)["dense"]["kernel"]).all())
        True
    """
    accepted = sorted(set(_FORMATS.values()))
    if format is None:
        suffix = os.path.splitext(os.fspath(path))[1].lower()
        if suffix not in _FORMATS:
            raise ValueError(
                f"cannot infer the format of {os.fspath(path)!r} from its suffix; name it "
                f"{' or '.join(repr(s) for s in _FORMATS)} or pass format= one of {accepted}"
            )
        format = _FORMATS[suffix]
    if format not in accepted:
        raise ValueError(f"unknown format {format!r}; accepted formats are {accepted}")
    if format == "safetensors":
        write_safetensors(path, tree)
        return
    entries = _dense_entries(tree, safetensors=False)

    def write(handle: BinaryIO) -> None:
        from flax import serialization  # loads on first use, not with `import jaxcompress`

        handle.write(serialization.msgpack_serialize(_nested_dense(entries)))

    _atomic_write(path, write)
