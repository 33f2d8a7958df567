"""What a recipe's ``[model]`` table names: the user's model function and input batches."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def import_apply(spec: str, *, folders: tuple[Path, ...] = ()) -> Callable[..., Any]:
    """The function ``"module:function"`` names, with ``folders`` searched first for the module.

    ``folders`` are put in front of ``sys.path`` while the module is imported (a user's
    ``model.py`` beside the recipe, or in the current directory), then taken out again.
    A module imported before is reused, as Python's ``import`` does.

    Args:
        spec: ``"module:function"``; the function part may be dotted (``"mod:Net.apply"``).
        folders: folders to search before ``sys.path``.

    Raises:
        ValueError: the module or the attribute is missing, or the result is not callable.
            Errors raised by the module itself while importing propagate as they are.

    Example:
        >>> import_apply("math:sqrt")(16.0)
        4.0
        >>> import_apply("math:root")
        Traceback (most recent call last):
        ...
        ValueError: 'math:root': the module math has no attribute 'root'
    """
    module_name, _, attribute = spec.partition(":")
    added = [str(folder.resolve()) for folder in folders]
    sys.path[:0] = added
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name is None or not module_name.startswith(error.name):
            raise  # the module exists, and something it imports does not
        searched = ", ".join(added) or "sys.path"
        raise ValueError(
            f"{spec!r}: no module named {error.name!r} (searched {searched})"
        ) from None
    finally:
        for folder in added:
            sys.path.remove(folder)
    found: Any = module
    for part in attribute.split("."):
        if not hasattr(found, part):
            raise ValueError(f"{spec!r}: the module {module_name} has no attribute {attribute!r}")
        found = getattr(found, part)
    if not callable(found):
        raise ValueError(f"{spec!r} is a {type(found).__name__}, not a function apply(params, x)")
    return found


def load_inputs(path: Path) -> Any:
    """The arrays in an ``.npy`` file, or an ``.npz`` one (one array, or a dict of several).

    Raises:
        ValueError: the file is missing or unreadable, holds no arrays, or its arrays
            disagree on their number of rows.

    Example:
        >>> import os, tempfile
        >>> import numpy as np
        >>> path = os.path.join(tempfile.mkdtemp(), "x.npz")
        >>> np.savez(path, tokens=np.zeros((4, 3)), mask=np.ones((4, 3)))
        >>> sorted(load_inputs(path))
        ['mask', 'tokens']
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{str(path)!r}: no such file")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ValueError(f"{str(path)!r}: not a readable .npy/.npz file ({error})") from None
    if isinstance(loaded, np.ndarray):
        arrays = {"": loaded}
    else:
        with loaded:
            arrays = {name: loaded[name] for name in loaded.files}
    if not arrays:
        raise ValueError(f"{str(path)!r}: holds no arrays")
    for name, array in arrays.items():
        if array.ndim < 1 or len(array) == 0:
            raise ValueError(
                f"{str(path)!r}: {name or 'the array'} has shape {array.shape}; inputs need "
                "at least one row along the first axis"
            )
    rows = {name: len(array) for name, array in arrays.items()}
    if len(set(rows.values())) > 1:
        raise ValueError(f"{str(path)!r}: the arrays have different numbers of rows: {rows}")
    return arrays[""] if list(arrays) == [""] else arrays


def batches_of(inputs: Any, batch_size: int) -> list[Any]:
    """``inputs`` (an array or a dict of them) split into batches of ``batch_size`` rows.

    The last batch holds the rows left over, so it may be smaller.

    Example:
        >>> import numpy as np
        >>> [b.shape for b in batches_of(np.zeros((70, 3)), 32)]
        [(32, 3), (32, 3), (6, 3)]
    """
    if isinstance(inputs, dict):
        rows = len(next(iter(inputs.values())))
        return [
            {name: array[start : start + batch_size] for name, array in inputs.items()}
            for start in range(0, rows, batch_size)
        ]
    return [inputs[start : start + batch_size] for start in range(0, len(inputs), batch_size)]
