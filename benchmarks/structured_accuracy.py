"""How much accuracy does structured pruning (prune_units) cost on the digits models?

LeNet-300-100 and LeNet-5 are trained densely on the embedded UCI digits (fixed split:
1437 train / 360 test images) with Adam, as the other digits benchmarks do (LeNet-300-100:
40 epochs at 1e-3; LeNet-5: 80 epochs at 3e-3), on seeds 0, 1 and 2. Then half of the
units of the prunable groups are removed with ``prune_units`` and the test accuracy of
the thinned model (``stats.apply_fn(thinned, x)``) is measured:

* uniform 50 % of every group, importance l2, l1, activation and taylor, no fine-tuning
  (activation and taylor score on four fixed calibration batches of 128 training images,
  taylor with their labels);
* uniform 50 %, l2, then a short fine-tune of the thinned parameters through
  ``stats.apply_fn`` (Adam 1e-3, 10 epochs of batches of 64);
* per-group fractions from ``jaxcompress.sensitivity(..., method="units")`` (levels 0.25,
  0.5, 0.75, 0.9; metric: accuracy on the TRAINING set, so the test set chooses nothing)
  and ``report.allocate(0.5)``: the same global 50 % of units, placed where the training
  accuracy suffers least; without and with the same fine-tune;
* for reference, the dense model trained for the same 10 extra epochs.

Every row gives the test accuracy (mean and std over the seeds), the drop from dense in
percentage points, the units removed, the parameter count and the FLOPs per image
(``stats.flops`` for a batch-1 program: multiply-adds x 2 of dots and convolutions).
The issue sets no accuracy target; the drops are stated as measured.

Run: ``env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/structured_accuracy.py``
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _common import command, markdown_table, write
from flax import linen as nn

import jaxcompress as jc
from jaxcompress.examples.classifier import fit_classifier
from jaxcompress.examples.data import load_digits
from jaxcompress.examples.models import LeNet5, LeNet300100
from jaxcompress.structure.units import prune_units

try:
    from jaxcompress.structure.sensitivity import sensitivity
except ImportError:  # not written yet: the sensitivity rows say "not run"
    sensitivity = None

COMMAND = command(__file__)
SEEDS = (0, 1, 2)
FRACTION = 0.5
IMPORTANCES = ("l2", "l1", "activation", "taylor")
LEVELS = (0.25, 0.5, 0.75, 0.9)
FINETUNE_EPOCHS = 10
FINETUNE_LR = 1e-3
BATCH = 64
CALIBRATION_BATCHES = 4
CALIBRATION_SIZE = 128


@dataclasses.dataclass(frozen=True)
class Setup:
    name: str
    module: nn.Module
    flatten: bool
    epochs: int
    learning_rate: float


SETUPS = (
    Setup("LeNet-300-100", LeNet300100(), flatten=True, epochs=40, learning_rate=1e-3),
    Setup("LeNet-5", LeNet5(), flatten=False, epochs=80, learning_rate=3e-3),
)


def _count(tree: Any) -> int:
    return sum(int(np.size(leaf)) for leaf in jax.tree.leaves(tree))


def _accuracy(fn: Callable, params: Any, x: np.ndarray, y: np.ndarray) -> float:
    return float(jnp.mean(jnp.argmax(fn(params, x), axis=-1) == y))


def finetune(apply_thinned: Callable, params: Any, x: np.ndarray, y: np.ndarray, seed: int):
    """Adam on softmax cross-entropy through ``apply_thinned``, batches of 64, fixed order."""
    optimizer = optax.adam(FINETUNE_LR)

    @jax.jit
    def step(p, state, xb, yb):
        def loss_fn(q):
            logits = apply_thinned(q, xb)
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

        loss, grads = jc.training.value_and_grad(loss_fn)(p)
        updates, state = optimizer.update(grads, state, p)
        return optax.apply_updates(p, updates), state, loss

    state = optimizer.init(params)
    order = np.random.default_rng(seed)
    for _ in range(FINETUNE_EPOCHS):
        permutation = order.permutation(len(y))
        for start in range(0, len(y) - BATCH + 1, BATCH):
            index = permutation[start : start + BATCH]
            params, state, _ = step(params, state, x[index], y[index])
    return params


def run_seed(setup: Setup, seed: int, train, test) -> tuple[list[dict], dict]:
    """All rows of one model and seed, and what the sensitivity analysis allocated."""
    (x_train, y_train), (x_test, y_test) = train, test
    model = setup.module

    def apply(p: Any, x: jax.Array) -> jax.Array:
        return model.apply({"params": p}, x)

    dense_fn = jax.jit(apply)
    example = jnp.asarray(x_train[:1])
    params = model.init(jax.random.key(seed), example)["params"]
    params = fit_classifier(
        model, params, x_train, y_train,
        epochs=setup.epochs, learning_rate=setup.learning_rate, seed=seed,
    )  # fmt: skip
    calib_order = np.random.default_rng(100 + seed).permutation(len(y_train))
    calib = [
        calib_order[i * CALIBRATION_SIZE : (i + 1) * CALIBRATION_SIZE]
        for i in range(CALIBRATION_BATCHES)
    ]
    data = {
        "activation": [jnp.asarray(x_train[i]) for i in calib],
        "taylor": [(jnp.asarray(x_train[i]), jnp.asarray(y_train[i])) for i in calib],
    }
    dense_flops = None
    rows = []

    def record(row: str, thinned: Any, stats: Any, thinned_fn: Callable | None) -> None:
        fn = thinned_fn or jax.jit(stats.apply_fn)
        acc = _accuracy(fn, thinned, x_test, y_test)
        removed = sum(g.removed for g in stats.groups)
        total = sum(g.size for g in stats.groups)
        rows.append(
            {
                "row": row,
                "seed": seed,
                "test_accuracy": acc,
                "units_removed": removed,
                "units_total": total,
                "params": _count(thinned),
                "flops_per_image": stats.flops[1],
                "fractions": {g.name: g.removed / g.size for g in stats.groups},
            }
        )

    dense_acc = _accuracy(dense_fn, params, x_test, y_test)
    tx = prune_units(FRACTION, importance="l2", apply_fn=apply, example_input=example)
    thinned_l2, stats_l2 = tx(params)
    dense_flops = stats_l2.flops[0]
    rows.append(
        {
            "row": "dense",
            "seed": seed,
            "test_accuracy": dense_acc,
            "units_removed": 0,
            "units_total": sum(g.size for g in stats_l2.groups),
            "params": _count(params),
            "flops_per_image": dense_flops,
            "fractions": {},
        }
    )
    # The thinned model computes what the dense model computes on the masked params.
    thinned_fn = jax.jit(stats_l2.apply_fn)
    masked_acc = _accuracy(dense_fn, stats_l2.masked(params), x_test, y_test)
    masked_diff = float(
        jnp.max(jnp.abs(thinned_fn(thinned_l2, x_test) - dense_fn(stats_l2.masked(params), x_test)))
    )
    for importance in IMPORTANCES:
        if importance == "l2":
            thinned, stats = thinned_l2, stats_l2
        else:
            tx = prune_units(
                FRACTION, importance=importance, apply_fn=apply, example_input=example,
                data=data.get(importance),
            )  # fmt: skip
            thinned, stats = tx(params)
        record(f"uniform 50%, {importance}", thinned, stats, None)
    record(
        f"uniform 50%, l2, + fine-tune {FINETUNE_EPOCHS} epochs",
        finetune(stats_l2.apply_fn, thinned_l2, x_train, y_train, seed),
        stats_l2,
        thinned_fn,
    )

    allocation = None
    if sensitivity is not None:
        train_x = jnp.asarray(x_train)

        def eval_fn(p: Any) -> float:
            return _accuracy(dense_fn, p, train_x, y_train)

        report = sensitivity(
            apply, params, eval_fn, levels=LEVELS, method="units", example_input=example,
            progress=False,
        )  # fmt: skip
        allocation = report.allocate(FRACTION)
        tx = prune_units(allocation, importance="l2", apply_fn=apply, example_input=example)
        thinned_s, stats_s = tx(params)
        record("sensitivity-allocated 50%, l2", thinned_s, stats_s, None)
        record(
            f"sensitivity-allocated 50%, l2, + fine-tune {FINETUNE_EPOCHS} epochs",
            finetune(stats_s.apply_fn, thinned_s, x_train, y_train, seed),
            stats_s,
            None,
        )
        allocation = {
            "fractions": allocation,
            "train_accuracy_baseline": report.baseline,
            "train_accuracy_by_level": {k: list(v) for k, v in report.metrics.items()},
        }
    more = finetune(apply, params, x_train, y_train, seed)
    rows.append(
        {
            "row": f"dense + {FINETUNE_EPOCHS} more epochs (reference)",
            "seed": seed,
            "test_accuracy": _accuracy(dense_fn, more, x_test, y_test),
            "units_removed": 0,
            "units_total": rows[0]["units_total"],
            "params": _count(params),
            "flops_per_image": dense_flops,
            "fractions": {},
        }
    )
    check = {"masked_dense_accuracy": masked_acc, "max_abs_logit_diff": masked_diff}
    return rows, {"allocation": allocation, "check": check}


def _mean_std(values: list[float]) -> str:
    return f"{100 * np.mean(values):.2f} ± {100 * np.std(values):.2f}"


def _span(values: list[int]) -> str:
    """One number when every seed agrees, else ``min–max`` over the seeds."""
    low, high = min(values), max(values)
    return f"{low:,}" if low == high else f"{low:,}–{high:,}"


def main() -> None:
    started = time.perf_counter()
    load_before = os.getloadavg()
    results: dict[str, Any] = {}
    sections = []
    for setup in SETUPS:
        train = load_digits(split="train", flatten=setup.flatten)
        test = load_digits(split="test", flatten=setup.flatten)
        rows, extras = [], {}
        for seed in SEEDS:
            seed_rows, extra = run_seed(setup, seed, train, test)
            rows += seed_rows
            extras[seed] = extra
            for r in seed_rows:
                print(f"{setup.name} seed {seed}: {r['row']}: {100 * r['test_accuracy']:.2f} %")
        names = list(dict.fromkeys(r["row"] for r in rows))
        dense = [r["test_accuracy"] for r in rows if r["row"] == "dense"]
        table_rows = []
        for name in names:
            mine = [r for r in rows if r["row"] == name]
            accs = [r["test_accuracy"] for r in mine]
            changes = [a - d for d, a in zip(dense, accs, strict=True)]
            table_rows.append(
                [
                    name,
                    _mean_std(accs),
                    f"{100 * np.mean(changes):+.2f}",
                    f"{_span([r['units_removed'] for r in mine])} / {mine[0]['units_total']}",
                    _span([r["params"] for r in mine]),
                    _span([r["flops_per_image"] for r in mine]),
                ]
            )
        if sensitivity is None:
            table_rows.append(
                ["sensitivity-allocated 50%", "not run: sensitivity not available", "", "", "", ""]
            )
        table = markdown_table(
            [
                "row",
                "test accuracy % (mean ± std, 3 seeds)",
                "change vs dense (points)",
                "units removed",
                "params",
                "FLOPs per image",
            ],
            table_rows,
        )
        alloc_lines = []
        for seed, extra in extras.items():
            if extra["allocation"] is not None:
                fractions = ", ".join(
                    f"{k} {v:.3f}" for k, v in extra["allocation"]["fractions"].items()
                )
                alloc_lines.append(f"- seed {seed}: {fractions}")
        checks = "; ".join(
            f"seed {seed}: masked-dense accuracy "
            f"{100 * e['check']['masked_dense_accuracy']:.2f} %, "
            f"max |logit diff| {e['check']['max_abs_logit_diff']:.1e}"
            for seed, e in extras.items()
        )
        uniform = [r for r in rows if r["row"] == "uniform 50%, l2"][0]
        allocated = [r for r in rows if r["row"] == "sensitivity-allocated 50%, l2"]
        same_cost = all(
            (r["params"], r["flops_per_image"]) == (uniform["params"], uniform["flops_per_image"])
            for r in allocated
        )
        cost_note = (
            "The allocated models have the parameters and FLOPs of uniform 50 % here.\n\n"
            if allocated and same_cost
            else "`allocate()` balances unit counts, not parameters or FLOPs: the allocated "
            f"models keep {min(r['params'] for r in allocated):,}–"
            f"{max(r['params'] for r in allocated):,} parameters and "
            f"{min(r['flops_per_image'] for r in allocated) / uniform['flops_per_image']:.2f}–"
            f"{max(r['flops_per_image'] for r in allocated) / uniform['flops_per_image']:.2f}x "
            f"the FLOPs of uniform 50 % ({uniform['params']:,} parameters, "
            f"{uniform['flops_per_image']:,} FLOPs), so the two rows are not equal in cost.\n\n"
            if allocated
            else ""
        )
        sections.append(
            f"## {setup.name}\n\nDense: {setup.epochs} epochs, Adam {setup.learning_rate:g}. "
            f"Uniform 50 % groups: "
            + ", ".join(f"{k} ({v:.0%})" for k, v in uniform["fractions"].items())
            + f".\n\n{table}\n\n"
            + (
                "Sensitivity allocation (fraction of each group's units removed; the "
                "global unit count matches uniform 50 % to the floor of each group):\n\n"
                + "\n".join(alloc_lines)
                + "\n\n"
                if alloc_lines
                else ""
            )
            + cost_note
            + f"Check (uniform l2, test set): thinned model vs dense model on "
            f"`stats.masked(params)`: {checks}.\n"
        )
        results[setup.name] = {"rows": rows, "per_seed": {str(k): v for k, v in extras.items()}}
    wall = time.perf_counter() - started
    load_after = os.getloadavg()
    body = f"""
Test accuracy on the fixed 360-image digits test split; dense models trained on the 1437
training images with Adam (as `benchmarks/deep_compression.py` does), seeds {list(SEEDS)}.
`prune_units(0.5, importance=...)` removes `floor(0.5 * units)` of every prunable group
(the output layer is left whole: it is a model output) and the thinned model is
evaluated with `jax.jit(stats.apply_fn)`. Activation and Taylor scores use
{CALIBRATION_BATCHES} batches of {CALIBRATION_SIZE} training images (Taylor with labels
and the default softmax cross-entropy). Fine-tune: Adam {FINETUNE_LR:g},
{FINETUNE_EPOCHS} epochs of batches of {BATCH}, training the thinned parameters through
`stats.apply_fn`. Sensitivity: `jaxcompress.sensitivity(apply, params, eval_fn,
levels={LEVELS}, method="units", example_input=x)` with `eval_fn` = accuracy on the
training set, then `.allocate(0.5)`, fed to `prune_units` (l2). Params: every leaf of
the thinned tree (biases included). FLOPs per image: `stats.flops` for a batch-1 input.
"change vs dense" is the mean over seeds of (pruned − dense) test accuracy, in points.
No accuracy target is set by the issue.

Wall time {wall:.0f} s. 1-minute load average {load_before[0]:.2f} before and
{load_after[0]:.2f} after, on {os.cpu_count()} CPUs.

{chr(10).join(sections)}
"""
    path = write(
        "structured_accuracy",
        title="Structured pruning (prune_units) accuracy on digits: importances, "
        "fine-tuning, sensitivity allocation",
        command=COMMAND,
        body_markdown=body,
        data={
            "seeds": SEEDS,
            "fraction": FRACTION,
            "levels": LEVELS,
            "finetune": {"epochs": FINETUNE_EPOCHS, "learning_rate": FINETUNE_LR, "batch": BATCH},
            "sensitivity_available": sensitivity is not None,
            "models": results,
            "wall_s": wall,
            "load_average": [load_before, load_after],
        },
    )
    print(f"wall time {wall:.0f} s")
    print(path)


if __name__ == "__main__":
    main()
