"""Which axes of a traced computation are coupled: the dependency graph of unit pruning.

Removing unit ``i`` of a Dense layer's output also removes its bias entry, the next
layer's input row ``i``, the scale and bias of any per-channel norm in between, and,
across a residual addition, unit ``i`` of every branch. Torch-Pruning (DepGraph) finds
these couplings in PyTorch; here they are read from the jaxpr of ``apply_fn(params, x)``,
so linen, nnx and plain functions are handled alike.

Every axis of every value in the (inlined) jaxpr is a row-major product of *atoms*. Ops
that keep an index's identity unify atoms: element-wise ops axis by axis, transposes by
their permutation, a ``dot_general``'s contracted and batch axes with their partners,
a conv's input features with its kernel's input features. A ``reshape`` that splits an
axis refines its atom into factors (a ``(B, 768) -> (B, 12, 64)`` reshape gives a
12-head atom and a 64-dim atom), and one that merges axes makes the merged axis the
product of their atoms (a flatten before a Dense ties the Dense's input rows to the
conv channels, strided). A *group* is one atom that some weight produces: a free axis
of a parameter in a ``dot_general``, or a conv kernel's output-feature axis. Removing a
unit of a group removes its slice from every tensor whose axes contain the atom.

A group is *blocked*, and left whole, when its atom reaches a model input or output,
is reduced over by anything but a contraction (a LayerNorm's mean, a softmax over
features: removing a unit would change every other unit's value), is sliced, padded,
concatenated or gathered along, or touches an op this module does not understand
(``scan``, ``while``, grouped convolutions, ...). The reason names the op.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.extend.core as jex
import numpy as np

from jaxcompress.core.paths import path_to_str
from jaxcompress.jaxpr.graph import CONV, DOT, sub_jaxpr

__all__ = ["Coupling", "Flat", "Group", "analyze", "flatten_jaxpr", "trace_flat"]

_ELEMENTWISE = frozenset(
    {
        "add",
        "sub",
        "mul",
        "div",
        "rem",
        "pow",
        "max",
        "min",
        "atan2",
        "nextafter",
        "and",
        "or",
        "xor",
        "not",
        "neg",
        "sign",
        "floor",
        "ceil",
        "round",
        "is_finite",
        "exp",
        "exp2",
        "log",
        "log1p",
        "expm1",
        "tanh",
        "logistic",
        "sin",
        "cos",
        "tan",
        "asin",
        "acos",
        "atan",
        "sinh",
        "cosh",
        "asinh",
        "acosh",
        "atanh",
        "sqrt",
        "rsqrt",
        "cbrt",
        "abs",
        "integer_pow",
        "square",
        "erf",
        "erfc",
        "erf_inv",
        "lgamma",
        "digamma",
        "select_n",
        "clamp",
        "eq",
        "ne",
        "lt",
        "le",
        "gt",
        "ge",
        "real",
        "imag",
        "conj",
        "population_count",
        "shift_left",
        "shift_right_logical",
        "shift_right_arithmetic",
        "reduce_precision",
        "convert_element_type",
        "copy",
        "copy_p",
        "sharding_constraint",
        "reshard",
        "mesh_cast",
        "pvary",
        "stop_gradient",
    }
)
_MANY_SAME = frozenset({"optimization_barrier", "device_put"})
_REDUCTIONS = frozenset(
    {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or"}
)
_ARG_REDUCTIONS = frozenset({"argmax", "argmin"})
_ALONG_AXIS = frozenset({"cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp", "rev"})
# Ops that create values from nothing but their parameters.
_SOURCES = frozenset({"iota", "rng_bit_generator", "random_seed", "random_bits", "random_wrap"})
# Values derived from a parameter by these ops still "are" that parameter's axes.
_RELABEL = frozenset(
    {"convert_element_type", "copy", "copy_p", "transpose", "reshape", "squeeze"}
    | {"broadcast_in_dim", "sharding_constraint", "reshard", "mesh_cast", "pvary"}
)


@dataclasses.dataclass(frozen=True)
class Flat:
    """A jaxpr with every call-like sub-jaxpr inlined, over numbered values.

    Attributes:
        shapes: shape of each value, by id.
        consts: concrete arrays of the constant values (closed-over arrays), by id.
        eqns: ``(eqn, inputs, outputs)`` where inputs are value ids or ``Literal``s.
        inputs: value ids of the program's flat inputs (parameters first).
        outputs: value ids or ``Literal``s of the program's flat outputs.
        out_tree: the pytree structure of the outputs.
        num_params: how many of ``inputs`` are parameter leaves.
        paths: the parameter leaf paths.
    """

    shapes: tuple[tuple[int, ...], ...]
    consts: dict[int, Any]
    eqns: tuple[tuple[Any, tuple[Any, ...], tuple[int, ...]], ...]
    inputs: tuple[int, ...]
    outputs: tuple[Any, ...]
    out_tree: Any
    num_params: int
    paths: tuple[str, ...]


def flatten_jaxpr(closed: Any, out_tree: Any, num_params: int, paths: Sequence[str]) -> Flat:
    """Inlines the call-like sub-jaxprs of ``closed`` into one list of equations."""
    shapes: list[tuple[int, ...]] = []
    consts: dict[int, Any] = {}
    eqns: list[tuple[Any, tuple[Any, ...], tuple[int, ...]]] = []

    def new(var: Any) -> int:
        shapes.append(tuple(getattr(var.aval, "shape", ())))
        return len(shapes) - 1

    def inline(jaxpr: Any, const_values: Sequence[Any], args: Sequence[Any]) -> list[Any]:
        env: dict[Any, Any] = {}
        for var, value in zip(jaxpr.constvars, const_values, strict=True):
            env[var] = new(var)
            consts[env[var]] = value
        for var, ref in zip(jaxpr.invars, args, strict=True):
            env[var] = ref

        def read(v: Any) -> Any:
            return v if isinstance(v, jex.Literal) else env[v]

        for eqn in jaxpr.eqns:
            ins = tuple(read(v) for v in eqn.invars)
            sub = sub_jaxpr(eqn)
            if sub is not None:
                outs = inline(sub[0], sub[1], ins)
            else:
                outs = [new(v) for v in eqn.outvars]
                eqns.append((eqn, ins, tuple(outs)))
            for var, ref in zip(eqn.outvars, outs, strict=True):
                if not isinstance(var, jex.DropVar):
                    env[var] = ref
        return [read(v) for v in jaxpr.outvars]

    inputs = [new(v) for v in closed.jaxpr.invars]
    outputs = inline(closed.jaxpr, list(closed.consts), inputs)
    return Flat(
        shapes=tuple(shapes),
        consts=consts,
        eqns=tuple(eqns),
        inputs=tuple(inputs),
        outputs=tuple(outputs),
        out_tree=out_tree,
        num_params=num_params,
        paths=tuple(paths),
    )


def trace_flat(apply_fn: Callable[..., Any], params: Any, *args: Any) -> Flat:
    """Traces ``apply_fn(params, *args)`` (shapes only) into a :class:`Flat` program.

    Raises:
        ValueError: the function cannot be traced with these inputs, or two parameter
            leaves have the same path.
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    paths = [path_to_str(path) for path, _ in flat]
    if len(set(paths)) != len(paths):
        raise ValueError(f"parameter paths are not unique: {paths}")
    try:
        closed, out_shape = jax.make_jaxpr(apply_fn, return_shape=True)(params, *args)
    except Exception as error:  # any failure to trace is the caller's input's fault
        raise ValueError(
            f"cannot trace apply_fn(params, *example_input): {type(error).__name__}: {error}"
        ) from error
    return flatten_jaxpr(closed, jax.tree_util.tree_structure(out_shape), len(paths), paths)


class _Atoms:
    """Union-find over axis atoms, where a class may be refined into row-major factors."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.parts: list[tuple[int, ...] | None] = []
        self.blocked: dict[int, str] = {}

    def new(self, size: int) -> int:
        self.parent.append(len(self.parent))
        self.size.append(int(size))
        self.parts.append(None)
        return len(self.parent) - 1

    def find(self, a: int) -> int:
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:
            self.parent[a], a = root, self.parent[a]
        return root

    def leaves(self, a: int) -> list[int]:
        root = self.find(a)
        parts = self.parts[root]
        if parts is None:
            return [root]
        return [leaf for part in parts for leaf in self.leaves(part)]

    def block(self, atoms: Sequence[int], reason: str) -> None:
        for atom in atoms:
            for leaf in self.leaves(atom):
                self.blocked.setdefault(leaf, reason)

    def _split(self, leaf: int, first: int) -> tuple[int, int]:
        head, tail = self.new(first), self.new(self.size[leaf] // first)
        self.parts[leaf] = (head, tail)
        if leaf in self.blocked:
            self.blocked[head] = self.blocked[tail] = self.blocked[leaf]
        return head, tail

    def _link(self, a: int, b: int) -> None:
        """Unites two leaf classes of equal size."""
        a, b = self.find(a), self.find(b)
        if a == b:
            return
        self.parent[b] = a
        reason = self.blocked.get(a) or self.blocked.get(b)
        if reason:
            self.blocked[a] = reason

    def unify(self, left: Sequence[int], right: Sequence[int], reason: str) -> bool:
        """Unifies two row-major atom sequences of equal total size, refining as needed.

        Sequences that cannot be aligned (``(6, 4)`` against ``(4, 6)``) are blocked
        with ``reason`` instead; returns whether they aligned.
        """
        a_queue, b_queue = deque(left), deque(right)
        while True:
            a = self._next_leaf(a_queue)
            b = self._next_leaf(b_queue)
            if a is None or b is None:
                if a is None and b is None:
                    return True
                break
            sa, sb = self.size[a], self.size[b]
            if sa == sb:
                self._link(a, b)
            elif sa > sb and sa % sb == 0:
                head, tail = self._split(a, sb)
                self._link(head, b)
                a_queue.appendleft(tail)
            elif sb > sa and sb % sa == 0:
                head, tail = self._split(b, sa)
                self._link(a, head)
                b_queue.appendleft(tail)
            else:
                break
        self.block([*left, *right], reason)
        return False

    def _next_leaf(self, queue: deque[int]) -> int | None:
        while queue:
            atom = self.find(queue.popleft())
            parts = self.parts[atom]
            if parts is not None:
                queue.extendleft(reversed(parts))
            elif self.size[atom] != 1:
                return atom
        return None


@dataclasses.dataclass(frozen=True)
class Group:
    """One set of coupled units: removing unit ``i`` removes slice ``i`` everywhere.

    Attributes:
        name: the path of the first parameter that produces these units (its free axis
            in a dot, or a conv kernel's output features), with ``[axis a]`` or
            ``[axis a factor k]`` appended when that parameter produces several groups.
        size: the number of units.
        members: ``(parameter path, axis)`` of every parameter slice the units cut.
        producers: paths of the parameters that produce the units.
        reason: why the group is left whole, or ``None`` when it can be pruned.
        atom: the atom's id in its :class:`Coupling` (internal).
    """

    name: str
    size: int
    members: tuple[tuple[str, int], ...]
    producers: tuple[str, ...]
    reason: str | None
    atom: int

    @property
    def prunable(self) -> bool:
        """Whether units of this group can be removed."""
        return self.reason is None


@dataclasses.dataclass(frozen=True)
class Coupling:
    """The result of :func:`analyze`: the flat program, its atoms and its groups.

    Attributes:
        flat: the inlined program.
        groups: every group some parameter produces, prunable or not, in program order.
        layouts: for each value id, the atom of each axis.
        atoms: the atom union-find (internal).
        sites: for each group atom, value ids whose activations score its units.
    """

    flat: Flat
    groups: tuple[Group, ...]
    layouts: tuple[tuple[int, ...], ...]
    atoms: _Atoms
    sites: dict[int, tuple[int, ...]]

    def axis_factors(self, value: int, axis: int) -> list[int]:
        """The leaf atoms (size-1 included) that axis ``axis`` of ``value`` is made of."""
        return self.atoms.leaves(self.layouts[value][axis])

    def key(self, group: Group) -> tuple[int, int, int]:
        """A key naming ``group`` by its first member's leaf, axis and factor position.

        It is the same for two traces of one model at different input shapes.
        """
        for leaf_index in range(self.flat.num_params):
            value = self.flat.inputs[leaf_index]
            for axis in range(len(self.flat.shapes[value])):
                factors = self.axis_factors(value, axis)
                if group.atom in factors:
                    return (leaf_index, axis, factors.index(group.atom))
        raise AssertionError("a group always has a parameter member")


def _is_literal(ref: Any) -> bool:
    return isinstance(ref, jex.Literal)


def analyze(flat: Flat) -> Coupling:
    """Finds the coupled axes of ``flat`` and the groups its parameters produce."""
    atoms = _Atoms()
    layouts: list[tuple[int, ...]] = [tuple(atoms.new(s) for s in shape) for shape in flat.shapes]
    derived: dict[int, int] = {v: v for v in flat.inputs[: flat.num_params]}
    producer_atoms: list[tuple[int, int]] = []  # (atom, producing value)
    consumer_sites: list[tuple[int, int]] = []  # (atom, activation value contracted with it)
    output_sites: list[tuple[int, int]] = []  # (atom, dot output that carries it)

    def lay(ref: Any) -> tuple[int, ...]:
        return () if _is_literal(ref) else layouts[ref]

    def shape(ref: Any) -> tuple[int, ...]:
        return tuple(np.shape(ref.val)) if _is_literal(ref) else flat.shapes[ref]

    def same_axes(a: Any, b: Any, reason: str) -> None:
        """Element-wise: unify axes of equal size (size-1 axes broadcast)."""
        sa, sb = shape(a), shape(b)
        if len(sa) == 0 or len(sb) == 0:
            return
        if len(sa) != len(sb):
            atoms.block([*lay(a), *lay(b)], reason)
            return
        for x, y, n, m in zip(lay(a), lay(b), sa, sb, strict=True):
            if n == m:
                atoms.unify([x], [y], reason)

    def block_all(refs: Sequence[Any], reason: str) -> None:
        atoms.block([atom for ref in refs for atom in lay(ref)], reason)

    for eqn, ins, outs in flat.eqns:
        name = eqn.primitive.name
        params = eqn.params
        why = f"the {name} op"
        if name in _ELEMENTWISE:
            for ref in ins:
                same_axes(ref, outs[0], why)
        elif name in _MANY_SAME and len(ins) == len(outs):
            for ref, out in zip(ins, outs, strict=True):
                same_axes(ref, out, why)
        elif name == "broadcast_in_dim":
            if ins and not _is_literal(ins[0]):
                for i, d in enumerate(params["broadcast_dimensions"]):
                    if shape(ins[0])[i] == flat.shapes[outs[0]][d]:
                        atoms.unify([lay(ins[0])[i]], [layouts[outs[0]][d]], why)
        elif name == "squeeze":
            # Drops size-1 axes (equinox's conv adds and removes a batch axis): the
            # others keep their order.
            dropped = {d % len(lay(ins[0])) for d in params["dimensions"]}
            remaining = [i for i in range(len(lay(ins[0]))) if i not in dropped]
            for k, i in enumerate(remaining):
                atoms.unify([lay(ins[0])[i]], [layouts[outs[0]][k]], why)
        elif name in ("reshape", "expand_dims"):
            if params.get("dimensions") is not None:
                block_all([*ins, *outs], why)
            else:
                atoms.unify(lay(ins[0]), layouts[outs[0]], f"a reshape that mixes axes ({why})")
        elif name == "transpose":
            for i, p in enumerate(params["permutation"]):
                atoms.unify([layouts[outs[0]][i]], [lay(ins[0])[p]], why)
        elif name == DOT:
            (lc, rc), (lb, rb) = params["dimension_numbers"]
            lhs, rhs = ins[0], ins[1]
            ll, rl, ol = lay(lhs), lay(rhs), layouts[outs[0]]
            for i, j in zip(lc, rc, strict=True):
                atoms.unify([ll[i]], [rl[j]], why)
            for k, (i, j) in enumerate(zip(lb, rb, strict=True)):
                atoms.unify([ll[i]], [rl[j]], why)
                atoms.unify([ll[i]], [ol[k]], why)
            lfree = [i for i in range(len(ll)) if i not in lc and i not in lb]
            rfree = [j for j in range(len(rl)) if j not in rc and j not in rb]
            for k, i in enumerate(lfree):
                atoms.unify([ll[i]], [ol[len(lb) + k]], why)
            for k, j in enumerate(rfree):
                atoms.unify([rl[j]], [ol[len(lb) + len(lfree) + k]], why)
            for operand, free, contracted in ((lhs, lfree, lc), (rhs, rfree, rc)):
                other = rhs if operand is lhs else lhs
                layout = lay(operand)
                if not _is_literal(operand) and operand in derived:
                    producer_atoms.extend((layout[i], derived[operand]) for i in free)
                    output_sites.extend((layout[i], outs[0]) for i in free)
                    if not _is_literal(other) and other not in derived:
                        consumer_sites.extend((layout[i], other) for i in contracted)
        elif name == CONV:
            lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
            lhs, rhs = ins[0], ins[1]
            ll, rl, ol = lay(lhs), lay(rhs), layouts[outs[0]]
            atoms.unify([ll[lhs_spec[0]]], [ol[out_spec[0]]], why)
            if params["feature_group_count"] != 1 or params["batch_group_count"] != 1:
                atoms.block(
                    [ll[lhs_spec[1]], rl[rhs_spec[0]], rl[rhs_spec[1]], ol[out_spec[1]]],
                    "a grouped convolution",
                )
            else:
                atoms.unify([ll[lhs_spec[1]]], [rl[rhs_spec[1]]], why)
                atoms.unify([rl[rhs_spec[0]]], [ol[out_spec[1]]], why)
                if not _is_literal(rhs) and rhs in derived:
                    producer_atoms.append((rl[rhs_spec[0]], derived[rhs]))
                    output_sites.append((rl[rhs_spec[0]], outs[0]))
                    if not _is_literal(lhs) and lhs not in derived:
                        consumer_sites.append((ll[lhs_spec[1]], lhs))
        elif name in _REDUCTIONS or name in _ARG_REDUCTIONS:
            axes = tuple(params["axes"])
            kept = [i for i in range(len(lay(ins[0]))) if i not in axes]
            for k, i in enumerate(kept):
                atoms.unify([lay(ins[0])[i]], [layouts[outs[0]][k]], why)
            atoms.block([lay(ins[0])[i] for i in axes], f"a reduction over it ({why})")
        elif name in _ALONG_AXIS or name in ("sort", "concatenate", "split"):
            axes = _axes_of(name, params)
            for ref in ins:
                for i, atom in enumerate(lay(ref)):
                    if i in axes:
                        atoms.block([atom], why)
                    else:
                        for out in outs:
                            if len(flat.shapes[out]) == len(lay(ref)):
                                atoms.unify([atom], [layouts[out][i]], why)
            for out in outs:
                atoms.block([layouts[out][i] for i in axes if i < len(layouts[out])], why)
        elif name == "slice" or name == "pad":
            source = lay(ins[0])
            whole = _untouched_axes(name, params, shape(ins[0]))
            for i, atom in enumerate(source):
                if i in whole:
                    atoms.unify([atom], [layouts[outs[0]][i]], why)
                else:
                    atoms.block([atom, layouts[outs[0]][i]], why)
            if name == "pad":
                block_all(ins[1:], why)
        elif name in _SOURCES:
            block_all(outs, why)
        else:
            block_all([*ins, *outs], why)
        if name in _RELABEL and ins and not _is_literal(ins[0]) and ins[0] in derived:
            derived[outs[0]] = derived[ins[0]]

    atoms.block([a for v in flat.inputs[flat.num_params :] for a in layouts[v]], "a model input")
    atoms.block([a for ref in flat.outputs for a in lay(ref)], "a model output")
    return _groups(flat, atoms, tuple(layouts), producer_atoms, consumer_sites, output_sites)


def _axes_of(name: str, params: dict[str, Any]) -> tuple[int, ...]:
    if name in ("concatenate",):
        return (params["dimension"],)
    if name == "rev":
        return tuple(params["dimensions"])
    if name == "sort":
        return (params["dimension"],)
    return (params["axis"],)


def _untouched_axes(name: str, params: dict[str, Any], shape: tuple[int, ...]) -> set[int]:
    if name == "pad":
        return {i for i, cfg in enumerate(params["padding_config"]) if tuple(cfg) == (0, 0, 0)}
    strides = params.get("strides") or (1,) * len(shape)
    return {
        i
        for i, (start, limit, stride) in enumerate(
            zip(params["start_indices"], params["limit_indices"], strides, strict=True)
        )
        if start == 0 and limit == shape[i] and stride == 1
    }


def _groups(flat, atoms, layouts, producer_atoms, consumer_sites, output_sites) -> Coupling:
    param_values = flat.inputs[: flat.num_params]
    origin = {value: index for index, value in enumerate(param_values)}
    # The non-unit leaf atoms of each parameter axis, and the slices each atom cuts.
    factors: dict[tuple[int, int], list[int]] = {}
    members: dict[int, list[tuple[str, int]]] = {}
    for index, value in enumerate(param_values):
        for axis, atom in enumerate(layouts[value]):
            leaves = [leaf for leaf in atoms.leaves(atom) if atoms.size[leaf] > 1]
            factors[index, axis] = leaves
            for leaf in leaves:
                members.setdefault(leaf, []).append((flat.paths[index], axis))
    # Producers, in program order: parameters whose axis a dot or conv passes through.
    produced: dict[int, list[int]] = {}
    for atom, value in producer_atoms:
        for leaf in atoms.leaves(atom):
            if leaf in members:
                indices = produced.setdefault(leaf, [])
                if origin[value] not in indices:
                    indices.append(origin[value])
    # Activations that score a group's units: those a weight contracts over them (the
    # next layer's input), else the outputs of the producing dots.
    found: tuple[dict[int, list[int]], dict[int, list[int]]] = ({}, {})
    for table, pairs in zip(found, (consumer_sites, output_sites), strict=True):
        for atom, value in pairs:
            for leaf in atoms.leaves(atom):
                if leaf in produced:
                    table.setdefault(leaf, []).append(value)
    sites = {leaf: found[0].get(leaf) or found[1].get(leaf, []) for leaf in produced}

    def where_produced(leaf: int) -> tuple[int, int, int]:
        index = produced[leaf][0]
        for axis in range(len(layouts[param_values[index]])):
            if leaf in factors[index, axis]:
                return index, axis, factors[index, axis].index(leaf)
        raise AssertionError("a producer holds its atom")

    first = {leaf: where_produced(leaf) for leaf in produced}
    per_path: dict[int, int] = {}
    for index, _, _ in first.values():
        per_path[index] = per_path.get(index, 0) + 1
    groups = []
    for leaf in produced:
        index, axis, factor = first[leaf]
        name = flat.paths[index]
        if per_path[index] > 1:
            several = len(factors[index, axis]) > 1
            name += f"[axis {axis} factor {factor}]" if several else f"[axis {axis}]"
        groups.append(
            Group(
                name=name,
                size=atoms.size[leaf],
                members=tuple(members[leaf]),
                producers=tuple(flat.paths[i] for i in produced[leaf]),
                reason=atoms.blocked.get(leaf),
                atom=leaf,
            )
        )
    return Coupling(
        flat=flat,
        groups=tuple(groups),
        layouts=layouts,
        atoms=atoms,
        sites={leaf: tuple(dict.fromkeys(values)) for leaf, values in sites.items()},
    )
