"""A whole recipe: its ``[[transform]]`` steps, ``[model]``, ``[auto]`` and ``[distill]``.

The three tables need what a checkpoint alone doesn't hold, a model function and
unlabeled inputs::

    [model]
    apply = "model:apply"     # module:function, called as apply(params, x)
    data = "inputs.npy"       # unlabeled inputs (.npy, or .npz), relative to the recipe
    batch_size = 32           # rows per batch; the last batch may be smaller

    [auto]                    # one format per kernel, chosen under a budget (jc.auto)
    ratio = 8                 # and/or bytes = 250_000 (the whole tree)
    candidates = ["dense", "int8", "kmeans4", "kmeans3"]   # default: all of auto's
    metric = "cosine"         # cosine | mse | kl
    where = "kernel"          # a regex or list of them (default: every kernel)

    [distill]                 # then train the compressed tree on the dense one's outputs
    steps = 200
    loss = "mse"              # cosine | mse | kl
    learning_rate = 1e-3      # Adam
    eval_data = "heldout.npy" # optional: the report's before/after loss on other inputs

``[auto]`` chooses the transform itself, so a recipe with ``[auto]`` has no
``[[transform]]`` table. Errors name the file and line, as for ``[[transform]]`` tables.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from jaxcompress.cli.recipes import (
    RecipeError,
    RecipeStep,
    locate,
    parse_toml,
    table_lines,
    transform_steps,
    where_value,
)
from jaxcompress.hybrid.budget import Budget, budget
from jaxcompress.hybrid.candidates import default_candidates
from jaxcompress.transforms.filters import Filter, kernels

LOSSES = ("cosine", "mse", "kl")
DATA_SUFFIXES = (".npy", ".npz")


@dataclasses.dataclass(frozen=True)
class TableAt:
    """Where a table is: ``"<source>:<line>"`` of its header and of each key.

    Example:
        >>> at = TableAt("r.toml:4", {"steps": "r.toml:5"})
        >>> at.line("steps"), at.line("loss"), at.locate(ValueError("steps must be > 0"))
        ('r.toml:5', 'r.toml:4', 'r.toml:5')
    """

    at: str
    keys: dict[str, str]

    def line(self, key: str) -> str:
        """The key's line, or the header's when the key is absent."""
        return self.keys.get(key, self.at)

    def locate(self, error: Exception) -> str:
        """The line of the first key ``error`` names, else the header's."""
        return locate(error, self.keys, self.at)


@dataclasses.dataclass(frozen=True)
class ModelTable:
    """``[model]``: the model function and its unlabeled inputs.

    Attributes:
        apply: ``"module:function"`` (dotted attributes allowed: ``"pkg.mod:Net.apply"``).
        data: the inputs file, resolved against the recipe's folder.
        batch_size: rows per batch.
        folder: the recipe's folder, searched first for ``apply``'s module.
        lines: where the table is.
    """

    apply: str
    data: Path
    batch_size: int
    folder: Path
    lines: TableAt


@dataclasses.dataclass(frozen=True)
class AutoTable:
    """``[auto]``: :func:`jaxcompress.auto`'s options.

    Attributes:
        budget: from ``bytes`` and ``ratio``.
        candidates: default candidate names, or ``None`` for all of them.
        metric: ``"cosine"``, ``"mse"`` or ``"kl"``.
        where: the weights to choose formats for.
        lines: where the table is.
    """

    budget: Budget
    candidates: tuple[str, ...] | None
    metric: str
    where: Filter
    lines: TableAt


@dataclasses.dataclass(frozen=True)
class DistillTable:
    """``[distill]``: :func:`jaxcompress.distill`'s options (Adam at ``learning_rate``).

    Attributes:
        steps, loss, learning_rate, features, temperature, train_dense, train_scale:
            as :func:`jaxcompress.distill` takes them (``features``: ``None``, ``True`` or
            a filter).
        eval_data: held-out inputs for the report, or ``None`` (the training inputs).
        lines: where the table is.
    """

    steps: int
    loss: str
    learning_rate: float
    features: Any
    temperature: float
    train_dense: bool
    train_scale: bool
    eval_data: Path | None
    lines: TableAt


class Recipe(NamedTuple):
    """A recipe file, read and checked (nothing loaded yet).

    Attributes:
        source: the file name, for messages.
        steps: its ``[[transform]]`` tables, built (empty with ``[auto]``).
        model: ``[model]`` or ``None``.
        auto: ``[auto]`` or ``None``.
        distill: ``[distill]`` or ``None``.
    """

    source: str
    steps: list[RecipeStep]
    model: ModelTable | None
    auto: AutoTable | None
    distill: DistillTable | None

    @property
    def in_memory(self) -> bool:
        """Whether the checkpoint is loaded whole (a ``[model]`` table), not streamed."""
        return self.model is not None


# --- values ------------------------------------------------------------------------------


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"must be a non-empty string, got {value!r}")
    return value


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"must be a positive integer, got {value!r}")
    return value


def _positive_number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"must be a positive number, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"must be a positive number, got {value!r}")
    return float(value)


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {value!r}")
    return value


def _loss(value: Any) -> str:
    if value not in LOSSES:
        raise ValueError(f"must be one of {', '.join(LOSSES)}, got {value!r}")
    return value


def _candidates(value: Any) -> tuple[str, ...]:
    names = list(default_candidates())
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ValueError(f"must be a list of candidate names from {names}, got {value!r}")
    unknown = [name for name in value if name not in names]
    if unknown:
        raise ValueError(f"{unknown} are not candidate names; choose from {names}")
    if len(set(value)) != len(value):
        raise ValueError(f"repeats a name: {value}")
    return tuple(value)


def _features(value: Any) -> Any:
    if isinstance(value, bool):
        return True if value else None
    try:
        return where_value(value)
    except TypeError:
        raise ValueError(
            f"must be true, false, a regex on weight paths or a list of them, got {value!r}"
        ) from None


def _where(value: Any) -> Filter:
    try:
        return where_value(value)
    except TypeError as error:
        raise ValueError(str(error).removeprefix("where ")) from None


class _Reader:
    """One table's values, each checked, errors naming the key's line."""

    def __init__(self, name: str, table: dict[str, Any], at: TableAt, accepted: tuple[str, ...]):
        self.name, self.table, self.at = name, table, at
        for key in table:
            if key not in accepted:
                raise RecipeError(
                    f"{at.line(key)}: [{name}] has no key {key!r}; it takes {', '.join(accepted)}"
                )

    def get(self, key: str, check: Callable[[Any], Any], default: Any = None) -> Any:
        if key not in self.table:
            return default
        try:
            return check(self.table[key])
        except ValueError as error:
            raise RecipeError(f"{self.at.line(key)}: [{self.name}] {key} {error}") from None

    def require(self, key: str, check: Callable[[Any], Any], what: str) -> Any:
        if key not in self.table:
            raise RecipeError(f"{self.at.at}: [{self.name}] needs {key} = {what}")
        return self.get(key, check)


# --- tables ------------------------------------------------------------------------------


def _model(table: dict[str, Any], at: TableAt, folder: Path) -> ModelTable:
    read = _Reader("model", table, at, ("apply", "data", "batch_size"))
    apply = read.require("apply", _text, '"module:function" (a function apply(params, x))')
    if ":" not in apply or not all(part.strip() for part in apply.split(":", 1)):
        raise RecipeError(
            f'{at.line("apply")}: [model] apply must be "module:function" (as '
            f'"model:apply" for apply() in model.py), got {apply!r}'
        )
    data = Path(read.require("data", _text, '"inputs.npy" (unlabeled inputs, .npy or .npz)'))
    if data.suffix.lower() not in DATA_SUFFIXES:
        raise RecipeError(
            f"{at.line('data')}: [model] data must be a .npy or .npz file, got {str(data)!r}"
        )
    return ModelTable(
        apply=apply,
        data=folder / data,
        batch_size=read.get("batch_size", _positive_int, 32),
        folder=folder,
        lines=at,
    )


def _auto(table: dict[str, Any], at: TableAt) -> AutoTable:
    keys = ("bytes", "ratio", "candidates", "metric", "where")
    read = _Reader("auto", table, at, keys)
    size = read.get("bytes", _positive_int)
    ratio = read.get("ratio", _positive_number)
    if size is None and ratio is None:
        raise RecipeError(f"{at.at}: [auto] needs a budget: bytes = ... and/or ratio = ...")
    return AutoTable(
        budget=budget(bytes=size, ratio=ratio),
        candidates=read.get("candidates", _candidates),
        metric=read.get("metric", _loss, "cosine"),
        where=read.get("where", _where, kernels),
        lines=at,
    )


def _distill(table: dict[str, Any], at: TableAt, folder: Path) -> DistillTable:
    keys = (
        "steps",
        "loss",
        "learning_rate",
        "features",
        "temperature",
        "train_dense",
        "train_scale",
        "eval_data",
    )
    read = _Reader("distill", table, at, keys)
    eval_data = read.get("eval_data", _text)
    if eval_data is not None and Path(eval_data).suffix.lower() not in DATA_SUFFIXES:
        raise RecipeError(
            f"{at.line('eval_data')}: [distill] eval_data must be a .npy or .npz file, "
            f"got {eval_data!r}"
        )
    return DistillTable(
        steps=read.get("steps", _positive_int, 100),
        loss=read.get("loss", _loss, "cosine"),
        learning_rate=read.get("learning_rate", _positive_number, 1e-4),
        features=read.get("features", _features),
        temperature=read.get("temperature", _positive_number, 1.0),
        train_dense=read.get("train_dense", _boolean, True),
        train_scale=read.get("train_scale", _boolean, True),
        eval_data=None if eval_data is None else folder / eval_data,
        lines=at,
    )


def parse_recipe_text(text: str, *, source: str = "recipe", folder: Path = Path(".")) -> Recipe:
    """Reads every table of a recipe's TOML text, checked; nothing is imported or loaded.

    Args:
        text: the TOML text.
        source: the file name used in error messages.
        folder: what relative ``data`` / ``eval_data`` paths and ``apply``'s module are
            looked up in (the recipe's folder).

    Raises:
        RecipeError: anything :func:`jaxcompress.cli.recipes.parse_recipe_steps` refuses;
            an unknown key or a bad value in ``[model]``, ``[auto]`` or ``[distill]``;
            ``[auto]`` or ``[distill]`` without ``[model]``; ``[auto]`` together with
            ``[[transform]]`` tables; ``[distill]`` with nothing to distill.

    Example:
        >>> recipe = parse_recipe_text('''
        ... [model]
        ... apply = "model:apply"
        ... data = "inputs.npy"
        ...
        ... [auto]
        ... ratio = 8
        ... ''')
        >>> recipe.in_memory, recipe.auto.budget.ratio, recipe.model.batch_size
        (True, 8.0, 32)
        >>> parse_recipe_text('[auto]\\nratio = 8\\n')
        Traceback (most recent call last):
        ...
        jaxcompress.cli.recipes.RecipeError: recipe:1: [auto] needs a [model] table \
with apply = "module:function" and data = "inputs.npy"
    """
    document = parse_toml(text, source=source)
    headers = {t.name: t for t in table_lines(text) if not t.array}

    def where(name: str) -> TableAt:
        found = headers.get(name)
        lines = found.keys if found else {}
        return TableAt(
            f"{source}:{found.header if found else 0}",
            {key: f"{source}:{line}" for key, line in lines.items()},
        )

    if "auto" in document and document.get("transform"):
        first = next(t.header for t in table_lines(text) if t.array and t.name == "transform")
        raise RecipeError(
            f"{source}:{first}: a recipe with [auto] has no [[transform]] tables: [auto] "
            f"({where('auto').at}) chooses every weight's format itself"
        )
    steps = transform_steps(document, text, source=source)
    model = _model(document["model"], where("model"), folder) if "model" in document else None
    auto = _auto(document["auto"], where("auto")) if "auto" in document else None
    distill = (
        _distill(document["distill"], where("distill"), folder) if "distill" in document else None
    )
    for name, table in (("auto", auto), ("distill", distill)):
        if table is not None and model is None:
            raise RecipeError(
                f"{table.lines.at}: [{name}] needs a [model] table with "
                'apply = "module:function" and data = "inputs.npy"'
            )
    if auto is None and not steps:
        what = "and no [auto] table" if model is not None else "tables"
        raise RecipeError(f"{source}: no [[transform]] {what}")
    return Recipe(source, steps, model, auto, distill)


def read_recipe(path: str | Path) -> Recipe:
    """Reads and checks a recipe file (see :func:`parse_recipe_text`).

    Example:
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "r.toml")
        >>> _ = open(path, "w").write('[[transform]]\\nkind = "quantize"\\nbits = 4\\n')
        >>> recipe = read_recipe(path)
        >>> [step.at for step in recipe.steps], recipe.in_memory
        (['r.toml:1'], False)
    """
    path = Path(path)
    return parse_recipe_text(path.read_text(), source=path.name, folder=path.parent)
