"""``compress_file``: a checkpoint compressed into a ``.jxc`` file one leaf at a time."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxcompress.core.progress import over_leaves
from jaxcompress.core.version import __version__
from jaxcompress.io import container, treecodec
from jaxcompress.io import metadata as file_metadata
from jaxcompress.io.files import FORMAT, FileReport, inspect_file
from jaxcompress.io.resumable import ResumableWriter
from jaxcompress.io.sources import Source, fingerprint_digest, open_source
from jaxcompress.transforms.base import LeafEntry, LeafPass, LeafStream, Transform, flatten_leaves
from jaxcompress.transforms.filters import describe


def _stages(tx: Transform) -> tuple[Transform, ...]:
    return getattr(tx, "stages", ()) or (tx,)


def _where(stage: Transform) -> str | None:
    where = getattr(stage, "where", None)
    return None if where is None else describe(where)


def _jsonable(value: Any) -> Any:
    """Leaf stats as JSON values (for the journal): arrays of one value become numbers."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    array = np.asarray(value)
    if array.size == 1:
        return array.item()
    return array.tolist()


def _markers_in_order(node: Any) -> Iterator[int]:
    """The leaf markers of an encoded skeleton, in the order ``save`` writes leaves."""
    if isinstance(node, dict):
        if node.get("type") == "scalar":
            yield node["value"]
            return
        for value in node.values():
            yield from _markers_in_order(value)
    elif isinstance(node, list):
        for value in node:
            yield from _markers_in_order(value)


def _filled(node: Any, done: dict[int, tuple[Any, Any]]) -> Any:
    """The encoded skeleton with each marker replaced by its leaf's node."""
    if isinstance(node, dict):
        if node.get("type") == "scalar":
            return done[node["value"]][0]
        return {key: _filled(value, done) for key, value in node.items()}
    if isinstance(node, list):
        return [_filled(value, done) for value in node]
    return node


def _discard(data: Any) -> int:
    return -1


def _passes(tx: Transform, source: Source, entries: list[LeafEntry], data: Any) -> list[LeafPass]:
    stages = _stages(tx)
    passes = []
    for position, stage in enumerate(stages):
        leafwise = getattr(stage, "leafwise", None)
        if leafwise is None:
            raise ValueError(
                f"compress_file: {getattr(stage, 'name', stage)!r} cannot run leaf by leaf; "
                "use the factories (prune, quantize, cluster, ...) and chain"
            )
        if position == 0:

            def stream() -> Iterator[LeafEntry]:
                for entry in entries:
                    yield entry._replace(leaf=_peek(source, entry.leaf))

            leaf_pass = leafwise(LeafStream(stream, len(entries)), data)
        else:
            leaf_pass = leafwise(None, data)
        if leaf_pass is None:
            raise ValueError(
                f"compress_file: {stage.name!r} needs every leaf at once (a global criterion "
                "after the first stage of a chain, or progress=True on the transform); put "
                "the global stage first or drop progress="
            )
        passes.append(leaf_pass)
    return passes


def _peek(source: Source, marker: int) -> Any:
    """A leaf loaded for a planning pass (in-memory sources keep it for the writing pass)."""
    return source.load(marker, keep=True)


def compress_file(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    tx: Transform,
    *,
    data: Any = None,
    progress: bool = True,
    entropy: bool = True,
    resume: bool = True,
    metadata: dict[str, Any] | None = None,
    on_leaf: Callable[[str, Any, Any], None] | None = None,
) -> FileReport:
    """Compresses the checkpoint at ``src`` into the ``.jxc`` file ``dst``, leaf by leaf.

    Each leaf is read, run through every stage of ``tx`` and written before the next
    is read, so memory holds the runtime, about one leaf and its compressed form (for
    safetensors and ``.jxc`` inputs; msgpack and orbax checkpoints are read whole,
    see :mod:`jaxcompress.io.sources`). The file is the one
    ``save(dst, tx(read_checkpoint(src), data=data)[0])`` writes, byte for byte.

    A global criterion (``prune(..., scope="global")`` as the first stage) is planned
    first, from passes over the leaves that load them one at a time. Output goes to
    ``.<dst name>.compressing`` with a journal beside it; an interrupted run is resumed
    by calling again with the same arguments: finished leaves are checked against
    their CRC-32s and kept, the rest redone. ``dst`` appears only when complete.

    Args:
        src: a safetensors file or sharded ``*.safetensors.index.json``, a flax
            ``.msgpack`` checkpoint, an orbax checkpoint directory or a ``.jxc`` file.
        dst: the ``.jxc`` file to write.
        tx: a transform built from the factories, or a :func:`~jaxcompress.chain` of
            them. Only the first stage may need a global plan.
        data: calibration statistics for data-aware methods, as for ``tx(params, data=)``.
        progress: show a bar on stderr (leaves and bytes done).
        entropy: entropy-code code streams and masks where smaller, as in ``save``.
        resume: pick up a matching interrupted run (``False`` starts over). A run
            matches when the input files (path, size, modification time), each
            stage's name and filter, ``entropy``, whether ``data`` is given and the
            library version are the same; pass ``False`` after changing anything
            else (a callable filter's body, ``data``'s values).
        metadata: a dict stored in the header, as in ``save``.
        on_leaf: called as ``on_leaf(path, original, compressed)`` for each leaf this
            call compresses (not those kept from an interrupted run), while both are
            in memory: a summary needs no second pass over the files.

    Returns:
        The :class:`~jaxcompress.io.files.FileReport` of ``dst``.

    Raises:
        ValueError: a stage cannot run leaf by leaf, or a leaf is refused (the error
            names it; leaves finished before it are kept for a resumed run).
        FileFormatError: ``src`` is not a supported checkpoint.

    Example:
        >>> import os, tempfile
        >>> import numpy as np
        >>> import jaxcompress as jc
        >>> tmp = tempfile.mkdtemp()
        >>> src, dst = os.path.join(tmp, "m.safetensors"), os.path.join(tmp, "m.jxc")
        >>> w = np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32)
        >>> jc.export_dense(src, {"dense": {"kernel": w, "bias": np.zeros(64, np.float32)}})
        >>> report = jc.compress_file(src, dst, jc.quantize(4), progress=False)
        >>> jc.load(dst)["dense"]["kernel"]
        Quantized(shape=(64, 64), dtype=float32, bits=4, axis=1, group_size=None)
    """
    stored_metadata = file_metadata.checked(metadata)
    with open_source(src) as source:
        entries, treedef = flatten_leaves(source.skeleton)
        # A transform's output is rebuilt by jax (dicts in sorted key order): so is this.
        skeleton = jax.tree_util.tree_unflatten(treedef, [entry.leaf for entry in entries])
        by_marker = {entry.leaf: entry for entry in entries}
        skeleton_node = treecodec.encode_node(skeleton, _discard, entropy=entropy)
        order = list(_markers_in_order(skeleton_node))
        job = {
            "source": fingerprint_digest(source.fingerprint),
            # The name shows a factory's options but not its filter: both, or a run
            # with another where= would resume from leaves compressed under the old one.
            "transform": [[stage.name, _where(stage)] for stage in _stages(tx)],
            "entropy": entropy,
            "data": data is not None,
            "library": __version__,
        }
        with ResumableWriter(dst, job, resume=resume) as writer:
            todo = [marker for marker in order if marker not in writer.done]
            passes = _passes(tx, source, [by_marker[m] for m in sorted(by_marker)], data)
            taken = [0] * len(passes)
            for stage_stats in (record[1] for record in writer.done.values()):
                for position, finished in enumerate(stage_stats):
                    taken[position] += finished is not None
            sizes = [_size(source.shapes[m]) for m in todo]
            name = getattr(tx, "name", "compress_file")
            for marker in over_leaves(todo, sizes=sizes, description=name, enabled=progress):
                entry = by_marker[marker]
                leaf = source.load(marker)
                # Kept through the stages only for on_leaf: else it goes after the first.
                original = leaf if on_leaf is not None else None
                stats: list[Any] = []
                for position, leaf_pass in enumerate(passes):
                    current = entry._replace(leaf=leaf)
                    leaf_stats = None
                    if leaf_pass.select(current):
                        leaf, leaf_stats = leaf_pass.step(current)
                        taken[position] += 1
                    stats.append(_jsonable(leaf_stats))
                if on_leaf is not None:
                    on_leaf(entry.path, original, leaf)
                del original  # before encoding, as without on_leaf
                node = treecodec.encode_node(leaf, writer.add, entry.path, entropy=entropy)
                del leaf
                writer.finish_leaf(marker, node, stats)
            paths = [entry.path for entry in entries]
            for leaf_pass, count in zip(passes, taken, strict=True):
                if count == 0 and leaf_pass.nothing_selected is not None:
                    leaf_pass.nothing_selected(paths)
            header = {
                "format": FORMAT,
                "version": container.VERSION,
                "library": __version__,
                "tree": _filled(skeleton_node, writer.done),
                "metadata": stored_metadata,
                "buffers": writer.buffers,
            }
            writer.commit(header)
    return inspect_file(Path(dst))


def _size(shape_dtype: Any) -> int:
    if shape_dtype is None:
        return 0
    shape, dtype = shape_dtype
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
