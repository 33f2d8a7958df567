"""The one per-leaf driver under every compression factory.

A factory such as :func:`jaxcompress.prune` describes its work on one leaf (how to
check it, how to compress it); :func:`per_leaf` turns that into a
:class:`~jaxcompress.transforms.base.Transform` and does the rest the same way for
every method:

1. ``prepare(key, data)``: checks of the call itself (a key, ``data=``) and what
   every leaf's check reads (statistics by path).
2. select the leaves ``where`` picks, and check every one of them before any work,
   so nothing is half done and errors name the leaf path. A check that finds the
   method cannot take a leaf raises :class:`Unfit`: under the factory's default
   filter that leaf is skipped (left as it is, stats ``{"skipped": reason}``, one
   warning per call naming every skipped path); under a user's own filter it raises.
3. ``plan(items)``: optional, a plan over all selected leaves at once (a global
   threshold); without one, each leaf is planned on its own and the transform can
   run leaf by leaf in a :func:`~jaxcompress.transforms.base.chain`.
4. split the key, one per selected leaf; show the progress bar.
5. ``step(item, key)``: compress one leaf.
6. place the result next to the weight's sharding, re-wrap a ``Sparse`` leaf's
   compressed values in its mask, and gather the stats by path in leaf order.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, cast

import jax
from jax.sharding import NamedSharding

from jaxcompress.arrays import Sparse
from jaxcompress.arrays.checks import check_selected_leaf, check_values_to_compress
from jaxcompress.core.checks import is_traced
from jaxcompress.core.mesh import named_sharding_of, place_like
from jaxcompress.core.progress import leaf_bytes, over_leaves
from jaxcompress.transforms.base import (
    LeafEntry,
    LeafPass,
    LeafStream,
    Passes,
    Transform,
    select_leaves,
)
from jaxcompress.transforms.filters import Filter, compile_filter, warn_nothing_selected

__all__ = [
    "LeafItem",
    "Unfit",
    "per_leaf",
    "place_children",
]


class Unfit(ValueError):
    """A check's verdict that the method cannot take a leaf (its shape does not fit).

    Raised by a factory's per-leaf ``check``, with a message naming the leaf. Under
    the factory's default filter :func:`per_leaf` skips the leaf instead; under a
    user's own filter it reaches the caller as the ``ValueError`` it is.

    Example:
        >>> isinstance(Unfit("prune_nm: leaf 'w' ..."), ValueError)
        True
    """


class _Skip(NamedTuple):
    """The plan of a selected leaf the default filter picked but the method cannot take."""

    reason: str


class LeafItem(NamedTuple):
    """One selected leaf, checked and planned.

    Attributes:
        entry: the leaf as it is in the tree (a ``Sparse`` leaf stays whole here).
        weight: the checked array the step compresses: the leaf itself, or the kept
            values of a ``Sparse`` leaf when the method nests in ``Sparse``.
        plan: whatever the method's check (or global plan) worked out for this leaf.
    """

    entry: LeafEntry
    weight: jax.Array
    plan: Any


Prepare = Callable[[jax.Array | None, Any], Any]
Check = Callable[[LeafEntry, jax.Array, Any], Any]
GlobalPlan = Callable[[list[LeafItem]], Sequence[Any]]
Step = Callable[[LeafItem, jax.Array | None], tuple[Any, Any]]
Place = Callable[[Any, NamedSharding | None], Any]


def place_children(leaf: Any, reference: NamedSharding | None) -> Any:
    """Puts every child array of ``leaf`` on ``reference``'s mesh, laid out like the weight.

    The default placement of :func:`per_leaf` (see :func:`jaxcompress.core.mesh.spec_for`).

    Example:
        >>> import jax.numpy as jnp
        >>> from jaxcompress.arrays import Sparse
        >>> leaf = Sparse(jnp.ones(2), jnp.ones((2, 1), jnp.uint8), (2, 2), jnp.float32)
        >>> place_children(leaf, None) is leaf
        True
    """
    if reference is None:
        return leaf
    return jax.tree.map(functools.partial(place_like, reference=reference), leaf)


def _no_preparation(key: jax.Array | None, data: Any) -> None:
    del key, data


def _no_check(entry: LeafEntry, weight: jax.Array, context: Any) -> None:
    del entry, weight, context


def _split_key(key: jax.Array | None, count: int) -> list[jax.Array | None]:
    if key is None:
        return [None] * count
    return list(jax.random.split(key, count))


def per_leaf(
    name: str,
    where: Filter,
    *,
    step: Step,
    check: Check = _no_check,
    prepare: Prepare = _no_preparation,
    plan: GlobalPlan | None = None,
    place: Place = place_children,
    progress: bool = False,
    nests_in_sparse: bool = False,
    default_where: Filter | None = None,
) -> Transform:
    """Lifts a per-leaf compression step into a :class:`~jaxcompress.transforms.base.Transform`.

    Args:
        name: the transform's name; errors start with it.
        where: which leaves to compress.
        step: ``step(item, key) -> (new_leaf, leaf_stats)`` for one :class:`LeafItem`;
            ``new_leaf`` ``None`` leaves the leaf as it is (its stats still count).
        check: ``check(entry, weight, context) -> plan``, the method's checks of one
            selected leaf (after the shared ones: floating, finite, not empty, not
            already compressed); raise naming ``entry.path``. Its result is the
            item's ``plan``.
        prepare: ``prepare(key, data) -> context``, checks of the call made before
            any leaf is looked at; ``context`` goes to every ``check``.
        plan: optional ``plan(items) -> plans``, one new plan per item computed over
            every selected leaf at once (a global threshold). A transform with one
            does not run leaf by leaf as a later stage of a chain.
        place: ``place(new_leaf, reference)`` puts the compressed leaf's children next
            to the weight's ``NamedSharding`` (``None`` when it has none).
        progress: show a bar on stderr while it runs (not under ``jit``, and not in
            a chain running leaf by leaf).
        nests_in_sparse: whether a selected ``Sparse`` leaf has its kept values
            compressed and re-wrapped in its mask (value compressors: quantize,
            cluster); otherwise it is refused like any compressed leaf.
        default_where: the factory's default filter. When ``where`` is it, a leaf
            whose ``check`` raises :class:`Unfit` is skipped: left as it is, with stats
            ``{"skipped": reason}`` (``True`` under ``jit``, which returns no
            strings), and one warning per call lists the skipped paths.

    Returns:
        A transform whose stats map each selected leaf's path to its step's stats, in
        leaf order, with :attr:`~jaxcompress.transforms.base.Transform.leafwise` set,
        so that :func:`~jaxcompress.transforms.base.chain` runs it leaf by leaf.

    Example:
        >>> import jax.numpy as jnp
        >>> from jaxcompress.transforms.base import chain
        >>> halve = per_leaf("halve", "w", step=lambda item, key: (item.weight / 2, {}))
        >>> out, stats = chain(halve, halve)({"w": jnp.ones(2), "b": jnp.ones(2)})
        >>> out["w"].tolist(), out["b"].tolist(), stats
        ([0.25, 0.25], [1.0, 1.0], ({'w': {}}, {'w': {}}))
    """
    select = compile_filter(where)
    skips_unfit = default_where is not None and where is default_where

    def checked(entry: LeafEntry, context: Any) -> LeafItem:
        if nests_in_sparse:
            weight = check_values_to_compress(name, entry.path, entry.leaf)
        else:
            weight = check_selected_leaf(name, entry.path, entry.leaf)
        try:
            return LeafItem(entry, weight, check(entry, weight, context))
        except Unfit as unfit:
            if not skips_unfit:
                raise
            return LeafItem(entry, weight, _Skip(str(unfit)))

    def warn_skipped(items: list[LeafItem]) -> None:
        skipped = [item for item in items if isinstance(item.plan, _Skip)]
        if skipped:
            reasons = "; ".join(item.plan.reason for item in skipped)
            paths = ", ".join(repr(item.entry.path) for item in skipped)
            warnings.warn(
                f"{name}: the default filter selected {len(skipped)} leaf/leaves the method "
                f"cannot take, left as they are: {paths} ({reasons}). Pass where= to "
                "choose the leaves yourself",
                stacklevel=5,
            )

    def planned(params: Any, key: jax.Array | None, data: Any):
        """Every selected leaf checked (and globally planned) before any work."""
        context = prepare(key, data)
        selected, entries, treedef = select_leaves(params, where, name=name)
        items = [checked(entry, context) for entry in selected]
        warn_skipped(items)
        if plan is not None:
            # Skipped leaves take no part in a global criterion.
            fit = [item for item in items if not isinstance(item.plan, _Skip)]
            plans = iter(plan(fit))
            items = [
                item if isinstance(item.plan, _Skip) else item._replace(plan=next(plans))
                for item in items
            ]
        return items, entries, treedef

    def finish(item: LeafItem, key: jax.Array | None) -> tuple[Any, Any]:
        """One leaf compressed, placed and re-nested: ``(new leaf, leaf stats)``."""
        if isinstance(item.plan, _Skip):
            reason = True if is_traced(item.weight) else item.plan.reason
            return item.entry.leaf, {"skipped": reason}
        new_leaf, leaf_stats = step(item, key)
        if new_leaf is None:
            return item.entry.leaf, leaf_stats
        new_leaf = place(new_leaf, named_sharding_of(item.weight))
        sparse = item.entry.leaf
        if isinstance(sparse, Sparse):
            new_leaf = Sparse(new_leaf, sparse.mask, sparse.shape, sparse.dtype)
        return new_leaf, leaf_stats

    def apply(params, *, key=None, data=None):
        items, entries, treedef = planned(params, key, data)
        leaves = [entry.leaf for entry in entries]
        stats = {}
        for item, leaf_key in over_leaves(
            list(zip(items, _split_key(key, len(items)), strict=True)),
            sizes=[leaf_bytes(item.weight) for item in items],
            description=name,
            enabled=progress and not any(is_traced(item.weight) for item in items),
        ):
            leaves[item.entry.index], stats[item.entry.path] = finish(item, leaf_key)
        return jax.tree_util.tree_unflatten(treedef, leaves), stats

    def leafwise(params, data):
        # A chain drives the leaves itself, so there is no bar to show.
        if progress:
            return None
        if isinstance(params, LeafStream):
            return streamed(params, data) if plan is not None else leafwise(None, data)
        if params is None:
            if plan is not None:
                return None
            context = prepare(None, data)

            def later_step(entry: LeafEntry) -> tuple[Any, Any]:
                # A later stage sees one leaf at a time, so it warns per skipped leaf.
                item = checked(entry, context)
                warn_skipped([item])
                return finish(item, None)

            return LeafPass(
                lambda entry: bool(select(entry.path, entry.leaf)),
                later_step,
                functools.partial(warn_nothing_selected, name, where),
            )
        items, _, _ = planned(params, None, data)
        if any(is_traced(item.weight) for item in items):
            return None
        # Popped, so each planned weight is let go once its leaf is done.
        todo = {item.entry.index: item for item in items}
        return LeafPass(
            lambda entry: entry.index in todo, lambda e: finish(todo.pop(e.index), None)
        )

    def streamed(stream: LeafStream, data: Any) -> LeafPass:
        """The global plan from leaves loaded one at a time, then a per-leaf pass."""
        global_plan = plan
        assert global_plan is not None  # only called for a transform with a global plan
        context = prepare(None, data)

        def items():
            for entry in stream.entries():
                if select(entry.path, entry.leaf):
                    yield checked(entry, context)

        # One pass checks every selected leaf before any work and keeps only its plan.
        # (The weight is dropped too: the plan pass must not hold every leaf.)
        light = [
            LeafItem(item.entry._replace(leaf=None), None, item.plan)  # type: ignore[arg-type]
            for item in items()
        ]
        warn_skipped(light)
        fit = [item for item in light if not isinstance(item.plan, _Skip)]
        if not light:
            return LeafPass(
                lambda entry: False,
                lambda entry: finish(checked(entry, context), None),
                functools.partial(warn_nothing_selected, name, where),
            )
        fit_indices = {item.entry.index for item in fit}

        def fit_items():
            return (item for item in items() if item.entry.index in fit_indices)

        plans = dict(
            zip(
                (item.entry.index for item in fit),
                global_plan(cast(Any, Passes(fit_items, len(fit)))),
                strict=True,
            )
        )
        todo = {item.entry.index: item for item in light}

        def step_one(entry: LeafEntry) -> tuple[Any, Any]:
            item = checked(entry, context)
            todo.pop(entry.index)
            if entry.index in plans:
                item = item._replace(plan=plans.pop(entry.index))
            return finish(item, None)

        return LeafPass(lambda entry: entry.index in todo, step_one)

    return Transform(apply, name, leafwise, where=where)
