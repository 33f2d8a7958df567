"""Compression recipes: a TOML list of transforms, turned into one ``chain``.

A recipe is what ``jaxcompress compress --recipe`` reads::

    # Deep Compression's first two stages on the kernels.
    [[transform]]
    kind = "prune"
    sparsity = 0.9
    scope = "global"

    [[transform]]
    kind = "cluster"
    bits = 5
    where = "dense"      # a regex on leaf paths, or a list of them (any matches)

``kind`` names a transform factory (:data:`KINDS`); every other key is one of its
keyword options, with dtypes given by name (``scale_dtype = "bfloat16"``). Errors
name the file and line of the offending key or table.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import jax.numpy as jnp

from jaxcompress.methods.cluster import cluster
from jaxcompress.methods.prune import prune
from jaxcompress.methods.quantize import quantize
from jaxcompress.transforms.base import Transform, chain
from jaxcompress.transforms.filters import Filter, NothingSelectedWarning, describe

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

KINDS: dict[str, Callable[..., Transform]] = {
    "prune": prune,
    "quantize": quantize,
    "cluster": cluster,
}
_DTYPE_OPTIONS = ("scale_dtype", "codebook_dtype")
TABLES = ("transform", "model", "auto", "distill")


class RecipeError(ValueError):
    """A recipe that can't be turned into transforms; the message names the line.

    Example:
        >>> issubclass(RecipeError, ValueError)
        True
    """


class RecipeStep(NamedTuple):
    """One ``[[transform]]`` table of a recipe, built.

    Attributes:
        kind: the transform factory's name (``"prune"``).
        where: the filter it runs with (the factory's default when the table has none).
        at: ``"<source>:<line>"`` of the table's header, for messages.
        transform: the transform.
        key_lines: ``"<source>:<line>"`` of each key of the table.
    """

    kind: str
    where: Filter
    at: str
    transform: Transform
    key_lines: dict[str, str]

    def locate(self, error: Exception) -> str:
        """``"<source>:<line>"`` of the option ``error`` names, else of the table.

        Example:
            >>> step = parse_recipe_steps('[[transform]]\\nkind = "quantize"\\nbits = 3\\n')[0]
            >>> step.locate(ValueError("bits must be 2 to 8")), step.locate(ValueError("no"))
            ('recipe:3', 'recipe:1')
        """
        return locate(error, self.key_lines, self.at)


class TableLines(NamedTuple):
    """Where one table of a recipe is: its name, its header's line and each key's line.

    Attributes:
        name: the table's name (``"transform"``, ``"model"``).
        array: whether it is an array-of-tables entry (``[[transform]]``).
        header: the header's line number.
        keys: each key's line number.
    """

    name: str
    array: bool
    header: int
    keys: dict[str, int]


def table_lines(text: str) -> list[TableLines]:
    """Every table header of a recipe, in order, with the lines of its keys.

    Example:
        >>> [(t.name, t.header, t.keys) for t in table_lines('[model]\\napply = "m:f"\\n')]
        [('model', 1, {'apply': 2})]
    """
    tables: list[TableLines] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if match := re.match(r"\s*\[\[\s*([A-Za-z0-9_\-.]+)\s*\]\]", line):
            tables.append(TableLines(match.group(1), True, number, {}))
        elif match := re.match(r"\s*\[\s*([A-Za-z0-9_\-.]+)\s*\]", line):
            tables.append(TableLines(match.group(1), False, number, {}))
        elif tables and (match := re.match(r"\s*([A-Za-z0-9_\-]+)\s*=", line)):
            tables[-1].keys.setdefault(match.group(1), number)
    return tables


def _table_lines(text: str) -> list[tuple[int, dict[str, int]]]:
    """For each ``[[transform]]`` table: its header line and each key's line."""
    return [(t.header, t.keys) for t in table_lines(text) if t.array and t.name == "transform"]


def locate(error: Exception, key_lines: dict[str, str], default: str) -> str:
    """The ``"<source>:<line>"`` of the first key ``error``'s message names, else ``default``.

    Example:
        >>> locate(ValueError("steps must be positive"), {"steps": "r:3"}, "r:1")
        'r:3'
    """
    text = str(error)
    for key, at in key_lines.items():
        if key != "kind" and re.search(rf"\b{re.escape(key)}\b", text):
            return at
    return default


def where_value(value: Any) -> Any:
    """A recipe's ``where`` value as a filter: a regex string, or a list of them (a tuple).

    Example:
        >>> where_value(["dense1", "dense2"])
        ('dense1', 'dense2')
    """
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise TypeError(f"where must be a regex string or a list of them, got {value!r}")


def _options(kind: str, table: dict[str, Any], at: Callable[[str], str]) -> dict[str, Any]:
    factory = KINDS[kind]
    parameters = inspect.signature(factory).parameters
    options = {}
    for name, value in table.items():
        if name == "kind":
            continue
        if name not in parameters:
            accepted = ", ".join(p for p in parameters)
            raise RecipeError(f"{at(name)}: {kind} has no option {name!r}; it takes {accepted}")
        if name == "where":
            try:
                value = where_value(value)
            except TypeError as error:
                raise RecipeError(f"{at(name)}: {error}") from None
        elif name in _DTYPE_OPTIONS:
            try:
                value = jnp.dtype(value)
            except TypeError:
                raise RecipeError(f"{at(name)}: {value!r} is not a dtype name") from None
        options[name] = value
    return options


def parse_toml(text: str, *, source: str = "recipe") -> dict[str, Any]:
    """A recipe's TOML document, its tables checked by name and shape (not by content).

    A recipe has ``[[transform]]`` tables and optional ``[model]``, ``[auto]`` and
    ``[distill]`` tables (:data:`TABLES`).

    Raises:
        RecipeError: invalid TOML, an unknown table, or a table of the wrong shape.

    Example:
        >>> sorted(parse_toml('[auto]\\nratio = 8\\n'))
        ['auto']
        >>> parse_toml('[[auto]]\\nratio = 8\\n')  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        jaxcompress.cli.recipes.RecipeError: recipe:1: [auto] is one table; write [auto], ...
    """
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise RecipeError(f"{source}: invalid TOML: {error}") from None
    unknown = sorted(set(document) - set(TABLES))
    if unknown:
        raise RecipeError(
            f"{source}: unknown table {unknown[0]!r}; a recipe has [[transform]] tables "
            "and optional [model], [auto] and [distill] tables"
        )
    headers = {t.name: t.header for t in table_lines(text)}
    for name, value in document.items():
        at = f"{source}:{headers.get(name, 0)}"
        if name == "transform" and not isinstance(value, list):
            raise RecipeError(f"{at}: write [[transform]] (one per step), not [transform]")
        if name != "transform" and not isinstance(value, dict):
            raise RecipeError(f"{at}: [{name}] is one table; write [{name}], not [[{name}]]")
    return document


def transform_steps(document: dict[str, Any], text: str, *, source: str) -> list[RecipeStep]:
    """The steps of a parsed recipe's ``[[transform]]`` tables, in order (maybe none).

    Args:
        document: from :func:`parse_toml`.
        text: the TOML text it came from (for line numbers).
        source: the file name used in error messages.

    Example:
        >>> text = '[[transform]]\\nkind = "prune"\\nsparsity = 0.5\\n'
        >>> [step.kind for step in transform_steps(parse_toml(text), text, source="r")]
        ['prune']
    """
    tables = document.get("transform", [])
    lines = _table_lines(text)
    steps = []
    for index, table in enumerate(tables):
        header, keys = lines[index] if index < len(lines) else (0, {})

        def at(key: str | None = None, header=header, keys=keys) -> str:
            return f"{source}:{keys.get(key, header) if key else header}"

        if not isinstance(table, dict):
            raise RecipeError(f"{at()}: a [[transform]] entry must be a table, got {table!r}")
        kind = table.get("kind")
        if kind not in KINDS:
            raise RecipeError(
                f"{at('kind')}: unknown transform kind {kind!r}; choose one of {', '.join(KINDS)}"
            )
        options = _options(kind, table, at)
        where = options.get("where", inspect.signature(KINDS[kind]).parameters["where"].default)
        step = RecipeStep(kind, where, at(), chain(), {key: at(key) for key in keys})
        try:
            transform = KINDS[kind](**options)
        except (TypeError, ValueError) as error:
            raise RecipeError(f"{step.locate(error)}: {kind}: {error}") from None
        steps.append(step._replace(transform=transform))
    return steps


def parse_recipe_steps(text: str, *, source: str = "recipe") -> list[RecipeStep]:
    """Turns recipe TOML text into its steps, one per ``[[transform]]`` table, in order.

    The ``[model]``, ``[auto]`` and ``[distill]`` tables are only checked by name here;
    :func:`jaxcompress.cli.hybrid_recipe.read_recipe` reads them.

    Args:
        text: the TOML text.
        source: the file name used in error messages.

    Raises:
        RecipeError: as :func:`parse_recipe`; no ``[[transform]]`` table (and no
            ``[auto]``, which chooses the transform itself).

    Example:
        >>> steps = parse_recipe_steps('[[transform]]\\nkind = "cluster"\\nbits = 3\\n')
        >>> [(step.kind, step.where.__name__, step.at) for step in steps]
        [('cluster', 'kernels', 'recipe:1')]
    """
    document = parse_toml(text, source=source)
    if not document.get("transform") and "auto" not in document:
        raise RecipeError(f"{source}: no [[transform]] tables")
    return transform_steps(document, text, source=source)


def parse_recipe(text: str, *, source: str = "recipe") -> Transform:
    """Turns recipe TOML text into one transform (a ``chain`` of its tables).

    Args:
        text: the TOML text.
        source: the file name used in error messages.

    Raises:
        RecipeError: invalid TOML, an unknown transform or option, or an option value
            the transform rejects, naming the line.

    Example:
        >>> import jax.numpy as jnp
        >>> tx = parse_recipe('''
        ... [[transform]]
        ... kind = "prune"
        ... sparsity = 0.5
        ... ''')
        >>> tx({"w": jnp.array([[1.0, -2.0], [0.5, 3.0]])})[0]["w"].nnz
        2
        >>> parse_recipe('[[transform]]\\nkind = "prune"\\nsparsity = 0.5\\nbitz = 3\\n')
        ... # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        jaxcompress.cli.recipes.RecipeError: recipe:4: prune has no option 'bitz'; it takes ...
    """
    document = parse_toml(text, source=source)
    hybrid = [name for name in TABLES[1:] if name in document]
    if hybrid:
        raise RecipeError(
            f"{source}: [{hybrid[0]}] needs the model and data: run it with `jaxcompress "
            "compress`, or call jaxcompress.auto / jaxcompress.distill in Python"
        )
    transforms = [step.transform for step in parse_recipe_steps(text, source=source)]
    return transforms[0] if len(transforms) == 1 else chain(*transforms)


def read_recipe_steps(path: str | Path) -> list[RecipeStep]:
    """Reads a recipe file's steps (see :func:`parse_recipe_steps`).

    Example:
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "r.toml")
        >>> _ = open(path, "w").write('[[transform]]\\nkind = "quantize"\\nbits = 4\\n')
        >>> [step.at for step in read_recipe_steps(path)]
        ['r.toml:1']
    """
    path = Path(path)
    return parse_recipe_steps(path.read_text(), source=path.name)


@contextlib.contextmanager
def step_errors(steps: list[RecipeStep], *, allow_empty: bool) -> Iterator[None]:
    """Runs the block with the steps' errors turned into :class:`RecipeError` naming the line.

    A step whose filter selects nothing (:class:`NothingSelectedWarning`) is an error
    unless ``allow_empty``; a ``TypeError``/``ValueError`` whose message starts with a
    step's transform name is located at that step's option or table.

    Example:
        >>> import jax.numpy as jnp
        >>> steps = parse_recipe_steps('[[transform]]\\nkind = "prune"\\nsparsity = 0.5\\n'
        ...                            'where = "conv"\\n')
        >>> with step_errors(steps, allow_empty=False):
        ...     _ = steps[0].transform({"dense": {"kernel": jnp.ones((2, 2))}})
        ... # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        jaxcompress.cli.recipes.RecipeError: recipe:1: prune: where='conv' selects none...
    """
    with warnings.catch_warnings():
        if not allow_empty:  # raised before a file is committed, so nothing is written
            warnings.simplefilter("error", NothingSelectedWarning)
        try:
            yield
        except NothingSelectedWarning as warning:
            # The stages warn in order, so the first step the message fits is the one.
            message = str(warning)
            step, rest = next(
                (s, message[len(prefix) :])
                for s in steps
                for prefix in [f"{s.transform.name}: where={describe(s.where)} "]
                if message.startswith(prefix)
            )
            raise RecipeError(
                f"{step.at}: {step.kind}: where={describe(step.where)} {rest} "
                "(pass --allow-empty to write the file anyway)"
            ) from None
        except (TypeError, ValueError) as error:
            if isinstance(error, RecipeError):
                raise
            refused = next((s for s in steps if str(error).startswith(s.transform.name)), None)
            if refused is None:
                raise
            raise RecipeError(f"{refused.locate(error)}: {error}") from None
