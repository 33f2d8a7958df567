"""The byte layout of a jaxcompress file: magic, buffers, JSON header, trailer.

::

    offset 0   magic  b"\\x89JXC\\r\\n\\x1a\\n"  (8 bytes; the 0x89 and CR-LF catch text-mode
               copies, like PNG's)
    offset 8   format version, u32 little-endian; 4 reserved zero bytes
    offset 16  the buffers, back to back, no padding
    ...        the header: UTF-8 JSON (tree structure, leaf kinds, shapes, dtypes, and
               each buffer's offset, length and CRC-32), zlib-compressed because its
               repetitive keys would otherwise rival a small model's weights
    end - 20   trailer: header length (u64), header CRC-32 (u32), b"JXCEND\\0\\0"

The header sits at the end so :class:`ContainerWriter` streams buffers to disk as
they are encoded, holding one leaf at a time. Writes go to a temporary file in the
target directory that is renamed over the target only when complete, so a crash
leaves the old file intact (:mod:`jaxcompress.io.atomic`: symlinks are written
through, anything but a regular file is refused, permissions are kept).
"""

from __future__ import annotations

import json
import mmap
import os
import stat
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from jaxcompress.io import atomic
from jaxcompress.io.errors import FileFormatError

MAGIC = b"\x89JXC\r\n\x1a\n"
TRAILER_MAGIC = b"JXCEND\x00\x00"
VERSION = 1
PREAMBLE_BYTES = 16
TRAILER_BYTES = 20
FIXED_BYTES = PREAMBLE_BYTES + TRAILER_BYTES
MAX_HEADER_BYTES = 1 << 28  # a header's JSON text, inflated


def append_buffer(
    file: Any,
    buffers: list[dict[str, int]],
    offset: int,
    data: bytes | bytearray | memoryview | np.ndarray,
) -> int:
    """Writes ``data`` at ``offset`` of ``file``, records it in ``buffers``; the next offset.

    Example:
        >>> import io
        >>> buffers = []
        >>> append_buffer(io.BytesIO(), buffers, 8, b"abc"), buffers[0]["length"]
        (11, 3)
    """
    if isinstance(data, np.ndarray):
        # A uint8 view: memoryview can't export ml_dtypes (bfloat16, float8).
        data = np.ascontiguousarray(data).reshape(-1).view(np.uint8).data
    view = memoryview(data).cast("B")
    file.write(view)
    buffers.append({"offset": offset, "length": len(view), "crc32": zlib.crc32(view)})
    return offset + len(view)


class ContainerWriter:
    """Streams buffers into a temporary file; :meth:`commit` renames it into place.

    Use as a context manager: leaving the block with an exception removes the
    temporary file and leaves any existing file at ``path`` untouched.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "x.jxc")
        >>> with ContainerWriter(path) as writer:
        ...     record = writer.add(b"abc")
        ...     writer.commit({"tree": None, "buffers": writer.buffers})
        >>> record, read_container(path)[0]["buffers"]
        (0, [{'offset': 0, 'length': 3, 'crc32': 891568578}])
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.buffers: list[dict[str, int]] = []
        self._offset = 0
        self._file: Any = None
        self._temp: Path | None = None
        self._target = self.path
        self._sigterm: atomic.SigtermCleanup | None = None

    def __enter__(self) -> ContainerWriter:
        # Checks and sweeping come first, so a refused path leaves nothing behind.
        self._target, existing = atomic.resolve_target(self.path)
        atomic.sweep_stale(self._target)
        mode = None if existing is None else stat.S_IMODE(existing.st_mode)
        handle, self._temp = atomic.create_partial(self._target, mode)
        self._file = os.fdopen(handle, "wb")
        self._sigterm = atomic.SigtermCleanup()  # from here on __exit__ restores the handler
        self._file.write(MAGIC + struct.pack("<II", VERSION, 0))
        return self

    def add(self, data: bytes | bytearray | memoryview | np.ndarray) -> int:
        """Appends one buffer and returns its index in ``buffers``."""
        self._offset = append_buffer(self._file, self.buffers, self._offset, data)
        return len(self.buffers) - 1

    def commit(self, header: dict[str, Any]) -> None:
        """Writes the header and trailer, flushes to disk and renames into place."""
        self._file.write(header_and_trailer(header))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        assert self._temp is not None  # set with self._file, which the writes above needed
        # The resolved target: a symlink at ``path`` stays a link to the new file.
        os.replace(self._temp, self._target)
        self._temp = None

    def __exit__(self, exc_type: Any, *exc_info: Any) -> None:
        if self._sigterm is not None:
            self._sigterm.begin_cleanup()
        try:
            if self._file is not None and not self._file.closed:
                self._file.close()
            if self._temp is not None:
                self._temp.unlink(missing_ok=True)
        finally:
            if self._sigterm is not None:
                terminated = exc_type is not None and issubclass(exc_type, atomic.Terminated)
                self._sigterm.finish(terminated=terminated)


def header_and_trailer(header: dict[str, Any]) -> bytes:
    """The bytes that end a file: the compressed JSON header, then the trailer.

    Example:
        >>> header_and_trailer({"buffers": []})[-8:]
        b'JXCEND\\x00\\x00'
    """
    text = zlib.compress(json.dumps(header, separators=(",", ":"), allow_nan=False).encode(), 9)
    return text + struct.pack("<QI", len(text), zlib.crc32(text)) + TRAILER_MAGIC


def _fail(path: Path, message: str) -> FileFormatError:
    return FileFormatError(f"{path}: {message}")


def read_container(path: str | os.PathLike) -> tuple[dict[str, Any], memoryview, int]:
    """Validates the frame of a file and returns ``(header, body, header_bytes)``.

    ``body`` is a read-only memory map of the buffer region, so buffers are read
    only when touched. ``header_bytes`` counts the JSON header plus the fixed 36
    bytes of magic, version and trailer. Buffer checksums are checked by
    :func:`buffer_view`.

    Raises:
        FileFormatError: wrong magic or version, truncated file, corrupt header, or a
            buffer table that points outside the body.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "x.jxc")
        >>> with ContainerWriter(path) as writer:
        ...     writer.commit({"buffers": writer.buffers})
        >>> header, body, header_bytes = read_container(path)
        >>> len(body), header_bytes
        (0, 58)
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        preamble = handle.read(PREAMBLE_BYTES)
        if preamble[:8] != MAGIC:
            raise _fail(path, "not a jaxcompress file (wrong magic number)")
        if size < FIXED_BYTES:
            raise _fail(path, f"truncated: {size} bytes, a valid file has at least {FIXED_BYTES}")
        (version,) = struct.unpack("<I", preamble[8:12])
        if version != VERSION:
            raise _fail(
                path, f"format version {version} is not supported (this library reads {VERSION})"
            )
        handle.seek(size - TRAILER_BYTES)
        trailer = handle.read(TRAILER_BYTES)
        if trailer[12:] != TRAILER_MAGIC:
            raise _fail(path, "truncated or damaged: the trailer is missing")
        header_length, header_crc = struct.unpack("<QI", trailer[:12])
        body_length = size - FIXED_BYTES - header_length
        if body_length < 0:
            raise _fail(path, f"header length {header_length} points outside the file")
        handle.seek(PREAMBLE_BYTES + body_length)
        text = handle.read(header_length)
        if zlib.crc32(text) != header_crc:
            raise _fail(path, "header checksum mismatch: the file is damaged")
        try:
            header = json.loads(_inflate(text).decode())
        except (UnicodeDecodeError, ValueError, zlib.error) as error:
            raise _fail(path, f"header is not valid JSON ({error})") from None
        if not isinstance(header, dict):
            raise _fail(path, "header is not a JSON object")
        if body_length:
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            body = memoryview(mapped)[PREAMBLE_BYTES : PREAMBLE_BYTES + body_length]
        else:
            body = memoryview(b"")
    _check_buffer_table(path, header.get("buffers"), body_length)
    return header, body, header_length + FIXED_BYTES


def _inflate(data: bytes) -> bytes:
    """zlib-decompresses a header, refusing one that inflates past ``MAX_HEADER_BYTES``."""
    inflater = zlib.decompressobj()
    text = inflater.decompress(data, MAX_HEADER_BYTES)
    if inflater.unconsumed_tail:
        raise ValueError(f"header inflates past {MAX_HEADER_BYTES} bytes")
    if not inflater.eof:
        raise ValueError("header is truncated")
    return text


def _check_buffer_table(path: Path, buffers: Any, body_length: int) -> None:
    if not isinstance(buffers, list):
        raise _fail(path, "header has no buffer table")
    for index, record in enumerate(buffers):
        fields = ("offset", "length", "crc32")
        if not isinstance(record, dict) or any(
            type(record.get(name)) is not int or record[name] < 0 for name in fields
        ):
            raise _fail(path, f"buffer {index}: malformed record {record!r}")
        if record["offset"] + record["length"] > body_length:
            raise _fail(
                path,
                f"buffer {index} ({record['offset']}+{record['length']} bytes) points outside "
                f"the {body_length}-byte body: the file is truncated or damaged",
            )


def buffer_view(
    path: str | os.PathLike, header: dict[str, Any], body: memoryview, index: Any, *, where: str
) -> memoryview:
    """The bytes of buffer ``index``, after checking its CRC-32.

    Args:
        path: the file, for messages.
        header: the header from :func:`read_container`.
        body: the body from :func:`read_container`.
        index: the buffer index as read from the header (validated here).
        where: the leaf path, for messages.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "x.jxc")
        >>> with ContainerWriter(path) as writer:
        ...     _ = writer.add(b"hello")
        ...     writer.commit({"buffers": writer.buffers})
        >>> header, body, _ = read_container(path)
        >>> bytes(buffer_view(path, header, body, 0, where="greeting"))
        b'hello'
    """
    buffers = header["buffers"]
    if type(index) is not int or not 0 <= index < len(buffers):
        raise _fail(Path(path), f"{where}: buffer index {index!r} is not in the buffer table")
    record = buffers[index]
    view = body[record["offset"] : record["offset"] + record["length"]]
    if zlib.crc32(view) != record["crc32"]:
        raise _fail(
            Path(path), f"{where}: checksum mismatch in buffer {index}: the file is damaged"
        )
    return view
