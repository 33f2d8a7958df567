"""Sharded arrays stored block by block: nothing is gathered to write or to read them.

An array that is split over devices (``not x.is_fully_replicated``) is stored as a
*blocks* node: one block per distinct shard index, written from the device that
holds it, so saving never assembles the whole array on one host::

    {"type": "blocks", "dtype": "uint8", "shape": [512, 128],
     "blocks": [{"index": [[0, 128], [0, 64]], "part": 0, "buffer": 7, "coding": "rans"},
                {"index": [[0, 128], [64, 128]], "part": 1, "slot": 0}, ...]}

With several processes (``jax.distributed``) each process writes the blocks its own
devices hold into its own *part* file, ``<path>.part<p>``; process 0 writes the
main file, which holds the tree and its own blocks (part 0). A part file is a
container like the main file whose header lists its blocks by slot. A block is
stored raw or, for byte streams (bit-packed codes and masks) where it is smaller,
rANS-coded as bytes: for independent symbols a byte's entropy is the sum of its
symbols', so this loses nothing against per-symbol coding.

Reading gives a :class:`BlockSource`, which decodes only the blocks a requested
slice touches: ``jax.make_array_from_callback`` with it reads each device's shard
straight from the file(s) that hold it.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxcompress.io import ans, container
from jaxcompress.io.errors import FileFormatError

PART_FORMAT = "jaxcompress-part"
# rANS must beat the raw bytes by this much to be kept: decoding costs time.
_RANS_MIN_GAIN = 0.98

AddBuffer = Callable[[Any], int]
GetBuffer = Callable[[Any, str], memoryview]


def part_path(path: str | os.PathLike, part: int) -> Path:
    """Where process ``part`` (> 0) writes its blocks of the file at ``path``.

    Example:
        >>> str(part_path("model.jxc", 1))
        'model.jxc.part1'
    """
    return Path(f"{os.fspath(path)}.part{part}")


def is_split(x: Any) -> bool:
    """Whether ``x`` is a concrete ``jax.Array`` whose devices hold different pieces.

    Example:
        >>> import jax.numpy as jnp
        >>> is_split(jnp.ones(4)), is_split(np.ones(4))
        (False, False)
    """
    return (
        isinstance(x, jax.Array)
        and not isinstance(x, jax.core.Tracer)
        and x.size > 0
        and not x.is_fully_replicated
    )


# ---------------------------------------------------------------- writing


@dataclasses.dataclass
class WriteSession:
    """One process's view of a save: which part it writes and the slots handed out.

    Attributes:
        part: this process's part number (its ``jax.process_index()``).
        parts: the number of parts (processes).
        add: appends a buffer to this process's file and returns its index.
        records: this part's block table (slot -> record); unused for part 0,
            whose records sit inline in the main header.
        next_slot: the next slot number of every part.
    """

    part: int
    parts: int
    add: AddBuffer
    records: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    next_slot: list[int] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        self.next_slot = self.next_slot or [0] * self.parts


_SESSION: contextvars.ContextVar[WriteSession | None] = contextvars.ContextVar(
    "jaxcompress_write_session", default=None
)


@contextlib.contextmanager
def _bound(variable: contextvars.ContextVar, value: Any) -> Iterator[Any]:
    token = variable.set(value)
    try:
        yield value
    finally:
        variable.reset(token)


def writing(session: WriteSession) -> contextlib.AbstractContextManager[WriteSession]:
    """Makes ``session`` the one :func:`blocks_node` writes through, inside the block.

    Example:
        >>> with writing(WriteSession(part=0, parts=1, add=lambda data: 0)) as session:
        ...     session.parts
        1
    """
    return _bound(_SESSION, session)


def _box(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    return tuple(
        (s.indices(dim)[0], s.indices(dim)[1]) for s, dim in zip(index, shape, strict=True)
    )


def _encode_block(data: np.ndarray, add: AddBuffer, entropy: bool) -> dict[str, Any]:
    data = np.ascontiguousarray(data)
    if entropy and data.dtype == np.uint8 and data.size:
        symbols = data.reshape(-1)
        if ans.empirical_entropy_bits(symbols, 256) / 8 < _RANS_MIN_GAIN * data.size:
            coded = ans.encode(symbols, 256)
            if len(coded) < _RANS_MIN_GAIN * data.size:
                return {"buffer": add(coded), "coding": "rans"}
    return {"buffer": add(data), "coding": "raw"}


def blocks_node(x: jax.Array, add: AddBuffer, path: str, *, entropy: bool) -> dict[str, Any]:
    """The node of a split array, writing the blocks this process owns.

    A block is owned by the first device (in the sharding's device order) that
    holds its index; its process writes it. Every process computes the same node,
    so slot numbers agree without communication.

    Args:
        x: a split ``jax.Array`` (see :func:`is_split`).
        add: appends a buffer to the file being written (used when no
            :func:`writing` session is active: one process, one file).
        path: the leaf path, for messages.
        entropy: rANS-code byte blocks where that is smaller.

    Example:
        >>> import jax
        >>> from jax.sharding import NamedSharding, PartitionSpec as P
        >>> mesh = jax.make_mesh((len(jax.devices()),), ("x",))
        >>> x = jax.device_put(np.arange(8.0 * len(jax.devices())), NamedSharding(mesh, P("x")))
        >>> buffers = []
        >>> node = blocks_node(x, lambda d: buffers.append(d) or len(buffers) - 1, "w",
        ...                    entropy=False)
        >>> len(node["blocks"]) == len(jax.devices()), node["blocks"][0]["index"]
        (True, [[0, 8]])
    """
    session = _SESSION.get() or WriteSession(part=0, parts=1, add=add)
    shape = tuple(x.shape)
    owners: dict[tuple[tuple[int, int], ...], Any] = {}
    for device, index in x.sharding.devices_indices_map(shape).items():
        owners.setdefault(_box(index, shape), device)
    local = {_box(shard.index, shape): shard for shard in x.addressable_shards}
    blocks = []
    for box, device in owners.items():
        part = device.process_index
        entry: dict[str, Any] = {"index": [list(edge) for edge in box], "part": part}
        if part == session.part:
            shard = local.get(box)
            if shard is None or shard.device != device:
                shard = next(s for s in x.addressable_shards if s.device == device)
            record = _encode_block(np.asarray(shard.data), session.add, entropy)
            if part == 0:
                entry.update(record)
            else:
                session.records.append(record)
        if part != 0:
            entry["slot"] = session.next_slot[part]
            session.next_slot[part] += 1
        blocks.append(entry)
    return {"type": "blocks", "dtype": x.dtype.name, "shape": list(shape), "blocks": blocks}


# ---------------------------------------------------------------- reading


class PartReader:
    """Opens a file's part files on first use and hands out their checked blocks.

    Example:
        >>> reader = PartReader("model.jxc", parts=1, save_id=None)
        >>> reader.parts
        1
    """

    def __init__(self, path: str | os.PathLike, *, parts: int, save_id: Any) -> None:
        self.path, self.parts, self.save_id = Path(path), parts, save_id
        self._opened: dict[int, tuple[dict, memoryview]] = {}

    def _open(self, part: int) -> tuple[dict, memoryview]:
        if part not in self._opened:
            where = part_path(self.path, part)
            if not where.exists():
                raise FileFormatError(
                    f"{self.path}: part file {where.name} is missing (the file was saved by "
                    f"{self.parts} processes; copy every {self.path.name}.part* with it)"
                )
            header, body, _ = container.read_container(where)
            expected = (PART_FORMAT, part, self.parts, self.save_id)
            found = tuple(header.get(k) for k in ("format", "part", "parts", "save_id"))
            if found != expected:
                raise FileFormatError(
                    f"{where}: not part {part} of {self.parts} of this save "
                    f"(format, part, parts, save id = {found})"
                )
            if not isinstance(header.get("blocks"), list):
                raise FileFormatError(f"{where}: part header has no block table")
            self._opened[part] = (header, body)
        return self._opened[part]

    def record(self, part: int, slot: Any, where: str) -> tuple[dict, GetBuffer]:
        """The block record in slot ``slot`` of part ``part``, and its buffer getter."""
        header, body = self._open(part)
        blocks = header["blocks"]
        if type(slot) is not int or not 0 <= slot < len(blocks):
            raise FileFormatError(f"{where}: block slot {slot!r} is not in part {part}")
        file = part_path(self.path, part)

        def get(index: Any, leaf: str) -> memoryview:
            return container.buffer_view(file, header, body, index, where=leaf)

        record = blocks[slot]
        if not isinstance(record, dict):
            raise FileFormatError(f"{file}: block slot {slot} is not a record")
        return record, get


_READER: contextvars.ContextVar[PartReader | None] = contextvars.ContextVar(
    "jaxcompress_part_reader", default=None
)


def reading(reader: PartReader) -> contextlib.AbstractContextManager[PartReader]:
    """Makes ``reader`` the one :func:`read_blocks` resolves other parts through.

    Example:
        >>> with reading(PartReader("m.jxc", parts=1, save_id=None)) as reader:
        ...     reader.parts
        1
    """
    return _bound(_READER, reader)


def _fail(path: str, message: str) -> FileFormatError:
    return FileFormatError(f"{path or 'tree'}: {message}")


def _check_tiling(boxes: list[tuple[tuple[int, int], ...]], shape: tuple[int, ...], path: str):
    """The boxes must form a grid that covers ``shape`` exactly once."""
    edges = []
    for axis, dim in enumerate(shape):
        spans = sorted({box[axis] for box in boxes})
        stops = [0] + [stop for _, stop in spans]
        if any(start != stops[i] or stop <= start for i, (start, stop) in enumerate(spans)) or (
            stops[-1] != dim
        ):
            raise _fail(path, f"blocks do not tile axis {axis} of {dim} entries: {spans}")
        edges.append(len(spans))
    if len(set(boxes)) != len(boxes) or len(boxes) != math.prod(edges):
        raise _fail(path, f"{len(boxes)} blocks do not form the {edges} grid of the array")


class BlockSource:
    """A stored split array, decoded lazily: only the blocks a slice touches are read.

    ``source[index]`` (a tuple of slices, as ``jax.make_array_from_callback`` passes)
    returns that region; ``np.asarray(source)`` assembles the whole array.

    Attributes:
        shape: the array's shape.
        dtype: its dtype.
    """

    def __init__(self, node: dict, get: GetBuffer, path: str, dtype: np.dtype) -> None:
        self.shape, self.dtype, self._path = tuple(node["shape"]), np.dtype(dtype), path
        self._blocks = node["blocks"]
        self._get = get
        self._decoded: dict[int, np.ndarray] = {}
        self._boxes = [tuple(tuple(edge) for edge in b["index"]) for b in self._blocks]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def _block(self, i: int) -> np.ndarray:
        if i not in self._decoded:
            entry, box = self._blocks[i], self._boxes[i]
            where = f"{self._path} block {i}"
            if entry["part"] == 0:
                record, get = entry, self._get
            else:
                reader = _READER.get()
                if reader is None:
                    raise _fail(self._path, f"block {i} is in part {entry['part']}: no reader")
                record, get = reader.record(entry["part"], entry.get("slot"), where)
            self._decoded[i] = _decode_block(record, get, box, self.dtype, where)
        return self._decoded[i]

    def __getitem__(self, index: Any) -> np.ndarray:
        index = index if isinstance(index, tuple) else (index,)
        index = index + (slice(None),) * (self.ndim - len(index))
        want = _box(index, self.shape)
        out = np.empty([stop - start for start, stop in want], self.dtype)
        for i, box in enumerate(self._boxes):
            overlap = [(max(a, c), min(b, d)) for (a, b), (c, d) in zip(box, want, strict=True)]
            if any(start >= stop for start, stop in overlap):
                continue
            pairs = list(zip(overlap, box, want, strict=True))
            source = tuple(slice(s - a, t - a) for (s, t), (a, _), _ in pairs)
            target = tuple(slice(s - c, t - c) for (s, t), _, (c, _) in pairs)
            out[target] = self._block(i)[source]
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = self[tuple(slice(None) for _ in self.shape)]
        return whole if dtype is None else whole.astype(dtype)


def _decode_block(
    record: dict, get: GetBuffer, box: tuple, dtype: np.dtype, where: str
) -> np.ndarray:
    block_shape = tuple(stop - start for start, stop in box)
    nbytes = math.prod(block_shape) * dtype.itemsize
    data = get(record.get("buffer"), where)
    coding = record.get("coding")
    if coding == "rans":
        if dtype != np.uint8:
            raise _fail(where, f"an rANS block must hold uint8, the array is {dtype}")
        return ans.decode(data, nbytes, 256).reshape(block_shape)
    if coding != "raw":
        raise _fail(where, f"unknown block coding {coding!r}")
    if len(data) != nbytes:
        raise _fail(where, f"block buffer has {len(data)} bytes, its {block_shape} needs {nbytes}")
    return np.frombuffer(data, dtype).reshape(block_shape)


def read_blocks(
    node: dict, get: GetBuffer, path: str, *, dtype: np.dtype, shape: tuple[int, ...]
) -> BlockSource:
    """A validated :class:`BlockSource` for a blocks ``node`` of ``shape`` and ``dtype``.

    Raises:
        FileFormatError: a dtype or shape other than expected, a block index outside
            the array, blocks that do not tile it, or a malformed block entry.

    Example:
        >>> node = {"type": "blocks", "dtype": "uint8", "shape": [4],
        ...         "blocks": [{"index": [[0, 2]], "part": 0, "buffer": 0, "coding": "raw"},
        ...                    {"index": [[2, 4]], "part": 0, "buffer": 1, "coding": "raw"}]}
        >>> buffers = [memoryview(b"ab"), memoryview(b"cd")]
        >>> source = read_blocks(node, lambda i, p: buffers[i], "w", dtype=np.dtype("uint8"),
        ...                      shape=(4,))
        >>> bytes(np.asarray(source)), bytes(source[(slice(1, 3),)])
        (b'abcd', b'bc')
    """
    if node.get("dtype") != np.dtype(dtype).name:
        raise _fail(path, f"blocks hold {node.get('dtype')!r}, expected {np.dtype(dtype).name}")
    if node.get("shape") != list(shape):
        raise _fail(path, f"blocks cover shape {node.get('shape')!r}, expected {list(shape)}")
    blocks = node.get("blocks")
    if not isinstance(blocks, list) or not blocks:
        raise _fail(path, "a blocks node needs a non-empty block list")
    reader = _READER.get()
    parts = reader.parts if reader is not None else 1
    boxes = []
    for i, entry in enumerate(blocks):
        index = entry.get("index") if isinstance(entry, dict) else None
        if not (
            isinstance(index, list)
            and len(index) == len(shape)
            and all(
                isinstance(edge, list)
                and len(edge) == 2
                and all(type(v) is int for v in edge)
                and 0 <= edge[0] <= edge[1] <= dim
                for edge, dim in zip(index, shape, strict=True)
            )
        ):
            raise _fail(path, f"block {i} has a malformed index {index!r}")
        part = entry.get("part")
        if type(part) is not int or not 0 <= part < parts:
            raise _fail(path, f"block {i} names part {part!r}; the file has {parts}")
        boxes.append(tuple(tuple(edge) for edge in index))
    _check_tiling(boxes, shape, path)
    return BlockSource(node, get, path, dtype)
