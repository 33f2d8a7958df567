"""Intermediate features of a model, found by tracing it: the teacher signal of distillation.

:func:`traced_features` runs ``apply_fn(params, x)`` and also returns, for each chosen
weight, the output of the ``dot_general`` or convolution that consumes it: the layer's
pre-activation (``x @ kernel`` before the bias add). The weights are found in the
jaxpr as :func:`jaxcompress.calibrate` finds them, so no layer names are needed, and
the same code works for linen, nnx (an ``nnx.State``), equinox and plain functions.
:func:`feature_loss` compares a student's features with a teacher's.
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.arrays import is_compressed
from jaxcompress.arrays.tree import on_arrays, split_arrays
from jaxcompress.core.checks import is_traced
from jaxcompress.core.paths import path_to_str
from jaxcompress.jaxpr import graph
from jaxcompress.transforms.filters import (
    Filter,
    compile_filter,
    describe,
    kernels,
    nothing_selected_message,
)

__all__ = ["feature_loss", "traced_features"]


@dataclasses.dataclass(frozen=True)
class _Program:
    """What :func:`traced_features` runs for one input signature."""

    names: tuple[str, ...]  # feature names, in program order of their first use
    run: Callable[..., Any]  # jitted (flat_arrays, flat_x) -> (output, features)


# apply_fn (a bound method's instance) -> {(function, where, signature): program}. Weak,
# so a model that is dropped takes its programs with it.
_CACHE: weakref.WeakKeyDictionary[Any, dict[Any, _Program]] = weakref.WeakKeyDictionary()


def _signature(arrays: Any, x: Any, rest: Any) -> tuple[Any, ...]:
    leaves, tree = jax.tree_util.tree_flatten((arrays, x))
    # The non-array half is bound into the program, so it is part of the key by identity
    # (the cached program keeps it alive, so an id cannot be reused meanwhile).
    others = tuple(id(leaf) for leaf in jax.tree_util.tree_leaves(rest))
    avals = tuple((tuple(np.shape(v)), str(jnp.result_type(v))) for v in leaves)
    return (tree, avals, others)


def _cache_slot(apply_fn: Any, where: Filter, signature: Any) -> tuple[dict, Any] | None:
    """``(programs of this function, key)``, or ``None`` where it cannot be cached."""
    owner, function = apply_fn, None
    if inspect.ismethod(apply_fn):  # a new bound method each access: key on its parts
        owner, function = apply_fn.__self__, apply_fn.__func__
    key = (function, where, signature)
    try:
        hash(key)
        programs = _CACHE.setdefault(owner, {})
    except TypeError:  # unhashable or not weakly referenceable: trace every call
        return None
    return programs, key


def _feature_names(uses: list[graph.WeightUse]) -> list[tuple[str, graph.WeightUse]]:
    """``path`` for the first use, ``path@1``, ``path@2``, ... for the later ones."""
    return [(use.path if i == 0 else f"{use.path}@{i}", use) for i, use in enumerate(uses)]


def _build(
    apply_fn: Callable[..., Any], arrays: Any, x: Any, where: Filter, rest: Any
) -> tuple[_Program, bool]:
    """Traces ``apply_fn`` once and plans the features; ``(program, cacheable)``."""
    flat, _ = jax.tree_util.tree_flatten_with_path(arrays)
    select = compile_filter(where)
    chosen = [path_to_str(p) for p, leaf in flat if select(path_to_str(p), leaf)]
    if not chosen:
        paths = [path_to_str(p) for p, _ in flat]
        raise ValueError(nothing_selected_message("traced_features", where, paths))
    closed, paths, out_tree = graph.trace_with_output(apply_fn, arrays, x)
    uses = graph.uses_in_jaxpr(closed, paths)
    hidden = graph.opaque_uses(closed, paths)
    features: list[tuple[str, graph.WeightUse]] = []
    skipped: dict[str, str] = {}
    for path in chosen:
        outside = [u for u in uses[path] if u.gathered is None]
        reasons = []
        if hidden[path]:
            reasons.append(f"it enters {', '.join(hidden[path])}, whose body is not read")
        if len(outside) < len(uses[path]):
            reasons.append("it is used inside a shard_map, whose outputs are not captured")
        if not uses[path] and not reasons and where is not kernels:
            # The default filter asks only for kernels that feed a dot/conv.
            reasons.append("no dot_general or convolution consumes it")
        if reasons:
            skipped[path] = "; ".join(reasons)
        features += _feature_names(outside)
    if not features:
        detail = "; ".join(f"{p}: {r}" for p, r in skipped.items()) or "none feeds one"
        raise ValueError(
            f"traced_features: where={describe(where)} selects {len(chosen)} leaves but no "
            f"dot_general or convolution output of them can be captured ({detail})"
        )
    if skipped:
        listed = "; ".join(f"{p} ({r})" for p, r in skipped.items())
        warnings.warn(
            f"traced_features: no feature (or not every use) for {len(skipped)} selected "
            f"weight(s): {listed}",
            stacklevel=3,
        )
    names = tuple(name for name, _ in features)
    sites = [(use.site, graph.RESULT) for _, use in features]

    def run(flat_arrays: list[Any], flat_x: list[Any]) -> tuple[Any, dict[str, jax.Array]]:
        outs, got = graph.run_and_capture(closed, sites, *flat_arrays, *flat_x)
        found = {name: got[site] for name, site in zip(names, sites, strict=True)}
        return jax.tree_util.tree_unflatten(out_tree, outs), found

    # A jaxpr holding a tracer of an enclosing transformation must not outlive it.
    cacheable = not any(is_traced(c) for c in closed.consts)
    return _Program(names, jax.jit(run)), cacheable


def traced_features(
    apply_fn: Callable[..., Any],
    params: Any,
    x: Any,
    *,
    where: Filter = kernels,
) -> tuple[Any, dict[str, jax.Array]]:
    """Runs ``apply_fn(params, x)`` and returns its output and each chosen weight's feature.

    A weight's feature is the output of the ``dot_general`` or convolution that
    consumes it, as found in the traced jaxpr (:mod:`jaxcompress.jaxpr.graph`): the
    layer's pre-activation, ``x @ kernel`` or ``conv(x, kernel)`` before the bias add,
    in the op's dtype and layout (an equinox ``Linear`` under :func:`jax.vmap` is one
    ``weight @ x`` over the batch, so its feature is ``(out, batch)``). It is the
    value the model computes, not a recomputation, and the whole call is
    differentiable in ``params`` and ``x`` and can be jitted; the program is
    replayed equation by equation inside one :func:`jax.jit` (a ``jit``,
    ``remat`` or custom-derivative call holding a captured op is inlined, so there the
    body is differentiated rather than its custom rule).

    ``apply_fn`` is traced once per input signature (tree structure, shapes and
    dtypes of ``params`` and ``x``; the same ``apply_fn`` object, ``where`` and
    non-array leaves): later calls reuse the program, so ``where`` is not called
    again. Under an enclosing :func:`jax.jit` the trace happens once per compile.

    A weight used by several ops (tied, or a layer applied twice) gives one feature
    per use, in program order: ``path`` for the first, then ``path@1``, ``path@2``, ...
    Uses inside code the jaxpr walk does not read (a ``scan``/``while``/``cond`` body, a
    Pallas kernel, an ``ffi_call``) and uses inside a ``shard_map`` are left out, with
    one warning per trace naming the weights and why. Under the default filter a
    kernel no dot/conv consumes (an embedding table read by ``take``) is left out
    silently; with an explicit ``where`` it is named in that warning.

    Args:
        apply_fn: ``apply_fn(params, x) -> output``. For nnx, ``graphdef, state =
            nnx.split(model)`` and ``apply_fn = lambda s, x: nnx.merge(graphdef, s)(x)``
            with ``params=state``; for equinox, ``params`` may be the module.
        params: the parameter pytree (linen params, ``nnx.State``, a dict, an equinox
            module). Compressed leaves are refused: materialize them first.
        x: the input, an array or a pytree of arrays.
        where: which weights give features (a :data:`jaxcompress.filters.Filter` on
            ``a/b/kernel`` paths); by default every floating leaf with two or more
            dims that a dot/conv consumes (:func:`jaxcompress.filters.kernels`).

    Returns:
        ``(output, features)``: ``apply_fn(params, x)`` and ``{name: pre-activation}``.

    Raises:
        ValueError: if ``where`` selects no leaf (naming the closest paths), or no
            selected leaf feeds a dot/conv whose output can be captured.
        TypeError: if ``params`` holds a compressed leaf (its path is named).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> params = {"w1": jnp.eye(2), "b1": jnp.ones((1, 2)), "w2": 2 * jnp.eye(2)}
        >>> def apply(p, x):
        ...     return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]
        >>> out, feats = traced_features(apply, params, jnp.zeros((1, 2)))
        >>> sorted(feats), feats["w1"].tolist()  # before the bias add
        (['w1', 'w2'], [[0.0, 0.0]])
        >>> [round(v, 3) for v in feats["w2"][0].tolist()]  # tanh(1) @ w2, the output
        [1.523, 1.523]
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_compressed)
    for key_path, leaf in flat:
        if is_compressed(leaf):
            raise TypeError(
                f"traced_features: params leaf {path_to_str(key_path)!r} is compressed "
                f"({type(leaf).__name__}); pass jaxcompress.materialize(params)"
            )
    arrays, rest = split_arrays(params)
    apply_arrays = on_arrays(apply_fn, rest)
    slot = _cache_slot(apply_fn, where, _signature(arrays, x, rest))
    program = None if slot is None else slot[0].get(slot[1])
    if program is None:
        program, cacheable = _build(apply_arrays, arrays, x, where, rest)
        if slot is not None and cacheable:
            slot[0][slot[1]] = program
    flat_arrays = jax.tree_util.tree_leaves(arrays)
    return program.run(flat_arrays, jax.tree_util.tree_leaves(x))


def feature_loss(
    student: Mapping[str, jax.Array], teacher: Mapping[str, jax.Array], *, eps: float = 1e-6
) -> jax.Array:
    """The mean over features of the relative squared error of a student's to a teacher's.

    For each name, ``mean((s - t)**2) / (mean(t**2) + eps)``, then the mean over
    names, in float32. Dividing by the teacher feature's own power makes every layer
    count alike whatever its width or scale (a raw MSE would be ruled by the
    largest-valued layer, and would change with a layer's output scale), so a
    value of ``0.01`` means 1 % of that feature's energy is off; ``1.0`` is what a
    student outputting zeros scores. ``eps`` (per element) keeps an all-zero teacher
    feature finite. The teacher is a target: no gradient flows into it.

    Args:
        student: ``{name: feature}``, as :func:`traced_features` returns.
        teacher: the same names, each with the student's shape (any float dtype).
        eps: added to each teacher feature's mean square; must be positive.

    Returns:
        A float32 scalar.

    Raises:
        ValueError: for empty or differently named feature dicts, a shape mismatch
            (naming the feature), or ``eps <= 0``.
        TypeError: if either argument is not a mapping.

    Example:
        >>> import jax.numpy as jnp
        >>> t = {"a": jnp.array([1.0, -1.0]), "b": jnp.array([10.0, 10.0])}
        >>> s = {"a": jnp.array([1.0, -1.0]), "b": jnp.array([9.0, 11.0])}
        >>> round(float(feature_loss(s, t)), 4)  # (0 + 1/100) / 2
        0.005
    """
    for name, value in (("student", student), ("teacher", teacher)):
        if not isinstance(value, Mapping):
            raise TypeError(
                f"feature_loss: {name} must be a mapping of names to features, "
                f"got {type(value).__name__}"
            )
    if not eps > 0:
        raise ValueError(f"feature_loss: eps must be positive, got {eps}")
    if not teacher:
        raise ValueError("feature_loss: teacher has no features")
    if set(student) != set(teacher):
        missing = sorted(set(teacher) - set(student))
        extra = sorted(set(student) - set(teacher))
        raise ValueError(
            "feature_loss: student and teacher features differ: "
            f"missing from student {missing}, not in teacher {extra}"
        )
    terms = []
    for name, t in teacher.items():
        s = student[name]
        if tuple(np.shape(s)) != tuple(np.shape(t)):
            raise ValueError(
                f"feature_loss: feature {name!r} has shape {tuple(np.shape(s))} in the "
                f"student and {tuple(np.shape(t))} in the teacher"
            )
        t32 = jax.lax.stop_gradient(jnp.asarray(t, jnp.float32))
        s32 = jnp.asarray(s, jnp.float32)
        terms.append(jnp.mean(jnp.square(s32 - t32)) / (jnp.mean(jnp.square(t32)) + eps))
    return jnp.mean(jnp.stack(terms))
