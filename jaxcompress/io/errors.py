"""The one error every reader in :mod:`jaxcompress.io` raises for a bad file."""

from __future__ import annotations


class FileFormatError(ValueError):
    """A file is not a valid jaxcompress (or interop) file: truncated, tampered or foreign.

    It subclasses ``ValueError`` so callers can catch either. The message names the
    file, the leaf or buffer involved, and what was expected.

    Example:
        >>> from jaxcompress.io.errors import FileFormatError
        >>> issubclass(FileFormatError, ValueError)
        True
    """
