"""Checked command-line values: integer ranges and output paths, errors naming the flag.

argparse puts ``argument --epochs:`` in front of an :class:`argparse.ArgumentTypeError`
raised by a ``type=`` function, so these only say what was wrong with the value.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path


def int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse ``type=`` that reads an integer from ``low`` to ``high`` (inclusive).

    Args:
        low: the smallest value accepted.
        high: the largest, or ``None`` for no bound.

    Example:
        >>> epochs = int_in(0)
        >>> epochs("3")
        3
        >>> epochs("-1")
        Traceback (most recent call last):
        ...
        argparse.ArgumentTypeError: expected an integer >= 0, got '-1'
    """
    wanted = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
        return value

    parse.__name__ = wanted  # argparse's fallback message names the type
    return parse


def fraction_below_one(text: str) -> float:
    """An argparse ``type=`` for a fraction in ``[0, 1)``, such as a sparsity.

    Example:
        >>> fraction_below_one("0.9")
        0.9
        >>> fraction_below_one("nan")
        Traceback (most recent call last):
        ...
        argparse.ArgumentTypeError: expected a number in [0, 1), got 'nan'
    """
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


def check_output_path(path: str | os.PathLike, *, flag: str) -> Path:
    """Checks that a file can be written at ``path`` before any work is done.

    The folder must exist and be writable, and ``path`` must not be a folder or
    anything other than a regular file (a device, a socket).

    Args:
        path: where the command will write.
        flag: the option that gave it, named in the error.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: naming ``flag`` and what is wrong.

    Example:
        >>> import tempfile
        >>> folder = tempfile.mkdtemp()
        >>> check_output_path(folder, flag="-o")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: -o ...: is a directory; give a file name inside it
    """
    path = Path(path)
    if str(path) == "" or path.name in ("", ".", ".."):
        raise ValueError(f"{flag} {str(path)!r}: not a file name")
    if path.is_dir():
        raise ValueError(f"{flag} {str(path)!r}: is a directory; give a file name inside it")
    if path.exists() and not path.is_file():
        raise ValueError(f"{flag} {str(path)!r}: exists and is not a regular file")
    folder = path.parent
    if not folder.is_dir():
        raise ValueError(f"{flag} {str(path)!r}: the folder {str(folder)!r} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {str(path)!r}: the folder {str(folder)!r} is not writable")
    return path
