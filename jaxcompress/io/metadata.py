"""The ``metadata=`` of a saved file: checked at save time so it reads back as saved.

JSON holds ``None``, ``bool``, ``int``, finite ``float``, ``str``, lists and dicts
with string keys. Anything else would either fail deep inside ``json`` or come back
changed (an ``int`` key as a string, NaN as invalid JSON), so :func:`checked`
refuses it, naming the key path. Two conversions are exact and therefore made:
numpy ``bool_``, integer and floating scalars become the equal Python number, and
tuples become lists (they read back as lists).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from jaxcompress.io.errors import FileFormatError


def _where(path: str) -> str:
    return f"metadata{path}"


def _value(value: Any, path: str) -> Any:
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (float, np.floating)):
        number = float(value)
        if not math.isfinite(number):
            raise ValueError(f"{_where(path)} is {number}; JSON metadata holds only finite numbers")
        if type(value)(number) != value:  # a longdouble beyond float64
            raise ValueError(f"{_where(path)} = {value!r} is not exactly a float64")
        return number
    if isinstance(value, (list, tuple)):
        return [_value(item, f"{path}[{index}]") for index, item in enumerate(value)]
    if isinstance(value, dict):
        return _mapping(value, path)
    raise ValueError(
        f"{_where(path)} is a {type(value).__name__}; metadata holds only None, bool, int, "
        "finite float, str, lists and dicts with str keys (and numpy scalars of those)"
    )


def _mapping(mapping: dict, path: str) -> dict[str, Any]:
    result = {}
    for key, item in mapping.items():
        if not isinstance(key, str):
            raise ValueError(f"{_where(path)}: key {key!r} is not a str (JSON would make it one)")
        result[str(key)] = _value(item, f"{path}[{key!r}]")
    return result


def checked(metadata: Any) -> dict[str, Any]:
    """The metadata as it will be stored and read back, or a ``ValueError`` naming the key.

    Example:
        >>> import numpy as np
        >>> checked({"step": np.int64(3), "lr": np.float32(0.5), "shape": (2, 3)})
        {'step': 3, 'lr': 0.5, 'shape': [2, 3]}
        >>> checked({"loss": {"best": float("nan")}})
        Traceback (most recent call last):
        ...
        ValueError: metadata['loss']['best'] is nan; JSON metadata holds only finite numbers
    """
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise ValueError(f"metadata must be a dict, got a {type(metadata).__name__}")
    return _mapping(metadata, "")


def read(header: dict[str, Any], path: Any) -> dict[str, Any]:
    """The metadata of a file's header, a :class:`FileFormatError` if it is not a JSON object.

    Example:
        >>> read({"metadata": {"note": "hi"}}, "m.jxc")
        {'note': 'hi'}
    """
    value = header.get("metadata", {})
    if not isinstance(value, dict):
        raise FileFormatError(f"{path}: header metadata is not a JSON object")
    return value
