"""Which primitives consume each weight: the one module that reads jaxprs.

:func:`trace_uses` traces ``apply_fn(params, *args)`` with :func:`jax.make_jaxpr` and
follows every parameter leaf through the jaxpr until it reaches a ``dot_general`` or a
``conv_general_dilated``. On the way it looks through ops that only move or relabel the
values (``convert_element_type``, ``reshape``, ``transpose``, ``broadcast_in_dim``,
``squeeze``, ``copy``, sharding constraints; ``expand_dims`` lowers to
``broadcast_in_dim``/``reshape``) and into the sub-jaxprs of ``jit`` (``pjit``),
``closed_call``, ``remat``/``checkpoint``, ``custom_jvp_call`` and ``custom_vjp_call``.
Each consumption is one :class:`WeightUse`, with the contracted and free axes in the
weight's *original* numbering.

It also enters ``shard_map`` bodies. A weight passed in replicated (its ``in_specs``
entry names no mesh axis) is followed as anywhere else; its uses there carry
``gathered``, the manual mesh axes over which :func:`capture` concatenates the
per-device activations on their first row dim (only the axes the activation varies
along, as the ``check_vma`` avals say, so a replicated activation comes back once), and
``activation_shape`` is that whole shape. A weight the ``in_specs`` split across
devices, a use under ``check_vma=False`` (which devices hold copies is unknown), one in
a nested ``shard_map`` or on an input with no row dim keeps its use with a ``note``
saying why its statistics cannot be assembled.

What it does not follow: any op that computes new values from the weight (``mul`` by a
mask, ``dequantize``-style arithmetic, ``concatenate``, ``slice``, ``gather``/``take``
for embedding lookups, ``rev``). A weight that only reaches a dot through one of those
has no uses. Ops that run code of their own on the weight (``pallas_call``,
``while``, ``cond``, ``ffi_call``; see :func:`is_opaque`) are not entered either, but
:func:`opaque_uses` names the weights that reach one, so callers can tell a weight
seen whole from one whose uses are incomplete. A ``scan`` is entered for the weights
it runs over (stacked layers: one of its ``xs``, sliced per iteration; see
:attr:`WeightUse.stacked`), not for one passed to it whole (a const or a carry), and
not when it is nested in another ``scan`` or in a ``shard_map``. A ``reshape`` that
splits an original axis (``(64, 10) -> (8, 8, 10)``) cannot be mapped back; such uses are kept with
``contracting_axes=None`` and a ``note`` saying why.

:func:`capture` replays a jaxpr and returns the *other* operand (the activation) of
chosen uses, or with ``RESULT`` the op's output (:func:`run_and_capture` also returns
the program's outputs, differentiably); :func:`input_features` turns that activation
into rows of features in the order of the weight's matrix view (im2col patches for
convolutions).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

import jax
import jax.extend.core as jex
import numpy as np
from jax import lax

from jaxcompress.core.paths import path_to_str

__all__ = [
    "ConvInfo",
    "WeightUse",
    "RESULT",
    "capture",
    "bind_equation",
    "eqn_at",
    "evaluate",
    "fan_in_axes",
    "fan_in_by_path",
    "input_features",
    "is_opaque",
    "opaque_uses",
    "activation_row_dim",
    "run_and_capture",
    "sub_jaxpr",
    "trace_jaxpr",
    "trace_uses",
    "trace_with_output",
    "uses_in_jaxpr",
]

# An atom is one original axis of the weight (or None for an axis broadcast in later)
# with its size; every axis of the weight as an op sees it is a row-major run of atoms.
Atom = tuple[int | None, int]
Layout = tuple[tuple[Atom, ...], ...]

# Ops whose single output is the single input, element for element.
_SAME = frozenset(
    {
        "convert_element_type",
        "copy",
        "copy_p",
        "reduce_precision",
        "sharding_constraint",
        "reshard",
        "mesh_cast",
        "pvary",
    }
)
# Ops mapping n inputs to n outputs, each unchanged.
_MANY_SAME = frozenset({"optimization_barrier", "device_put"})
# Call-like ops whose sub-jaxpr takes the eqn's operands one for one, and the
# parameter that holds it.
_CALLS = {
    "jit": "jaxpr",
    "pjit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "remat": "jaxpr",
    "remat2": "jaxpr",
    "checkpoint": "jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr",
}
DOT = "dot_general"
CONV = "conv_general_dilated"


@dataclasses.dataclass(frozen=True)
class ConvInfo:
    """The parameters of a ``conv_general_dilated`` that consumes a weight.

    Attributes:
        dimension_numbers: ``ConvDimensionNumbers(lhs_spec, rhs_spec, out_spec)``, each
            ``(batch/out-feature dim, feature/in-feature dim, *spatial dims)``.
        window_strides: stride per spatial dim.
        padding: ``(low, high)`` padding per spatial dim.
        lhs_dilation: input dilation per spatial dim (transposed convolutions).
        rhs_dilation: kernel dilation per spatial dim (atrous convolutions).
        feature_group_count: ``> 1`` for grouped/depthwise convolutions.
        batch_group_count: ``> 1`` only in weight-gradient convolutions.

    Example:
        >>> from jax import lax
        >>> dn = lax.conv_dimension_numbers((1, 8, 8, 1), (3, 3, 1, 6), ("NHWC", "HWIO", "NHWC"))
        >>> ConvInfo(dn, (1, 1), ((1, 1), (1, 1)), (1, 1), (1, 1), 1, 1).dimension_numbers.rhs_spec
        (3, 2, 0, 1)
    """

    dimension_numbers: Any
    window_strides: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]
    lhs_dilation: tuple[int, ...]
    rhs_dilation: tuple[int, ...]
    feature_group_count: int
    batch_group_count: int


@dataclasses.dataclass(frozen=True)
class WeightUse:
    """One place where a parameter leaf is consumed by a ``dot_general`` or a conv.

    Axis numbers in ``contracting_axes``, ``free_axes`` and ``batch_axes`` refer to the
    weight leaf as stored (its *original* axes), after undoing the transposes and
    reshapes between the leaf and the op. They are ``None`` when that is not possible
    (``note`` says why); an original axis of size 1 that was squeezed away appears in
    neither.

    Attributes:
        path: the leaf path, ``a/b/kernel``.
        primitive: ``"dot_general"`` or ``"conv_general_dilated"``.
        operand: which operand of the primitive the weight is (0 = lhs, 1 = rhs).
        site: indices of the equation, from the top-level jaxpr down through the
            sub-jaxprs it sits in; with ``operand`` it identifies the activation.
        weight_shape: the leaf's shape.
        operand_shape: the weight's shape as the primitive sees it.
        contracting_axes: original axes summed against the activation (for a conv
            kernel: its input-feature and spatial axes).
        free_axes: original axes that reach the output.
        batch_axes: original axes that are ``dot_general`` batch dimensions.
        activation_shape: shape of the other operand.
        activation_dtype: dtype of the other operand.
        activation_contracting_dims: for a dot, the activation's contracted dims, paired
            one for one with ``operand_contracting_dims``; empty for a conv.
        operand_contracting_dims: the weight operand's contracted dims (op numbering):
            for a conv ``(in-feature dim, *spatial dims)`` of the kernel.
        layout: for each axis of the operand, the original axes it is made of
            (row-major ``(axis, size)`` pairs, ``axis=None`` where it was broadcast),
            or ``None`` when unmappable.
        conv: the conv parameters, or ``None`` for a dot.
        note: why the axes could not be mapped back, else ``""``.
        gathered: ``None`` outside ``shard_map``; inside one, the manual mesh axes over
            which :func:`capture` concatenates the per-device activations (along
            :attr:`gather_dim`) to make the whole activation; ``()`` when every
            device holds the same one. ``activation_shape`` is that whole shape.
        gather_dim: the activation dim the shards are concatenated along (its first
            row dim: the first one a dot does not contract, a conv's batch dim).
        stacked: ``None`` unless the weight reaches the op as one slice per iteration
            of a ``scan`` (stacked layers): then the original axis the scan runs over.
            The other axis fields describe one slice (in the leaf's numbering, without
            this axis), ``activation_shape`` is one iteration's, and :func:`capture`
            returns the activations of every iteration stacked on a new leading axis,
            in the order of that axis.
        scan: the site of that ``scan`` equation (see :func:`eqn_at`), else ``None``.

    Example:
        >>> import jax.numpy as jnp
        >>> uses = trace_uses(lambda p, x: x @ p["w"], {"w": jnp.ones((4, 3))}, jnp.ones((2, 4)))
        >>> u = uses["w"][0]
        >>> u.primitive, u.operand, u.contracting_axes, u.free_axes, u.activation_shape
        ('dot_general', 1, (0,), (1,), (2, 4))
    """

    path: str
    primitive: str
    operand: int
    site: tuple[int, ...]
    weight_shape: tuple[int, ...]
    operand_shape: tuple[int, ...]
    contracting_axes: tuple[int, ...] | None
    free_axes: tuple[int, ...] | None
    batch_axes: tuple[int, ...] | None
    activation_shape: tuple[int, ...]
    activation_dtype: np.dtype
    activation_contracting_dims: tuple[int, ...]
    operand_contracting_dims: tuple[int, ...]
    layout: Layout | None
    conv: ConvInfo | None = None
    note: str = ""
    gathered: tuple[str, ...] | None = None
    gather_dim: int | None = None
    stacked: int | None = None
    scan: tuple[int, ...] | None = None

    @property
    def mappable(self) -> bool:
        """Whether the contracted/free axes were mapped back to the leaf's axes."""
        return self.contracting_axes is not None


@dataclasses.dataclass
class _Track:
    """A value derived from parameter leaf ``leaf`` by relabelling ops only."""

    leaf: int
    layout: Layout | None
    note: str = ""
    stacked: int | None = None  # the original axis a scan slices it along
    scan: tuple[int, ...] | None = None  # the site of that scan


def _unmappable(leaf: int, note: str) -> _Track:
    return _Track(leaf, None, note)


def _reshape_layout(layout: Layout, new_shape: Sequence[int]) -> Layout | None:
    """Regroups the atoms for a row-major reshape; ``None`` if an atom would be split."""
    atoms = [atom for group in layout for atom in group]
    groups: list[list[Atom]] = []
    j = 0
    for size in new_shape:
        group: list[Atom] = []
        product = 1
        while product < size:
            if j >= len(atoms):
                return None
            atom_size = atoms[j][1]
            if atom_size == 0 or size % (product * atom_size):
                return None
            group.append(atoms[j])
            product *= atom_size
            j += 1
        if product != size:
            return None
        groups.append(group)
    rest = atoms[j:]
    if any(size != 1 for _, size in rest):
        return None
    if rest and groups:
        groups[-1].extend(rest)
    return tuple(tuple(group) for group in groups)


def _broadcast_layout(
    layout: Layout, in_shape: Sequence[int], shape: Sequence[int], dims: Sequence[int]
) -> Layout:
    out: list[tuple[Atom, ...]] = []
    for j, size in enumerate(shape):
        if j in dims:
            i = list(dims).index(j)
            group = layout[i]
            out.append(group if in_shape[i] == size else (*group, (None, size)))
        else:
            out.append(() if size == 1 else ((None, size),))
    return tuple(out)


def _relabel(name: str, params: dict[str, Any], track: _Track, in_shape, out_shape) -> _Track:
    """The track of the output of a single-operand relabelling op."""
    if track.layout is None:
        return track
    layout = track.layout
    if name in _SAME:
        return track
    if name == "transpose":
        return dataclasses.replace(track, layout=tuple(layout[p] for p in params["permutation"]))
    if name == "reshape":
        if params.get("dimensions") is not None:
            layout = tuple(layout[p] for p in params["dimensions"])
        new = _reshape_layout(layout, out_shape)
        if new is None:
            return _unmappable(
                track.leaf,
                f"reshape {tuple(in_shape)} -> {tuple(out_shape)} splits an original axis",
            )
        return dataclasses.replace(track, layout=new)
    if name == "squeeze":
        dropped = {d % len(in_shape) for d in params["dimensions"]}
        return dataclasses.replace(
            track, layout=tuple(g for i, g in enumerate(layout) if i not in dropped)
        )
    if name == "expand_dims":  # not a jax primitive today; kept for other front ends
        out = list(layout)
        for d in sorted(params["dimensions"]):
            out.insert(d, ())
        return dataclasses.replace(track, layout=tuple(out))
    if name == "broadcast_in_dim":
        new = _broadcast_layout(layout, in_shape, out_shape, params["broadcast_dimensions"])
        return dataclasses.replace(track, layout=new)
    raise AssertionError(name)  # pragma: no cover


_RELABEL = _SAME | {"transpose", "reshape", "squeeze", "expand_dims", "broadcast_in_dim"}


def _axes(layout: Layout, dims: Sequence[int]) -> tuple[int, ...]:
    return tuple(sorted(a for d in dims for a, _ in layout[d] if a is not None))


def _has_broadcast(layout: Layout, dims: Sequence[int]) -> bool:
    return any(a is None and size != 1 for d in dims for a, size in layout[d])


def _shape(v: Any) -> tuple[int, ...]:
    return tuple(getattr(v.aval, "shape", ()))


@dataclasses.dataclass(frozen=True)
class _Manual:
    """The ``shard_map`` an equation sits in, as far as gathering its inputs goes."""

    axes: tuple[str, ...]  # its manual mesh axes, in mesh order
    sizes: tuple[int, ...]  # their sizes
    checked: bool  # check_vma: the avals say which axes a value varies along
    note: str = ""  # why nothing in it can be gathered


def _manual_of(eqn: Any, outer: _Manual | None) -> _Manual:
    params = eqn.params
    mesh = params["mesh"]
    manual = set(params.get("newly_manual_axes", ()) or mesh.axis_names)
    axes = tuple(a for a in mesh.axis_names if a in manual)
    sizes = tuple(int(dict(mesh.shape)[a]) for a in axes)
    note = "" if outer is None else "used inside a shard_map nested in another"
    return _Manual(axes, sizes, bool(params.get("check_vma", True)), note)


def _varying(aval: Any) -> frozenset[str] | None:
    """The manual axes a value varies along, from its aval; ``None`` if it does not say."""
    mat = getattr(aval, "manual_axis_type", None)
    varying = getattr(mat, "varying", None)
    if varying is None:
        varying = getattr(aval, "vma", None)
    if varying is None or getattr(mat, "unreduced", None):
        return None
    return frozenset(varying)


def activation_row_dim(eqn: Any, operand: int) -> int | None:
    """The first row dim of the other operand of a dot/conv whose ``operand`` is a weight.

    That is the activation's first dim a ``dot_general`` neither contracts nor batches,
    or a convolution's batch dim; ``None`` where there is none (a vector input).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> eqn = jax.make_jaxpr(lambda w, x: x @ w)(jnp.ones((4, 3)), jnp.ones((2, 4))).eqns[0]
        >>> activation_row_dim(eqn, 1)
        0
    """
    if eqn.primitive.name == DOT:
        (contract, batch) = eqn.params["dimension_numbers"]
        act = 1 - operand
        rank = len(_shape(eqn.invars[act]))
        free = [d for d in range(rank) if d not in contract[act] and d not in batch[act]]
        return free[0] if free else None
    if eqn.primitive.name == CONV and operand == 1:
        return int(eqn.params["dimension_numbers"].lhs_spec[0])
    return None


def _gather(eqn: Any, operand: int, manual: _Manual) -> tuple[int | None, tuple[str, ...], str]:
    """``(dim, axes, note)``: how :func:`capture` assembles a use's activation in a shard_map.

    The per-device activations are concatenated along ``dim`` over the manual ``axes``
    it varies along (one copy of what is replicated); ``note`` says why the result
    would not be the activation of each row once.
    """
    dim = activation_row_dim(eqn, operand)
    varying = _varying(eqn.invars[1 - operand].aval) if manual.checked else None
    note = manual.note
    if varying is None:
        axes = manual.axes
        note = note or (
            "used inside a shard_map with check_vma=False: which devices hold copies of "
            "its input is unknown"
        )
    else:
        axes = tuple(a for a in manual.axes if a in varying)
    if axes and dim is None:
        note = note or "used inside a shard_map on an input with no row dim to gather"
    return dim, axes, note


def _make_use(
    eqn: Any,
    site: tuple[int, ...],
    operand: int,
    track: _Track,
    path: str,
    weight_shape: tuple[int, ...],
    manual: _Manual | None = None,
) -> WeightUse:
    name = eqn.primitive.name
    weight_var = eqn.invars[operand]
    act_var = eqn.invars[1 - operand]
    rank = len(_shape(weight_var))
    conv = None
    note = track.note
    if name == DOT:
        (contract, batch) = eqn.params["dimension_numbers"]
        w_contract = tuple(contract[operand])
        w_batch = tuple(batch[operand])
        a_contract = tuple(contract[1 - operand])
    else:
        p = eqn.params
        conv = ConvInfo(
            dimension_numbers=p["dimension_numbers"],
            window_strides=tuple(p["window_strides"]),
            padding=tuple(tuple(pad) for pad in p["padding"]),
            lhs_dilation=tuple(p["lhs_dilation"]),
            rhs_dilation=tuple(p["rhs_dilation"]),
            feature_group_count=int(p["feature_group_count"]),
            batch_group_count=int(p["batch_group_count"]),
        )
        spec = p["dimension_numbers"].rhs_spec if operand == 1 else p["dimension_numbers"].lhs_spec
        w_contract = (spec[1], *spec[2:])
        w_batch = ()
        a_contract = ()
        if operand == 0 and not note:
            note = "the weight is the conv input (lhs), not its kernel"
    w_free = tuple(d for d in range(rank) if d not in w_contract and d not in w_batch)
    layout = track.layout
    if layout is not None and _has_broadcast(layout, w_contract):
        note = note or "a contracted axis was broadcast from the weight"
        layout = None
    if layout is None or (name == CONV and operand == 0):
        contracting = free = batch_axes = None
    else:
        contracting = _axes(layout, w_contract)
        free = _axes(layout, w_free)
        batch_axes = _axes(layout, w_batch)
    act_shape = _shape(act_var)
    gathered = gather_dim = None
    if manual is not None:
        gather_dim, gathered, gather_note = _gather(eqn, operand, manual)
        note = note or gather_note
        if gathered and gather_dim is not None:
            sizes = dict(zip(manual.axes, manual.sizes, strict=True))
            shards = math.prod(sizes[a] for a in gathered)
            act_shape = tuple(
                size * shards if d == gather_dim else size for d, size in enumerate(act_shape)
            )
    return WeightUse(
        path=path,
        primitive=name,
        operand=operand,
        site=site,
        weight_shape=weight_shape,
        operand_shape=_shape(weight_var),
        contracting_axes=contracting,
        free_axes=free,
        batch_axes=batch_axes,
        activation_shape=act_shape,
        activation_dtype=np.dtype(act_var.aval.dtype),
        activation_contracting_dims=a_contract,
        operand_contracting_dims=w_contract,
        layout=layout,
        conv=conv,
        note=note,
        gathered=gathered,
        gather_dim=gather_dim,
        stacked=track.stacked,
        scan=track.scan,
    )


def sub_jaxpr(eqn: Any) -> tuple[Any, list[Any]] | None:
    """``(jaxpr, consts)`` of a call-like eqn whose operands map one for one, else None.

    Example:
        >>> import jax
        >>> eqn = jax.make_jaxpr(jax.jit(lambda x: x + 1))(1.0).jaxpr.eqns[0]
        >>> eqn.primitive.name, sub_jaxpr(eqn) is not None
        ('jit', True)
    """
    key = _CALLS.get(eqn.primitive.name)
    if key is None or key not in eqn.params:
        return None
    sub = eqn.params[key]
    if isinstance(sub, jex.ClosedJaxpr):
        jaxpr, consts = sub.jaxpr, list(sub.consts)
    elif isinstance(sub, jex.Jaxpr):
        jaxpr, consts = sub, []
    else:
        return None
    if len(jaxpr.invars) != len(eqn.invars) or len(jaxpr.outvars) != len(eqn.outvars):
        return None
    return jaxpr, consts


SHARD_MAP = "shard_map"
# Ops that run code of their own on a weight (a kernel) without a body to follow.
_KERNEL_CALLS = frozenset({"ffi_call", "custom_call", "tpu_custom_call", "triton_kernel_call"})


def _bodies(value: Any) -> bool:
    if isinstance(value, jex.Jaxpr | jex.ClosedJaxpr):
        return True
    return isinstance(value, tuple | list) and any(_bodies(v) for v in value)


def is_opaque(eqn: Any) -> bool:
    """Whether an equation runs code on its inputs that :func:`trace_uses` does not read.

    That is one with a body the walk does not enter (``pallas_call``, ``cond``,
    ``while``, ``scan``, a call whose arity differs from its body's) or a foreign
    kernel (``ffi_call``).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> f = lambda x: jax.lax.cond(x.sum() > 0, jnp.sin, jnp.cos, x)
        >>> [is_opaque(e) for e in jax.make_jaxpr(f)(jnp.ones(2)).eqns][-1]
        True
    """
    name = eqn.primitive.name
    if name in _KERNEL_CALLS:
        return True
    if name in (DOT, CONV, SHARD_MAP) or sub_jaxpr(eqn) is not None:
        return False
    return any(_bodies(v) for v in eqn.params.values())


def _shard_map_body(eqn: Any) -> Any:
    body = eqn.params.get("jaxpr")
    if isinstance(body, jex.ClosedJaxpr):
        body = body.jaxpr if not body.consts else None
    if not isinstance(body, jex.Jaxpr) or len(body.invars) != len(eqn.invars):
        return None
    return body


def _into_shard_map(track: _Track | None, spec: Any) -> _Track | None:
    """A weight's track inside a shard_map: unmappable where ``in_specs`` split it."""
    if track is None or track.layout is None:
        return track
    split = [entry for entry in tuple(spec) if entry is not None]
    if split:
        return _unmappable(track.leaf, f"shard_map splits it across mesh axes (in_specs {spec})")
    return track


SCAN = "scan"


def _scan_parts(eqn: Any) -> tuple[Any, list[Any], int] | None:
    """``(body, body consts, consts + carries)`` of a ``scan`` equation, else None."""
    body = eqn.params.get("jaxpr")
    if not isinstance(body, jex.ClosedJaxpr) or len(body.jaxpr.invars) != len(eqn.invars):
        return None
    fixed = int(eqn.params["num_consts"]) + int(eqn.params["num_carry"])
    return body.jaxpr, list(body.consts), fixed


def _into_scan(track: _Track | None, site: tuple[int, ...]) -> _Track | None:
    """A weight a ``scan`` runs over (one of its ``xs``) as the body sees it: one slice."""
    if track is None or track.layout is None:
        return track
    if track.stacked is not None:
        return _unmappable(track.leaf, "sliced by nested scans")
    first = track.layout[0]
    if len(first) != 1 or first[0][0] is None:
        return _unmappable(track.leaf, "a scan runs over an axis that is not one axis of it")
    return _Track(track.leaf, track.layout[1:], stacked=first[0][0], scan=site)


Emit = Callable[[Any, tuple[int, ...], int, _Track, "_Manual | None"], None]


def _walk(
    jaxpr: Any,
    tracks: Sequence[_Track | None],
    prefix: tuple[int, ...],
    emit: Emit,
    hide: Callable[[Any, _Track], None],
    manual: _Manual | None = None,
    in_scan: bool = False,
) -> list[_Track | None]:
    env: dict[Any, _Track] = {}
    for var, track in zip(jaxpr.invars, tracks, strict=True):
        if track is not None:
            env[var] = track

    def get(v: Any) -> _Track | None:
        return None if isinstance(v, jex.Literal) else env.get(v)

    for i, eqn in enumerate(jaxpr.eqns):
        ins = [get(v) for v in eqn.invars]
        if all(t is None for t in ins):
            continue
        name = eqn.primitive.name
        site = (*prefix, i)
        outs: list[_Track | None] = [None] * len(eqn.outvars)
        if name in (DOT, CONV):
            for operand, track in enumerate(ins[:2]):
                if track is not None:
                    emit(eqn, site, operand, track, manual)
        elif name in _RELABEL and len(eqn.invars) == 1 and len(eqn.outvars) == 1:
            assert ins[0] is not None  # the only input; all-None inputs were skipped above
            outs[0] = _relabel(
                name, eqn.params, ins[0], _shape(eqn.invars[0]), _shape(eqn.outvars[0])
            )
        elif name in _MANY_SAME and len(eqn.invars) == len(eqn.outvars):
            outs = list(ins)
        elif name == SHARD_MAP and not in_scan and _shard_map_body(eqn) is not None:
            # Outputs are not followed: out_specs may concatenate them.
            specs = eqn.params["in_specs"]
            inner = [_into_shard_map(t, s) for t, s in zip(ins, specs, strict=True)]
            _walk(_shard_map_body(eqn), inner, site, emit, hide, _manual_of(eqn, manual))
        elif name == SCAN and not in_scan and manual is None and (parts := _scan_parts(eqn)):
            # Stacked layers: a weight scanned over is followed slice by slice; one
            # passed whole (a const, a carry) is not, its rows per iteration unseen.
            body, _, fixed = parts
            inner = []
            for k, track in enumerate(ins):
                if track is not None and k < fixed:
                    hide(eqn, track)
                inner.append(_into_scan(track, site) if k >= fixed else None)
            # Outputs are not followed: they are stacked per iteration.
            _walk(body, inner, site, emit, hide, None, in_scan=True)
        else:
            sub = sub_jaxpr(eqn)
            if sub is not None:
                outs = _walk(sub[0], ins, site, emit, hide, manual, in_scan)
            elif is_opaque(eqn) or name == SHARD_MAP:
                for track in ins:
                    if track is not None:
                        hide(eqn, track)
        for var, track in zip(eqn.outvars, outs, strict=True):
            if track is not None and not isinstance(var, jex.DropVar):
                env[var] = track
    return [get(v) for v in jaxpr.outvars]


def _collect(
    closed_jaxpr: Any, paths: Sequence[str]
) -> tuple[dict[str, list[WeightUse]], dict[str, list[str]]]:
    """The dot/conv uses of each leading input, and the opaque ops each one enters."""
    jaxpr = closed_jaxpr.jaxpr
    if len(paths) > len(jaxpr.invars):
        raise ValueError(f"{len(paths)} paths for a jaxpr with {len(jaxpr.invars)} inputs")
    shapes = [_shape(v) for v in jaxpr.invars[: len(paths)]]
    result: dict[str, list[WeightUse]] = {path: [] for path in paths}
    hidden: dict[str, list[str]] = {path: [] for path in paths}
    tracks: list[_Track | None] = [
        _Track(i, tuple(((i_axis, size),) for i_axis, size in enumerate(shape)))
        for i, shape in enumerate(shapes)
    ]
    tracks += [None] * (len(jaxpr.invars) - len(paths))

    def emit(eqn, site, operand, track, manual) -> None:
        path = paths[track.leaf]
        use = _make_use(eqn, site, operand, track, path, shapes[track.leaf], manual)
        result[path].append(use)

    def hide(eqn: Any, track: _Track) -> None:
        names = hidden[paths[track.leaf]]
        if eqn.primitive.name not in names:
            names.append(eqn.primitive.name)

    _walk(jaxpr, tracks, (), emit, hide)
    return result, hidden


def uses_in_jaxpr(closed_jaxpr: Any, paths: Sequence[str]) -> dict[str, list[WeightUse]]:
    """The uses of the first ``len(paths)`` inputs of a jaxpr, keyed by those paths.

    This is :func:`trace_uses` for a jaxpr you already have: ``paths[i]`` names input
    ``i`` (inputs beyond ``len(paths)`` are activations/other arguments).

    Args:
        closed_jaxpr: a ``ClosedJaxpr`` (from :func:`jax.make_jaxpr`).
        paths: the names of its leading inputs, the parameter leaves.

    Returns:
        ``{path: [WeightUse, ...]}`` in program order, ``[]`` for unconsumed leaves.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> jaxpr = jax.make_jaxpr(lambda w, x: x @ w.T)(jnp.ones((3, 4)), jnp.ones((2, 4)))
        >>> uses_in_jaxpr(jaxpr, ["w"])["w"][0].contracting_axes
        (1,)
    """
    return _collect(closed_jaxpr, paths)[0]


def opaque_uses(closed_jaxpr: Any, paths: Sequence[str]) -> dict[str, list[str]]:
    """For each leading input of a jaxpr, the opaque ops (:func:`is_opaque`) it enters.

    The companion of :func:`uses_in_jaxpr`: a weight listed here reaches code whose
    products :func:`trace_uses` cannot see (a Pallas kernel, a ``scan`` body), so its
    uses are incomplete. Weights are followed as in :func:`uses_in_jaxpr`.

    Args:
        closed_jaxpr: a ``ClosedJaxpr``.
        paths: the names of its leading inputs.

    Returns:
        ``{path: [primitive name, ...]}``, ``[]`` for a weight seen whole.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> f = lambda w, x: jax.lax.scan(lambda c, _: (c @ w, None), x, None, length=2)[0]
        >>> opaque_uses(jax.make_jaxpr(f)(jnp.eye(2), jnp.ones(2)), ["w"])
        {'w': ['scan']}
    """
    return _collect(closed_jaxpr, paths)[1]


def trace_jaxpr(
    apply_fn: Callable[..., Any], params: Any, *example_args: Any
) -> tuple[jex.ClosedJaxpr, list[str]]:
    """Traces ``apply_fn(params, *example_args)``: ``(closed_jaxpr, leaf_paths)``.

    The jaxpr's first ``len(leaf_paths)`` inputs are the parameter leaves, in
    :func:`jax.tree_util.tree_flatten` order, named like
    :func:`jaxcompress.filters.path_to_str`.

    Args:
        apply_fn: the function to trace (jitted or not).
        params: its parameter pytree (linen params, ``nnx.State``, a dict ...).
        *example_args: example inputs (arrays or ``jax.ShapeDtypeStruct``).

    Returns:
        ``(ClosedJaxpr, list of leaf paths)``.

    Example:
        >>> import jax.numpy as jnp
        >>> jaxpr, paths = trace_jaxpr(lambda p, x: x @ p["w"], {"w": jnp.ones((4, 3))},
        ...                            jnp.ones((2, 4)))
        >>> paths, len(jaxpr.jaxpr.invars)
        (['w'], 2)
    """
    closed, paths, _ = trace_with_output(apply_fn, params, *example_args)
    return closed, paths


def trace_with_output(
    apply_fn: Callable[..., Any], params: Any, *example_args: Any
) -> tuple[jex.ClosedJaxpr, list[str], Any]:
    """:func:`trace_jaxpr`, also returning the output's treedef (to unflatten its outputs).

    Example:
        >>> import jax.numpy as jnp
        >>> _, paths, tree = trace_with_output(lambda p, x: {"y": x @ p["w"]},
        ...                                    {"w": jnp.ones((4, 3))}, jnp.ones((2, 4)))
        >>> paths, tree.num_leaves
        (['w'], 1)
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    paths = [path_to_str(path) for path, _ in flat]
    if len(set(paths)) != len(paths):
        raise ValueError(f"parameter paths are not unique: {paths}")
    closed, shape = jax.make_jaxpr(apply_fn, return_shape=True)(params, *example_args)
    return closed, paths, jax.tree_util.tree_structure(shape)


def trace_uses(
    apply_fn: Callable[..., Any], params: Any, *example_args: Any
) -> dict[str, list[WeightUse]]:
    """Maps each parameter leaf to the ``dot_general``/conv ops that consume it.

    Traces ``apply_fn(params, *example_args)`` with :func:`jax.make_jaxpr` (nothing is
    computed) and follows every leaf through relabelling ops and call sub-jaxprs (see
    the module docstring for exactly which). For an nnx model trace a pure function
    of the state: ``graphdef, state = nnx.split(model)`` then
    ``trace_uses(lambda s, x: nnx.merge(graphdef, s)(x), state, x)``.

    Args:
        apply_fn: ``apply_fn(params, *example_args)``; may be jitted.
        params: the parameter pytree; leaves may be sharded.
        *example_args: example inputs with the shapes and dtypes used later.

    Returns:
        ``{path: [WeightUse, ...]}`` for every leaf, in program order; leaves that no
        dot/conv consumes (biases, norm scales) map to ``[]``. A weight used twice
        (tied) has two uses.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jaxcompress.examples.models import LeNet5
        >>> model = LeNet5()
        >>> x = jnp.zeros((2, 8, 8, 1))
        >>> params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]  # shapes suffice
        >>> uses = trace_uses(lambda p, x: model.apply({"params": p}, x), params, x)
        >>> [(u.primitive, u.contracting_axes, fan_in_axes(u)) for u in uses["conv2/kernel"]]
        [('conv_general_dilated', (0, 1, 2), 3)]
        >>> uses["conv2/bias"]
        []
    """
    closed, paths = trace_jaxpr(apply_fn, params, *example_args)
    return uses_in_jaxpr(closed, paths)


def trailing_fan_in_axes(use: WeightUse) -> int | None:
    """How many trailing axes of the weight are its contracted inputs, or ``None``.

    The mirror of :func:`fan_in_axes` for weights stored output first, as equinox's
    ``Linear`` ``(out, in)`` (-> 1) and ``Conv`` ``(out, in, h, w)`` (-> 3) used as
    ``weight @ x``. ``None`` where :func:`fan_in_axes` applies or neither does.

    Example:
        >>> import jax.numpy as jnp
        >>> use, = trace_uses(lambda w, x: x @ w.T, jnp.ones((4, 3)), jnp.ones((2, 3)))[""]
        >>> fan_in_axes(use), trailing_fan_in_axes(use)
        (None, 1)
    """
    shape, contracted = _kernel_view(use)
    if contracted is None or fan_in_axes(use) is not None:
        return None
    first = min(contracted)
    for axis in range(len(shape)):
        if shape[axis] != 1 and (axis >= first) != (axis in contracted):
            return None
    return len(shape) - first


def _contracted_kernel_axes(use: WeightUse) -> set[int] | None:
    """The weight's contracted axes, or ``None`` for a use no fan-in can be read from.

    That is an unmappable use, one with ``dot_general`` batch axes, a conv's input
    rather than its kernel, or one that contracts nothing.
    """
    if use.contracting_axes is None or use.batch_axes:
        return None
    if use.primitive == CONV and use.operand == 0:
        return None
    return set(use.contracting_axes) or None


def _kernel_view(
    use: WeightUse, weight_shape: Sequence[int] | None = None
) -> tuple[tuple[int, ...], set[int] | None]:
    """The shape the op multiplies and its contracted axes: one slice of a stacked weight."""
    shape = tuple(use.weight_shape if weight_shape is None else weight_shape)
    contracted = _contracted_kernel_axes(use)
    axis = use.stacked
    if axis is None or contracted is None:
        return shape, contracted
    return shape[:axis] + shape[axis + 1 :], {c - (c > axis) for c in contracted}


def fan_in_axes(use: WeightUse, weight_shape: Sequence[int] | None = None) -> int | None:
    """How many leading axes of the weight are contracted inputs, or ``None``.

    That is the ``fan_in_axes`` of the weight's matrix view
    (:func:`jaxcompress.arrays.lowrank.matrix_shape`): Dense ``(in, out)`` -> 1, conv
    HWIO -> 3, DenseGeneral q/k/v ``(features, heads, head_dim)`` -> 1, attention output
    ``(heads, head_dim, features)`` -> 2. ``None`` when the contracted axes are not the
    leading ones (for example a ``(out, in)`` kernel used as ``x @ w.T``), when the
    weight has ``dot_general`` batch axes, when the use is unmappable or when the weight
    is a conv's input rather than its kernel. Axes of size 1 count on either side.
    For a use of one slice of a stacked weight (:attr:`WeightUse.stacked`) it is the
    slice's, numbered without the stacked axis.

    Args:
        use: one use of the weight.
        weight_shape: the leaf shape; defaults to ``use.weight_shape``.

    Returns:
        The number of leading contracted axes, or ``None``.

    Example:
        >>> import jax.numpy as jnp
        >>> w = jnp.ones((2, 4, 8))  # (heads, head_dim, features)
        >>> use, = trace_uses(lambda w, x: jnp.einsum("bhd,hdf->bf", x, w), w,
        ...                   jnp.ones((3, 2, 4)))[""]
        >>> fan_in_axes(use)
        2
    """
    shape, contracted = _kernel_view(use, weight_shape)
    if contracted is None:
        return None
    k = max(contracted) + 1
    for axis in range(len(shape)):
        inside = axis < k
        if shape[axis] != 1 and inside != (axis in contracted):
            return None
    return k


def fan_in_by_path(uses: dict[str, list[WeightUse]]) -> dict[str, int]:
    """``{path: fan_in_axes}`` for weights whose every use agrees on one matrix view.

    Args:
        uses: the result of :func:`trace_uses`.

    Returns:
        The fan-in per path; weights with no uses or with a ``None``/conflicting
        fan-in are left out.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jaxcompress.examples.models import LeNet300100
        >>> model, x = LeNet300100(), jnp.zeros((2, 64))
        >>> params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
        >>> fan_in_by_path(trace_uses(lambda p, x: model.apply({"params": p}, x), params, x))
        {'dense1/kernel': 1, 'dense2/kernel': 1, 'dense3/kernel': 1}
    """
    out: dict[str, int] = {}
    for path, path_uses in uses.items():
        fans = {fan_in_axes(use) for use in path_uses}
        fan = fans.pop() if len(fans) == 1 else None
        if fan is not None:
            out[path] = fan
    return out


RESULT = -1
"""The ``operand`` that asks :func:`capture` for an equation's output, not an operand."""


def capture(
    closed_jaxpr: Any,
    sites: Iterable[tuple[tuple[int, ...], int]],
    *flat_args: Any,
    iteration: int | None = None,
) -> dict[tuple[tuple[int, ...], int], jax.Array]:
    """Evaluates a jaxpr and returns chosen operands of chosen equations.

    The jaxpr is interpreted equation by equation (inlining the call sub-jaxprs that
    contain a requested site); call it inside :func:`jax.jit` so the interpretation
    happens once, at trace time. :func:`run_and_capture` also returns the outputs.
    A ``scan`` holding a requested site runs as a new
    ``scan`` that also returns the operand of every iteration, stacked on a new leading
    axis in the order of the scanned inputs (see :attr:`WeightUse.stacked`).

    With ``iteration=i`` such a ``scan`` instead runs only the iterations before the
    one that reads slice ``i`` of its scanned inputs (``i`` from the end for a reverse
    scan), then that iteration's body once, returning its operands unstacked, and
    evaluation stops there: every requested site must then come before or inside it.
    This is how one stacked layer is calibrated without running the ones after it.

    Args:
        closed_jaxpr: the jaxpr the sites come from.
        sites: ``(site, operand)`` pairs, ``site`` as in :attr:`WeightUse.site`; for the
            activation of a use pass ``(use.site, 1 - use.operand)``, for the
            equation's output (a layer's pre-activation) ``(use.site, RESULT)``.
        *flat_args: the jaxpr's inputs (flattened params, then the other arguments).
        iteration: the one iteration of scans to capture (see above), or ``None``.

    Returns:
        ``{(site, operand): value}``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> f = lambda w, x: jnp.tanh(x) @ w
        >>> w, x = jnp.ones((2, 3)), jnp.zeros((1, 2))
        >>> jaxpr = jax.make_jaxpr(f)(w, x)
        >>> use, = uses_in_jaxpr(jaxpr, ["w"])["w"]
        >>> capture(jaxpr, [(use.site, 0)], w, x)[(use.site, 0)].tolist()
        [[0.0, 0.0]]
    """
    return run_and_capture(closed_jaxpr, sites, *flat_args, iteration=iteration)[1]


def run_and_capture(
    closed_jaxpr: Any,
    sites: Iterable[tuple[tuple[int, ...], int]],
    *flat_args: Any,
    iteration: int | None = None,
) -> tuple[list[Any], dict[tuple[tuple[int, ...], int], jax.Array]]:
    """:func:`capture`, also returning the jaxpr's outputs: ``(outputs, captured)``.

    Differentiable: every equation is bound on the given values, so :func:`jax.grad`
    through the outputs and the captured values works. A call (``jit``, ``remat``,
    ``custom_jvp``/``custom_vjp``) that holds a requested site is inlined, so there
    its body is differentiated rather than its custom rule. An output
    (``operand=RESULT``) inside a ``shard_map`` is not captured (ValueError).

    Args:
        closed_jaxpr: the jaxpr the sites come from.
        sites: ``(site, operand)`` pairs as in :func:`capture`.
        *flat_args: the jaxpr's inputs.
        iteration: as in :func:`capture`; evaluation then stops early and ``outputs``
            is empty.

    Returns:
        ``(outputs, {(site, operand): value})``, ``outputs`` a list like the jaxpr's.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> jaxpr = jax.make_jaxpr(lambda w, x: jnp.tanh(x @ w))(jnp.ones((2, 1)), jnp.ones(2))
        >>> site = uses_in_jaxpr(jaxpr, ["w"])["w"][0].site
        >>> outs, got = run_and_capture(jaxpr, [(site, RESULT)], jnp.ones((2, 1)), jnp.ones(2))
        >>> got[(site, RESULT)].tolist(), [round(v, 3) for v in outs[0].tolist()]
        ([2.0], [0.964])
    """
    wanted: dict[tuple[int, ...], list[int]] = {}
    for site, operand in sites:
        wanted.setdefault(tuple(site), []).append(operand)
    inline = {site[:k] for site in wanted for k in range(1, len(site))}
    captured: dict[tuple[tuple[int, ...], int], jax.Array] = {}
    jaxpr = closed_jaxpr.jaxpr
    outs: list[Any] = []
    with contextlib.suppress(_Captured):
        outs = _interpret(
            jaxpr,
            list(closed_jaxpr.consts),
            list(flat_args),
            (),
            wanted,
            inline,
            captured,
            iteration,
        )
    missing = [(s, o) for s, ops in wanted.items() for o in ops if (s, o) not in captured]
    if missing:
        raise ValueError(f"sites {missing} are not dot/conv equations of this jaxpr")
    return outs, captured


def _environment(jaxpr, consts, args) -> tuple[dict[Any, Any], Callable[[Any], Any]]:
    """The variable environment of a jaxpr's inputs, and its reader (literals inline)."""
    env: dict[Any, Any] = dict(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, args, strict=True))

    def read(v: Any) -> Any:
        return v.val if isinstance(v, jex.Literal) else env[v]

    return env, read


class _Captured(Exception):
    """``capture(iteration=...)`` has every site it wants: the rest is not evaluated."""


def _interpret(jaxpr, consts, args, prefix, wanted, inline, captured, iteration=None) -> list[Any]:
    env, read = _environment(jaxpr, consts, args)

    for i, eqn in enumerate(jaxpr.eqns):
        site = (*prefix, i)
        invals = [read(v) for v in eqn.invars]
        sub = sub_jaxpr(eqn) if site in inline else None
        if sub is not None:
            outs = _interpret(sub[0], sub[1], invals, site, wanted, inline, captured, iteration)
        elif site in inline and eqn.primitive.name == SCAN and _scan_parts(eqn) is not None:
            outs = _interpret_scan(eqn, invals, site, wanted, inline, captured, iteration)
        elif site in inline and eqn.primitive.name == SHARD_MAP:
            outs = _interpret_shard_map(eqn, invals, site, wanted, inline, captured)
        else:
            outs = bind_equation(eqn, invals)
            for operand in wanted.get(site, ()):
                if eqn.primitive.name in (DOT, CONV):
                    captured[(site, operand)] = outs[0] if operand == RESULT else invals[operand]
        for var, val in zip(eqn.outvars, outs, strict=True):
            if not isinstance(var, jex.DropVar):
                env[var] = val
    return [read(v) for v in jaxpr.outvars]


def _interpret_scan(eqn, invals, site, wanted, inline, captured, iteration) -> list[Any]:
    """Runs a scan whose body holds wanted sites, returning their operands (see capture)."""
    parts = _scan_parts(eqn)
    assert parts is not None  # checked by the caller
    body, body_consts, fixed = parts
    params = eqn.params
    n_carry, length, reverse = int(params["num_carry"]), int(params["length"]), params["reverse"]
    n_consts = fixed - n_carry
    consts, init, xs = invals[:n_consts], invals[n_consts:fixed], invals[fixed:]
    keys = [(s, o) for s, ops in wanted.items() if s[: len(site)] == site for o in ops if s != site]

    def run(carry, x, found):
        args = [*consts, *carry, *x]
        return _interpret(body, body_consts, args, site, wanted, inline, found)

    if iteration is None:

        def step(carry, x):
            found: dict[tuple[tuple[int, ...], int], jax.Array] = {}
            outs = run(carry, x, found)
            return tuple(outs[:n_carry]), (tuple(outs[n_carry:]), tuple(found[k] for k in keys))

        carry, (ys, extra) = lax.scan(
            step, tuple(init), tuple(xs), length=length, reverse=reverse, unroll=params["unroll"]
        )
        captured.update(zip(keys, extra, strict=True))
        return [*carry, *ys]

    if not 0 <= iteration < length:
        raise ValueError(f"iteration {iteration} is outside the scan's {length} iterations")
    # The iterations run before the wanted one, in the scan's own order.
    before = slice(iteration + 1, length) if reverse else slice(0, iteration)

    def plain(carry, x):
        return tuple(run(carry, x, {})[:n_carry]), None

    carry, _ = lax.scan(
        plain,
        tuple(init),
        tuple(x[before] for x in xs),
        length=len(range(length)[before]),
        reverse=reverse,
    )
    run(carry, [x[iteration] for x in xs], captured)
    raise _Captured


def _eqn_at(jaxpr: Any, rel: tuple[int, ...]) -> Any:
    """The equation at ``rel`` (indices down through sub-jaxprs) below ``jaxpr``."""
    eqn = jaxpr.eqns[rel[0]]
    for i in rel[1:]:
        sub = sub_jaxpr(eqn)
        scan = _scan_parts(eqn) if eqn.primitive.name == SCAN else None
        if sub is not None:
            body = sub[0]
        elif scan is not None:
            body = scan[0]
        else:
            body = _shard_map_body(eqn)
        eqn = body.eqns[i]
    return eqn


def eqn_at(closed_jaxpr: Any, site: Sequence[int]) -> Any:
    """The equation at ``site`` (as in :attr:`WeightUse.site`) of a jaxpr.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> f = lambda w, x: jax.lax.scan(lambda c, w: (c @ w, None), x, w)[0]
        >>> jaxpr = jax.make_jaxpr(f)(jnp.ones((3, 2, 2)), jnp.ones(2))
        >>> use, = uses_in_jaxpr(jaxpr, ["w"])["w"]
        >>> use.stacked, eqn_at(jaxpr, use.scan).primitive.name, eqn_at(jaxpr, use.site).primitive
        (0, 'scan', dot_general)
    """
    return _eqn_at(closed_jaxpr.jaxpr, tuple(site))


def _interpret_shard_map(eqn, invals, site, wanted, inline, captured) -> list[Any]:
    """Runs a shard_map whose body holds wanted sites, gathering their operands.

    The body is interpreted inside a new ``shard_map`` with the same mesh and specs
    that also returns each wanted operand, concatenated over the manual axes it
    varies along on its row dim (see :attr:`WeightUse.gathered`); one copy of a
    replicated operand comes back.
    """
    params = eqn.params
    body = _shard_map_body(eqn)
    manual = _manual_of(eqn, None)
    keys = [(s, o) for s, ops in wanted.items() if s[: len(site)] == site for o in ops if s != site]
    specs = []
    for s, operand in keys:
        inner = _eqn_at(body, s[len(site) :])
        if inner.primitive.name not in (DOT, CONV):
            raise ValueError(f"site {s} is not a dot/conv equation of this jaxpr")
        if operand == RESULT:
            raise ValueError(f"site {s}: outputs inside a shard_map are not captured")
        dim, axes, _ = _gather(inner, 1 - operand, manual)
        if not axes:
            specs.append(jax.sharding.PartitionSpec())
        elif dim is None:
            raise ValueError(f"site {s}: its operand has no row dim to gather the shards on")
        else:
            specs.append(jax.sharding.PartitionSpec(*(None,) * dim, axes))
    n_out = len(eqn.outvars)

    def local(*args: Any) -> tuple[Any, ...]:
        found: dict[tuple[tuple[int, ...], int], jax.Array] = {}
        outs = _interpret(body, [], list(args), site, wanted, inline, found)
        return (*outs, *(found[k] for k in keys))

    results = jax.shard_map(
        local,
        mesh=params["mesh"],
        in_specs=tuple(params["in_specs"]),
        out_specs=(*params["out_specs"], *specs),
        axis_names=frozenset(manual.axes),
        check_vma=bool(params.get("check_vma", True)),
    )(*invals)
    captured.update(zip(keys, results[n_out:], strict=True))
    return list(results[:n_out])


def _conv_patches(use: WeightUse, activation: jax.Array) -> tuple[jax.Array, list[int]]:
    """im2col: ``(N, *out_spatial, C, *kernel_spatial)`` patches and their row dims."""
    conv = use.conv
    assert conv is not None
    dn = conv.dimension_numbers
    lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
    filter_shape = tuple(use.operand_shape[d] for d in rhs_spec[2:])
    patches = lax.conv_general_dilated_patches(
        activation,
        filter_shape,
        conv.window_strides,
        conv.padding,
        lhs_dilation=conv.lhs_dilation,
        rhs_dilation=conv.rhs_dilation,
        dimension_numbers=dn,
        precision=lax.Precision.HIGHEST,
    )
    # (batch, *out_spatial, features), features ordered (in_channel, *kernel_spatial).
    patches = patches.transpose(out_spec[0], *out_spec[2:], out_spec[1])
    channels = activation.shape[lhs_spec[1]]
    patches = patches.reshape(*patches.shape[:-1], channels, *filter_shape)
    row_dims = [lhs_spec[0], *lhs_spec[2:]]
    return patches, row_dims


def input_features(use: WeightUse, activation: jax.Array) -> tuple[jax.Array, list[int]]:
    """The activation of a use as rows of the weight's input features.

    The last axis holds the ``m`` features ordered like the weight's contracted axes
    flattened row-major in ascending original order: for contracted axes ``0..k-1``
    exactly the rows of ``weight.reshape(m, n)``, so ``features @ weight.reshape(m, n)``
    is the op's output (for a conv: im2col patches with its padding, strides and
    dilations). The leading axes are the rows (every token/pixel position is a row).

    Args:
        use: a mappable use (dot, or conv with the weight as kernel and
            ``feature_group_count == batch_group_count == 1``).
        activation: the other operand, as returned by :func:`capture`.

    Returns:
        ``(features, row_dims)``: ``features`` of shape ``(*rows, m)``; ``row_dims[i]``
        is the activation dim that row axis ``i`` comes from (for a conv, the input's
        batch and spatial dims).

    Raises:
        ValueError: if the use cannot be expressed as rows of features.

    Example:
        >>> import jax.numpy as jnp
        >>> w = jnp.ones((2, 3, 4))  # contracted (0, 1): x is (batch, 3, 2)
        >>> use, = trace_uses(lambda w, x: jnp.einsum("bji,ijo->bo", x, w), w,
        ...                   jnp.ones((5, 3, 2)))[""]
        >>> x = jnp.arange(6.0).reshape(1, 3, 2)
        >>> feats, rows = input_features(use, x)
        >>> feats.tolist(), rows
        ([[0.0, 2.0, 4.0, 1.0, 3.0, 5.0]], [0])
    """
    if use.layout is None or use.contracting_axes is None:
        raise ValueError(f"{use.path}: the use's axes are not mappable ({use.note})")
    if use.batch_axes:
        raise ValueError(f"{use.path}: the weight has dot_general batch axes {use.batch_axes}")
    if use.primitive == CONV:
        conv = use.conv
        assert conv is not None
        if use.operand != 1:
            raise ValueError(f"{use.path}: the weight is a conv input, not its kernel")
        if conv.feature_group_count != 1 or conv.batch_group_count != 1:
            raise ValueError(
                f"{use.path}: grouped convolutions (feature_group_count="
                f"{conv.feature_group_count}) have no single input-feature matrix"
            )
        patches, row_dims = _conv_patches(use, activation)
        n_rows = len(row_dims)
        values = patches
    else:
        a_contract = list(use.activation_contracting_dims)
        row_dims = [d for d in range(activation.ndim) if d not in a_contract]
        n_rows = len(row_dims)
        values = activation.transpose(*row_dims, *a_contract)
    rows_shape = values.shape[:n_rows]
    # Split each contracted dim into the original axes it is made of ...
    atoms = [atom for d in use.operand_contracting_dims for atom in use.layout[d]]
    values = values.reshape(*rows_shape, *(size for _, size in atoms))
    # ... and order them by original axis.
    # Contracted atoms are never broadcast (such a use has no layout), so each has an axis.
    order = sorted(range(len(atoms)), key=lambda j: cast(int, atoms[j][0]))
    values = values.transpose(*range(n_rows), *(n_rows + j for j in order))
    m = math.prod(size for _, size in atoms)
    return values.reshape(*rows_shape, m), row_dims


def evaluate(
    closed_jaxpr: Any,
    args: Sequence[Any],
    *,
    special: Callable[[Any], bool],
    rule: Callable[[Any, list[Any]], list[Any]],
) -> list[Any]:
    """Evaluates a jaxpr, handing equations that touch ``special`` values to ``rule``.

    Values for which ``special(value)`` is true (stand-ins for compressed weights, say)
    never reach a primitive: a call-like equation (``jit``, ``remat``, custom
    derivatives) that receives one is inlined, a ``shard_map`` that receives one
    replicated (its ``in_specs`` entry names no mesh axis) is evaluated body and all
    inside a new ``shard_map`` with the same mesh and specs (special values must then
    be pytrees of arrays; they cross as their leaves), and any other equation that
    receives one is evaluated by ``rule(eqn, input_values)``, which returns the list
    of its outputs (special or not). Every other equation is bound as traced. Call it inside
    :func:`jax.jit` so the interpretation happens once, at trace time.

    Args:
        closed_jaxpr: the program (from :func:`trace_jaxpr` or :func:`jax.make_jaxpr`).
        args: its inputs, special values included.
        special: marks the values ``rule`` must handle.
        rule: evaluates one equation with special inputs.

    Returns:
        The program's outputs.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> jaxpr = jax.make_jaxpr(lambda w, x: jnp.tanh(x @ w))(jnp.ones((2, 2)), jnp.ones(2))
        >>> tagged = ("scaled identity", 3.0)
        >>> def rule(eqn, vals):  # x @ w with w = 3 * identity
        ...     return [vals[0] * vals[1][1]]
        >>> out, = evaluate(jaxpr, [tagged, jnp.ones(2)], special=lambda v: isinstance(v, tuple),
        ...                 rule=rule)
        >>> [round(float(v), 3) for v in out]
        [0.995, 0.995]
    """
    return _evaluate(closed_jaxpr.jaxpr, list(closed_jaxpr.consts), list(args), special, rule)


def bind_equation(eqn: Any, invals: list[Any]) -> list[Any]:
    """Applies one jaxpr equation's primitive to ``invals``: the list of its outputs.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> eqn = jax.make_jaxpr(jnp.sin)(1.0).jaxpr.eqns[0]
        >>> [round(float(v), 3) for v in bind_equation(eqn, [0.5])]
        [0.479]
    """
    bind_params = eqn.primitive.get_bind_params(eqn.params)
    ctx = getattr(getattr(eqn, "ctx", None), "manager", None)
    if ctx is None:
        out = eqn.primitive.bind(*invals, **bind_params)
    else:
        with ctx:
            out = eqn.primitive.bind(*invals, **bind_params)
    return list(out) if eqn.primitive.multiple_results else [out]


def _evaluate(jaxpr, consts, args, special, rule) -> list[Any]:
    env, read = _environment(jaxpr, consts, args)

    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        if not any(special(v) for v in invals):
            outs = bind_equation(eqn, invals)
        else:
            sub = sub_jaxpr(eqn)
            if sub is not None:
                outs = _evaluate(sub[0], sub[1], invals, special, rule)
            elif eqn.primitive.name == SHARD_MAP:
                outs = _evaluate_shard_map(eqn, invals, special, rule)
            else:
                outs = rule(eqn, invals)
        for var, val in zip(eqn.outvars, outs, strict=True):
            if not isinstance(var, jex.DropVar):
                env[var] = val
    return [read(v) for v in jaxpr.outvars]


class _Escapes(Exception):
    """A special value would leave a shard_map body: it cannot cross out_specs."""


def _evaluate_shard_map(eqn, invals, special, rule) -> list[Any]:
    """Evaluates a shard_map's body inside a new one, special values passed replicated.

    Each special value must be a pytree of arrays (it crosses the boundary as its
    leaves, each with ``PartitionSpec()``); one the ``in_specs`` split across devices,
    or one the body would return, sends the whole equation to ``rule``.
    """
    body = _shard_map_body(eqn)
    specs = tuple(eqn.params["in_specs"])
    split = any(
        special(v) and any(e is not None for e in tuple(spec))
        for v, spec in zip(invals, specs, strict=True)
    )
    if body is None or split:
        return rule(eqn, invals)
    flat: list[Any] = []
    flat_specs: list[Any] = []
    rebuild: list[tuple[int, int | None, Any]] = []
    for value, spec in zip(invals, specs, strict=True):
        if special(value):
            leaves, treedef = jax.tree.flatten(value)
            rebuild.append((len(flat), len(leaves), treedef))
            flat += leaves
            flat_specs += [jax.sharding.PartitionSpec()] * len(leaves)
        else:
            rebuild.append((len(flat), None, None))
            flat.append(value)
            flat_specs.append(spec)

    def local(*xs: Any) -> tuple[Any, ...]:
        vals = [
            xs[i] if n is None else jax.tree.unflatten(tree, xs[i : i + n])
            for i, n, tree in rebuild
        ]
        outs = _evaluate(body, [], vals, special, rule)
        if any(special(o) for o in outs):
            raise _Escapes
        return tuple(outs)

    manual = _manual_of(eqn, None)
    try:
        outs = jax.shard_map(
            local,
            mesh=eqn.params["mesh"],
            in_specs=tuple(flat_specs),
            out_specs=tuple(eqn.params["out_specs"]),
            axis_names=frozenset(manual.axes),
            check_vma=manual.checked,
        )(*flat)
    except _Escapes:
        return rule(eqn, invals)
    return list(outs)
