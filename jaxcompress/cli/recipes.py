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

import inspect
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax.numpy as jnp

from jaxcompress.methods.cluster import cluster
from jaxcompress.methods.prune import prune
from jaxcompress.methods.quantize import quantize
from jaxcompress.transforms.base import Transform, chain
from jaxcompress.transforms.filters import Filter

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
        text = str(error)
        for key, at in self.key_lines.items():
            if key != "kind" and re.search(rf"\b{re.escape(key)}\b", text):
                return at
        return self.at


def _table_lines(text: str) -> list[tuple[int, dict[str, int]]]:
    """For each ``[[transform]]`` table: its header line and each key's line."""
    tables: list[tuple[int, dict[str, int]]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if re.match(r"\s*\[\[\s*transform\s*\]\]", line):
            tables.append((number, {}))
        elif tables and (match := re.match(r"\s*([A-Za-z0-9_\-]+)\s*=", line)):
            tables[-1][1].setdefault(match.group(1), number)
    return tables


def _where(value: Any) -> Any:
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
                value = _where(value)
            except TypeError as error:
                raise RecipeError(f"{at(name)}: {error}") from None
        elif name in _DTYPE_OPTIONS:
            try:
                value = jnp.dtype(value)
            except TypeError:
                raise RecipeError(f"{at(name)}: {value!r} is not a dtype name") from None
        options[name] = value
    return options


def parse_recipe_steps(text: str, *, source: str = "recipe") -> list[RecipeStep]:
    """Turns recipe TOML text into its steps, one per ``[[transform]]`` table, in order.

    Args:
        text: the TOML text.
        source: the file name used in error messages.

    Raises:
        RecipeError: as :func:`parse_recipe`.

    Example:
        >>> steps = parse_recipe_steps('[[transform]]\\nkind = "cluster"\\nbits = 3\\n')
        >>> [(step.kind, step.where.__name__, step.at) for step in steps]
        [('cluster', 'kernels', 'recipe:1')]
    """
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise RecipeError(f"{source}: invalid TOML: {error}") from None
    unknown = sorted(set(document) - {"transform"})
    if unknown:
        raise RecipeError(
            f"{source}: unknown table {unknown[0]!r}; a recipe has [[transform]] tables"
        )
    tables = document.get("transform")
    if not isinstance(tables, list) or not tables:
        raise RecipeError(f"{source}: no [[transform]] tables")
    lines = _table_lines(text)
    steps = []
    for index, table in enumerate(tables):
        header, keys = lines[index] if index < len(lines) else (0, {})

        def at(key: str | None = None, header=header, keys=keys) -> str:
            return f"{source}:{keys.get(key, header) if key else header}"

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
