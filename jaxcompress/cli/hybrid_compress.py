"""``jaxcompress compress`` with a ``[model]`` table: the whole checkpoint in memory.

:func:`jaxcompress.auto` and :func:`jaxcompress.distill` run the model, so they need
every weight at once: the checkpoint is loaded whole, compressed (the ``[[transform]]``
steps, or the transform ``[auto]`` chooses), distilled when the recipe has
``[distill]``, and saved. Without ``[model]`` the command streams leaf by leaf instead
(:func:`jaxcompress.compress_file`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
import optax
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from jaxcompress.calibration.calibrate import calibrate
from jaxcompress.cli.hybrid_recipe import Recipe
from jaxcompress.cli.model_inputs import batches_of, import_apply, load_inputs
from jaxcompress.cli.recipes import RecipeError, step_errors
from jaxcompress.hybrid.auto import auto
from jaxcompress.hybrid.autoplan import AutoPlan
from jaxcompress.io.checkpoints import read_checkpoint
from jaxcompress.io.files import FileReport, save
from jaxcompress.training.distill import DistillReport, distill
from jaxcompress.transforms.base import Transform, chain


class InMemoryResult(NamedTuple):
    """What :func:`compress_in_memory` did.

    Attributes:
        file: the written file's report.
        plan: ``[auto]``'s plan, or ``None``.
        distilled: ``[distill]``'s report, or ``None``.
    """

    file: FileReport
    plan: AutoPlan | None
    distilled: DistillReport | None


def _one_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def _batches(path: Path, batch_size: int, at: str, key: str) -> list[Any]:
    try:
        return batches_of(load_inputs(path), batch_size)
    except ValueError as error:
        raise RecipeError(f"{at}: {key} {error}") from None


def _apply_fn(recipe: Recipe) -> Any:
    model = recipe.model
    assert model is not None
    at = f"{model.lines.line('apply')}: [model] apply"
    try:
        return import_apply(model.apply, folders=(model.folder, Path.cwd()))
    except ValueError as error:
        raise RecipeError(f"{at} {error}") from None
    except Exception as error:  # the user's module failed while importing
        raise RecipeError(f"{at}: importing {model.apply!r} failed: {_one_line(error)}") from None


def _check_model(apply_fn: Any, params: Any, batch: Any, at: str, what: str) -> None:
    """Traces ``apply_fn(params, batch)`` once (no compute), so a mismatch fails now, named."""
    try:
        jax.eval_shape(apply_fn, params, batch)
    except Exception as error:  # whatever the user's function raises
        shapes = jax.tree.map(np.shape, batch)
        raise RecipeError(
            f"{at}: the model fails on the checkpoint's parameters and {what} of shape "
            f"{shapes}: {_one_line(error)}"
        ) from None


def _needs_data(error: Exception) -> bool:
    # The library's own message for a data-aware option run without statistics
    # (calibration/lookup.py): calibrate only then, since a Gram per weight is costly.
    return isinstance(error, ValueError) and "needs data=" in str(error)


def compress_in_memory(
    recipe: Recipe,
    checkpoint: str,
    output: str,
    *,
    allow_empty: bool,
    entropy: bool,
    console: Console,
) -> InMemoryResult:
    """Runs a recipe with a ``[model]`` table: load, compress (``[auto]``), distill, save.

    With ``[[transform]]`` steps, a step with a data-aware option (GPTQ, AWQ, Wanda,
    SparseGPT, Hessian k-means) gets calibration statistics of the model over the
    ``[model]`` inputs.

    Args:
        recipe: from :func:`jaxcompress.cli.hybrid_recipe.read_recipe`, with ``model``.
        checkpoint: the checkpoint to read (any format
            :func:`jaxcompress.io.checkpoints.read_checkpoint` reads).
        output: the ``.jxc`` file to write.
        allow_empty: a step selecting no leaf warns instead of failing.
        entropy: entropy-code code streams and masks.
        console: where progress lines go (stderr).

    Raises:
        RecipeError: a missing or broken model function or inputs, a model that fails
            on the checkpoint, or an option ``auto``/``distill``/a transform refuses,
            naming the recipe's line.

    Example:
        >>> import os, tempfile, textwrap
        >>> import numpy as np, jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> from jaxcompress.cli.hybrid_recipe import read_recipe
        >>> folder = tempfile.mkdtemp()
        >>> jc.export_dense(f"{folder}/w.safetensors", {"w": jnp.ones((4, 3))})
        >>> np.save(f"{folder}/x.npy", np.ones((8, 4), np.float32))
        >>> _ = open(f"{folder}/r.toml", "w").write(textwrap.dedent('''
        ...     [model]
        ...     apply = "operator:matmul"   # apply(params, x) = params @ x: a bad model
        ...     data = "x.npy"
        ...     [[transform]]
        ...     kind = "quantize"
        ...     '''))
        >>> compress_in_memory(read_recipe(f"{folder}/r.toml"), f"{folder}/w.safetensors",
        ...                    f"{folder}/o.jxc", allow_empty=False, entropy=True,
        ...                    console=Console(quiet=True))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        jaxcompress.cli.recipes.RecipeError: r.toml:3: [model] apply: the model fails on ...
    """
    model = recipe.model
    if model is None:
        raise ValueError("compress_in_memory: the recipe has no [model] table")
    apply_fn = _apply_fn(recipe)
    batches = _batches(model.data, model.batch_size, model.lines.line("data"), "[model] data")
    eval_batches = None
    if recipe.distill is not None and recipe.distill.eval_data is not None:
        at = recipe.distill.lines.line("eval_data")
        eval_batches = _batches(recipe.distill.eval_data, model.batch_size, at, "eval_data")
    console.print(
        f"loading all of {checkpoint} into memory: a recipe with [model] compresses in "
        "memory, not leaf by leaf",
        markup=False,
        soft_wrap=True,
    )
    params = read_checkpoint(checkpoint)
    apply_at = f"{model.lines.line('apply')}: [model] apply"
    _check_model(apply_fn, params, batches[0], apply_at, f"{model.data.name}'s first batch")
    if eval_batches is not None:
        _check_model(apply_fn, params, eval_batches[0], apply_at, "eval_data's first batch")

    plan = None
    if recipe.auto is not None:
        table = recipe.auto
        console.print(
            "[auto]: measuring each candidate format on each weight", markup=False, soft_wrap=True
        )
        try:
            tx, plan = auto(
                apply_fn,
                params,
                batches,
                budget=table.budget,
                candidates=None if table.candidates is None else list(table.candidates),
                metric=table.metric,
                where=table.where,
            )
        except (TypeError, ValueError) as error:
            raise RecipeError(f"{table.lines.locate(error)}: {error}") from None
    else:
        steps = [step.transform for step in recipe.steps]
        tx = steps[0] if len(steps) == 1 else chain(*steps)

    def compress(data: Any) -> tuple[Any, DistillReport | None]:
        if recipe.distill is None:
            return tx(params, data=data)[0], None
        return _distill(recipe.distill, apply_fn, params, tx, batches, eval_batches, data)

    with step_errors(recipe.steps, allow_empty=allow_empty):
        try:
            compressed, distilled = compress(None)
        except ValueError as error:
            if not _needs_data(error):
                raise
            console.print(
                f"calibrating on {model.data.name} for the data-aware options", markup=False
            )
            compressed, distilled = compress(calibrate(apply_fn, params, batches))
    file = save(output, compressed, entropy=entropy, progress=True)
    return InMemoryResult(file, plan, distilled)


def _distill(
    table: Any,
    apply_fn: Any,
    params: Any,
    tx: Transform,
    batches: list[Any],
    eval_batches: list[Any] | None,
    data: Any,
) -> tuple[Any, DistillReport]:
    try:
        return distill(
            apply_fn,
            params,
            tx,
            batches,
            optimizer=optax.adam(table.learning_rate),
            steps=table.steps,
            loss=table.loss,
            features=table.features,
            data=data,
            eval_batches=eval_batches,
            temperature=table.temperature,
            train_dense=table.train_dense,
            train_scale=table.train_scale,
        )
    except NotImplementedError as error:
        raise RecipeError(f"{table.lines.locate(error)}: {error}") from None
    except (TypeError, ValueError) as error:
        if not str(error).startswith("distill:"):
            raise  # a transform's error: step_errors names its line
        raise RecipeError(f"{table.lines.locate(error)}: {error}") from None


# --- output ------------------------------------------------------------------------------


def plan_dict(plan: AutoPlan) -> dict[str, Any]:
    """An :class:`~jaxcompress.AutoPlan` as JSON-ready values (no measurements, no frontier).

    Example:
        >>> import jaxcompress as jc
        >>> from jaxcompress.hybrid.autoplan import AutoRow
        >>> plan = jc.AutoPlan((AutoRow("w", "int8", 16, 64, 0.01),), jc.budget(bytes=20),
        ...                    "cosine", 16, 64, 0.01, 0.02, ((16, 0.01),), {})
        >>> plan_dict(plan)["rows"][0]["format"], plan_dict(plan)["budget"]["bytes"]
        ('int8', 20)
    """
    return {
        "rows": [dataclasses.asdict(row) for row in plan.rows],
        "budget": dataclasses.asdict(plan.budget),
        "metric": plan.metric,
        "bytes": plan.bytes,
        "dense_bytes": plan.dense_bytes,
        "predicted_loss": plan.predicted_loss,
        "measured_loss": plan.measured_loss,
    }


def distill_dict(report: DistillReport) -> dict[str, Any]:
    """A :class:`~jaxcompress.DistillReport` as JSON-ready values.

    Example:
        >>> import numpy as np
        >>> report = DistillReport(2, np.array([0.5, 0.25], np.float32), 0.5, 0.125,
        ...                        "batches", "mse", 1.5)
        >>> distill_dict(report)["loss"], distill_dict(report)["after"]
        ([0.5, 0.25], 0.125)
    """
    return {
        "steps": report.steps,
        "loss_name": report.loss_name,
        "loss": [float(value) for value in report.loss],
        "before": report.before,
        "after": report.after,
        "eval_on": report.eval_on,
        "seconds": report.seconds,
    }


def plan_table(plan: AutoPlan) -> Table:
    """``[auto]``'s choice as a rich table: each weight's format, bytes and loss.

    Example:
        >>> import jaxcompress as jc
        >>> from jaxcompress.hybrid.autoplan import AutoRow
        >>> plan = jc.AutoPlan((AutoRow("w", "int8", 16, 64, 0.01),), jc.budget(bytes=20),
        ...                    "cosine", 16, 64, 0.01, 0.02, ((16, 0.01),), {})
        >>> plan_table(plan).row_count
        2
    """
    table = Table(title=escape(f"[auto] formats (budget {plan.budget})"), box=box.SIMPLE_HEAD)
    for column in ("weight", "format", "bytes", "dense bytes", f"{plan.metric} loss alone"):
        table.add_column(column, justify="left" if column in ("weight", "format") else "right")
    for row in plan.rows:
        table.add_row(
            escape(row.path),
            escape(row.format),
            f"{row.bytes:,}",
            f"{row.dense_bytes:,}",
            f"{row.loss:.4g}",
        )
    table.add_row(
        "total",
        "",
        f"{plan.bytes:,}",
        f"{plan.dense_bytes:,}",
        f"predicted {plan.predicted_loss:.4g}, measured {plan.measured_loss:.4g}",
    )
    return table


def distill_table(report: DistillReport) -> Table:
    """``[distill]``'s report as a rich table.

    Example:
        >>> import numpy as np
        >>> report = DistillReport(2, np.array([0.5, 0.25], np.float32), 0.5, 0.125,
        ...                        "batches", "mse", 1.5)
        >>> distill_table(report).row_count
        5
    """
    table = Table(
        title=escape(f"[distill] {report.loss_name} loss to the dense model"), box=box.SIMPLE_HEAD
    )
    table.add_column("")
    table.add_column(report.loss_name, justify="right")
    first, last = (float(report.loss[0]), float(report.loss[-1])) if len(report.loss) else (0, 0)
    table.add_row("steps", f"{report.steps}")
    table.add_row("training loss, first → last", f"{first:.4g} → {last:.4g}")
    table.add_row(f"loss on {report.eval_on}, before", f"{report.before:.4g}")
    table.add_row(f"loss on {report.eval_on}, after", f"{report.after:.4g}")
    table.add_row("wall time", f"{report.seconds:.3g} s")
    return table
