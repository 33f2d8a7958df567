"""``auto``: one compression format per weight, chosen by measurement under a budget.

Weights differ in what they tolerate: one layer keeps its outputs through 3-bit
k-means while another needs int8. ``auto`` measures instead of guessing. For each
candidate format it compresses every selected weight once (one pass), then, weight
by weight, runs the model on the calibration batches with only that weight in that
format and every other weight dense, and compares the outputs with the dense ones
(``metric``). With a latency budget it also times each weight's uses in each
format as ``accelerate`` serves them (:mod:`jaxcompress.hybrid.latency`). Treating
the losses and use times as additive, it picks one format per weight with the least
total predicted loss within the budget's bytes and predicted latency, exactly (a
multiple-choice knapsack over the measured points, :mod:`jaxcompress.hybrid.choose`),
and returns an ordinary :func:`~jaxcompress.partition` transform with an
:class:`AutoPlan`.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from jaxcompress.arrays import leaf_nbytes
from jaxcompress.arrays.checks import check_selected_leaf
from jaxcompress.arrays.tree import materialize, nbytes, on_arrays, split_arrays
from jaxcompress.calibration.calibrate import calibrate
from jaxcompress.core.progress import over_leaves
from jaxcompress.hybrid.autoplan import AutoPlan, AutoRow
from jaxcompress.hybrid.budget import Budget
from jaxcompress.hybrid.candidates import DENSE, resolve_candidates
from jaxcompress.hybrid.choose import Option, choose
from jaxcompress.hybrid.latency import (
    CHOSEN,
    MODEL,
    UNITS_PER_SECOND,
    Key,
    Timer,
    UseBench,
    chosen_model,
    median_times,
    to_units,
)
from jaxcompress.hybrid.output_metrics import resolve_metric
from jaxcompress.numerics.knapsack import pareto_frontier
from jaxcompress.transforms.base import (
    LeafEntry,
    Transform,
    chain,
    masked,
    partition,
    select_leaves,
)
from jaxcompress.transforms.filters import Filter, kernels

__all__ = ["auto"]


@dataclasses.dataclass(frozen=True)
class _PathsIn:
    """The filter selecting exactly the leaves at ``paths`` (no regex, no prefix matches)."""

    paths: frozenset[str]

    def __call__(self, path: str, leaf: Any) -> bool:
        return path in self.paths

    def __repr__(self) -> str:
        return f"path in {sorted(self.paths)!r}"


def _batch_list(batches: Any) -> list[Any]:
    if isinstance(batches, jax.Array | np.ndarray):
        return [batches]  # one array is one batch, not an iterable of rows
    try:
        listed = list(batches)
    except TypeError:
        raise TypeError(
            f"auto: batches must be an iterable of model inputs, got {type(batches).__name__}"
        ) from None
    if not listed:
        raise ValueError("auto: batches is empty; give at least one calibration batch")
    return listed


def _batch_weight(x: Any) -> float:
    leaves = jax.tree.leaves(x)
    shape: tuple[int, ...] = tuple(getattr(leaves[0], "shape", ())) if leaves else ()
    return float(shape[0]) if shape else 1.0


def _keyed(tx: Transform, fixed: jax.Array | None) -> Transform:
    """``tx`` with ``fixed`` as its key when called without one: the measured leaves again."""

    def apply(params: Any, *, key: Any = None, data: Any = None) -> Any:
        return tx(params, key=fixed if key is None else key, data=data)

    return Transform(apply, getattr(tx, "name", repr(tx)))


class _Evaluator:
    """The model's loss against its dense outputs on every batch, compiled once."""

    def __init__(self, apply_fn: Callable, dense: Any, batches: list[Any], metric: Callable):
        arrays, rest = split_arrays(dense)
        self._rest = rest
        run = jax.jit(on_arrays(apply_fn, rest))
        self._references = [run(arrays, x) for x in batches]
        self._batches = batches
        weights = np.array([_batch_weight(x) for x in batches])
        self._weights = weights / weights.sum()

        def loss(params: Any, x: Any, reference: Any) -> jax.Array:
            return metric(reference, apply_fn(params, x))

        self._loss = jax.jit(on_arrays(loss, rest))

    def __call__(self, params: Any, what: str) -> float:
        arrays, _ = split_arrays(params)
        values = [
            self._loss(arrays, x, reference)
            for x, reference in zip(self._batches, self._references, strict=True)
        ]
        total = 0.0
        for value, weight in zip(values, self._weights, strict=True):
            number = np.asarray(value)
            if number.shape != () or not np.isfinite(number):
                raise ValueError(
                    f"auto: the metric gave {number!r} for {what}; it must return one finite number"
                )
            total += float(weight) * float(number)
        return total


def _compress_each(
    name: str, tx: Transform, params: Any, paths: list[str], *, key: Any, data: Any
) -> dict[str, Any]:
    """Each selected leaf in format ``tx`` (``None`` where it does not fit), in one pass.

    A pass that raises (a filter of the candidate's own selecting a leaf the method
    cannot take) is retried leaf by leaf, and a leaf that still raises has no result.
    """
    try:
        out, _ = masked(tx, _PathsIn(frozenset(paths)))(params, key=key, data=data)
        results = _leaves_at(out, paths)
    except ValueError:
        results = {}
        for path in paths:
            try:
                out, _ = masked(tx, _PathsIn(frozenset([path])))(params, key=key, data=data)
            except ValueError:
                results[path] = None
                continue
            results[path] = _leaves_at(out, [path])[path]
    original = _leaves_at(params, paths)
    # A leaf the candidate skipped (its default filter left it dense) comes back as it was.
    return {
        path: None if leaf is None or leaf is original[path] else leaf
        for path, leaf in results.items()
    }


def _leaves_at(tree: Any, paths: list[str]) -> dict[str, Any]:
    wanted = set(paths)
    selected, _, _ = select_leaves(tree, lambda path, leaf: path in wanted)
    return {entry.path: entry.leaf for entry in selected}


def _selected(params: Any, where: Filter) -> tuple[list[LeafEntry], list[LeafEntry], Any]:
    selected, entries, treedef = select_leaves(params, where)
    if not selected:
        paths = [entry.path for entry in entries]
        raise ValueError(f"auto: where={where!r} selects no leaf of params (leaves: {paths})")
    paths = [entry.path for entry in selected]
    duplicates = sorted({path for path in paths if paths.count(path) > 1})
    if duplicates:
        raise ValueError(f"auto: several leaves share the path(s) {duplicates}")
    for entry in selected:
        check_selected_leaf("auto", entry.path, entry.leaf)
    return selected, entries, treedef


def auto(
    apply_fn: Callable[..., Any],
    params: Any,
    batches: Any,
    *,
    budget: Budget,
    candidates: Mapping[str, Transform | None] | list[str] | tuple[str, ...] | None = None,
    metric: str | Callable[[Any, Any], Any] = "cosine",
    where: Filter = kernels,
    data: Any = None,
    key: jax.Array | None = None,
    progress: bool = True,
    timer: Timer | None = None,
) -> tuple[Transform, AutoPlan]:
    """Picks one compression format per weight, with the least measured loss within a budget.

    1. Data-aware candidates get input statistics from one
       :func:`jaxcompress.calibrate` over ``batches`` (unless ``data=`` is given).
    2. For each candidate, every selected weight is compressed once (one pass, the
       candidate masked to the selected leaves), and then for each weight the model
       runs on ``batches`` with only that weight in that format (others dense): its
       loss is ``metric(dense_out, out)``, averaged over batches by batch size. The
       model is compiled once. A candidate that skips or cannot take a weight (it is
       left dense, or the transform raises ``ValueError``) is not available for it.
    3. With a ``latency=`` budget, each weight's uses (its ``dot_general`` or
       convolution, found by tracing the model on the first batch) are rebuilt
       alone on an activation of the real shape and timed dense (``jax.jit``) and
       in each format (``jax.jit(jaxcompress.accelerate(...))``, prepared, so the
       route ``accelerate`` takes in the model), and the dense model is timed whole
       (:mod:`jaxcompress.hybrid.latency`); the predicted latency of a choice is
       ``dense model - Σ dense use times + Σ chosen use times``.
    4. With the losses (and use times) taken as additive, the choice of one format
       per weight minimising the loss with the bytes and the predicted latency
       within the budget is exact: a multiple-choice knapsack solved by merging
       Pareto frontiers on one limit
       (:func:`jaxcompress.numerics.knapsack.pareto_frontier`), a bounded 3-D
       Pareto search on two (:func:`jaxcompress.numerics.knapsack.solve2`);
       latencies enter it as integer nanoseconds.
    5. The chosen tree is built and measured as a whole: its loss, its bytes and,
       with a latency budget, its latency through
       ``jax.jit(jaxcompress.accelerate(apply_fn))``.

    What holds: the bytes are within the budget (checked, ``ValueError`` if not)
    and the *predicted* latency is within it, exactly. The *measured* latency is
    not guaranteed (timings are noisy and uses timed alone need not add up to the
    model): when it is over, ``plan.latency_exceeded`` is set and a warning says
    so. Timings are medians of interleaved rounds
    (:func:`jaxcompress.hybrid.latency.median_times`); serve the result under
    ``jax.jit`` to get them (calling the accelerated function directly adds its
    Python tree handling per call).

    The returned ``tx`` is a :func:`jaxcompress.partition` over the chosen formats
    (``"dense"`` and unselected leaves: ``jaxcompress.chain()``), with the statistics
    and key used here as its defaults, so ``tx(params)`` gives exactly the measured
    leaves. Candidates should work leaf by leaf (every default does): one with a
    global criterion (``prune(scope="global")``) sees a different set of leaves in
    ``tx`` than when it was measured.

    Args:
        apply_fn: ``apply_fn(params, x) -> output`` (an array or a pytree of them).
            For nnx: ``graphdef, state = nnx.split(model)``,
            ``apply_fn = lambda s, x: nnx.merge(graphdef, s)(x)``, ``params=state``.
        params: the dense parameter pytree (linen params, ``nnx.State``, dict).
        batches: an iterable of inputs ``x`` (one array is one batch); kept small, as
            the model runs ``len(batches)`` times per (candidate, weight).
        budget: a :func:`jaxcompress.budget`: ``bytes=`` (the whole tree's
            :func:`jaxcompress.nbytes`, unselected leaves included) and/or ``ratio=``
            (float32 bytes of the selected weights over their compressed bytes)
            and/or ``latency=`` (seconds per call on the first batch).
        candidates: name → transform (``None`` for dense, under the name ``"dense"``),
            or a sequence of names from
            :func:`jaxcompress.hybrid.candidates.default_candidates` (the default:
            dense, int8, int4 in groups of 128, GPTQ int4, k-means 5/4/3-bit, pruning
            50 %/75 % with int8 values, low rank at 90 %/75 % energy).
        metric: ``"cosine"`` (mean ``1 - cos`` along the output's last axis),
            ``"mse"``, ``"kl"`` (of softmax outputs: logits), or a function
            ``metric(dense_out, out) -> scalar`` (jit-compatible).
        where: which leaves to choose a format for (default: every kernel).
        data: input statistics for data-aware candidates (from
            :func:`jaxcompress.calibrate`); ``None`` calibrates over ``batches``.
        key: PRNG key for randomized candidates; candidate ``i`` gets
            ``fold_in(key, i)``.
        progress: a bar on stderr over the (candidate, weight) evaluations (and the
            timings' compilations).
        timer: with a latency budget, ``timer({key: thunk}) -> {key: seconds per
            call}`` over keys ``(weight path, format name)`` (a weight's uses) and
            ``(MODEL, "dense")`` / ``(MODEL, "chosen")`` (the whole model;
            :data:`jaxcompress.hybrid.latency.MODEL`); each thunk returns arrays to
            wait on. Default: :func:`jaxcompress.hybrid.latency.median_times`.

    Returns:
        ``(tx, plan)``: the transform and an :class:`AutoPlan`
        (``print(plan)`` shows its table, ``plan.plot()`` the loss-size frontier).

    Raises:
        ValueError: a budget no choice reaches (the message gives the smallest reachable
            size or predicted latency), ``where`` selecting nothing, an empty
            ``batches``, a weight with no available candidate, an unknown metric or
            candidate name, a metric that is not one finite number, or a timer that
            does not give finite, non-negative seconds for every key.
        TypeError: ``budget`` not a :class:`Budget`, a candidate that is not a
            transform, a timer that is not callable, or a selected leaf that is
            compressed or not floating.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
        >>> params = {"a": {"kernel": jax.random.normal(k1, (32, 64))},
        ...           "b": {"kernel": jax.random.normal(k2, (64, 16)) * 0.1}}
        >>> def apply_fn(p, x):
        ...     return jnp.tanh(x @ p["a"]["kernel"]) @ p["b"]["kernel"]
        >>> x = jax.random.normal(k3, (16, 32))
        >>> tx, plan = jc.auto(apply_fn, params, [x], budget=jc.budget(ratio=6),
        ...                    candidates=["dense", "int8", "kmeans4", "kmeans3"],
        ...                    progress=False)
        >>> compressed, _ = tx(params)
        >>> jc.nbytes(compressed) <= 4 * (32 * 64 + 64 * 16) // 6
        True
        >>> plan.bytes == jc.nbytes(compressed), sorted(plan.formats)
        (True, ['a/kernel', 'b/kernel'])
    """
    if not callable(apply_fn):
        raise TypeError(f"auto: apply_fn must be callable, got {type(apply_fn).__name__}")
    if not isinstance(budget, Budget):
        raise TypeError(
            f"auto: budget must be a jaxcompress.budget(...), got {type(budget).__name__}"
        )
    if not isinstance(progress, bool):
        raise TypeError(f"auto: progress must be True or False, got {progress!r}")
    if timer is not None and not callable(timer):
        raise TypeError(f"auto: timer must be callable, got {type(timer).__name__}")
    if timer is None:
        timer = functools.partial(median_times, progress=progress)
    formats = resolve_candidates(candidates)
    loss_metric = resolve_metric(metric)
    metric_name = metric if isinstance(metric, str) else getattr(metric, "__name__", "metric")
    batch_list = _batch_list(batches)
    selected, entries, treedef = _selected(params, where)
    paths = [entry.path for entry in selected]
    selected_paths = set(paths)

    compressing = {name: tx for name, tx in formats.items() if tx is not None}
    if data is None and compressing:
        data = calibrate(apply_fn, params, batch_list)
    keys = {
        name: None if key is None else jax.random.fold_in(key, position)
        for position, name in enumerate(compressing)
    }
    evaluate = _Evaluator(apply_fn, params, batch_list, loss_metric)
    leaves = [entry.leaf for entry in entries]
    dense_bytes = {entry.path: leaf_nbytes(entry.leaf) for entry in selected}

    # Latency: each weight's uses timed alone (dense here, each format in the loop).
    timing = budget.latency is not None
    bench = UseBench(apply_fn, params, batch_list[0], paths) if timing else None
    calls: dict[Key, Any] = {}
    if bench is not None:
        calls[(MODEL, DENSE)] = bench.model()
        for entry in selected:
            thunk = bench.use(entry.path, entry.leaf)
            if thunk is not None:
                calls[(entry.path, DENSE)] = thunk

    # measured[path][name] = (bytes, loss)
    measured: dict[str, dict[str, tuple[int, float]]] = {path: {} for path in paths}
    if DENSE in formats:
        for path in paths:
            measured[path][DENSE] = (dense_bytes[path], 0.0)
    pairs = [(name, entry) for name in compressing for entry in selected]
    current: tuple[str, dict[str, Any]] | None = None
    for name, entry in over_leaves(
        pairs,
        sizes=[dense_bytes[entry.path] for _, entry in pairs],
        description="auto",
        enabled=progress,
    ):
        if current is None or current[0] != name:
            current = (
                name,
                _compress_each(name, compressing[name], params, paths, key=keys[name], data=data),
            )
        leaf = current[1][entry.path]
        if leaf is None:
            continue
        trial = list(leaves)
        trial[entry.index] = materialize(leaf).astype(entry.leaf.dtype)
        loss = evaluate(jax.tree_util.tree_unflatten(treedef, trial), f"{entry.path!r} as {name!r}")
        measured[entry.path][name] = (leaf_nbytes(leaf), loss)
        if bench is not None:
            thunk = bench.use(entry.path, leaf)
            if thunk is not None:
                calls[(entry.path, name)] = thunk

    missing = [path for path in paths if not measured[path]]
    if missing:
        raise ValueError(
            f"auto: no candidate of {list(formats)} can take the weight(s) {missing}; add "
            f"'dense' to candidates or narrow where="
        )
    unselected = sum(
        leaf_nbytes(entry.leaf) for entry in entries if entry.path not in selected_paths
    )
    float32_bytes = sum(4 * int(np.prod(entry.leaf.shape)) for entry in selected)
    byte_limit = budget.limit(selected_float32=float32_bytes, unselected=unselected)

    latencies: dict[str, dict[str, float]] = {}
    model_units = base_units = 0
    latency_limit = None
    if bench is not None:
        times = _timed(timer, calls)
        # A weight whose uses are not modelled costs nothing here in any format: its
        # dense time stays inside the dense model's.
        latencies = {
            path: {name: times.get((path, name), 0.0) for name in [DENSE, *measured[path]]}
            for path in paths
        }
        model_units = to_units(times[(MODEL, DENSE)])
        base_units = model_units - sum(to_units(latencies[path][DENSE]) for path in paths)
        assert budget.latency is not None
        latency_limit = to_units(budget.latency) - base_units
    options = {
        path: {
            name: Option(
                bytes_,
                loss,
                to_units(latencies[path][name]) if bench is not None else None,
            )
            for name, (bytes_, loss) in measured[path].items()
        }
        for path in paths
    }
    picked = choose(
        options,
        byte_limit=byte_limit,
        latency_limit=latency_limit,
        unselected=unselected,
        latency_base=base_units,
        what=f"budget {budget} with candidates {list(formats)}",
    )
    choice = picked.formats
    names = {path: list(measured[path]) for path in paths}
    frontier = pareto_frontier([[measured[path][name] for name in names[path]] for path in paths])

    labels = jax.tree_util.tree_unflatten(
        treedef, [choice.get(entry.path, DENSE) for entry in entries]
    )
    used = sorted(set(choice.values()) | {DENSE}, key=[DENSE, *compressing].index)
    inner = partition(
        {
            name: chain() if name == DENSE else _keyed(compressing[name], keys[name])
            for name in used
        },
        labels,
    )
    calibration = data

    def apply(params: Any, *, key: Any = None, data: Any = None) -> Any:
        return inner(params, key=key, data=calibration if data is None else data)

    tx = Transform(apply, f"auto({budget}: {', '.join(f'{p}={c}' for p, c in choice.items())})")

    compressed, _ = tx(params)
    total_bytes = nbytes(compressed)
    measured_loss = evaluate(materialize(compressed), "the whole compressed tree")
    if byte_limit is not None and total_bytes - unselected > byte_limit:
        raise ValueError(
            f"auto: the chosen formats measured {picked.bytes + unselected:,} bytes leaf by "
            f"leaf but take {total_bytes:,} together, over the budget; a candidate's result "
            "depends on the other leaves it is given (a global criterion?): use per-layer "
            "candidates"
        )
    latency: dict[str, Any] = {}
    if bench is not None:
        assert picked.latency is not None and budget.latency is not None
        predicted = (base_units + picked.latency) / UNITS_PER_SECOND
        thunk = chosen_model(apply_fn, compressed, batch_list[0])
        measured_latency = float(_timed(timer, {(MODEL, CHOSEN): thunk})[(MODEL, CHOSEN)])
        exceeded = measured_latency > budget.latency
        if exceeded:
            warnings.warn(
                f"auto: the chosen formats were predicted to run in {predicted:.4g} s per "
                f"call, within the budget of {budget.latency:.4g} s, but measured "
                f"{measured_latency:.4g} s (plan.latency_exceeded); the use-by-use "
                "timings did not add up to the model's: lower the budget or measure again",
                stacklevel=2,
            )
        lat_frontier = pareto_frontier(
            [
                [(to_units(latencies[path][name]), measured[path][name][1]) for name in names[path]]
                for path in paths
            ]
        )
        latency = {
            "dense_latency": model_units / UNITS_PER_SECOND,
            "predicted_latency": predicted,
            "measured_latency": measured_latency,
            "latency_exceeded": exceeded,
            "latency_frontier": tuple(
                ((int(units) + base_units) / UNITS_PER_SECOND, float(cost))
                for units, cost in zip(lat_frontier.sizes, lat_frontier.costs, strict=True)
            ),
            "latencies": latencies,
            "latency_notes": dict(bench.notes),
        }
    rows = tuple(
        AutoRow(
            path=path,
            format=choice[path],
            bytes=measured[path][choice[path]][0],
            dense_bytes=dense_bytes[path],
            loss=measured[path][choice[path]][1],
            latency=latencies[path][choice[path]] if latencies else None,
            dense_latency=latencies[path][DENSE] if latencies else None,
        )
        for path in paths
    )
    plan = AutoPlan(
        rows=rows,
        budget=budget,
        metric=metric_name,
        bytes=total_bytes,
        dense_bytes=nbytes(params),
        predicted_loss=picked.loss,
        measured_loss=measured_loss,
        frontier=tuple(
            (int(size) + unselected, float(cost))
            for size, cost in zip(frontier.sizes, frontier.costs, strict=True)
        ),
        measurements=measured,
        **latency,
    )
    return tx, plan


def _timed(timer: Timer, calls: dict[Key, Any]) -> dict[Key, float]:
    """``timer(calls)``, checked: a finite, non-negative number of seconds for every key."""
    times = dict(timer(calls))
    for key in calls:
        value = times.get(key)
        if not isinstance(value, int | float) or not np.isfinite(value) or value < 0:
            raise ValueError(
                f"auto: the timer gave {value!r} for {key}; it must return non-negative "
                "finite seconds for every key it is given"
            )
    return times
