"""Filters: which leaves of a pytree a transform touches.

A filter is one of:

* a regex string, searched (``re.search``) anywhere in the leaf path ``a/b/kernel``:
  ``"dense1"`` also selects ``dense10/kernel``; anchor it (``"^dense1/"``) or use
  :func:`exact` or :func:`glob` to match whole paths;
* a predicate ``(path, leaf) -> bool``, such as :func:`exact` and :func:`glob`;
* a tuple of filters, which selects a leaf when any of them does.

Paths join the pytree keys with ``/``. nnx's trailing ``value`` attribute is
dropped, so a linen ``params`` dict and an ``nnx.State`` of the same model give
the same paths.

A transform whose filter selects no leaf of a non-empty tree warns
(:func:`warn_nothing_selected`), naming the filter and the paths it may have meant.
"""

from __future__ import annotations

import difflib
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from jaxcompress.arrays import is_compressed
from jaxcompress.core.paths import path_to_str as path_to_str

Predicate = Callable[[str, Any], bool]
Filter = str | Predicate | tuple["Filter", ...]


def compile_filter(where: Filter) -> Predicate:
    """Turns any accepted filter form into a ``(path, leaf) -> bool`` predicate.

    A regex string is searched anywhere in the path (``re.search``), not matched
    against the whole of it: ``"dense1"`` selects ``dense1/kernel`` and also
    ``dense10/kernel``.

    Args:
        where: a regex string, a predicate, or a tuple of filters.

    Returns:
        A predicate over ``(path, leaf)``.

    Raises:
        TypeError: if ``where`` is none of the accepted forms.
        ValueError: if a regex string does not compile.

    Example:
        >>> select = compile_filter(("bias", kernels))
        >>> import jax.numpy as jnp
        >>> select("dense/bias", jnp.zeros(3)), select("dense/scale", jnp.zeros(3))
        (True, False)
    """
    if isinstance(where, str):
        try:
            pattern = re.compile(where)
        except re.error as error:
            raise ValueError(
                f"where={where!r} is not a valid regular expression: {error}"
            ) from None
        return lambda path, leaf: pattern.search(path) is not None
    if isinstance(where, tuple):
        parts = [compile_filter(part) for part in where]
        return lambda path, leaf: any(part(path, leaf) for part in parts)
    if callable(where):
        return where
    raise TypeError(
        "where= must be a regex string, a (path, leaf) -> bool predicate or a tuple of them; "
        f"got {type(where).__name__}"
    )


def _is_floating(leaf: Any) -> bool:
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.floating)


def kernels(path: str, leaf: Any) -> bool:
    """Selects floating-point leaves with two or more dimensions (weight matrices, convs).

    Norm scales and other 1-D leaves are left alone, and so is a leaf named ``bias``
    whatever its shape: equinox's conv bias is ``(out, 1, 1)``, a flax
    ``DenseGeneral``'s ``(heads, head_dim)``, and neither is a weight to compress.

    Example:
        >>> import jax.numpy as jnp
        >>> kernels("dense/kernel", jnp.zeros((4, 3))), kernels("dense/bias", jnp.zeros(3))
        (True, False)
        >>> kernels("conv/bias", jnp.zeros((8, 1, 1)))
        False
    """
    if path.rsplit("/", 1)[-1] == "bias":
        return False
    return _is_floating(leaf) and len(getattr(leaf, "shape", ())) >= 2


def floating(path: str, leaf: Any) -> bool:
    """Selects every floating-point leaf with at least one dimension.

    Example:
        >>> import jax.numpy as jnp
        >>> floating("dense/bias", jnp.zeros(3)), floating("step", jnp.zeros((), jnp.int32))
        (True, False)
    """
    return _is_floating(leaf) and len(getattr(leaf, "shape", ())) >= 1


def dense_only(path: str, leaf: Any) -> bool:
    """Selects leaves that are not already compressed.

    Example:
        >>> import jax.numpy as jnp
        >>> dense_only("w", jnp.zeros((2, 2)))
        True
    """
    return not is_compressed(leaf)


def nothing(path: str, leaf: Any) -> bool:
    """Selects no leaf.

    Example:
        >>> import jax.numpy as jnp
        >>> nothing("w", jnp.zeros((2, 2)))
        False
    """
    return False


def everything(path: str, leaf: Any) -> bool:
    """Selects every leaf.

    Example:
        >>> import jax.numpy as jnp
        >>> everything("w", jnp.zeros((2, 2)))
        True
    """
    return True


def not_(where: Filter) -> Predicate:
    """Selects the leaves that ``where`` does not select.

    Example:
        >>> import jax.numpy as jnp
        >>> not_("bias")("dense/bias", jnp.zeros(3)), not_("bias")("dense/kernel", jnp.zeros(3))
        (False, True)
    """
    select = compile_filter(where)
    return lambda path, leaf: not select(path, leaf)


def all_of(*wheres: Filter) -> Predicate:
    """Selects the leaves that every one of ``wheres`` selects.

    Example:
        >>> import jax.numpy as jnp
        >>> all_of(kernels, "dense1")("dense1/kernel", jnp.zeros((4, 3)))
        True
        >>> all_of(kernels, "dense1")("dense2/kernel", jnp.zeros((4, 3)))
        False
    """
    selects = [compile_filter(where) for where in wheres]
    return lambda path, leaf: all(select(path, leaf) for select in selects)


class exact:  # a filter, named and called like the function filters
    """Selects the leaves whose whole path is one of ``paths``.

    Unlike a regex string, nothing else matches: ``exact("dense1/kernel")`` does not
    select ``dense10/kernel`` or ``enc/dense1/kernel``.

    Args:
        *paths: whole leaf paths such as ``"dense1/kernel"``.

    Example:
        >>> import jax.numpy as jnp
        >>> select = exact("dense1/kernel", "dense2/kernel")
        >>> select("dense1/kernel", jnp.zeros(2)), select("dense10/kernel", jnp.zeros(2))
        (True, False)
        >>> select
        exact('dense1/kernel', 'dense2/kernel')
    """

    def __init__(self, *paths: str) -> None:
        for path in paths:
            if not isinstance(path, str):
                raise TypeError(f"exact: paths must be strings, got {path!r}")
        self.paths = paths
        self._set = frozenset(paths)

    def __call__(self, path: str, leaf: Any) -> bool:
        return path in self._set

    def __repr__(self) -> str:
        return f"exact({', '.join(map(repr, self.paths))})"


def _glob_regex(pattern: str) -> str:
    """The regex of one glob pattern: ``*`` and ``?`` stay inside one path segment."""
    parts = []
    index = 0
    while index < len(pattern):
        char = pattern[index]
        end = pattern.find("]", index + 1) if char == "[" else -1
        if pattern.startswith("**/", index):
            parts.append("(?:[^/]*/)*")  # zero or more whole segments
            index += 3
        elif pattern.startswith("**", index):
            parts.append(".*")
            index += 2
        elif end > index + 1:
            body = pattern[index + 1 : end]
            if body.startswith("!") and len(body) > 1:
                parts.append(f"[^/{re.escape(body[1:])}]")
            else:
                parts.append(f"[{re.escape(body)}]")
            index = end + 1
        else:
            parts.append({"*": "[^/]*", "?": "[^/]"}.get(char, re.escape(char)))
            index += 1
    return "".join(parts)


class glob:  # a filter, named and called like the function filters
    """Selects the leaves whose whole path matches one of the shell-style ``patterns``.

    The rules are :mod:`fnmatch`'s, made aware of ``/``: ``*`` matches any run of
    characters within one path segment, ``?`` one character other than ``/``,
    ``[abc]`` / ``[!abc]`` one character of a set (or not of it, never ``/``), and
    ``**`` any number of whole segments (``**/kernel`` is every ``kernel`` at any
    depth). A pattern matches the whole path, and case matters. Ranges such as
    ``[0-9]`` are not supported: ``-`` in a set is a literal.

    Args:
        *patterns: glob patterns such as ``"layers/*/kernel"``.

    Example:
        >>> import jax.numpy as jnp
        >>> select = glob("layers/*/kernel")
        >>> select("layers/0/kernel", jnp.zeros(2)), select("layers/0/attn/kernel", jnp.zeros(2))
        (True, False)
        >>> glob("**/kernel")("layers/0/attn/kernel", jnp.zeros(2))
        True
    """

    def __init__(self, *patterns: str) -> None:
        for pattern in patterns:
            if not isinstance(pattern, str):
                raise TypeError(f"glob: patterns must be strings, got {pattern!r}")
        self.patterns = patterns
        self._regexes = [re.compile(_glob_regex(pattern)) for pattern in patterns]

    def __call__(self, path: str, leaf: Any) -> bool:
        return any(regex.fullmatch(path) is not None for regex in self._regexes)

    def __repr__(self) -> str:
        return f"glob({', '.join(map(repr, self.patterns))})"


def describe(where: Filter) -> str:
    """A short, readable name of a filter for messages.

    Example:
        >>> describe("Dense/Kernel"), describe(kernels), describe(("a", glob("b/*")))
        ("'Dense/Kernel'", 'kernels', "('a', glob('b/*'))")
    """
    if isinstance(where, tuple):
        inner = ", ".join(describe(part) for part in where)
        return f"({inner},)" if len(where) == 1 else f"({inner})"
    if isinstance(where, str | exact | glob):
        return repr(where)
    return getattr(where, "__name__", None) or repr(where)


def _path_texts(where: Filter) -> list[str]:
    """The path-like text inside a filter, to compare with the paths there are."""
    if isinstance(where, str):
        return [where]
    if isinstance(where, exact):
        return list(where.paths)
    if isinstance(where, glob):
        return list(where.patterns)
    if isinstance(where, tuple):
        return [text for part in where for text in _path_texts(part)]
    return []


def _has_regex(where: Filter) -> bool:
    if isinstance(where, tuple):
        return any(_has_regex(part) for part in where)
    return isinstance(where, str)


def close_paths(where: Filter, paths: Sequence[str], *, limit: int = 3) -> list[str]:
    """The paths ``where`` most likely meant, closest first, compared case-insensitively.

    Uses :func:`difflib.get_close_matches` on each path-like string in the filter (a
    regex, an exact path, a glob pattern); a plain predicate has none, so it gets none.

    Example:
        >>> close_paths("Dense/Kernel", ["Dense_0/kernel", "Dense_0/bias", "Dense_1/kernel"])
        ['Dense_0/kernel', 'Dense_1/kernel']
    """
    by_lower: dict[str, str] = {}
    for path in paths:
        by_lower.setdefault(path.lower(), path)
    order = {lower: position for position, lower in enumerate(by_lower)}
    found: list[str] = []
    for text in _path_texts(where):
        query = text.lower()
        matches = difflib.get_close_matches(query, list(by_lower), n=limit)
        # Equally close paths in tree order, not difflib's reverse alphabetical one.
        closeness = {m: difflib.SequenceMatcher(None, query, m).ratio() for m in matches}
        for match in sorted(matches, key=lambda m: (-closeness[m], order[m])):
            if by_lower[match] not in found:
                found.append(by_lower[match])
    return found[:limit]


def nothing_selected_message(name: str, where: Filter, paths: Sequence[str]) -> str:
    """What :func:`warn_nothing_selected` says: the filter, and the paths it may have meant.

    Example:
        >>> print(nothing_selected_message("prune", "Dense/Kernel", ["Dense_0/kernel", "b"]))
        ... # doctest: +NORMALIZE_WHITESPACE
        prune: where='Dense/Kernel' selects none of the 2 leaves, so nothing is done;
        did you mean 'Dense_0/kernel'? (a regex is searched anywhere in the path)
    """
    count = f"{len(paths)} lea{'f' if len(paths) == 1 else 'ves'}"
    message = f"{name}: where={describe(where)} selects none of the {count}, so nothing is done"
    suggestions = close_paths(where, paths)
    if suggestions:
        message += f"; did you mean {', '.join(map(repr, suggestions))}?"
    else:
        shown = ", ".join(map(repr, paths[:4]))
        message += f"; the paths are {shown}{', ...' if len(paths) > 4 else ''}"
    if _has_regex(where):
        message += " (a regex is searched anywhere in the path)"
    return message


class NothingSelectedWarning(UserWarning):
    """A transform's ``where=`` selected no leaf, so it did nothing.

    Turn it into an error with
    ``warnings.filterwarnings("error", category=jc.filters.NothingSelectedWarning)``.

    Example:
        >>> issubclass(NothingSelectedWarning, UserWarning)
        True
    """


_PACKAGE = str(Path(__file__).resolve().parents[1])


def _stacklevel_outside_package() -> int:
    """The ``stacklevel`` at which a warning from our caller points at the user's code."""
    level, frame = 1, sys._getframe(1)
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    return level


def warn_nothing_selected(name: str, where: Filter, paths: Sequence[str]) -> None:
    """Warns that ``where`` selected none of ``paths``, unless that is what it asked for.

    The warning is a :class:`NothingSelectedWarning`, which points at the first
    caller outside jaxcompress.

    There is no warning when the tree has no leaf at all (a :func:`~jaxcompress.masked`
    that hid every leaf has warned already) or when ``where`` is :func:`nothing` or
    ``()``.

    Args:
        name: the transform, which starts the message.
        where: the filter that selected nothing.
        paths: every leaf path it was tried on.

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     warn_nothing_selected("prune", "Dense/Kernel", ["Dense_0/kernel"])
        >>> "did you mean 'Dense_0/kernel'?" in str(caught[0].message)
        True
    """
    if not paths or where is nothing or where == ():
        return
    message = nothing_selected_message(name, where, paths)
    warnings.warn(message, NothingSelectedWarning, stacklevel=_stacklevel_outside_package())
