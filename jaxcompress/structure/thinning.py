"""Running a traced program on thinned tensors: slicing, re-evaluation with new shapes.

When units are removed, every value whose axes contain a pruned atom shrinks. The
flat program of :mod:`jaxcompress.coupling` is re-evaluated equation by equation on
the smaller arrays; only the parameters that spell out shapes (``broadcast_in_dim``,
``reshape``, ``iota``, a ``slice``'s limits) are rewritten to the new sizes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np

from jaxcompress.jaxpr.graph import bind_equation
from jaxcompress.structure.coupling import CONV, DOT, Coupling

__all__ = ["cut", "flops", "new_shapes", "run", "zero_removed"]

# atom id -> kept unit indices (sorted)
Kept = Mapping[int, np.ndarray]


def _factors(coupling: Coupling, value: int) -> list[list[int]]:
    return [coupling.atoms.leaves(atom) for atom in coupling.layouts[value]]


def new_shapes(coupling: Coupling, kept: Kept) -> list[tuple[int, ...]]:
    """The shape of every value of the program once the ``kept`` units remain."""
    return [new_shapes_of(coupling, value, kept) for value in range(len(coupling.flat.shapes))]


def cut(coupling: Coupling, value: int, array: jax.Array, kept: Kept) -> jax.Array:
    """Keeps only the ``kept`` units of ``array``, the program's value ``value``."""
    factors = _factors(coupling, value)
    if not any(leaf in kept for axis in factors for leaf in axis):
        return array
    size = coupling.atoms.size
    expanded = [size[leaf] for axis in factors for leaf in axis]
    out = jnp.reshape(array, expanded)
    position = 0
    for axis in factors:
        for leaf in axis:
            if leaf in kept:
                out = jnp.take(out, jnp.asarray(kept[leaf]), axis=position)
            position += 1
    return jnp.reshape(out, new_shapes_of(coupling, value, kept))


def zero_removed(coupling: Coupling, value: int, array: jax.Array, kept: Kept) -> jax.Array:
    """``array`` at its full shape with the removed units' slices set to zero."""
    factors = _factors(coupling, value)
    size = coupling.atoms.size
    keep = np.ones([size[leaf] for axis in factors for leaf in axis], dtype=bool)
    position = 0
    for axis in factors:
        for leaf in axis:
            if leaf in kept:
                mask = np.zeros(size[leaf], dtype=bool)
                mask[np.asarray(kept[leaf])] = True
                shape = [1] * keep.ndim
                shape[position] = size[leaf]
                keep = keep & mask.reshape(shape)
            position += 1
    keep = keep.reshape(np.shape(array))
    return jnp.where(keep, array, jnp.zeros((), dtype=array.dtype))


def new_shapes_of(coupling: Coupling, value: int, kept: Kept) -> tuple[int, ...]:
    """The shape of the program's value ``value`` once the ``kept`` units remain."""
    size = coupling.atoms.size
    return tuple(
        math.prod(len(kept[leaf]) if leaf in kept else size[leaf] for leaf in factors)
        for factors in _factors(coupling, value)
    )


def _with_new_shapes(eqn: Any, outs: Sequence[int], shapes: Sequence[tuple[int, ...]]) -> dict:
    params = dict(eqn.params)
    name = eqn.primitive.name
    if not outs:
        return params
    out_shape = shapes[outs[0]]
    if name == "broadcast_in_dim" or "shape" in params:
        params["shape"] = out_shape
    elif name == "reshape":
        params["new_sizes"] = out_shape
    elif name == "slice":
        old_in = tuple(eqn.invars[0].aval.shape)
        limits = list(params["limit_indices"])
        for axis, (start, limit) in enumerate(zip(params["start_indices"], limits, strict=True)):
            if start == 0 and limit == old_in[axis]:
                limits[axis] = out_shape[axis]
        params["limit_indices"] = tuple(limits)
    return params


def run(
    coupling: Coupling,
    inputs: Sequence[Any],
    kept: Kept,
    *,
    capture: Sequence[int] = (),
    perturb: Mapping[int, jax.Array] | None = None,
) -> tuple[list[Any], dict[int, Any]]:
    """Evaluates the program on (thinned) ``inputs``: ``(outputs, captured values)``.

    Args:
        coupling: the analysed program.
        inputs: its flat inputs, parameters already cut to the ``kept`` units.
        kept: the kept units of each pruned atom.
        capture: value ids whose arrays to return.
        perturb: value ids to which an array is added after they are computed (zeros,
            so that a gradient with respect to them is the gradient at that value).
    """
    flat = coupling.flat
    shapes = new_shapes(coupling, kept)
    env: dict[int, Any] = {}
    for value, array in flat.consts.items():
        env[value] = cut(coupling, value, array, kept)
    env.update(zip(flat.inputs, inputs, strict=True))
    perturb = perturb or {}

    def read(ref: Any) -> Any:
        return ref.val if isinstance(ref, jex.Literal) else env[ref]

    for eqn, ins, outs in flat.eqns:
        values = bind_equation(
            eqn.replace(params=_with_new_shapes(eqn, outs, shapes)), [read(r) for r in ins]
        )
        for out, val in zip(outs, values, strict=True):
            env[out] = val + perturb[out] if out in perturb else val
    outputs = [read(ref) for ref in flat.outputs]
    return outputs, {value: env[value] for value in capture}


def flops(coupling: Coupling, kept: Kept) -> int:
    """Multiply-adds times two of every ``dot_general`` and convolution, once thinned."""
    shapes = new_shapes(coupling, kept)
    total = 0
    for eqn, ins, outs in coupling.flat.eqns:
        name = eqn.primitive.name
        if name not in (DOT, CONV) or any(isinstance(r, jex.Literal) for r in ins[:2]):
            continue
        out = math.prod(shapes[outs[0]])
        if name == DOT:
            (lc, _), _ = eqn.params["dimension_numbers"]
            total += 2 * out * math.prod(shapes[ins[0]][i] for i in lc)
        else:
            rhs_spec = eqn.params["dimension_numbers"][1]
            rhs = shapes[ins[1]]
            per_output = math.prod(rhs) // rhs[rhs_spec[0]]
            total += 2 * out * per_output
    return total
