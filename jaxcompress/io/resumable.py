"""A ``.jxc`` file written leaf by leaf that survives being interrupted.

The buffers go to ``.<name>.compressing`` next to the target, and after each leaf a
line goes to its journal, ``.<name>.compressing.journal``: the leaf's marker, its
header node, its buffers' records (offset, length, CRC-32) and its stats. Both are
flushed after every leaf, so a killed process loses at most the leaf in flight. A
later run with the same job (same input files, transform name and options) reads
the journal, checks every finished leaf's buffers against their CRC-32s in the
partial file, keeps the longest run of leaves that check out, truncates the rest and
carries on from there. :meth:`ResumableWriter.commit` writes the header, flushes to
disk and renames the file into place, so the final name only ever holds a whole
file; the journal is removed after.
"""

from __future__ import annotations

import json
import os
import stat
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from jaxcompress.io import atomic, container

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

_CHUNK = 1 << 24  # bytes read at a time when verifying a buffer


def partial_paths(target: Path) -> tuple[Path, Path]:
    """``(partial file, journal)`` of a compression writing ``target``.

    Example:
        >>> [p.name for p in partial_paths(Path("out/m.jxc"))]
        ['.m.jxc.compressing', '.m.jxc.compressing.journal']
    """
    partial = target.with_name(f".{target.name}.compressing")
    return partial, partial.with_name(partial.name + ".journal")


def _crc_of(handle: Any, offset: int, length: int) -> int:
    crc = 0
    handle.seek(container.PREAMBLE_BYTES + offset)
    while length:
        block = handle.read(min(length, _CHUNK))
        if not block:
            return -1  # the partial file ends early
        crc = zlib.crc32(block, crc)
        length -= len(block)
    return crc


class ResumableWriter:
    """Streams leaves' buffers into a partial file with a journal; see the module doc.

    Attributes:
        done: ``{marker: (node, stats)}`` of the leaves finished by an earlier run
            and verified, in the order they were written.
        buffers: the buffer table so far.

    Example:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "m.jxc"
        >>> with ResumableWriter(target, {"job": 1}) as writer:
        ...     index = writer.add(b"abc")
        ...     writer.finish_leaf(0, {"buffer": index}, {})
        >>> with ResumableWriter(target, {"job": 1}) as writer:  # a second run resumes
        ...     list(writer.done), len(writer.buffers)
        ...     writer.commit({"tree": writer.done[0][0], "buffers": writer.buffers})
        ([0], 1)
        >>> container.read_container(target)[0]["tree"]
        {'buffer': 0}
    """

    def __init__(self, target: str | os.PathLike, job: dict[str, Any], *, resume: bool = True):
        self.path = Path(target)
        self.job = job
        self.resume = resume
        self.done: dict[int, tuple[Any, Any]] = {}
        self.buffers: list[dict[str, int]] = []
        self._offset = 0
        self._file: Any = None
        self._journal: Any = None
        self._target = self.path
        self._mode: int | None = None
        self._end = 0  # buffers up to here belong to finished leaves

    def __enter__(self) -> ResumableWriter:
        self._target, existing = atomic.resolve_target(self.path)
        self._mode = None if existing is None else stat.S_IMODE(existing.st_mode)
        partial, journal = partial_paths(self._target)
        records = self._read_journal(journal) if self.resume else []
        fd = os.open(partial, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        self._file = os.fdopen(fd, "r+b")
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self._file.close()
                raise FileExistsError(
                    f"{self.path}: another process is writing it ({partial.name} is locked)"
                ) from None
        kept = self._verified(records)
        self._end = len(self.buffers)
        end = container.PREAMBLE_BYTES + self._offset
        self._file.seek(0)
        self._file.write(container.MAGIC + struct.pack("<II", container.VERSION, 0))
        self._file.truncate(end)
        self._file.seek(end)
        self._journal = open(journal, "w", encoding="utf-8")  # rewritten: only what was kept
        self._write_line({"job": self.job})
        for record in kept:
            self._write_line(record)
        return self

    def _read_journal(self, journal: Path) -> list[dict[str, Any]]:
        try:
            lines = journal.read_text(encoding="utf-8").splitlines()
        except (FileNotFoundError, UnicodeDecodeError):
            return []
        records = []
        for number, line in enumerate(lines):
            try:
                record = json.loads(line)
            except ValueError:
                break  # a line torn by the interruption, and everything after it
            if number == 0:
                if record != {"job": self.job}:
                    return []  # another job's leftovers: start over
                continue
            records.append(record)
        return records

    def _verified(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The longest prefix of journal records whose buffers check out."""
        kept = []
        for record in records:
            buffers = record.get("buffers")
            first = record.get("first")
            if not isinstance(buffers, list) or first != len(self.buffers):
                break
            if any(
                buffer.get("offset") != self._offset + sum(b["length"] for b in buffers[:i])
                or _crc_of(self._file, buffer["offset"], buffer["length"]) != buffer["crc32"]
                for i, buffer in enumerate(buffers)
            ):
                break
            self.buffers.extend(buffers)
            self._offset += sum(buffer["length"] for buffer in buffers)
            self.done[record["marker"]] = (record["node"], record["stats"])
            kept.append(record)
        return kept

    def _write_line(self, record: dict[str, Any]) -> None:
        self._journal.write(json.dumps(record, separators=(",", ":"), allow_nan=True) + "\n")
        self._journal.flush()

    def add(self, data: bytes | bytearray | memoryview | np.ndarray) -> int:
        """Appends one buffer and returns its index in :attr:`buffers`."""
        self._offset = container.append_buffer(self._file, self.buffers, self._offset, data)
        return len(self.buffers) - 1

    def finish_leaf(self, marker: int, node: Any, stats: Any, *, first: int | None = None) -> None:
        """Records that leaf ``marker`` is written: its node, stats and buffers since ``first``.

        ``first`` is the index of its first buffer (by default, the buffers added since
        the previous leaf).
        """
        start = self._end if first is None else first
        self._file.flush()  # the buffers reach the file before the journal names them
        self._write_line(
            {
                "marker": marker,
                "node": node,
                "stats": stats,
                "first": start,
                "buffers": self.buffers[start:],
            }
        )
        self._end = len(self.buffers)
        self.done[marker] = (node, stats)

    def commit(self, header: dict[str, Any]) -> None:
        """Writes the header and trailer, flushes to disk and renames into place."""
        self._file.write(container.header_and_trailer(header))
        self._file.flush()
        os.fsync(self._file.fileno())
        if self._mode is not None:
            os.chmod(self._file.fileno(), self._mode)
        partial, journal = partial_paths(self._target)
        os.replace(partial, self._target)
        self._journal.close()
        journal.unlink(missing_ok=True)

    def __exit__(self, *exc_info: Any) -> None:
        # On an error the partial file and journal stay, for the next run to resume.
        for handle in (self._file, self._journal):
            if handle is not None and not handle.closed:
                handle.close()
