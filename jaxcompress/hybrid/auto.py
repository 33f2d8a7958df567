"""``auto``: one compression format per weight, chosen by measurement under a budget.

Weights differ in what they tolerate: one layer keeps its outputs through 3-bit
k-means while another needs int8. ``auto`` measures instead of guessing. For each
candidate format it compresses every selected weight once (one pass), then, weight
by weight, runs the model on the calibration batches with only that weight in that
format and every other weight dense, and compares the outputs with the dense ones
(``metric``). Treating the losses as additive, it picks one format per weight with
the least total predicted loss within the budget, exactly (a multiple-choice
knapsack over the measured points, :mod:`jaxcompress.numerics.knapsack`), and returns
an ordinary :func:`~jaxcompress.partition` transform with an :class:`AutoPlan`.
"""

from __future__ import annotations

import dataclasses
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
    3. With the losses taken as additive, the choice of one format per weight
       minimising their sum with the bytes within the budget is exact: a
       multiple-choice knapsack solved by merging Pareto frontiers
       (:func:`jaxcompress.numerics.knapsack.pareto_frontier`).
    4. The chosen tree is built and measured as a whole.

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
            (float32 bytes of the selected weights over their compressed bytes).
            ``latency=`` is not implemented yet.
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
        progress: a bar on stderr over the (candidate, weight) evaluations.

    Returns:
        ``(tx, plan)``: the transform and an :class:`AutoPlan`
        (``print(plan)`` shows its table, ``plan.plot()`` the loss-size frontier).

    Raises:
        ValueError: a budget no choice reaches (the message gives the smallest reachable
            size), ``where`` selecting nothing, an empty ``batches``, a weight with no
            available candidate, an unknown metric or candidate name, or a metric
            that is not one finite number.
        TypeError: ``budget`` not a :class:`Budget`, a candidate that is not a
            transform, or a selected leaf that is compressed or not floating.
        NotImplementedError: a ``latency=`` budget.

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
    if budget.latency is not None:
        raise NotImplementedError(
            "auto: latency budgets are not measured yet; give budget(bytes=...) or "
            "budget(ratio=...)"
        )
    if not isinstance(progress, bool):
        raise TypeError(f"auto: progress must be True or False, got {progress!r}")
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

    missing = [path for path in paths if not measured[path]]
    if missing:
        raise ValueError(
            f"auto: no candidate of {list(formats)} can take the weight(s) {missing}; add "
            f"'dense' to candidates or narrow where="
        )
    names = {path: list(measured[path]) for path in paths}
    options = [[measured[path][name] for name in names[path]] for path in paths]
    unselected = sum(
        leaf_nbytes(entry.leaf) for entry in entries if entry.path not in selected_paths
    )
    float32_bytes = sum(4 * int(np.prod(entry.leaf.shape)) for entry in selected)
    limit = budget.limit(selected_float32=float32_bytes, unselected=unselected)
    assert limit is not None  # a latency-only budget was refused above
    frontier = pareto_frontier(options)
    fits = np.flatnonzero(frontier.sizes <= limit)
    if len(fits) == 0:
        smallest = int(frontier.sizes[0])
        raise ValueError(
            f"auto: budget {budget} cannot be met: the smallest reachable size is "
            f"{smallest + unselected:,} bytes for the whole tree ({smallest:,} for the "
            f"selected weights, ratio {float32_bytes / max(smallest, 1):.3g} to float32), "
            f"with candidates {list(formats)}"
        )
    point = int(fits[-1])  # losses fall along the frontier: the largest fit is the best
    choice = {
        path: names[path][option]
        for path, option in zip(paths, frontier.choices(point), strict=True)
    }

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
    rows = tuple(
        AutoRow(
            path=path,
            format=choice[path],
            bytes=measured[path][choice[path]][0],
            dense_bytes=dense_bytes[path],
            loss=measured[path][choice[path]][1],
        )
        for path in paths
    )
    plan = AutoPlan(
        rows=rows,
        budget=budget,
        metric=metric_name,
        bytes=total_bytes,
        dense_bytes=nbytes(params),
        predicted_loss=float(frontier.costs[point]),
        measured_loss=measured_loss,
        frontier=tuple(
            (int(size) + unselected, float(cost))
            for size, cost in zip(frontier.sizes, frontier.costs, strict=True)
        ),
        measurements=measured,
    )
    if total_bytes - unselected > limit:
        raise ValueError(
            f"auto: the chosen formats measured {int(frontier.sizes[point]) + unselected:,} "
            f"bytes leaf by leaf but take {total_bytes:,} together, over the budget; a "
            "candidate's result depends on the other leaves it is given (a global "
            "criterion?): use per-layer candidates"
        )
    return tx, plan
