"""Gradual magnitude pruning as an optax wrapper (Zhu & Gupta, 2017).

:func:`pruned` wraps any optax optimizer. It keeps one boolean keep-mask per selected
leaf in its state, recomputes the masks from the current parameters every ``every``
steps with the same mask function as :func:`jaxcompress.prune`
(:func:`jaxcompress.methods.prune.magnitude_keep_mask`), and returns updates that leave the
pruned weights at exactly zero after ``optax.apply_updates``. :func:`cubic_sparsity`
is the schedule of the paper; :func:`finalize` turns the trained parameters into
:class:`~jaxcompress.Sparse` leaves.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable
from fractions import Fraction
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxcompress.arrays import is_compressed
from jaxcompress.arrays.checks import check_selected_leaf
from jaxcompress.core.checks import is_traced
from jaxcompress.core.mesh import named_sharding_of, place_like
from jaxcompress.methods.prune import global_counts, magnitude_keep_mask, sparse_from_mask
from jaxcompress.transforms.base import flatten_leaves, select_leaves
from jaxcompress.transforms.filters import Filter, kernels

__all__ = ["PrunedState", "cubic_sparsity", "finalize", "pruned"]

_SCOPES = ("layer", "global")
Schedule = Callable[[Any], Any]


class PrunedState(NamedTuple):
    """The optimizer state of :func:`pruned`.

    Attributes:
        inner_state: the wrapped optimizer's state.
        masks: a dict from each selected leaf's path (``"Dense_0/kernel"``) to its
            boolean keep-mask, shaped like the leaf; ``False`` marks a pruned weight.
            Leaves that ``where`` does not select have no mask.
        step: how many updates were made (int32); the masks are recomputed when
            ``step % every == 0``, before the update of that step.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> import jaxcompress as jc
        >>> state = jc.training.pruned(optax.sgd(0.1), 0.5).init({"w": jnp.ones((2, 2))})
        >>> sorted(state.masks), int(state.step)
        (['w'], 0)
    """

    inner_state: Any
    masks: dict[str, jax.Array]
    step: jax.Array


def _check_fraction(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number in [0, 1), got {value!r}")
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return float(value)


def cubic_sparsity(
    final: float, *, begin: int, end: int, initial: float = 0.0
) -> Callable[[Any], jax.Array]:
    """The cubic sparsity schedule of Zhu & Gupta (2017).

    ``s_t = final + (initial - final) * (1 - (t - begin) / (end - begin)) ** 3`` for
    ``begin <= t <= end``, ``initial`` before ``begin`` and ``final`` after ``end``.
    Sparsity grows fast at first, while there are many redundant weights, then slowly.

    Args:
        final: the sparsity reached at step ``end``, in ``[initial, 1)``.
        begin: the step pruning starts at (``>= 0``).
        end: the step the final sparsity is reached at (``> begin``).
        initial: the sparsity at step ``begin``, in ``[0, final]``.

    Returns:
        A schedule: a function from the step (an int or int array, traced or not) to
        the sparsity as a float32 scalar, like an optax schedule.

    Raises:
        ValueError: ``initial``/``final`` out of order or outside ``[0, 1)``, a
            negative ``begin`` or ``end <= begin``.
        TypeError: non-numeric arguments.

    Example:
        >>> import jaxcompress as jc
        >>> schedule = jc.training.cubic_sparsity(0.8, begin=10, end=20)
        >>> [round(float(schedule(t)), 4) for t in (0, 10, 15, 20, 100)]
        [0.0, 0.0, 0.7, 0.8, 0.8]
    """
    final = _check_fraction("cubic_sparsity: final", final)
    initial = _check_fraction("cubic_sparsity: initial", initial)
    if initial > final:
        raise ValueError(f"cubic_sparsity: initial ({initial}) must not exceed final ({final})")
    for name, value in (("begin", begin), ("end", end)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"cubic_sparsity: {name} must be an int step, got {value!r}")
    if begin < 0:
        raise ValueError(f"cubic_sparsity: begin must be >= 0, got {begin}")
    if end <= begin:
        raise ValueError(f"cubic_sparsity: end ({end}) must be greater than begin ({begin})")

    def schedule(step: Any) -> jax.Array:
        t = jnp.asarray(step).astype(jnp.float32)
        progress = jnp.clip((t - jnp.float32(begin)) / jnp.float32(end - begin), 0.0, 1.0)
        value = jnp.float32(final) + jnp.float32(initial - final) * (1.0 - progress) ** 3
        # Exact endpoints: before ``begin`` the formula would round initial.
        return jnp.where(t <= jnp.float32(begin), jnp.float32(initial), value)

    return schedule


def _schedule_count(sparsity: jax.Array, size: int) -> jax.Array:
    """How many of ``size`` entries a (possibly traced) float32 sparsity prunes.

    ``floor(s * size)`` with ``s`` read as the short decimal its float32 value prints
    as, so a schedule at ``float32(0.9)`` prunes 17280 of 19200 entries and one at
    ``float32(0.29)`` 29 of 100, as ``jaxcompress.prune`` does. The float32 product
    falls just short of such integers (``float32(0.9) * 19200 = 17279.9995``), so it
    is raised by 2**-21 relative (8 float32 ulps, more than the product's rounding)
    before the floor. Testing ``float32(c / size) <= s`` instead fails on XLA's CPU
    division, which is not correctly rounded.
    """
    s = jnp.asarray(sparsity).astype(jnp.float32)
    scaled = s * jnp.float32(size) * jnp.float32(1.0 + 2.0**-21)
    # Under jit an out-of-range schedule cannot raise: keep at least one entry.
    return jnp.clip(jnp.floor(scaled).astype(jnp.int32), 0, size - 1)


def _check_schedule_value(value: Any, step: Any) -> None:
    """Raises for an out-of-range schedule value, wherever the value is concrete."""
    if is_traced(value) or is_traced(step):
        return
    s = float(jnp.asarray(value))
    if not 0.0 <= s < 1.0:  # also catches NaN
        raise ValueError(
            f"pruned: the sparsity schedule returned {s!r} at step {int(step)}; "
            "sparsity must be in [0, 1)"
        )


def pruned(
    inner: optax.GradientTransformation,
    sparsity: float | Schedule,
    *,
    where: Filter = kernels,
    scope: str = "layer",
    every: int = 100,
) -> optax.GradientTransformation:
    """Gradual magnitude pruning around an optax optimizer.

    Every ``every`` steps (step 0 included) the keep-masks are recomputed from the
    current parameters with :func:`jaxcompress.methods.prune.magnitude_keep_mask`, so the
    masks (and tie-breaking) match :func:`jaxcompress.prune` on the same parameters.
    Gradients of pruned weights are zeroed before ``inner`` sees them, and the returned
    updates are ``where(mask, inner_updates, -params)``: after
    ``optax.apply_updates(params, updates)`` pruned weights are exactly ``0.0`` with
    no extra call (``p + (-p)`` is exactly zero in floating point).

    Take the gradients with :func:`jaxcompress.training.grad` (or
    :func:`~jaxcompress.training.value_and_grad`): on a dense tree it equals
    ``jax.grad``, and it also accepts trees that hold integer or non-array leaves
    (a step counter, an equinox module's activation), which ``jax.grad`` refuses.

    Args:
        inner: the optimizer to wrap, for example ``optax.sgd(0.1)``.
        sparsity: the fraction of entries to prune, a float in ``[0, 1)`` or an
            optax-style schedule ``step -> sparsity`` such as :func:`cubic_sparsity`.
            A leaf of ``n`` entries gets ``floor(s_t * n)`` pruned at a mask update of
            step ``t``, counted like :func:`jaxcompress.prune` (see
            :func:`jaxcompress.prune.pruned_count`).
        where: which leaves to prune; by default :func:`jaxcompress.filters.kernels`.
        scope: ``"layer"`` prunes each selected leaf to the sparsity; ``"global"``
            uses one magnitude threshold across all selected leaves. Both work under
            ``jit``.
        every: the number of steps between mask updates (``>= 1``).

    Returns:
        An ``optax.GradientTransformation`` whose state is a :class:`PrunedState`.
        Its ``update`` needs ``params``: ``tx.update(grads, state, params)``.

    Raises:
        ValueError: a sparsity outside ``[0, 1)`` (a schedule is checked at every
            step where its value is concrete: at ``init`` for step 0 and at every
            un-jitted update; under ``jit`` the count is clipped so that at least one
            entry of each leaf stays), an unknown scope, ``every < 1``, or ``update``
            without ``params``.
        TypeError: ``inner`` not an optax transformation, or a bad selected leaf.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> import jaxcompress as jc
        >>> params = {"w": jnp.array([[0.1, -2.0], [3.0, 0.2]]), "b": jnp.ones(2)}
        >>> tx = jc.training.pruned(optax.sgd(0.1), 0.5)
        >>> state = tx.init(params)
        >>> grads = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
        >>> updates, state = tx.update(grads, state, params)
        >>> params = optax.apply_updates(params, updates)
        >>> params["w"].tolist()
        [[0.0, -2.0999999046325684], [2.9000000953674316, 0.0]]
        >>> jc.training.finalize(params, state)["w"].nnz
        2
    """
    if not isinstance(inner, optax.GradientTransformation):
        raise TypeError(f"pruned: inner must be an optax.GradientTransformation, got {inner!r}")
    if callable(sparsity):
        schedule = sparsity
        constant = None
    else:
        constant = Fraction(repr(_check_fraction("pruned: sparsity", sparsity)))
        schedule = None
    if scope not in _SCOPES:
        raise ValueError(f"pruned: scope must be one of {_SCOPES}, got {scope!r}")
    if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1:
        raise ValueError(f"pruned: every must be an int >= 1, got {every!r}")

    def counts(weights: list[jax.Array], step: jax.Array) -> list[int | jax.Array]:
        sizes = [math.prod(w.shape) for w in weights]
        if scope == "global":
            total = sum(sizes)
            if constant is not None:
                total_pruned = math.floor(constant * total)
            else:
                total_pruned = _schedule_count(schedule(step), total)
            return global_counts(weights, total_pruned)
        if constant is not None:
            # Static counts: exactly what jaxcompress.prune computes.
            return [math.floor(constant * n) for n in sizes]
        value = schedule(step)
        return [_schedule_count(value, n) for n in sizes]

    def init_fn(params: Any) -> PrunedState:
        selected, _, _ = select_leaves(params, where, name="pruned")
        weights = [check_selected_leaf("pruned", e.path, e.leaf) for e in selected]
        if schedule is not None:
            # Called like optax calls schedules: with an int32 array step.
            step0 = jnp.zeros((), jnp.int32)
            _check_schedule_value(schedule(step0), step0)
        # Placeholder masks (nothing pruned); step 0 recomputes them from the params.
        masks = {
            e.path: jnp.ones_like(w, dtype=jnp.bool_)
            for e, w in zip(selected, weights, strict=True)
        }
        return PrunedState(inner.init(params), masks, jnp.zeros((), jnp.int32))

    def update_fn(updates: Any, state: PrunedState, params: Any = None):
        if params is None:
            raise ValueError(
                "pruned: update needs the current params to compute the masks and keep "
                "pruned weights at zero; call tx.update(grads, state, params)"
            )
        if not isinstance(state, PrunedState):
            raise TypeError(f"pruned: expected a PrunedState, got {type(state).__name__}")
        selected, entries, treedef = select_leaves(params, where)
        paths = [e.path for e in selected]
        if sorted(paths) != sorted(state.masks):
            raise ValueError(
                f"pruned: params select leaves {paths}, but the state has masks for "
                f"{sorted(state.masks)}; was the state made by init on these params?"
            )
        step = state.step
        if schedule is not None:
            _check_schedule_value(schedule(step), step)
        weights = [e.leaf for e in selected]

        def fresh_masks(weights):
            return tuple(
                magnitude_keep_mask(w, c)
                for w, c in zip(weights, counts(weights, step), strict=True)
            )

        def old_masks(weights):
            return tuple(state.masks[p] for p in paths)

        masks = jax.lax.cond(step % every == 0, fresh_masks, old_masks, weights)
        grads = treedef.flatten_up_to(updates)
        for entry, mask in zip(selected, masks, strict=True):
            g = grads[entry.index]
            # Zeroed gradients keep the inner statistics (momentum, Adam moments)
            # from building up for weights that are pruned.
            grads[entry.index] = jnp.where(mask, g, jnp.zeros((), g.dtype))
        grads = jax.tree_util.tree_unflatten(treedef, grads)
        inner_updates, inner_state = inner.update(grads, state.inner_state, params)
        out = treedef.flatten_up_to(inner_updates)
        for entry, mask in zip(selected, masks, strict=True):
            u = out[entry.index]
            # p + (-p) == 0 exactly, so apply_updates lands pruned weights on zero.
            out[entry.index] = jnp.where(mask, u, -entry.leaf.astype(u.dtype))
        new_state = PrunedState(inner_state, dict(zip(paths, masks, strict=True)), step + 1)
        return jax.tree_util.tree_unflatten(treedef, out), new_state

    return optax.GradientTransformation(init_fn, update_fn)


def _find_pruned_states(opt_state: Any) -> list[PrunedState]:
    nodes = jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, PrunedState))
    return [node for node in nodes if isinstance(node, PrunedState)]


def _as_array(x: Any) -> jax.Array:
    # nnx.Optimizer keeps its state in Variables; unwrap them.
    if hasattr(x, "get_value"):
        x = x.get_value()
    return jnp.asarray(x)


def finalize(params: Any, opt_state: Any) -> Any:
    """The pruned parameters as a compressed pytree with :class:`~jaxcompress.Sparse` leaves.

    Each leaf with a mask in the :class:`PrunedState` becomes a ``Sparse`` leaf holding
    the parameter's values where the mask keeps them; other leaves are unchanged.
    Call it outside ``jit``: a ``Sparse`` leaf's size depends on its mask.

    Args:
        params: the trained parameters (after the last ``optax.apply_updates``).
        opt_state: the state of a :func:`pruned` optimizer, or any state that holds
            exactly one :class:`PrunedState` (inside ``optax.chain``, a flax
            ``TrainState.opt_state``, or an ``nnx.Optimizer``'s ``opt_state``).

    Returns:
        ``params`` with the pruned leaves replaced by ``Sparse`` leaves.

    Raises:
        TypeError: ``opt_state`` holds no :class:`PrunedState` (for example a plain
            ``optax.sgd`` state) or holds more than one.
        ValueError: the masks do not match the leaves of ``params``.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> import jaxcompress as jc
        >>> params = {"w": jnp.array([[1.0, 0.0], [0.0, 4.0]])}
        >>> tx = optax.chain(optax.clip(1.0), jc.training.pruned(optax.sgd(0.1), 0.5))
        >>> state = tx.init(params)
        >>> sparse = jc.training.finalize(params, state)["w"]
        >>> sparse.nnz, sparse.materialize().tolist()
        (4, [[1.0, 0.0], [0.0, 4.0]])
    """
    found = _find_pruned_states(opt_state)
    if not found:
        raise TypeError(
            f"finalize: opt_state ({type(opt_state).__name__}) holds no PrunedState; pass "
            "the state of an optimizer built with jaxcompress.training.pruned"
        )
    if len(found) > 1:
        raise TypeError(f"finalize: opt_state holds {len(found)} PrunedStates; pass just one")
    masks = {path: _as_array(mask) for path, mask in found[0].masks.items()}
    entries, treedef = flatten_leaves(params)
    leaves = [entry.leaf for entry in entries]
    missing = set(masks) - {entry.path for entry in entries}
    if missing:
        raise ValueError(f"finalize: the state has masks for leaves not in params: {missing}")
    for entry in entries:
        if entry.path not in masks:
            continue
        if is_traced(entry.leaf) or is_traced(masks[entry.path]):
            raise ValueError("finalize: call it outside jax.jit; Sparse sizes depend on masks")
        if is_compressed(entry.leaf):
            raise TypeError(f"finalize: leaf {entry.path!r} is already compressed")
        weight = jnp.asarray(entry.leaf)
        keep = masks[entry.path]
        if keep.shape != weight.shape:
            raise ValueError(
                f"finalize: mask of {entry.path!r} has shape {keep.shape}, the leaf {weight.shape}"
            )
        sparse = sparse_from_mask(weight, keep, int(keep.sum()))
        reference = named_sharding_of(weight)
        leaves[entry.index] = jax.tree.map(
            functools.partial(place_like, reference=reference), sparse
        )
    return jax.tree_util.tree_unflatten(treedef, leaves)
