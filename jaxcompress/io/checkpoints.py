"""Reading a parameter pytree from whichever checkpoint format a path holds."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from jaxcompress.io.container import MAGIC
from jaxcompress.io.errors import FileFormatError
from jaxcompress.io.files import load
from jaxcompress.io.interop import read_msgpack, read_safetensors, read_safetensors_index

EXPECTED = (
    "a jaxcompress file (.jxc), a safetensors file (.safetensors) or sharded index "
    "(.safetensors.index.json), a flax msgpack checkpoint (.msgpack) or an orbax "
    "checkpoint directory"
)


def read_orbax(path: str | os.PathLike) -> Any:
    """The whole tree of the orbax checkpoint directory at ``path``.

    Raises:
        FileFormatError: the directory is not a readable orbax checkpoint.

    Example:
        >>> import tempfile
        >>> read_orbax(tempfile.mkdtemp())  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        jaxcompress.io.errors.FileFormatError: ...not a readable orbax checkpoint...
    """
    import orbax.checkpoint as ocp

    path = Path(path)
    try:
        return ocp.StandardCheckpointer().restore(path.resolve())
    except Exception as error:  # orbax raises many types for a foreign directory
        raise FileFormatError(f"{path}: not a readable orbax checkpoint ({error})") from None


def read_checkpoint(path: str | os.PathLike) -> Any:
    """The parameter pytree stored at ``path``, whatever its format.

    The format is recognized by content first (the jaxcompress magic number, an
    orbax directory), then by suffix.

    Raises:
        FileFormatError: the path holds none of the supported formats; the message
            says what was expected.
        FileNotFoundError: nothing is at ``path``.

    Example:
        >>> import os, tempfile
        >>> import jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> path = os.path.join(tempfile.mkdtemp(), "p.safetensors")
        >>> jc.export_dense(path, {"dense": {"kernel": jnp.ones((2, 3))}})
        >>> read_checkpoint(path)["dense"]["kernel"].shape
        (2, 3)
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_dir():
        return read_orbax(path)
    with open(path, "rb") as handle:
        head = handle.read(len(MAGIC))
    if head == MAGIC or path.suffix == ".jxc":
        return load(path)
    if path.name.endswith(".safetensors.index.json"):
        return read_safetensors_index(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    if path.suffix == ".msgpack":
        return read_msgpack(path)
    raise FileFormatError(f"{path}: not a checkpoint; expected {EXPECTED}")
