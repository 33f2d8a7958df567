"""The transform calling convention and its combinators.

A transform is a callable ``tx(params, *, key=None, data=None) -> (compressed, stats)``
built by a lowercase factory such as :func:`jaxcompress.prune`. It never mutates
its input and returns the same pytree structure with some leaves replaced by
compressed leaves. Combinators follow optax's names: :func:`chain`, :func:`masked`
and :func:`partition`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax

from jaxcompress.arrays import is_compressed
from jaxcompress.arrays.leading import output_first_inputs
from jaxcompress.core.paths import path_to_str
from jaxcompress.transforms.filters import Filter, compile_filter, warn_nothing_selected

ApplyFn = Callable[..., tuple[Any, Any]]


class LeafEntry(NamedTuple):
    """One leaf of a pytree, with its normalized path and position in the flat list.

    ``trailing_inputs`` is how many trailing axes are the inputs of a weight stored
    output first (equinox's ``Linear`` ``(out, in)``, ``Conv`` ``(out, in, *kernel)``;
    see :func:`~jaxcompress.arrays.leading.output_first_inputs`), and ``0`` for any
    other leaf, whose inputs (if any) lead, as in a linen ``(in, out)`` kernel.
    """

    index: int  # type: ignore[assignment]  # shadows tuple.index, which no caller uses
    path: str
    leaf: Any
    trailing_inputs: int = 0


class LeafPass(NamedTuple):
    """A transform's work on one pytree, leaf by leaf (see :attr:`Transform.leafwise`).

    Attributes:
        select: ``select(entry)``, whether the transform changes this leaf, given the
            leaf as it arrives (after the transforms before it in a :func:`chain`).
        step: ``step(entry) -> (new_leaf, leaf_stats)`` for a selected leaf.
        nothing_selected: optional ``nothing_selected(paths)``, called with every leaf
            path when ``select`` took none of them (to warn, as
            :func:`select_leaves` does for a named transform).

    The transform's stats are then the dict from each selected leaf's path to its
    ``leaf_stats``, in leaf order.
    """

    select: Callable[[LeafEntry], bool]
    step: Callable[[LeafEntry], tuple[Any, Any]]
    nothing_selected: Callable[[list[str]], None] | None = None


LeafwiseFn = Callable[[Any, Any], "LeafPass | None"]


class LeafStream(NamedTuple):
    """A pytree's leaves read one at a time, for planning over leaves that never coexist.

    Attributes:
        entries: ``entries()`` yields every leaf as a :class:`LeafEntry` in tree order,
            loading each as it goes; each call starts a new pass.
        length: the number of leaves.

    Example:
        >>> import numpy as np
        >>> stream = LeafStream(lambda: iter([LeafEntry(0, "w", np.ones(2))]), 1)
        >>> [entry.path for entry in stream.entries()]
        ['w']
    """

    entries: Callable[[], Iterator[LeafEntry]]
    length: int


class Passes(Sequence):
    """A lazy sequence: ``fn`` over ``source()``'s items, recomputed on every pass.

    A global plan iterates its items a few times; over a :class:`LeafStream` each
    pass loads the leaves again, one at a time, instead of holding them all.

    Example:
        >>> squares = Passes(lambda: iter(range(3)), 3, lambda x: x * x)
        >>> list(squares), list(squares), len(squares)
        ([0, 1, 4], [0, 1, 4], 3)
    """

    def __init__(self, source: Callable[[], Iterator[Any]], count: int, fn: Callable | None = None):
        self._source, self._count = source, count
        self._fn = fn if fn is not None else (lambda x: x)

    def __iter__(self) -> Iterator[Any]:
        return map(self._fn, self._source())

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return list(self)[index]
        for position, item in enumerate(self):
            if position == index % self._count:
                return item
        raise IndexError(index)


def lazy_map(fn: Callable[[Any], Any], items: Sequence) -> Sequence:
    """``fn`` over ``items``: a list for a list, a :class:`Passes` for a lazy one.

    Example:
        >>> lazy_map(abs, [-1, 2])
        [1, 2]
    """
    if isinstance(items, Passes):
        return Passes(lambda: iter(items), len(items), fn)
    return [fn(item) for item in items]


@dataclasses.dataclass(frozen=True)
class Transform:
    """A compression transform: call it as ``tx(params, *, key=None, data=None)``.

    Attributes:
        apply: the function doing the work, with the calling convention above.
        name: a short description, shown in reports and reprs.
        leafwise: optional, for transforms that work on each leaf on its own once
            planned: ``leafwise(params, data) -> LeafPass | None``, the same work as
            ``apply(params, data=data)`` (same leaves, same stats) split by leaf.
            ``params`` is ``None`` when the input is not known yet (a later stage of
            a :func:`chain`); return ``None`` where that is not possible (for example
            a global criterion that needs every leaf first). :func:`chain` uses it to
            run all its stages on one leaf before the next, so no intermediate tree
            exists. ``params`` may also be a :class:`LeafStream` (leaves loaded one
            at a time, as :func:`jaxcompress.compress_file` reads them): a global
            criterion is then planned from the streamed leaves.
        stages: for a :func:`chain`, its transforms in order (nested chains
            flattened); empty otherwise.
        where: the filter a per-leaf transform selects leaves with (``None`` if it
            has none); with ``name`` it identifies a job a resumed
            :func:`jaxcompress.compress_file` may carry on.

    Example:
        >>> import jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> tx = jc.prune(0.5)
        >>> compressed, stats = tx({"w": jnp.ones((2, 2))})
        >>> tx.name
        'prune(0.5, scope=layer)'
    """

    apply: ApplyFn
    name: str
    leafwise: LeafwiseFn | None = dataclasses.field(default=None, repr=False, compare=False)
    stages: tuple[Transform, ...] = dataclasses.field(default=(), repr=False, compare=False)
    where: Any = dataclasses.field(default=None, repr=False, compare=False)

    def __call__(self, params: Any, *, key: jax.Array | None = None, data: Any = None):
        return self.apply(params, key=key, data=data)


def flatten_leaves(tree: Any) -> tuple[list[LeafEntry], jax.tree_util.PyTreeDef]:
    """Flattens ``tree`` keeping compressed leaves whole, with ``a/b/kernel`` paths.

    Example:
        >>> import jax.numpy as jnp
        >>> entries, _ = flatten_leaves({"dense": {"kernel": jnp.zeros((2, 2))}})
        >>> [entry.path for entry in entries]
        ['dense/kernel']
    """
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_compressed)
    output_first = output_first_inputs(tree)
    entries = []
    for i, (key_path, leaf) in enumerate(with_paths):
        path = path_to_str(key_path)
        entries.append(LeafEntry(i, path, leaf, output_first.get(path, 0)))
    return entries, treedef


def select_leaves(
    tree: Any, where: Filter, *, name: str | None = None
) -> tuple[list[LeafEntry], list[LeafEntry], Any]:
    """Splits the leaves of ``tree`` into those ``where`` selects and the rest.

    Args:
        tree: the pytree.
        where: the filter.
        name: the transform selecting; given, a filter that selects no leaf of a
            non-empty tree warns (:func:`~jaxcompress.transforms.filters.warn_nothing_selected`).

    Returns:
        ``(selected, all_entries, treedef)``.

    Example:
        >>> import jax.numpy as jnp
        >>> params = {"k": jnp.zeros((2, 2)), "b": jnp.zeros(2)}
        >>> selected, entries, _ = select_leaves(params, "k")
        >>> [entry.path for entry in selected], len(entries)
        (['k'], 2)
    """
    select = compile_filter(where)
    entries, treedef = flatten_leaves(tree)
    selected = [entry for entry in entries if select(entry.path, entry.leaf)]
    if name is not None and not selected:
        warn_nothing_selected(name, where, [entry.path for entry in entries])
    return selected, entries, treedef


def _split_key(key: jax.Array | None, count: int) -> list[jax.Array | None]:
    if key is None:
        return [None] * count
    return list(jax.random.split(key, count))


def chain(*transforms: Transform) -> Transform:
    """Applies transforms one after another, each to the previous one's output.

    The key, if given, is split so each transform gets its own. Stats come back as
    a tuple with one entry per transform.

    Without a key, on concrete arrays, where every transform supports it
    (:attr:`Transform.leafwise`: every factory built on
    :func:`jaxcompress.transforms.engine.per_leaf` does, unless it shows a progress
    bar or, past the first stage, needs every leaf for a global criterion), the
    chain runs leaf by leaf: a global criterion of the first stage is computed first
    from all leaves, then each leaf goes through every stage before the next leaf
    starts. The result and stats are identical; only one leaf's intermediate values
    exist at a time instead of a whole intermediate tree.

    Args:
        *transforms: the transforms to apply, in order.

    Returns:
        A transform.

    Example:
        >>> import jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> params = {"a": jnp.arange(1.0, 9.0).reshape(2, 4), "b": jnp.ones((2, 2))}
        >>> tx = jc.chain(jc.masked(jc.prune(0.5), "a"), jc.masked(jc.prune(0.25), "b"))
        >>> compressed, stats = tx(params)
        >>> compressed["a"].nnz, compressed["b"].nnz, len(stats)
        (4, 3, 2)
    """
    for position, tx in enumerate(transforms):
        if not callable(tx):
            raise TypeError(f"chain: argument {position} is not a transform: {tx!r}")

    def apply(params, *, key=None, data=None):
        passes = _leaf_passes(transforms, params, key=key, data=data)
        if passes is not None:
            return _apply_leaf_by_leaf(passes, params)
        all_stats = []
        for tx, sub_key in zip(transforms, _split_key(key, len(transforms)), strict=True):
            params, stats = tx(params, key=sub_key, data=data)
            all_stats.append(stats)
        return params, tuple(all_stats)

    names = ", ".join(getattr(tx, "name", repr(tx)) for tx in transforms)
    stages = tuple(stage for tx in transforms for stage in (getattr(tx, "stages", ()) or (tx,)))
    return Transform(apply, f"chain({names})", stages=stages)


def _leaf_passes(transforms, params, *, key, data) -> list[LeafPass] | None:
    """Each transform's :class:`LeafPass` where the whole chain can run leaf by leaf."""
    if len(transforms) < 2 or key is not None:
        # Keys are split per transform and then per selected leaf of its input, which
        # only the step-by-step order knows.
        return None
    leafwise = [fn for tx in transforms if (fn := getattr(tx, "leafwise", None)) is not None]
    if len(leafwise) < len(transforms):
        return None
    if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(params)):
        # Under jit nothing is materialized stage by stage anyway.
        return None
    # Later stages first: they are cheap to ask, the first may plan over every leaf.
    later = [fn(None, data) for fn in leafwise[1:]]
    if any(leaf_pass is None for leaf_pass in later):
        return None
    first = leafwise[0](params, data)
    return None if first is None else [first, *later]


def _apply_leaf_by_leaf(passes: list[LeafPass], params: Any) -> tuple[Any, tuple]:
    """Every pass on one leaf, then the next leaf; stats as the passes would give them."""
    entries, treedef = flatten_leaves(params)
    leaves = [entry.leaf for entry in entries]
    all_stats: tuple[dict[str, Any], ...] = tuple({} for _ in passes)
    taken = [0] * len(passes)
    for entry in entries:
        leaf = entry.leaf
        for position, (leaf_pass, stats) in enumerate(zip(passes, all_stats, strict=True)):
            current = entry._replace(leaf=leaf)
            if leaf_pass.select(current):
                leaf, stats[entry.path] = leaf_pass.step(current)
                taken[position] += 1
        # The stage outputs before the last are dropped here, leaf by leaf.
        leaves[entry.index] = leaf
    for leaf_pass, count in zip(passes, taken, strict=True):
        if count == 0 and leaf_pass.nothing_selected is not None:
            leaf_pass.nothing_selected([entry.path for entry in entries])
    return jax.tree_util.tree_unflatten(treedef, leaves), all_stats


class _Hidden:
    """A placeholder with no children, so it vanishes from the inner transform's view."""

    def __repr__(self) -> str:
        return "<hidden>"


jax.tree_util.register_pytree_node(_Hidden, lambda _: ((), None), lambda _, __: _Hidden())


def _is_leaf_or_hidden(x: Any) -> bool:
    return is_compressed(x) or isinstance(x, _Hidden)


def _apply_to_subset(tx: Transform, params, keep: list[bool], *, key, data):
    """Runs ``tx`` on the visible leaves flagged in ``keep``; the rest come back as they were.

    Placeholders left by an enclosing ``masked`` stay hidden and consume no flag, so
    combinators nest.
    """
    leaves, treedef = jax.tree_util.tree_flatten(params, is_leaf=_is_leaf_or_hidden)
    flags = iter(keep)
    inner_input = [
        leaf if isinstance(leaf, _Hidden) or next(flags) else _Hidden() for leaf in leaves
    ]
    inner_output, stats = tx(jax.tree_util.tree_unflatten(treedef, inner_input), key=key, data=data)
    new_leaves = jax.tree_util.tree_flatten(inner_output, is_leaf=_is_leaf_or_hidden)[0]
    if len(new_leaves) != len(leaves):
        raise ValueError(f"{tx.name}: the transform changed the pytree structure")
    merged = [
        old if isinstance(new, _Hidden) else new
        for old, new in zip(leaves, new_leaves, strict=True)
    ]
    return jax.tree_util.tree_unflatten(treedef, merged), stats


def masked(transform: Transform, where: Filter) -> Transform:
    """Applies ``transform`` only to the leaves ``where`` selects.

    The inner transform does not see the other leaves at all, so a global
    criterion (for example ``prune(scope="global")``) is computed over the
    selected leaves only. Unselected leaves come back unchanged.

    Args:
        transform: the transform to restrict.
        where: a filter (regex string, predicate, or tuple of those).

    Returns:
        A transform.

    Example:
        >>> import jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> params = {"enc": {"kernel": jnp.ones((4, 4))}, "dec": {"kernel": jnp.ones((4, 4))}}
        >>> out, _ = jc.masked(jc.prune(0.5), "enc")(params)
        >>> jc.is_compressed(out["enc"]["kernel"]), jc.is_compressed(out["dec"]["kernel"])
        (True, False)
    """
    select = compile_filter(where)

    def apply(params, *, key=None, data=None):
        entries, _ = flatten_leaves(params)
        keep = [bool(select(entry.path, entry.leaf)) for entry in entries]
        if not any(keep):
            warn_nothing_selected("masked", where, [entry.path for entry in entries])
        return _apply_to_subset(transform, params, keep, key=key, data=data)

    return Transform(apply, f"masked({getattr(transform, 'name', transform)!s}, where={where!r})")


def partition(transforms: Mapping[Any, Transform], labels: Any) -> Transform:
    """Applies a different transform to each labelled group of leaves.

    Args:
        transforms: a mapping from label to transform.
        labels: a pytree with the structure of the params whose leaves are labels,
            or a function ``params -> labels pytree``. Every label must be a key of
            ``transforms``; use ``jaxcompress.chain()`` (the identity) for groups to
            leave alone.

    Returns:
        A transform whose stats are a dict from label to that group's stats.

    Raises:
        ValueError: when a label has no transform, naming the leaf path.

    Example:
        >>> import jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> params = {"a": jnp.ones((4, 4)), "b": jnp.ones((4, 4)), "c": jnp.ones(4)}
        >>> tx = jc.partition(
        ...     {"heavy": jc.prune(0.75), "light": jc.prune(0.25), "keep": jc.chain()},
        ...     {"a": "heavy", "b": "light", "c": "keep"},
        ... )
        >>> out, _ = tx(params)
        >>> out["a"].nnz, out["b"].nnz, out["c"].shape
        (4, 12, (4,))
    """
    transforms = dict(transforms)

    def apply(params, *, key=None, data=None):
        label_tree = labels(params) if callable(labels) else labels
        entries, treedef = flatten_leaves(params)
        label_leaves = treedef.flatten_up_to(label_tree)
        for entry, label in zip(entries, label_leaves, strict=True):
            if label not in transforms:
                raise ValueError(
                    f"partition: leaf {entry.path!r} has label {label!r}, which is not a key of "
                    f"transforms ({sorted(map(str, transforms))})"
                )
        all_stats = {}
        for (label, tx), sub_key in zip(
            transforms.items(), _split_key(key, len(transforms)), strict=True
        ):
            keep = [leaf_label == label for leaf_label in label_leaves]
            params, all_stats[label] = _apply_to_subset(tx, params, keep, key=sub_key, data=data)
        return params, all_stats

    return Transform(apply, f"partition({', '.join(map(str, transforms))})")
