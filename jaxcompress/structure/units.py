"""Structured pruning that makes models physically smaller: units, channels and heads.

:func:`prune_units` removes whole units (Dense output features, conv channels,
attention heads, head dimensions) together with every slice coupled to them, which
:mod:`jaxcompress.coupling` finds in the traced computation. The result is a pytree of
*smaller dense arrays*, so the speedup needs no sparse kernel on any hardware, and
``stats.apply_fn(thinned, x)`` runs it by re-evaluating the traced program with the
new shapes (:mod:`jaxcompress.thinning`). For an nnx model it also rebuilds the module
with smaller layers.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import sys
from collections.abc import Callable, Iterable, Mapping
from fractions import Fraction
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.arrays.leading import is_equinox_module
from jaxcompress.arrays.tree import combine, on_arrays, split_arrays
from jaxcompress.core.checks import is_traced
from jaxcompress.core.paths import path_to_str
from jaxcompress.core.progress import over_leaves
from jaxcompress.structure.coupling import Coupling, Group, analyze, trace_flat
from jaxcompress.structure.equinox_sizes import resize_equinox
from jaxcompress.structure.thinning import cut, flops, new_shapes_of, run, zero_removed
from jaxcompress.transforms.base import Transform
from jaxcompress.transforms.filters import Filter, compile_filter

__all__ = ["GroupResult", "UnitStats", "coupled_groups", "prune_units"]

_IMPORTANCES = ("l1", "l2", "activation", "taylor")


def _signature(args: tuple[Any, ...]) -> tuple[Any, ...]:
    leaves, tree = jax.tree_util.tree_flatten(args)
    return (tree, tuple((tuple(np.shape(x)), str(jnp.result_type(x))) for x in leaves))


def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)), tree)


class _Programs:
    """The analysed program of ``apply_fn`` for each input signature, traced on demand."""

    def __init__(self, apply_fn: Callable[..., Any], params: Any) -> None:
        self.apply_fn = apply_fn
        self.params = _abstract(params)
        self.cache: dict[Any, Coupling] = {}

    def get(self, args: tuple[Any, ...]) -> Coupling:
        signature = _signature(args)
        if signature not in self.cache:
            flat = trace_flat(self.apply_fn, self.params, *_abstract(args))
            self.cache[signature] = analyze(flat)
        return self.cache[signature]


def _as_args(example_input: Any) -> tuple[Any, ...]:
    return example_input if isinstance(example_input, tuple) else (example_input,)


def _module_fn(apply_fn: Any) -> tuple[Callable[..., Any], Any]:
    nnx = sys.modules.get("flax.nnx")  # flax loads only when used; unloaded, no nnx modules
    if nnx is not None and isinstance(apply_fn, nnx.Module):
        graphdef, _ = nnx.split(apply_fn)
        return (lambda state, *args: nnx.merge(graphdef, state)(*args)), graphdef
    if not callable(apply_fn):
        raise TypeError(f"prune_units: apply_fn must be callable, got {type(apply_fn).__name__}")
    if is_equinox_module(apply_fn):
        raise TypeError(
            "prune_units: for an equinox module, pass apply_fn=lambda m, x: jax.vmap(m)(x) "
            "(or however it is called) and give the module itself to the transform"
        )
    return apply_fn, None


def coupled_groups(apply_fn: Any, params: Any, example_input: Any) -> list[Group]:
    """The groups of coupled units in ``apply_fn(params, example_input)``.

    Args:
        apply_fn: ``apply_fn(params, x)``, or an nnx module (then ``params`` is its
            ``nnx.State`` and the module is called as ``nnx.merge(graphdef, params)(x)``).
        params: the parameter pytree (shapes suffice).
        example_input: an input (or a tuple of inputs) of the shape used later.

    Returns:
        Every group some parameter produces, in program order; ``group.reason`` says
        why a group cannot be pruned.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> from jaxcompress.examples.models import LeNet300100
        >>> model, x = LeNet300100(), jnp.zeros((1, 64))
        >>> params = model.init(jax.random.key(0), x)["params"]
        >>> for g in jc.coupled_groups(lambda p, x: model.apply({"params": p}, x), params, x):
        ...     print(g.name, g.size, g.reason)
        dense1/kernel 300 None
        dense2/kernel 100 None
        dense3/kernel 10 a model output
    """
    fn, _ = _module_fn(apply_fn)
    arrays, rest = split_arrays(params)
    return list(_Programs(on_arrays(fn, rest), arrays).get(_as_args(example_input)).groups)


@dataclasses.dataclass(frozen=True)
class GroupResult:
    """What :func:`prune_units` did to one group.

    Attributes:
        name: the group's name (see :class:`jaxcompress.coupling.Group`).
        size: units before pruning.
        removed: units removed.
        kept: the kept unit indices, ascending.
        members: ``(parameter path, axis)`` of every slice cut.
        scores: each unit's importance.

    Example:
        >>> import jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> params = {"a": jnp.array([[1.0, 0.1, 2.0]]), "b": jnp.ones((3, 1))}
        >>> fn = lambda p, x: jnp.tanh(x @ p["a"]) @ p["b"]
        >>> _, stats = jc.prune_units(0.34, apply_fn=fn, example_input=jnp.ones((1, 1)))(params)
        >>> stats["a"].removed, stats["a"].kept.tolist()
        (1, [0, 2])
    """

    name: str
    size: int
    removed: int
    kept: np.ndarray
    members: tuple[tuple[str, int], ...]
    scores: np.ndarray


@dataclasses.dataclass(frozen=True)
class UnitStats:
    """The stats of :func:`prune_units`.

    Attributes:
        groups: the pruned groups, in program order.
        skipped: groups left whole, by name, with the reason (an op, a model output).
        apply_fn: ``apply_fn(thinned, *inputs)``: the traced program re-evaluated on the
            smaller arrays; jit it like any function. Inputs of another batch size are
            traced again on first use.
        module: for an nnx module passed as ``apply_fn``, the module rebuilt with the
            thinned state (layer sizes updated), else ``None``. It is also ``None``
            when the rebuilt module's output differs from ``apply_fn``'s on the example
            input (then ``module_note`` says by how much): a module that computes
            constants from shapes, like attention's ``1/sqrt(head_dim)``, changes them
            when head dimensions are removed, while the traced program keeps them.
        module_note: why ``module`` is ``None`` for an nnx module, else ``""``.
        flops: ``(dense, thinned)`` multiply-add FLOPs of the example input's program.

    Example:
        >>> import jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> params = {"a": jnp.ones((2, 4)), "b": jnp.ones((4, 3))}
        >>> fn = lambda p, x: jnp.tanh(x @ p["a"]) @ p["b"]
        >>> tx = jc.prune_units(0.5, apply_fn=fn, example_input=jnp.ones((1, 2)))
        >>> thinned, stats = tx(params)
        >>> [(g.name, g.size, g.removed) for g in stats.groups], stats.skipped
        ([('a', 4, 2)], {'b': 'a model output'})
        >>> stats.flops  # 2 * (1*2*4 + 1*4*3) before, 2 * (1*2*2 + 1*2*3) after
        (40, 20)
    """

    groups: tuple[GroupResult, ...]
    skipped: dict[str, str]
    apply_fn: Callable[..., Any]
    module: Any
    module_note: str
    flops: tuple[int, int]
    _zero: Callable[[Any], Any] = dataclasses.field(repr=False)

    def __getitem__(self, name: str) -> GroupResult:
        for group in self.groups:
            if group.name == name:
                return group
        raise KeyError(f"no pruned group {name!r}; pruned: {[g.name for g in self.groups]}")

    def masked(self, params: Any) -> Any:
        """``params`` at their full shapes with every removed unit's slices zeroed.

        Example:
            >>> import jax.numpy as jnp
            >>> import jaxcompress as jc
            >>> params = {"a": jnp.array([[1.0, -3.0, 2.0]]), "b": jnp.ones((3, 1))}
            >>> fn = lambda p, x: jnp.maximum(x @ p["a"], 0) @ p["b"]
            >>> tx = jc.prune_units(0.34, apply_fn=fn, example_input=jnp.ones((1, 1)))
            >>> thinned, stats = tx(params)
            >>> stats.masked(params)["b"][:, 0].tolist()  # unit 0 has the least L2 norm
            [0.0, 1.0, 1.0]
        """
        return self._zero(params)

    def table(self) -> str:
        """A markdown table: each group's units before and after, and the skipped ones."""
        lines = ["| group | units | removed | kept |", "|---|---:|---:|---:|"]
        for g in self.groups:
            lines.append(f"| {g.name} | {g.size} | {g.removed} | {g.size - g.removed} |")
        for name, reason in self.skipped.items():
            lines.append(f"| {name} | | left whole: {reason} | |")
        dense, thinned = self.flops
        ratio = dense / thinned if thinned else float("inf")
        lines.append(f"\nFLOPs: {dense:,} dense, {thinned:,} thinned ({ratio:.2f}x fewer)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _fractions(fraction: Any, groups: list[Group]) -> dict[str, Fraction]:
    def check(value: Any, where: str) -> Fraction:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"prune_units: {where} must be a real number, got {value!r}")
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"prune_units: {where} must be in [0, 1], got {value!r}")
        return Fraction(repr(float(value)))

    by_name = {g.name: g for g in groups}
    if isinstance(fraction, Mapping):
        out = {}
        for name, value in fraction.items():
            if name not in by_name:
                raise ValueError(
                    f"prune_units: no group named {name!r}; the groups are {sorted(by_name)}"
                )
            if by_name[name].reason is not None:
                raise ValueError(
                    f"prune_units: group {name!r} cannot be pruned: it reaches "
                    f"{by_name[name].reason}"
                )
            out[name] = check(value, f"fraction[{name!r}]")
        return out
    value = check(fraction, "fraction")
    return {g.name: value for g in groups if g.reason is None}


def _selected_groups(groups: list[Group], params: Any, where: Filter | None) -> list[Group]:
    if where is None:
        return groups
    select = compile_filter(where)
    leaves = {path_to_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    chosen = {path for path, leaf in leaves.items() if select(path, leaf)}
    if not chosen:
        raise ValueError("prune_units: where= selected no parameter leaf")
    members = {path for g in groups for path, _ in g.members}
    lonely = sorted(chosen - members)
    if lonely:
        raise ValueError(
            f"prune_units: where= selected leaves with no structural axis (no unit of "
            f"theirs is produced by a dot or a conv): {lonely}"
        )
    return [g for g in groups if chosen & set(g.producers)]


def _unit_axis_values(coupling: Coupling, value: int, array: jax.Array, atom: int) -> jax.Array:
    """``array`` reshaped to ``(units, occurrences)`` along every axis factor ``atom``."""
    factors = [coupling.atoms.leaves(a) for a in coupling.layouts[value]]
    sizes = [coupling.atoms.size[leaf] for axis in factors for leaf in axis]
    flat_atoms = [leaf for axis in factors for leaf in axis]
    expanded = jnp.reshape(array, sizes)
    rows = []
    for position, leaf in enumerate(flat_atoms):
        if leaf == atom:
            rows.append(jnp.moveaxis(expanded, position, 0).reshape(sizes[position], -1))
    return jnp.concatenate(rows, axis=1)


def _weight_scores(coupling: Coupling, group: Group, leaves: list[Any], power: int) -> np.ndarray:
    total = np.zeros(group.size)
    for index in range(coupling.flat.num_params):
        value = coupling.flat.inputs[index]
        if not any(group.atom in coupling.atoms.leaves(a) for a in coupling.layouts[value]):
            continue
        weight = jnp.asarray(leaves[index], jnp.float32)
        rows = _unit_axis_values(coupling, value, weight, group.atom)
        total += np.asarray(jnp.sum(jnp.abs(rows) ** power, axis=1))
    return np.sqrt(total) if power == 2 else total


def _cross_entropy(outputs: jax.Array, targets: jax.Array) -> jax.Array:
    import optax  # loads on first use, not with `import jaxcompress`

    return optax.softmax_cross_entropy_with_integer_labels(outputs, targets).mean()


def _split_batch(batch: Any, several: bool, importance: str) -> tuple[tuple[Any, ...], Any]:
    """``(input args, targets or None)`` of one ``data=`` batch.

    ``several`` says whether the model takes several inputs (a tuple ``example_input``);
    then an input batch is a tuple of them, and ``(inputs tuple, targets)`` adds targets.
    """
    pair = isinstance(batch, tuple) and len(batch) == 2
    if several:
        pair = pair and isinstance(batch[0], tuple)
    if importance == "taylor" and not pair:
        raise ValueError(
            "prune_units: importance='taylor' needs data= batches of (inputs, targets)"
        )
    if pair:
        return _as_args(batch[0]), batch[1]
    return _as_args(batch), None


def _data_scores(
    programs: _Programs,
    groups: list[Group],
    key_of: dict[str, tuple[int, int, int]],
    params: Any,
    batches: Iterable[Any],
    importance: str,
    loss_fn: Callable[[Any, Any], jax.Array],
    several: bool,
) -> dict[str, np.ndarray]:
    totals = {g.name: np.zeros(g.size) for g in groups}
    count = 0
    leaves = jax.tree_util.tree_leaves(params)
    for batch in batches:
        args, targets = _split_batch(batch, several, importance)
        coupling = programs.get(args)
        atoms = {_group_by_key(coupling, key_of[g.name]).atom: g for g in groups}
        sites = {atom: coupling.sites.get(atom, ()) for atom in atoms}
        wanted = tuple(sorted({v for values in sites.values() for v in values}))
        if not wanted:
            raise ValueError("prune_units: no activation feeds the groups to score")
        flat_inputs = [*leaves, *jax.tree_util.tree_leaves(args)]
        values, grads = _activations(coupling, flat_inputs, wanted, importance, targets, loss_fn)
        for atom, group in atoms.items():
            per_site = []
            for value in sites[atom]:
                act = values[value]
                if importance == "taylor":
                    rows = _unit_axis_values(coupling, value, act * grads[value], atom)
                    per_site.append(jnp.abs(jnp.mean(rows, axis=1)))
                else:
                    rows = _unit_axis_values(coupling, value, jnp.abs(act), atom)
                    per_site.append(jnp.mean(rows, axis=1))
            totals[group.name] += np.asarray(jnp.mean(jnp.stack(per_site), axis=0))
        count += 1
    if count == 0:
        raise ValueError(f"prune_units: importance={importance!r} got no batches in data=")
    return {name: total / count for name, total in totals.items()}


def _activations(coupling, flat_inputs, wanted, importance, targets, loss_fn):
    @jax.jit
    def forward(inputs, perturb):
        outputs, captured = run(coupling, inputs, {}, capture=wanted, perturb=perturb)
        tree = jax.tree_util.tree_unflatten(coupling.flat.out_tree, outputs)
        loss = loss_fn(tree, targets) if targets is not None else jnp.zeros(())
        return loss, captured

    zeros = {v: jnp.zeros(coupling.flat.shapes[v], jnp.result_type(float)) for v in wanted}
    if importance == "taylor":
        grads, captured = jax.grad(forward, argnums=1, has_aux=True)(flat_inputs, zeros)
        return captured, grads
    _, captured = forward(flat_inputs, {})
    return captured, {}


def _group_by_key(coupling: Coupling, key: tuple[int, int, int]) -> Group:
    for group in coupling.groups:
        if coupling.key(group) == key:
            return group
    raise ValueError(
        "prune_units: the program traced for these inputs couples the parameters "
        "differently from the example input's; trace with inputs of the same structure"
    )


def prune_units(
    sparsity: float | Mapping[str, float] | None = None,
    *,
    importance: str = "l2",
    apply_fn: Any,
    example_input: Any,
    where: Filter | None = None,
    data: Iterable[Any] | None = None,
    loss_fn: Callable[[Any, Any], jax.Array] | None = None,
    progress: bool = False,
    fraction: float | Mapping[str, float] | None = None,
) -> Transform:
    """Removes the least important units of every coupled group: smaller dense layers.

    The coupled groups come from the jaxpr of ``apply_fn(params, example_input)`` (see
    :mod:`jaxcompress.coupling`): removing unit ``i`` of a group removes slice ``i``
    of every parameter (and closed-over constant) that carries it. Each group loses
    exactly ``floor(sparsity * units)`` units (on the decimal value of ``sparsity``),
    the ones with the lowest scores (ties: the lower index goes first).

    Args:
        sparsity: the fraction of units to remove, as :func:`jaxcompress.prune`'s
            leading argument: one fraction for every prunable group, or
            ``{group name: fraction}`` for chosen groups only (names from
            :func:`coupled_groups`, or a :meth:`jaxcompress.SensitivityReport.allocate`
            result).
        importance: how units are scored:

            * ``"l1"`` / ``"l2"``: the L1 / L2 norm of the unit's slices over the whole
              group (producer columns, biases, norm parameters and consumer rows).
            * ``"activation"``: the mean ``|activation|`` of the unit over ``data=``,
              taken where a weight consumes it (the next layer's input).
            * ``"taylor"``: ``|mean(activation × ∂loss/∂activation)|`` over ``data=``
              batches of ``(inputs, targets)`` (Molchanov et al. 2017).

        apply_fn: ``apply_fn(params, x)``, or an nnx module (then the transform takes
            its whole ``nnx.State`` from ``nnx.split`` and ``stats.module`` is the
            rebuilt module).
        example_input: an input (or a tuple of inputs) to trace with.
        where: only groups produced by a selected leaf are pruned. Selecting a leaf
            that no group cuts (an embedding table gathered from) is an error.
        data: batches for ``"activation"`` (inputs, or ``(inputs, targets)``) and
            ``"taylor"`` (``(inputs, targets)``); may also be passed when calling. For
            a model of several inputs (a tuple ``example_input``) the inputs of a batch
            are a tuple too.
        loss_fn: ``loss_fn(outputs, targets)`` for ``"taylor"``; by default softmax
            cross-entropy with integer labels.
        progress: show a bar on stderr, by leaf and bytes, while the leaves are cut.
        fraction: the old name of ``sparsity``, still accepted as a keyword.

    Returns:
        A transform ``tx(params, *, key=None, data=None) -> (thinned, stats)``:
        ``thinned`` has the structure of ``params`` with smaller dense leaves;
        ``stats`` is a :class:`UnitStats`. Call it outside ``jit`` (it traces); the
        thinned tree and ``stats.apply_fn`` run under ``jit`` and on sharded arrays.

    Raises:
        ValueError: a fraction that would remove every unit of a group, a fraction
            outside ``[0, 1]``, an unknown or unprunable group name, an unknown
            importance, missing ``data=``, an ``example_input`` the function cannot
            trace, a ``where`` selecting nothing or a leaf with no structural axis, or
            nothing prunable at all (the error lists why each group is left whole).
        TypeError: a non-numeric fraction or a non-callable ``apply_fn``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> from jaxcompress.examples.models import LeNet300100
        >>> model, x = LeNet300100(), jax.random.normal(jax.random.key(1), (4, 64))
        >>> params = model.init(jax.random.key(0), x)["params"]
        >>> apply = lambda p, x: model.apply({"params": p}, x)
        >>> thinned, stats = jc.prune_units(0.5, apply_fn=apply, example_input=x)(params)
        >>> thinned["dense1"]["kernel"].shape, thinned["dense2"]["kernel"].shape
        ((64, 150), (150, 50))
        >>> dense = apply(stats.masked(params), x)
        >>> bool(jnp.allclose(jax.jit(stats.apply_fn)(thinned, x), dense, atol=1e-5))
        True
    """
    if (sparsity is None) == (fraction is None):
        raise TypeError(
            "prune_units: give the fraction of units to remove once, as sparsity (or by its "
            f"old name fraction=), got sparsity={sparsity!r}, fraction={fraction!r}"
        )
    if sparsity is None:
        sparsity = fraction
    if importance not in _IMPORTANCES:
        raise ValueError(
            f"prune_units: importance must be one of {_IMPORTANCES}, got {importance!r}"
        )
    if example_input is None:
        raise ValueError("prune_units: example_input= is required to trace apply_fn")
    fn, graphdef = _module_fn(apply_fn)
    default_data = data
    loss = loss_fn or _cross_entropy
    name = f"prune_units({sparsity!r}, importance={importance})"

    def apply(tree, *, key=None, data=None):
        del key
        batches = data if data is not None else default_data
        # Non-array leaves (an equinox module's activation) are part of the program.
        params, rest = split_arrays(tree)
        programs = _Programs(on_arrays(fn, rest), params)
        coupling = programs.get(_as_args(example_input))
        groups = _selected_groups(list(coupling.groups), params, where)
        fractions = _fractions(sparsity, groups)
        if not fractions:
            reasons = {g.name: g.reason for g in coupling.groups}
            raise ValueError(f"{name}: nothing can be pruned; the groups: {reasons}")
        chosen = [g for g in groups if g.name in fractions]
        leaves, treedef = jax.tree_util.tree_flatten(params)
        if importance in ("activation", "taylor"):
            if batches is None:
                raise ValueError(f"{name}: importance={importance!r} needs data= batches")
            keys = {g.name: coupling.key(g) for g in chosen}
            several = isinstance(example_input, tuple)
            scores = _data_scores(
                programs, chosen, keys, params, batches, importance, loss, several
            )
        else:
            power = 1 if importance == "l1" else 2
            scores = {g.name: _weight_scores(coupling, g, leaves, power) for g in chosen}
        kept: dict[int, np.ndarray] = {}
        results = []
        for group in chosen:
            removed = math.floor(fractions[group.name] * group.size)
            if removed >= group.size:
                raise ValueError(
                    f"{name}: fraction {float(fractions[group.name])} would remove all "
                    f"{group.size} units of {group.name!r}"
                )
            order = np.argsort(scores[group.name], kind="stable")
            keep = np.sort(order[removed:])
            if removed:
                kept[group.atom] = keep
            result = GroupResult(
                group.name, group.size, removed, keep, group.members, scores[group.name]
            )
            results.append(result)
        flat = coupling.flat
        thinned_leaves = [
            cut(coupling, flat.inputs[i], leaf, kept)
            for i, leaf in over_leaves(
                list(enumerate(leaves)),
                sizes=[_dense_bytes(leaf) for leaf in leaves],
                description=name,
                enabled=progress and not any(is_traced(leaf) for leaf in leaves),
            )
        ]
        thinned = combine(jax.tree_util.tree_unflatten(treedef, thinned_leaves), rest)
        by_key = {coupling.key(g): kept[g.atom] for g in chosen if g.atom in kept}
        thinned_apply = _thinned_apply(programs, by_key)
        module, note = None, ""
        if graphdef is not None:
            rebuilt = _rebuild(graphdef, thinned)
            call = lambda _, *args: rebuilt(*args)  # noqa: E731  (the module holds the state)
            module, note = _checked(rebuilt, call, thinned, thinned_apply, example_input)
        elif is_equinox_module(thinned):
            thinned = resize_equinox(
                thinned, lambda path, axis: _factor_sizes(coupling, path, axis, kept)
            )
            module, note = _checked(thinned, fn, thinned, thinned_apply, example_input)
        stats = UnitStats(
            groups=tuple(results),
            skipped={g.name: g.reason for g in coupling.groups if g.reason is not None},
            apply_fn=thinned_apply,
            module=module,
            module_note=note,
            flops=(flops(coupling, {}), flops(coupling, kept)),
            _zero=lambda tree: combine(
                _zeroed(coupling, split_arrays(tree)[0], kept), split_arrays(tree)[1]
            ),
        )
        return thinned, stats

    return Transform(apply, name)


def _dense_bytes(leaf: Any) -> int:
    """Bytes of any parameter leaf (arrays, numpy arrays, Python scalars) for the bar."""
    return math.prod(np.shape(leaf)) * np.dtype(jnp.result_type(leaf)).itemsize


def _zeroed(coupling: Coupling, params: Any, kept: dict[int, np.ndarray]) -> Any:
    leaves, treedef = jax.tree_util.tree_flatten(params)
    inputs = coupling.flat.inputs
    return jax.tree_util.tree_unflatten(
        treedef,
        [zero_removed(coupling, inputs[i], leaf, kept) for i, leaf in enumerate(leaves)],
    )


def _thinned_apply(programs: _Programs, by_key: dict[tuple[int, int, int], np.ndarray]):
    def apply_thinned(thinned: Any, *args: Any) -> Any:
        coupling = programs.get(args)
        kept = {_group_by_key(coupling, key).atom: units for key, units in by_key.items()}
        leaves = jax.tree_util.tree_leaves(split_arrays(thinned)[0])
        flat = coupling.flat
        if len(leaves) != flat.num_params:
            raise ValueError(
                f"apply_fn: expected {flat.num_params} parameter leaves, got {len(leaves)}"
            )
        for index, leaf in enumerate(leaves):
            expected = new_shapes_of(coupling, flat.inputs[index], kept)
            if tuple(np.shape(leaf)) != expected:
                raise ValueError(
                    f"apply_fn: leaf {flat.paths[index]!r} has shape {tuple(np.shape(leaf))}, "
                    f"the thinned shape is {expected}"
                )
        outputs, _ = run(coupling, [*leaves, *jax.tree_util.tree_leaves(args)], kept)
        return jax.tree_util.tree_unflatten(flat.out_tree, outputs)

    return apply_thinned


def _rebuild(graphdef: Any, thinned: Any) -> Any:
    """The nnx module with the thinned state, its layers' size attributes updated."""
    from flax import nnx  # loaded already: graphdef came from an nnx module

    module = nnx.merge(graphdef, thinned)
    for _, node in nnx.iter_graph(module):
        if isinstance(node, nnx.Linear):
            node.in_features, node.out_features = node.kernel[...].shape
        elif isinstance(node, nnx.LinearGeneral) and not node.batch_axis:
            shape, count = node.kernel[...].shape, len(node.in_features)
            node.in_features, node.out_features = shape[:count], shape[count:]
        elif isinstance(node, nnx.MultiHeadAttention):
            node.num_heads, node.head_dim = node.query.kernel[...].shape[-2:]
            node.num_kv_heads = node.key.kernel[...].shape[-2]
            node.qkv_features = node.num_heads * node.head_dim
        elif isinstance(node, nnx.Conv):
            node.in_features = node.kernel[...].shape[-2] * node.feature_group_count
            node.out_features = node.kernel[...].shape[-1]
            node.kernel_shape = tuple(node.kernel[...].shape)
        elif isinstance(node, nnx.BatchNorm | nnx.LayerNorm | nnx.RMSNorm):
            reference = node.scale if node.scale is not None else getattr(node, "mean", None)
            if reference is not None:
                node.num_features = reference[...].shape[-1]
    return module


def _factor_sizes(
    coupling: Coupling, path: str, axis: int, kept: dict[int, np.ndarray]
) -> tuple[int, ...]:
    """The new size of each row-major factor of parameter ``path``'s ``axis``."""
    value = coupling.flat.inputs[coupling.flat.paths.index(path)]
    factors = coupling.axis_factors(value, axis)
    return tuple(len(kept[a]) if a in kept else coupling.atoms.size[a] for a in factors)


def _checked(module, call, thinned, thinned_apply, example_input) -> tuple[Any, str]:
    """``(module, "")`` when ``call(thinned, *inputs)`` computes the thinned program, else
    ``(None, why)``."""
    arrays, rest = split_arrays(thinned)

    @jax.jit  # one compile for both; run eagerly, each op of the replay compiles alone
    def outputs(arrays, args):
        tree = combine(arrays, rest)
        return thinned_apply(tree, *args), call(tree, *args)

    rng = np.random.default_rng(0)  # numpy: a jax.random draw would compile each shape
    args = jax.tree.map(
        lambda x: (
            jnp.asarray(rng.standard_normal(np.shape(x)), jnp.result_type(x))
            if jnp.issubdtype(jnp.result_type(x), jnp.floating)
            else x
        ),
        _as_args(example_input),
    )
    expected, got = map(jax.tree_util.tree_leaves, outputs(arrays, args))
    gap = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(expected, got, strict=True))
    scale = max(float(jnp.max(jnp.abs(a))) for a in expected)
    if gap <= 1e-4 * max(scale, 1.0):
        return module, ""
    return None, (
        f"the rebuilt module's output differs from the thinned program's by {gap:.3g} "
        "(it recomputes a shape-derived constant, such as attention's 1/sqrt(head_dim)); "
        "use stats.apply_fn"
    )
