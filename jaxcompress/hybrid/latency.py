"""Latencies for :func:`jaxcompress.auto`: each weight's use timed alone, dense and served.

``auto`` predicts the latency of a mixed tree from parts. Each selected weight's
uses (the ``dot_general``/convolution that consume it, found by tracing the model on
the first batch, :func:`jaxcompress.graph.trace_uses`) are rebuilt as a small
program of their own (:func:`use_program`): the same contracted, batch and free axes
of the weight as stored, on an activation of the real shape (its row count from the
batch). That program is timed under :func:`jax.jit` with the dense weight and, for
each candidate, under ``jax.jit(jaxcompress.accelerate(program))`` with the prepared
compressed weight, so it takes the route ``accelerate`` takes for it in the model.
The whole dense model is timed under :func:`jax.jit`. Then::

    predicted = dense model - sum of dense use times + sum of chosen use times

Every timing is a :data:`Timer` call over labelled thunks; the default,
:func:`median_times`, runs them all in interleaved rounds and takes medians, so
load that comes and goes hits every thunk alike. Tests pass a fake timer.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxcompress.arrays import is_compressed
from jaxcompress.arrays.tree import on_arrays, split_arrays
from jaxcompress.core.progress import over_leaves
from jaxcompress.jaxpr.graph import CONV, DOT, WeightUse, opaque_uses, trace_jaxpr, uses_in_jaxpr
from jaxcompress.runtime.accelerate import accelerate

__all__ = [
    "CHOSEN",
    "MODEL",
    "Key",
    "Timer",
    "UseBench",
    "chosen_model",
    "median_times",
    "to_units",
    "use_program",
]

MODEL = "<model>"
"""The path part of the keys that time the whole model (``(MODEL, "dense")``)."""

CHOSEN = "chosen"
"""The format part of the key that times the chosen mixed tree, ``(MODEL, CHOSEN)``."""

Key = tuple[str, str]
"""``(weight path or MODEL, format name)``: what a thunk handed to a :data:`Timer` runs."""

Timer = Callable[[Mapping[Key, Callable[[], Any]]], Mapping[Key, float]]
"""Seconds per call of each labelled thunk (each call returns jax arrays to wait on)."""

UNITS_PER_SECOND = 10**9
"""Latencies enter the knapsack as integer nanoseconds (the frontier is exact at any unit)."""


def to_units(seconds: float) -> int:
    """Seconds as the knapsack's integer unit (nanoseconds), rounded to nearest.

    Example:
        >>> to_units(1.5e-6)
        1500
    """
    return int(round(seconds * UNITS_PER_SECOND))


def median_times(
    calls: Mapping[Key, Callable[[], Any]],
    *,
    rounds: int = 7,
    min_time: float = 2e-3,
    progress: bool = False,
) -> dict[Key, float]:
    """Median seconds per call of each thunk, over rounds that interleave all of them.

    Each thunk is called once first (compiling it), then timed for about
    ``min_time`` per round (as many calls as that takes, each waited for with
    :func:`jax.block_until_ready`); every round visits every thunk, starting one
    further along each time, and the result is the median of its per-call means.

    Args:
        calls: labelled thunks.
        rounds: how many rounds (at least 1).
        min_time: the least seconds spent on one thunk in one round.
        progress: a bar on stderr over the first (compiling) calls.

    Returns:
        ``{key: seconds per call}``.

    Example:
        >>> import jax.numpy as jnp
        >>> x = jnp.ones((8, 8))
        >>> times = median_times({("w", "dense"): lambda: x @ x}, rounds=3, min_time=1e-4)
        >>> times[("w", "dense")] > 0
        True
    """
    if rounds < 1:
        raise ValueError(f"median_times: rounds must be at least 1, got {rounds}")
    keys = list(calls)
    numbers: dict[Key, int] = {}
    for key in over_leaves(
        keys, sizes=[1] * len(keys), description="auto: timing", enabled=progress
    ):
        jax.block_until_ready(calls[key]())  # compiles
        start = time.perf_counter()
        jax.block_until_ready(calls[key]())
        once = max(time.perf_counter() - start, 1e-7)
        numbers[key] = max(1, min(10_000, math.ceil(min_time / once)))
    samples: dict[Key, list[float]] = {key: [] for key in keys}
    for round_ in range(rounds):
        shift = round_ % max(len(keys), 1)
        for key in keys[shift:] + keys[:shift]:
            call, number = calls[key], numbers[key]
            start = time.perf_counter()
            for _ in range(number):
                jax.block_until_ready(call())
            samples[key].append((time.perf_counter() - start) / number)
    return {key: statistics.median(samples[key]) for key in keys}


def _permutation(use: WeightUse) -> tuple[int, ...] | None:
    """The weight's axes in the op's order, when the op sees a transposed weight only."""
    if use.layout is None or len(use.layout) != len(use.weight_shape):
        return None
    order = []
    for atoms in use.layout:
        if len(atoms) != 1 or atoms[0][0] is None:
            return None
        order.append(atoms[0][0])
    return tuple(order) if sorted(order) == list(range(len(use.weight_shape))) else None


def _describe(use: WeightUse) -> tuple[Any, ...] | str:
    """What :func:`use_program` builds, as a hashable tuple (equal uses share it), or why not."""
    dtype = np.dtype(use.activation_dtype)
    if use.primitive == DOT:
        if use.contracting_axes is None or use.batch_axes is None:
            return f"its {DOT} sees it through a reshape ({use.note or 'axes not mapped'})"
        contract, batch = use.contracting_axes, use.batch_axes
        batch_sizes = [use.weight_shape[a] for a in batch]
        sizes = [use.weight_shape[a] for a in contract]
        rows = max(1, math.prod(use.activation_shape) // max(1, math.prod(batch_sizes + sizes)))
        n = len(batch)
        dims = ((tuple(range(n + 1, n + 1 + len(contract))), contract), (tuple(range(n)), batch))
        return (DOT, dims, (*batch_sizes, rows, *sizes), dtype)
    order = _permutation(use)
    if use.primitive != CONV or use.conv is None or use.operand != 1 or order is None:
        return f"its {use.primitive} sees it reshaped or as the input"
    return (CONV, (order, use.conv), tuple(use.activation_shape), dtype)


def _build(description: tuple[Any, ...]) -> Callable[[Any, jax.Array], jax.Array]:
    primitive, how = description[0], description[1]
    if primitive == DOT:

        def dot(params: Any, x: jax.Array) -> jax.Array:
            return lax.dot_general(x, params["w"].astype(x.dtype), how)

        return dot
    order, conv = how

    def convolve(params: Any, x: jax.Array) -> jax.Array:
        kernel = jnp.transpose(params["w"], order).astype(x.dtype)
        return lax.conv_general_dilated(
            x,
            kernel,
            window_strides=conv.window_strides,
            padding=conv.padding,
            lhs_dilation=conv.lhs_dilation,
            rhs_dilation=conv.rhs_dilation,
            dimension_numbers=conv.dimension_numbers,
            feature_group_count=conv.feature_group_count,
            batch_group_count=conv.batch_group_count,
        )

    return convolve


def use_program(
    use: WeightUse,
) -> tuple[Callable[[Any, jax.Array], jax.Array], jax.ShapeDtypeStruct] | str:
    """One use of a weight as a program of its own: ``(program, activation)``, or why not.

    ``program({"w": weight}, x)`` contracts the weight's stored axes the use
    contracts (a ``dot_general`` with ``x`` laid out as ``(*batch, rows, *contracted)``,
    rows the activation's other entries), or runs the use's convolution on the
    weight transposed as the op sees it. ``accelerate`` routes a product by which of
    the leaf's axes it contracts, so the program takes the model's route.

    Args:
        use: from :func:`jaxcompress.graph.trace_uses`.

    Returns:
        The program and its activation's shape and dtype; a sentence saying why the use
        cannot be rebuilt (axes not mapped back through a reshape, a convolution on a
        reshaped kernel).

    Example:
        >>> import jax.numpy as jnp
        >>> from jaxcompress.jaxpr.graph import trace_uses
        >>> w, x = jnp.ones((4, 3)), jnp.ones((5, 2, 4))
        >>> use, = trace_uses(lambda p, x: x @ p["w"], {"w": w}, x)["w"]
        >>> program, activation = use_program(use)
        >>> activation.shape, program({"w": w}, jnp.ones(activation.shape)).shape
        ((10, 4), (10, 3))
    """
    description = _describe(use)
    if isinstance(description, str):
        return description
    shape, dtype = description[2], description[3]
    return _build(description), jax.ShapeDtypeStruct(shape, dtype)


def _activation(spec: jax.ShapeDtypeStruct, key: jax.Array) -> jax.Array:
    if jnp.issubdtype(spec.dtype, jnp.floating):
        return jax.random.normal(key, spec.shape, spec.dtype)
    return jnp.ones(spec.shape, spec.dtype)


class UseBench:
    """The thunks :func:`jaxcompress.auto` times: the dense model and each weight's uses.

    Built once per ``auto`` call from the model traced on one batch. Programs of the
    same shapes share one compiled function (dense) and one accelerated one.

    Attributes:
        notes: weight path → why its latency is not modelled (no use found, a use
            that cannot be rebuilt, a use inside code ``accelerate`` runs as written);
            such a weight counts the same time in every format.

    Example:
        >>> import jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> params = {"w": jnp.ones((16, 8))}
        >>> bench = UseBench(lambda p, x: x @ p["w"], params, jnp.ones((4, 16)), ["w"])
        >>> q, _ = jc.quantize(8)(params)
        >>> [out.shape for out in bench.use("w", q["w"])()]
        [(4, 8)]
        >>> bench.model()().shape, bench.notes
        ((4, 8), {})
    """

    def __init__(self, apply_fn: Callable, params: Any, x: Any, paths: Sequence[str]) -> None:
        arrays, rest = split_arrays(params)
        self._x = x
        self._arrays = arrays
        self._run = jax.jit(on_arrays(apply_fn, rest))
        closed, leaf_paths = trace_jaxpr(on_arrays(apply_fn, rest), arrays, x)
        uses = uses_in_jaxpr(closed, leaf_paths)
        opaque = opaque_uses(closed, leaf_paths)
        self.notes: dict[str, str] = {}
        self._programs: dict[str, list[tuple[Any, jax.Array]]] = {}
        key = jax.random.key(0)
        for path in paths:
            if opaque.get(path):
                self.notes[path] = f"it enters {', '.join(opaque[path])}, run as written"
                continue
            if not uses.get(path):
                self.notes[path] = "no dot_general or convolution consumes it"
                continue
            described = [_describe(use) for use in uses[path]]
            why = next((d for d in described if isinstance(d, str)), None)
            if why is not None:
                self.notes[path] = why
                continue
            programs = []
            for description in described:
                assert not isinstance(description, str)
                key, sub = jax.random.split(key)
                spec = jax.ShapeDtypeStruct(description[2], description[3])
                programs.append((description, _activation(spec, sub)))
            self._programs[path] = programs
        # One compiled function per distinct use, dense and accelerated.
        self._dense: dict[tuple[Any, ...], Callable] = {}
        self._fast: dict[tuple[Any, ...], tuple[Any, Callable]] = {}

    def model(self) -> Callable[[], Any]:
        """A thunk running the dense model (``jax.jit``) on the batch."""
        return lambda: self._run(self._arrays, self._x)

    def use(self, path: str, leaf: Any) -> Callable[[], Any] | None:
        """A thunk running ``path``'s uses with ``leaf`` (``None`` when not modelled).

        A compressed ``leaf`` is prepared and served by ``jax.jit(accelerate(...))``;
        a dense one runs under ``jax.jit``.
        """
        if path not in self._programs:
            return None
        thunks: list[Callable[[], Any]] = []
        for description, x in self._programs[path]:
            if is_compressed(leaf):
                if description not in self._fast:
                    fast = accelerate(_build(description))
                    self._fast[description] = (fast, jax.jit(fast))
                fast, run = self._fast[description]
                thunks.append(functools.partial(run, fast.prepare({"w": leaf}), x))
            else:
                if description not in self._dense:
                    self._dense[description] = jax.jit(_build(description))
                thunks.append(functools.partial(self._dense[description], {"w": leaf}, x))
        return lambda: [thunk() for thunk in thunks]


def chosen_model(apply_fn: Callable, compressed: Any, x: Any) -> Callable[[], Any]:
    """A thunk running ``jax.jit(accelerate(apply_fn))`` on the prepared ``compressed`` tree.

    Example:
        >>> import jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> q, _ = jc.quantize(8)({"w": jnp.ones((16, 8))})
        >>> chosen_model(lambda p, x: x @ p["w"], q, jnp.ones((2, 16)))().shape
        (2, 8)
    """
    fast = accelerate(apply_fn)
    arrays, rest = split_arrays(fast.prepare(compressed))
    run = jax.jit(on_arrays(fast, rest))
    return lambda: run(arrays, x)
