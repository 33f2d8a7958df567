"""``save``, ``load`` and ``inspect_file``: one compact, self-describing, checked file."""

from __future__ import annotations

import dataclasses
import io
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, Sharding

from jaxcompress.arrays import is_compressed
from jaxcompress.arrays.lowrank import factor_shardings
from jaxcompress.core.mesh import spec_for
from jaxcompress.core.paths import path_to_str
from jaxcompress.core.version import __version__
from jaxcompress.io import container, shards, templates, treecodec
from jaxcompress.io import metadata as file_metadata
from jaxcompress.io.errors import FileFormatError
from jaxcompress.runtime.report import human_bytes

if TYPE_CHECKING:
    from rich.progress import Progress
    from rich.table import Table

FORMAT = "jaxcompress"


def _progress(enabled: bool, total: int, description: str) -> Progress:
    # rich loads on first use, not with `import jaxcompress`.
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("leaves"),
        TimeElapsedColumn(),
        disable=not enabled,
        transient=True,
    )
    progress.add_task(description, total=total)
    return progress


def save(
    path: str | os.PathLike,
    tree: Any,
    *,
    entropy: bool = True,
    metadata: dict[str, Any] | None = None,
    progress: bool = False,
) -> FileReport:
    """Writes a pytree (compressed or not) to one compact file, atomically.

    Codes and indices are stored bit-packed, masks as a packed bitmap or relative
    indices, whichever is smaller per leaf; with ``entropy=True`` each code stream
    and mask is rANS-coded where that is smaller, so the file comes within about
    1 % of the streams' empirical entropy. The file is written to a temporary name
    and renamed into place, so an interrupted save leaves any old file intact. No
    pickle: the header is JSON and the body raw buffers, each with a CRC-32.

    An array split over devices (a leaf or a compressed leaf's child) is written
    shard by shard, never gathered: each distinct shard once, from the device that
    holds it. Under ``jax.distributed`` every process must call ``save`` with the
    same tree: process 0 writes ``path`` and process ``p`` writes the blocks its
    devices hold to ``path.part<p>``; keep those files together.

    Args:
        path: the file to write (``.jxc`` by convention).
        tree: a pytree of arrays and compressed leaves: dicts, ``FrozenDict``,
            ``nnx.State`` (with ``nnx.Param``/``BatchStat`` variables), lists,
            tuples, ``None`` and Python scalars.
        entropy: entropy-code code streams and masks where that is smaller.
        metadata: a dict stored in the header and read back by
            ``load(path, metadata=True)`` and ``inspect_file(path).metadata``. It may
            hold ``None``, ``bool``, ``int``, finite ``float``, ``str``, lists and
            dicts with ``str`` keys; numpy bool, integer and floating scalars are
            stored as the equal Python number and tuples as lists. Anything else
            (NaN, Inf, arrays, other objects, non-``str`` keys) is refused before
            anything is written.
        progress: show a progress bar over the leaves.

    Returns:
        The :class:`FileReport` of the written file.

    The temporary file is created next to the file the path resolves to: a symlink
    is written through (it stays a link, to the new file). Anything at the path that
    is not a regular file (a directory, a device, a FIFO) is refused. An existing
    file's permission bits are kept; a new file gets the usual mode (``0o666`` less
    the umask). A ``SIGTERM`` during the save removes the temporary file, and a later
    save to the same path removes temporary files left by killed processes.

    Raises:
        TypeError: a node or dtype the format can't store, naming its path.
        ValueError: ``metadata`` holds a value JSON cannot hold exactly, naming its key.
        FileExistsError: the path is not a regular file (or a symlink to one).

    Example:
        >>> import os, tempfile
        >>> import jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> params = {"w": jnp.linspace(-1.0, 1.0, 4096).reshape(64, 64), "b": jnp.zeros(64)}
        >>> compressed, _ = jc.chain(jc.prune(0.9), jc.cluster(bits=4))(params)
        >>> path = os.path.join(tempfile.mkdtemp(), "model.jxc")
        >>> report = jc.save(path, compressed)
        >>> report.file_bytes == os.path.getsize(path)
        True
        >>> report.file_bytes - report.header_bytes < jc.nbytes(compressed)  # gaps + rANS
        True
        >>> restored = jc.load(path)
        >>> bool((jc.materialize(restored)["w"] == jc.materialize(compressed)["w"]).all())
        True
    """
    stored_metadata = file_metadata.checked(metadata)  # refused before any file exists
    leaves = jax.tree_util.tree_leaves(tree, is_leaf=is_compressed)
    parts, part = jax.process_count(), jax.process_index()
    save_id = _save_id() if parts > 1 else None
    target = Path(path) if part == 0 else shards.part_path(path, part)
    with (
        container.ContainerWriter(target) as writer,
        _progress(progress and part == 0, len(leaves), f"saving {Path(path).name}") as bar,
        shards.writing(shards.WriteSession(part=part, parts=parts, add=writer.add)) as session,
    ):
        task = bar.task_ids[0]
        # Only process 0 writes the tree; the others write just their own blocks.
        root = treecodec.encode_node(
            tree,
            writer.add if part == 0 else _discard,
            entropy=entropy,
            on_leaf=lambda _: bar.advance(task),
        )
        if part == 0:
            header = {
                "format": FORMAT,
                "version": container.VERSION,
                "library": __version__,
                "tree": root,
                "metadata": stored_metadata,
                "buffers": writer.buffers,
            }
            if parts > 1:
                header.update(parts=parts, save_id=save_id)
        else:
            header = {
                "format": shards.PART_FORMAT,
                "part": part,
                "parts": parts,
                "save_id": save_id,
                "blocks": session.records,
                "buffers": writer.buffers,
            }
            writer.commit(header)
        _sync_processes("jaxcompress.save: parts written")
        if part == 0:
            # The main file appears only once every part is in place.
            writer.commit(header)
    _sync_processes("jaxcompress.save: done")
    return inspect_file(path)


def _discard(data: Any) -> int:
    return -1


def _save_id() -> int:
    """A random number all processes agree on, tying the part files to their main file."""
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.uint32(np.random.randint(2**31))))


def _sync_processes(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# ---------------------------------------------------------------- loading

ShardingSpec = Sharding | Callable[[str, tuple[int, ...]], Sharding | None] | Any


def _sharding_lookup(sharding: ShardingSpec) -> Callable[[str, tuple[int, ...]], Any]:
    if sharding is None or isinstance(sharding, Sharding):
        return lambda path, shape: sharding
    if callable(sharding):
        return sharding
    flat, _ = jax.tree_util.tree_flatten_with_path(
        sharding, is_leaf=lambda x: isinstance(x, Sharding)
    )
    by_path = {path_to_str(key_path): value for key_path, value in flat}

    def lookup(path: str, shape: tuple[int, ...]) -> Any:
        return by_path.get(path)

    return lookup


def _child_sharding(
    dense: Sharding, array: np.ndarray | shards.BlockSource, dense_shape: tuple[int, ...], path: str
):
    if tuple(array.shape) == tuple(dense_shape):
        return dense
    if isinstance(dense, NamedSharding):
        return NamedSharding(dense.mesh, spec_for(array.shape, dense))
    if dense.is_fully_replicated:
        return dense
    raise ValueError(f"{path}: a compressed leaf needs a NamedSharding, got {dense}")


def _placer(sharding: ShardingSpec) -> treecodec.Place:
    lookup = _sharding_lookup(sharding)

    def place(array: np.ndarray | shards.BlockSource, path: str, node: dict) -> jax.Array:
        lowrank = node.get("type") == "lowrank"
        # A LowRank factor comes as ``<leaf>/u`` or ``<leaf>/v``.
        dense_path, _, factor = path.rpartition("/") if lowrank else (path, "", "")
        dense_path = dense_path.removesuffix("/values")
        dense_shape = tuple(node["shape"])
        dense = lookup(dense_path, dense_shape)
        if dense is None:
            return jnp.asarray(np.array(array))
        if lowrank and isinstance(dense, NamedSharding):
            references = factor_shardings(dense, dense_shape, node["fan_in_axes"])
            reference = references[0] if factor == "u" else references[1]
            target = NamedSharding(dense.mesh, spec_for(array.shape, reference))
        else:
            target = _child_sharding(dense, array, dense_shape, path)
        # Each device reads only its slice of the (memory-mapped) buffer.
        return jax.make_array_from_callback(array.shape, target, lambda index: array[index])

    return place


def load(
    path: str | os.PathLike,
    *,
    sharding: ShardingSpec = None,
    progress: bool = False,
    metadata: bool = False,
    like: Any = None,
) -> Any:
    """Reads a file written by :func:`save` back into the same pytree.

    The file is memory-mapped; every buffer's CRC-32 is checked before use, and
    every header field is validated, so a truncated, tampered or foreign file
    raises :class:`~jaxcompress.io.errors.FileFormatError` naming the problem and
    nothing is returned.

    Args:
        path: the file.
        sharding: where arrays go. ``None`` puts them on the default device. A
            ``jax.sharding.Sharding`` is used for every leaf; a pytree of shardings
            laid out like the dense params (for example
            ``jax.tree.map(lambda x: x.sharding, params)``) or a function
            ``(path, dense_shape) -> Sharding | None`` places each leaf by its path.
            A compressed leaf's children are placed by the rules of
            :mod:`jaxcompress.sharding` for its dense sharding; each device gets only
            its slice, read straight from the mapped file for bit-packed buffers and
            for arrays saved shard by shard (only the blocks a device's slice touches
            are decoded, from whichever process's part file holds them).
        progress: show a progress bar over the leaves.
        metadata: also return the ``metadata`` dict given to :func:`save`.
        like: a template of the saved tree's structure: its array leaves (arrays or
            ``jax.ShapeDtypeStruct``, dense where a compressed leaf was saved) are
            replaced by the file's leaves at the same paths, and everything else
            (classes, functions, static fields, Python scalars) is kept from it.
            Required for a tree holding equinox modules, whose code the file does
            not store: pass the model itself, or its shapes from
            ``eqx.filter_eval_shape``.

    Returns:
        The pytree, with ``jax.Array`` leaves and compressed leaves; with
        ``metadata=True``, the pair ``(tree, metadata)``.

    Raises:
        FileFormatError: a damaged or foreign file.
        ValueError: a file holding an equinox module loaded without ``like=``, or a
            ``like=`` whose array paths, shapes or dtypes differ from the file's.

    Example:
        >>> import os, tempfile
        >>> import jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> path = os.path.join(tempfile.mkdtemp(), "q.jxc")
        >>> _ = jc.save(path, jc.quantize(8)({"w": jnp.ones((16, 16))})[0])
        >>> jc.load(path)["w"]
        Quantized(shape=(16, 16), dtype=float32, bits=8, axis=1, group_size=None)
        >>> _ = jc.save(path, {"b": jnp.zeros(2)}, metadata={"step": 100})
        >>> jc.load(path, metadata=True)[1]
        {'step': 100}

        An equinox module comes back through a template, here of shapes only:

        >>> import equinox as eqx, jax
        >>> mlp = eqx.nn.MLP(4, 2, 8, 1, key=jax.random.key(0))
        >>> _ = jc.save(path, jc.quantize(8)(mlp)[0])
        >>> like = eqx.filter_eval_shape(eqx.nn.MLP, 4, 2, 8, 1, key=jax.random.key(1))
        >>> loaded = jc.load(path, like=like)
        >>> loaded.layers[0].weight, loaded.activation is mlp.activation
        (Quantized(shape=(8, 4), dtype=float32, bits=8, axis=0, group_size=None), True)
    """
    header, body, _ = container.read_container(path)
    if header.get("format") != FORMAT:
        raise FileFormatError(f"{path}: header format is {header.get('format')!r}, not {FORMAT!r}")
    saved_metadata = file_metadata.read(header, path)
    root = header.get("tree")
    count = len(treecodec.leaf_nodes(root))
    place = _placer(sharding)
    parts = header.get("parts", 1)
    if type(parts) is not int or parts < 1:
        raise FileFormatError(f"{path}: header parts {parts!r} is not a positive integer")
    reader = shards.PartReader(path, parts=parts, save_id=header.get("save_id"))

    with (
        _progress(progress, count, f"loading {Path(path).name}") as bar,
        shards.reading(reader),
    ):
        task = bar.task_ids[0]

        def get(index: Any, where: str) -> memoryview:
            return container.buffer_view(path, header, body, index, where=where)

        tree = treecodec.decode_node(root, get, place, on_leaf=lambda _: bar.advance(task))
    if like is None:
        templates.refuse_saved_modules(tree, path)
    else:
        tree = templates.fill_template(tree, like, path)
    return (tree, saved_metadata) if metadata else tree


# ---------------------------------------------------------------- inspecting


@dataclasses.dataclass(frozen=True)
class FileLeaf:
    """One leaf of a saved file, as :func:`inspect_file` sees it.

    Attributes:
        path: the leaf path (``a/b/kernel``).
        kind: ``array``, ``sparse``, ``clustered``, ``quantized`` or ``lowrank``
            (``sparse+clustered`` when nested).
        shape: the dense shape.
        dtype: the dense dtype name.
        dense_bytes: bytes of the dense array.
        stored_bytes: bytes of this leaf's buffers in the file.
        entropy_bytes: the bound: empirical entropy of its code streams and masks
            (as stored: bitmap or relative indices) plus its raw float buffers.
        encoding: how each part is stored, for example ``mask=gaps5/rans codes=rans``.
    """

    path: str
    kind: str
    shape: tuple[int, ...]
    dtype: str
    dense_bytes: int
    stored_bytes: int
    entropy_bytes: float
    encoding: str


@dataclasses.dataclass(frozen=True)
class FileReport:
    """What a jaxcompress file holds, leaf by leaf, against its entropy bound.

    Print it for a table, or call :meth:`to_dict` for JSON.

    Attributes:
        path: the file.
        file_bytes: its size on disk.
        header_bytes: the JSON header plus the fixed 36 bytes of magic and trailer.
        leaves: one :class:`FileLeaf` per leaf.
        stream_bytes: bytes of the code streams and masks (entropy-coded or packed).
        stream_entropy_bytes: their empirical entropy, in bytes.
        metadata: the ``metadata`` dict given to :func:`save`.

    Example:
        >>> import os, tempfile
        >>> import jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> path = os.path.join(tempfile.mkdtemp(), "w.jxc")
        >>> report = jc.save(path, {"w": jnp.ones((4, 4))})
        >>> report.file_bytes == report.header_bytes + 64, report.leaves[0].encoding
        (True, 'raw')
    """

    path: str
    file_bytes: int
    header_bytes: int
    leaves: tuple[FileLeaf, ...]
    stream_bytes: int
    stream_entropy_bytes: float
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def dense_bytes(self) -> int:
        """Bytes of the dense pytree the file stands for."""
        return sum(leaf.dense_bytes for leaf in self.leaves)

    @property
    def entropy_bound_bytes(self) -> float:
        """Header plus the leaves' entropy bounds: what an ideal coder would write."""
        return self.header_bytes + sum(leaf.entropy_bytes for leaf in self.leaves)

    @property
    def ratio(self) -> float:
        """Dense bytes over file bytes."""
        return self.dense_bytes / self.file_bytes if self.file_bytes else math.inf

    def to_dict(self) -> dict[str, Any]:
        """The report as plain values for ``json.dumps``."""
        return {
            "path": self.path,
            "file_bytes": self.file_bytes,
            "header_bytes": self.header_bytes,
            "dense_bytes": self.dense_bytes,
            "ratio": self.ratio,
            "entropy_bound_bytes": self.entropy_bound_bytes,
            "stream_bytes": self.stream_bytes,
            "stream_entropy_bytes": self.stream_entropy_bytes,
            "metadata": self.metadata,
            "leaves": [
                {**dataclasses.asdict(leaf), "shape": list(leaf.shape)} for leaf in self.leaves
            ],
        }

    def table(self) -> Table:
        """The report as a ``rich`` table."""
        from rich import box  # rich loads on first use, not with `import jaxcompress`
        from rich.table import Table

        table = Table(title=f"{self.path}", box=box.SIMPLE_HEAD, pad_edge=False)
        longest_path = max((len(leaf.path) for leaf in self.leaves), default=4)
        for column in ("leaf", "shape", "kind", "dense", "stored", "entropy bound", "encoding"):
            right = column in ("dense", "stored", "entropy bound")
            # Paths and encodings may fold; numbers never wrap.
            table.add_column(
                column,
                justify="right" if right else "left",
                no_wrap=column not in ("leaf", "encoding"),
                overflow="fold",
                min_width=min(longest_path, 40) if column == "leaf" else None,
            )
        for leaf in self.leaves:
            table.add_row(
                leaf.path,
                "x".join(map(str, leaf.shape)) or "()",
                leaf.kind,
                human_bytes(leaf.dense_bytes),
                human_bytes(leaf.stored_bytes),
                human_bytes(leaf.entropy_bytes),
                leaf.encoding,
            )
        table.add_section()
        table.add_row("header", "", "", "", human_bytes(self.header_bytes), "", "")
        table.add_row(
            "file",
            "",
            f"{self.ratio:.1f}x",
            human_bytes(self.dense_bytes),
            f"{self.file_bytes:,} B",
            f"{self.entropy_bound_bytes:,.0f} B",
            f"streams {self.stream_bytes / max(self.stream_entropy_bytes, 1):.4f}x entropy",
        )
        return table

    def __rich__(self) -> Table:
        return self.table()

    def __str__(self) -> str:
        from rich.console import Console

        buffer = io.StringIO()
        Console(file=buffer, width=140, color_system=None).print(self.table())
        return buffer.getvalue()


SizeOf = Callable[[dict], int]


def _sizes(path: str | os.PathLike, header: dict) -> SizeOf:
    """Bytes stored for a buffer-holding node: a stream, an array or a blocks node.

    Blocks in other processes' part files are counted from those files' headers.
    """
    lengths = [record["length"] for record in header["buffers"]]
    part_headers = {
        part: container.read_container(shards.part_path(path, part))[0]
        for part in range(1, header.get("parts", 1))
    }

    def block_size(entry: dict) -> int:
        if entry["part"] == 0:
            return lengths[entry["buffer"]]
        part = part_headers[entry["part"]]
        return part["buffers"][part["blocks"][entry["slot"]]["buffer"]]["length"]

    def size_of(record: dict) -> int:
        if record.get("type") == "blocks":
            return sum(block_size(entry) for entry in record["blocks"])
        return lengths[record["buffer"]]

    return size_of


def _label(record: dict) -> str:
    if record.get("type") == "blocks":
        return f"{len(record['blocks'])} blocks"
    label = record.get("encoding", "")
    if label == "gaps":
        label += str(record.get("gap_bits"))
    return f"{label + '/' if label else ''}{record.get('coding')}"


def _leaf_summary(node: dict, size_of: SizeOf) -> tuple[str, int, float, list[str]]:
    """``(kind, stored bytes, entropy bytes, encodings)`` of one leaf node."""
    kind = node["type"]
    stored, bound, parts = 0, 0.0, []
    for name in ("mask", "indices", "codes"):
        record = node.get(name)
        if isinstance(record, dict):
            length = size_of(record)
            stored += length
            bound += record.get("entropy_bits", length * 8) / 8
            parts.append(f"{name}={_label(record)}")
    for name in ("codebook", "scale", "zero_point", "input_scale", "u", "v"):
        child = node.get(name)
        if isinstance(child, dict):
            length = size_of(child)
            stored, bound = stored + length, bound + length
            if name in ("u", "v"):
                parts.append(f"{name}=raw")
    if kind in ("array", "blocks"):
        length = size_of(node)
        stored, bound = stored + length, bound + length
        parts.append("raw" if kind == "array" else _label(node))
        kind = "array"
    values = node.get("values")
    if isinstance(values, dict):
        inner_kind, inner_stored, inner_bound, inner_parts = _leaf_summary(values, size_of)
        stored, bound = stored + inner_stored, bound + inner_bound
        parts += [f"values.{p}" if inner_kind != "array" else "values=raw" for p in inner_parts]
        if inner_kind != "array":
            kind = f"{kind}+{inner_kind}"
    return kind, stored, bound, parts


def _stream_totals(node: dict, size_of: SizeOf) -> tuple[int, float]:
    stored, entropy = 0, 0.0
    for name in ("mask", "indices", "codes"):
        record = node.get(name)
        if isinstance(record, dict):
            length = size_of(record)
            stored += length
            entropy += record.get("entropy_bits", length * 8) / 8
    values = node.get("values")
    if isinstance(values, dict):
        inner = _stream_totals(values, size_of)
        stored, entropy = stored + inner[0], entropy + inner[1]
    return stored, entropy


def _verify_buffers(path: str | os.PathLike, header: dict, body: memoryview) -> None:
    for index in range(len(header["buffers"])):
        container.buffer_view(path, header, body, index, where=f"buffer {index}")


def inspect_file(path: str | os.PathLike, *, verify: bool = False) -> FileReport:
    """Reads a file's header and reports every leaf's size against its entropy bound.

    Buffers are not read, so it is instant on any file size; :func:`load` checks them,
    and so does ``verify=True``.

    Args:
        path: the file.
        verify: also check every buffer's CRC-32 (in part files too), reading the
            whole file, so damage anywhere raises
            :class:`~jaxcompress.io.errors.FileFormatError`.

    Example:
        >>> import os, tempfile
        >>> import jax
        >>> import jaxcompress as jc
        >>> w = jax.random.normal(jax.random.key(0), (256, 256))
        >>> path = os.path.join(tempfile.mkdtemp(), "c.jxc")
        >>> _ = jc.save(path, jc.cluster(bits=4)({"w": w})[0])
        >>> report = jc.inspect_file(path)
        >>> report.leaves[0].kind, report.stream_bytes <= 1.02 * report.stream_entropy_bytes
        ('clustered', True)
    """
    header, body, header_bytes = container.read_container(path)
    if verify:
        _verify_buffers(path, header, body)
        for part in range(1, header.get("parts", 1)):
            part_path = shards.part_path(path, part)
            _verify_buffers(part_path, *container.read_container(part_path)[:2])
    leaves, stream_bytes, stream_entropy = [], 0, 0.0
    try:
        size_of = _sizes(path, header)
        for leaf_path, node in treecodec.leaf_nodes(header.get("tree")):
            kind, stored, bound, parts = _leaf_summary(node, size_of)
            shape = tuple(node["shape"])
            dtype = jnp.dtype(node["dtype"])
            leaves.append(
                FileLeaf(
                    path=leaf_path,
                    kind=kind,
                    shape=shape,
                    dtype=dtype.name,
                    dense_bytes=math.prod(shape) * dtype.itemsize,
                    stored_bytes=stored,
                    entropy_bytes=bound,
                    encoding=" ".join(parts),
                )
            )
            streams_stored, streams_entropy = _stream_totals(node, size_of)
            stream_bytes += streams_stored
            stream_entropy += streams_entropy
    except (KeyError, TypeError, IndexError, ValueError) as error:
        raise FileFormatError(f"{path}: malformed header ({error!r})") from None
    return FileReport(
        path=str(path),
        file_bytes=sum(
            file.stat().st_size
            for file in [Path(path)]
            + [shards.part_path(path, p) for p in range(1, header.get("parts", 1))]
        ),
        header_bytes=header_bytes,
        leaves=tuple(leaves),
        stream_bytes=stream_bytes,
        stream_entropy_bytes=stream_entropy,
        metadata=file_metadata.read(header, path),
    )
