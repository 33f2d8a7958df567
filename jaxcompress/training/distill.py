"""Recovery of a compressed model by distillation from the dense one.

:func:`distill` compresses the teacher with a transform, then trains the student to
match the teacher's outputs on unlabeled batches while the student stays in the form
the transform produced, so the compression holds at every step and the result is
again a tree of the same compressed leaves:

* :class:`~jaxcompress.Quantized`: a float latent, started at the leaf's own values,
  runs through straight-through rounding on the leaf's own grid (its scales, zero
  points, group layout and bits); the scales may train too (LSQ). At the end the
  latent is coded again on that grid (:func:`jaxcompress.arrays.quantized.requantize`).
* :class:`~jaxcompress.Clustered`: the codebook trains, the indices are fixed.
* :class:`~jaxcompress.Sparse`: the kept values train (the same way again when they
  are clustered or quantized), the mask is fixed.
* :class:`~jaxcompress.LowRank`: both factors train.
* dense floating leaves (biases, norms, unselected kernels) train unless
  ``train_dense=False``; integer and non-array leaves are fixed.

A thinned tree from :func:`jaxcompress.prune_units` runs through its stats'
``apply_fn``; its smaller leaves are dense and train as above.

Besides the output, the student can match the teacher's pre-activations, found by
tracing (``features=``); the step can run data parallel over a mesh (``mesh=``) and
the loop can be resumed bit for bit from orbax checkpoints (``checkpoint_dir=``,
through :mod:`jaxcompress.training.checkpoints`).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxcompress.arrays import Clustered, LowRank, Quantized, Sparse
from jaxcompress.arrays.base import is_compressed
from jaxcompress.arrays.quantized import (
    decode,
    from_groups,
    grid_codes,
    requantize,
    scale_inputs,
    to_groups,
    zero_points,
)
from jaxcompress.arrays.tree import combine, materialize, on_arrays, split_arrays
from jaxcompress.calibration.features import feature_loss, traced_features
from jaxcompress.core.paths import path_to_str
from jaxcompress.core.progress import over_steps
from jaxcompress.training.checkpoints import LoopCheckpoints, digest
from jaxcompress.transforms.base import Transform
from jaxcompress.transforms.filters import Filter, kernels

__all__ = ["DistillReport", "distill"]

_LOSSES = ("cosine", "mse", "kl")


# --- how each kind of leaf trains --------------------------------------------------------
#
# A leaf is split into a trainable pytree (handed to the optimizer) and a frozen one
# (passed to the step as an argument); a part, which holds only static metadata, puts
# them together as the dense array the model runs with, and as the compressed leaf at
# the end.


@dataclasses.dataclass(frozen=True)
class _Fixed:
    """A leaf that does not train: an integer array, or a float one with train_dense=False."""

    def dense(self, train: Any, frozen: Any) -> Any:
        return frozen

    def finish(self, train: Any, frozen: Any) -> Any:
        return frozen


@dataclasses.dataclass(frozen=True)
class _Dense:
    """A dense floating array that trains as it is."""

    def dense(self, train: Any, frozen: Any) -> Any:
        return train

    def finish(self, train: Any, frozen: Any) -> Any:
        return train


@dataclasses.dataclass(frozen=True)
class _Children:
    """Clustered / LowRank: the floating children train, the integer ones stay."""

    treedef: Any
    trains: tuple[bool, ...]

    def _leaf(self, train: list, frozen: list) -> Any:
        trained, fixed = iter(train), iter(frozen)
        children = [next(trained) if t else next(fixed) for t in self.trains]
        return jax.tree_util.tree_unflatten(self.treedef, children)

    def dense(self, train: Any, frozen: Any) -> Any:
        return self._leaf(train, frozen).materialize()

    def finish(self, train: Any, frozen: Any) -> Any:
        return self._leaf(train, frozen)


@dataclasses.dataclass(frozen=True)
class _Sparse:
    """Sparse: the kept values train through their own part, the mask stays."""

    values: Any
    shape: tuple[int, ...]
    dtype: Any

    def dense(self, train: Any, frozen: Any) -> Any:
        values = self.values.dense(train, frozen["values"])
        return Sparse(values, frozen["mask"], self.shape, self.dtype).materialize()

    def finish(self, train: Any, frozen: Any) -> Any:
        values = self.values.finish(train, frozen["values"])
        return Sparse(values, frozen["mask"], self.shape, self.dtype)


def _round_through(x: jax.Array) -> jax.Array:
    """``round(x)`` forward, the identity backward (the straight-through estimator)."""
    return x + jax.lax.stop_gradient(jnp.round(x) - x)


def _cast_through(x: jax.Array, dtype: Any) -> jax.Array:
    """``x`` rounded to ``dtype`` (and back to float32) forward, the identity backward."""
    return x + jax.lax.stop_gradient(x.astype(dtype).astype(jnp.float32) - x)


@dataclasses.dataclass(frozen=True)
class _Quantized:
    """Quantized: a float latent fake-quantized on the leaf's grid; optionally its scales.

    The latent stands for the values before AWQ input scales, ``(code - zero) * scale``,
    so its codes are exactly what :func:`requantize` stores at the end.
    """

    train_scale: bool

    def _scale(self, train: Any, leaf: Quantized) -> jax.Array:
        scale = leaf.scale.astype(jnp.float32)
        if not self.train_scale:
            return scale
        # Trained as a log factor: its steps are relative, whatever the scale's size,
        # and a scale never changes sign (nor leaves zero, for an all-zero group). It
        # is stored in the scale dtype at the end: the forward pass sees that rounding.
        return _cast_through(scale * jnp.exp(train["log_scale"]), leaf.scale.dtype)

    def dense(self, train: Any, frozen: Any) -> Any:
        leaf: Quantized = frozen
        scale = self._scale(train, leaf)
        zero = zero_points(scale, leaf.zero_point, leaf.bits)
        view = to_groups(train["latent"], leaf.axis, leaf.group_size)
        codes = grid_codes(view, scale, zero, bits=leaf.bits, round_fn=_round_through)
        values = from_groups((codes - zero[:, None, :]) * scale[:, None, :], leaf.shape, leaf.axis)
        if leaf.input_scale is not None:
            values = scale_inputs(values, leaf.input_scale)
        return values.astype(leaf.dtype)

    def finish(self, train: Any, frozen: Any) -> Any:
        leaf: Quantized = frozen
        scale = self._scale(train, leaf) if self.train_scale else None
        return requantize(leaf, train["latent"], scale=scale)


def _is_floating(leaf: Any) -> bool:
    return isinstance(leaf, jax.Array | np.ndarray | np.generic) and jnp.issubdtype(
        leaf.dtype, jnp.floating
    )


def _split_leaf(
    leaf: Any, path: str, *, train_dense: bool, train_scale: bool
) -> tuple[Any, Any, Any]:
    """``(part, train, frozen)`` for one leaf of the student."""
    if isinstance(leaf, Sparse):
        values = leaf.values
        if is_compressed(values):
            part, train, frozen = _split_leaf(
                values, path, train_dense=True, train_scale=train_scale
            )
        else:
            part, train, frozen = _Dense(), jnp.asarray(values), None
        return _Sparse(part, leaf.shape, leaf.dtype), train, {"values": frozen, "mask": leaf.mask}
    if isinstance(leaf, Quantized):
        latent = decode(
            leaf.unpacked_codes(),
            leaf.scale,
            leaf.zero_point,
            shape=leaf.shape,
            axis=leaf.axis,
            group_size=leaf.group_size,
            bits=leaf.bits,
            dtype=jnp.float32,
        )
        train = {"latent": latent}
        if train_scale:
            train["log_scale"] = jnp.zeros(leaf.scale.shape, jnp.float32)
        return _Quantized(train_scale), train, leaf
    if isinstance(leaf, Clustered | LowRank):
        children, treedef = jax.tree_util.tree_flatten(leaf)
        trains = tuple(_is_floating(child) for child in children)
        train = [c for c, t in zip(children, trains, strict=True) if t]
        frozen = [c for c, t in zip(children, trains, strict=True) if not t]
        return _Children(treedef, trains), train, frozen
    if is_compressed(leaf):
        raise TypeError(
            f"distill: leaf {path!r} is a {type(leaf).__name__}, which cannot be trained in "
            "its compressed form; distill the tree before preparing it for serving"
        )
    if _is_floating(leaf) and train_dense:
        return _Dense(), jnp.asarray(leaf), None
    return _Fixed(), None, leaf


# --- losses ------------------------------------------------------------------------------


def _cosine(student: jax.Array, teacher: jax.Array) -> jax.Array:
    s = student.astype(jnp.float32).reshape(-1, student.shape[-1])
    t = teacher.astype(jnp.float32).reshape(-1, teacher.shape[-1])
    dot = jnp.sum(s * t, axis=-1)
    norms = jnp.linalg.norm(s, axis=-1) * jnp.linalg.norm(t, axis=-1)
    return jnp.mean(1.0 - dot / jnp.maximum(norms, 1e-12))


def _mse(student: jax.Array, teacher: jax.Array) -> jax.Array:
    return jnp.mean(jnp.square(student.astype(jnp.float32) - teacher.astype(jnp.float32)))


def _kl(temperature: float) -> Callable[[jax.Array, jax.Array], jax.Array]:
    def kl(student: jax.Array, teacher: jax.Array) -> jax.Array:
        log_t = jax.nn.log_softmax(teacher.astype(jnp.float32) / temperature, axis=-1)
        log_s = jax.nn.log_softmax(student.astype(jnp.float32) / temperature, axis=-1)
        per_row = jnp.sum(jnp.exp(log_t) * (log_t - log_s), axis=-1)
        return jnp.mean(per_row) * temperature**2

    return kl


def _loss_fn(loss: Any, temperature: float) -> tuple[Callable[[Any, Any], jax.Array], str]:
    if callable(loss):
        name = getattr(loss, "__name__", type(loss).__name__)
        return (lambda s, t: jnp.asarray(loss(s, t), jnp.float32)), name
    if loss not in _LOSSES:
        raise ValueError(f"distill: loss must be one of {_LOSSES} or a callable, got {loss!r}")
    one = {"cosine": _cosine, "mse": _mse, "kl": _kl(temperature)}[loss]

    def on_trees(student: Any, teacher: Any) -> jax.Array:
        # A model with several outputs: the mean of the loss over them.
        pairs = zip(jax.tree.leaves(student), jax.tree.leaves(teacher), strict=True)
        values = [one(s, t) for s, t in pairs]
        return sum(values[1:], values[0]) / len(values)

    return on_trees, loss


# --- inputs ------------------------------------------------------------------------------


def _model_fn(apply_fn: Any) -> tuple[Callable[..., Any], Any]:
    """``(fn(params, x), graphdef)``; an nnx module is called as ``merge(graphdef, state)(x)``."""
    nnx = sys.modules.get("flax.nnx")  # flax loads only when used; unloaded, no nnx modules
    if nnx is not None and isinstance(apply_fn, nnx.Module):
        graphdef, state = nnx.split(apply_fn)
        return (lambda params, x: nnx.merge(graphdef, params)(x)), state
    if not callable(apply_fn):
        raise TypeError(
            "distill: apply_fn must be apply_fn(params, x) or an nnx module, got "
            f"{type(apply_fn).__name__}"
        )
    return apply_fn, None


def _signature(batch: Any) -> tuple[Any, tuple[tuple[tuple[int, ...], str], ...]]:
    leaves, treedef = jax.tree_util.tree_flatten(batch)
    return treedef, tuple((tuple(np.shape(x))[1:], str(jnp.result_type(x))) for x in leaves)


def _check_batches(batches: Any, name: str) -> Sequence[Any]:
    """``batches`` as a sequence of inputs, each laid out like the first but for its rows."""
    if isinstance(batches, jax.Array | np.ndarray):
        if batches.ndim < 2:
            raise ValueError(
                f"distill: {name} as an array has batches along its first axis and rows "
                f"along its second, so it needs at least 2 dimensions, got shape "
                f"{tuple(batches.shape)}"
            )
        items: Sequence[Any] = [batches[i] for i in range(batches.shape[0])]
    elif isinstance(batches, list | tuple):
        items = list(batches)
    else:
        raise TypeError(
            f"distill: {name} must be a list or tuple of input batches, or an array whose "
            f"first axis indexes batches, got {type(batches).__name__}"
        )
    if not items:
        raise ValueError(f"distill: {name} is empty")
    first = _signature(items[0])
    for index, batch in enumerate(items):
        leaves = jax.tree.leaves(batch)
        if not leaves or any(np.ndim(x) < 1 for x in leaves):
            raise ValueError(
                f"distill: {name}[{index}] must be arrays with a leading row axis, got {batch!r}"
            )
        signature = _signature(batch)
        if signature != first:
            raise ValueError(
                f"distill: {name}[{index}] has (trailing shape, dtype) {signature[1]}, but "
                f"{name}[0] has {first[1]}; every batch must match but for its rows"
            )
    return items


def _units_apply(stats: Any) -> Callable[..., Any] | None:
    """The thinned program of a :func:`jaxcompress.prune_units` in ``stats`` (the last one)."""
    if isinstance(stats, tuple | list):
        found = [_units_apply(s) for s in stats]
        found = [f for f in found if f is not None]
        return found[-1] if found else None
    apply = getattr(stats, "apply_fn", None)
    return apply if callable(apply) else None


def _feature_filter(features: Any) -> Filter | None:
    """The filter choosing which weights' features are matched, or ``None`` for none."""
    if features is None or features is False:
        return None
    if features is True:
        return kernels
    if isinstance(features, str | tuple) or callable(features):
        return features
    raise TypeError(
        "distill: features must be None, True or a filter (a regex string, a "
        f"(path, leaf) -> bool function or a tuple of them), got {type(features).__name__}"
    )


def _check_weight(feature_weight: Any) -> float:
    message = f"distill: feature_weight must be a non-negative number, got {feature_weight!r}"
    if isinstance(feature_weight, bool) or not isinstance(feature_weight, numbers.Real):
        raise ValueError(message)
    weight = float(feature_weight)
    if not (math.isfinite(weight) and weight >= 0):
        raise ValueError(message)
    return weight


# --- data parallel -----------------------------------------------------------------------


def _check_mesh(mesh: Any, named: dict[str, Sequence[Any]]) -> None:
    """Every batch's rows split evenly over the first axis of ``mesh``."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"distill: mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    axis = mesh.axis_names[0]
    devices = mesh.shape[axis]
    for name, items in named.items():
        for index, batch in enumerate(items):
            rows = {int(np.shape(x)[0]) for x in jax.tree.leaves(batch)}
            uneven = sorted(r for r in rows if r % devices)
            if uneven:
                raise ValueError(
                    f"distill: {name}[{index}] has {uneven[0]} rows, which do not split "
                    f"evenly over the {devices} devices of the mesh's first axis {axis!r}"
                )


# --- the report --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class DistillReport:
    """What :func:`distill` did.

    Attributes:
        steps: optimizer steps taken (counting those before a resumed checkpoint).
        loss: the training loss at each step (before that step's update), numpy float32:
            the output loss, plus ``feature_weight`` times the feature loss when
            features are matched.
        before: the mean output loss to the teacher over the evaluation batches, of the
            student as the transform made it.
        after: the same, of the returned compressed tree.
        eval_on: ``"eval_batches"`` or ``"batches"`` (when no held-out batches were given).
        loss_name: the loss (``"cosine"``, ``"mse"``, ``"kl"`` or a function's name).
        seconds: wall time of the whole call, compression included.
        features: the names of the matched features (see
            :func:`jaxcompress.calibration.features.traced_features`); empty without.
        features_before: the mean :func:`~jaxcompress.calibration.features.feature_loss`
            over the evaluation batches before training; ``None`` without features.
        features_after: the same, of the returned tree.
        resumed_from: the step of the checkpoint the run carried on from, or ``0``.

    Example:
        >>> import numpy as np
        >>> report = DistillReport(2, np.array([0.5, 0.25], np.float32), 0.5, 0.125,
        ...                        "batches", "mse", 1.5)
        >>> report
        DistillReport(steps=2, loss='mse', before=0.5, after=0.125)
        >>> print(report)
        | | mse |
        |:--|--:|
        | steps | 2 |
        | training loss, first → last | 0.5 → 0.25 |
        | loss on batches, before | 0.5 |
        | loss on batches, after | 0.125 |
        | wall time | 1.5 s |
    """

    steps: int
    loss: np.ndarray
    before: float
    after: float
    eval_on: str
    loss_name: str
    seconds: float
    features: tuple[str, ...] = ()
    features_before: float | None = None
    features_after: float | None = None
    resumed_from: int = 0

    def table(self) -> str:
        """A markdown table: steps, first and last training loss, evaluation before and after.

        Example:
            >>> import numpy as np
            >>> r = DistillReport(1, np.array([0.5], np.float32), 0.5, 0.4, "eval_batches",
            ...                   "cosine", 0.25, ("l1/kernel",), 0.2, 0.1)
            >>> print(r.table().splitlines()[5])
            | loss on eval_batches, after | 0.4 |
            >>> print(r.table().splitlines()[7])
            | feature loss (1 features) on eval_batches, after | 0.1 |
        """
        first, last = (float(self.loss[0]), float(self.loss[-1])) if len(self.loss) else (0, 0)
        steps = f"{self.steps}"
        if self.resumed_from:
            steps += f" (resumed at {self.resumed_from})"
        rows = [
            ("steps", steps),
            ("training loss, first → last", f"{first:.4g} → {last:.4g}"),
            (f"loss on {self.eval_on}, before", f"{self.before:.4g}"),
            (f"loss on {self.eval_on}, after", f"{self.after:.4g}"),
        ]
        if self.features_before is not None and self.features_after is not None:
            which = f"feature loss ({len(self.features)} features) on {self.eval_on}"
            rows += [
                (f"{which}, before", f"{self.features_before:.4g}"),
                (f"{which}, after", f"{self.features_after:.4g}"),
            ]
        rows.append(("wall time", f"{self.seconds:.3g} s"))
        lines = [f"| | {self.loss_name} |", "|:--|--:|"]
        return "\n".join(lines + [f"| {name} | {value} |" for name, value in rows])

    def __str__(self) -> str:
        return self.table()

    def _repr_markdown_(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return (
            f"DistillReport(steps={self.steps}, loss={self.loss_name!r}, "
            f"before={self.before:.4g}, after={self.after:.4g})"
        )


# --- distill -----------------------------------------------------------------------------


def _check_steps(steps: Any) -> int:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"distill: steps must be a positive integer, got {steps!r}")
    return int(steps)


def distill(
    apply_fn: Any,
    teacher_params: Any,
    tx: Transform,
    batches: Any,
    *,
    optimizer: optax.GradientTransformation | None = None,
    steps: int = 100,
    loss: str | Callable[[Any, Any], jax.Array] = "cosine",
    features: Any = None,
    feature_weight: float = 1.0,
    key: jax.Array | None = None,
    data: Any = None,
    eval_batches: Any = None,
    temperature: float = 1.0,
    train_dense: bool = True,
    train_scale: bool = True,
    mesh: Mesh | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 100,
    progress: bool = True,
) -> tuple[Any, DistillReport]:
    """Compresses ``teacher_params`` with ``tx``, then trains the result to match the teacher.

    The student starts as ``tx(teacher_params, key=key, data=data)`` and learns the dense
    teacher's outputs on ``batches`` (no labels) while staying compressed: every step
    runs the model on the student as it would be stored, so the returned tree has the
    same compressed leaves (kinds, shapes, masks, cluster indices, quantization
    metadata and grids) and is ready for :func:`jaxcompress.save` or
    :func:`jaxcompress.accelerate`. How each kind trains is in the module docstring:
    quantized weights through straight-through rounding on their own grid (codes stay
    in range), codebooks with their indices fixed, kept values with their mask fixed,
    both low-rank factors, and dense floating leaves. After :func:`jaxcompress.prune_units`
    the student runs through ``stats.apply_fn`` on the thinned tree.

    One jitted step computes the teacher's output, the student's, the loss, its gradient
    and the optimizer update.

    **Features.** With ``features=``, the student also matches the teacher's
    intermediate activations: the output of each ``dot_general`` or convolution that
    consumes a chosen weight (the pre-activation), found by tracing ``apply_fn``
    (:func:`jaxcompress.calibration.features.traced_features`), so no layer names are
    needed and linen, nnx, equinox and plain functions work alike. The loss is
    ``loss(student_out, teacher_out) + feature_weight * feature_loss(student_features,
    teacher_features)`` (:func:`~jaxcompress.calibration.features.feature_loss`: the
    mean over features of the relative squared error). The student's features come
    from its forward pass as stored (fake-quantized, masked, ...), at the same weights
    as the teacher's; both are computed inside the step.

    **Data parallel.** With ``mesh=``, each batch is split along its rows over the
    mesh's first axis and replicated over the others; the student, the optimizer state
    and the teacher are replicated. The losses are means over all rows, so the run
    equals the single-device one up to the order of float sums.

    **Resuming.** With ``checkpoint_dir=``, the state (step, trainable student,
    optimizer state, loss history) is saved with orbax-checkpoint every
    ``checkpoint_every`` steps and after the last one (the newest two are kept); the
    batch of a step is ``batches[step % len(batches)]`` and the step itself uses no
    randomness, so this is all a run needs. A call with the same arguments over a
    directory that holds a checkpoint carries on from its latest step, and returns
    bit for bit what an uninterrupted run would (``steps`` may be larger than the
    checkpoint's, to train on). A checkpoint from another run (another transform,
    key, data or starting student, loss, features, batch count or layout, or optimizer
    state layout) is refused. The optimizer itself is not compared: pass the same one.

    Args:
        apply_fn: ``apply_fn(params, x) -> output`` (a linen
            ``lambda p, x: model.apply({"params": p}, x)``, a function over an
            ``nnx.State`` such as ``lambda s, x: nnx.merge(graphdef, s)(x)``, or any
            function), or an nnx module, called as ``nnx.merge(graphdef, state)(x)``.
        teacher_params: the dense parameters (for an nnx module its ``nnx.State``; ``None``
            takes the module's own).
        tx: the compression, any :class:`~jaxcompress.Transform` or :func:`~jaxcompress.chain`.
        batches: unlabeled inputs: a list or tuple of batches (each an array, or a pytree
            of arrays for several inputs) or an array whose first axis indexes batches;
            cycled when ``steps`` exceeds their number. All batches match but for rows.
        optimizer: any optax optimizer; by default ``optax.adam(1e-4)``.
        steps: optimizer steps, at least 1.
        loss: ``"cosine"`` (mean over rows of ``1 - cos`` along the last axis), ``"mse"``,
            ``"kl"`` (``KL(softmax(t/T) || softmax(s/T)) T²``), or a function
            ``loss(student_out, teacher_out) -> scalar``. A model with several outputs
            gets the mean of a named loss over them.
        features: ``None`` (the output only), ``True`` (the features of every kernel a
            dot/conv consumes) or a :data:`jaxcompress.filters.Filter` on weight paths
            choosing them. Not with a thinned student (:func:`jaxcompress.prune_units`),
            whose features have other shapes.
        feature_weight: the weight of the feature loss, non-negative.
        key: the key passed to ``tx``.
        data: passed to ``tx`` (calibration statistics for GPTQ, AWQ, SparseGPT, …).
        eval_batches: held-out batches for the report's before / after loss; by default
            ``batches``.
        temperature: the softmax temperature ``T`` of ``"kl"``, positive.
        train_dense: whether dense floating leaves (biases, norms, unselected kernels)
            train too.
        train_scale: whether quantization scales train with the latents (LSQ: the
            gradient through ``s * round(w / s)``); zero points stay.
        mesh: a :class:`jax.sharding.Mesh` to run data parallel on; every batch's rows
            (and ``eval_batches``') must divide by the size of its first axis.
        checkpoint_dir: an orbax checkpoint directory to save to and resume from
            (needs ``orbax-checkpoint``).
        checkpoint_every: save after every this many steps (with ``checkpoint_dir``).
        progress: a bar over the steps on stderr (nothing when it is not a terminal).

    Returns:
        ``(compressed, report)``: the trained compressed tree and a :class:`DistillReport`.

    Raises:
        TypeError: ``tx`` is not a Transform, ``apply_fn`` is not callable, batches of
            the wrong type, ``features`` not a filter, ``mesh`` not a Mesh, or a leaf
            that cannot train compressed (a serving layout).
        ValueError: an unknown loss, ``steps < 1``, empty or inconsistent batches, a
            non-positive temperature, a negative ``feature_weight``, features that
            cannot be matched (none found, a thinned student), batch rows that do not
            split over ``mesh``, or a checkpoint from another run or past ``steps``.
        ImportError: ``checkpoint_dir`` without orbax-checkpoint installed.

    Example:
        >>> import jax, jax.numpy as jnp, optax
        >>> import jaxcompress as jc
        >>> params = {"w": jax.random.normal(jax.random.key(0), (8, 4))}
        >>> apply = lambda p, x: x @ p["w"]
        >>> x = jax.random.normal(jax.random.key(1), (2, 16, 8))  # 2 batches of 16 rows
        >>> student, report = jc.distill(apply, params, jc.cluster(k=4, where="w"), x,
        ...                              optimizer=optax.adam(1e-2), steps=20, loss="mse",
        ...                              progress=False)
        >>> student["w"]
        Clustered(shape=(8, 4), dtype=float32, k=4, bits=2, per_tensor)
        >>> report.after < report.before
        True

        Matching the hidden layer too, found by tracing:

        >>> params = {"a": jax.random.normal(jax.random.key(2), (8, 8)) / 3,
        ...           "b": jax.random.normal(jax.random.key(0), (8, 4)) / 3}
        >>> apply = lambda p, x: jnp.tanh(x @ p["a"]) @ p["b"]
        >>> student, report = jc.distill(apply, params, jc.prune(0.5), x, features=True,
        ...                              optimizer=optax.adam(1e-2), steps=20,
        ...                              progress=False)
        >>> report.features, report.features_after < report.features_before
        (('a', 'b'), True)
    """
    started = time.perf_counter()
    if not isinstance(tx, Transform):
        raise TypeError(
            f"distill: tx must be a jaxcompress Transform (jc.quantize(...), jc.chain(...)), "
            f"got {type(tx).__name__}"
        )
    where = _feature_filter(features)
    feature_weight = _check_weight(feature_weight)
    steps = _check_steps(steps)
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise ValueError(f"distill: temperature must be a positive number, got {temperature!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"distill: temperature must be a positive number, got {temperature!r}")
    loss_fn, loss_name = _loss_fn(loss, float(temperature))
    fn, module_state = _model_fn(apply_fn)
    if teacher_params is None:
        if module_state is None:
            raise ValueError("distill: teacher_params is None and apply_fn is not an nnx module")
        teacher_params = module_state
    train_batches = _check_batches(batches, "batches")
    held_out = (
        train_batches if eval_batches is None else _check_batches(eval_batches, "eval_batches")
    )
    if _signature(held_out[0]) != _signature(train_batches[0]):
        raise ValueError("distill: eval_batches must be laid out like batches")
    if mesh is not None:
        _check_mesh(mesh, {"batches": train_batches, "eval_batches": held_out})
    optimizer = optax.adam(1e-4) if optimizer is None else optimizer

    student, stats = tx(teacher_params, key=key, data=data)
    units_fn = _units_apply(stats)
    if where is not None and units_fn is not None:
        raise ValueError(
            "distill: features= cannot be matched on a student thinned by prune_units (its "
            "features have fewer units than the teacher's); pass features=None"
        )
    student_fn = units_fn or fn

    teacher_arrays, teacher_rest = split_arrays(teacher_params)
    teacher_apply = on_arrays(fn, teacher_rest)
    arrays, rest = split_arrays(student)
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(arrays, is_leaf=is_compressed)
    parts, train, frozen = [], [], []
    for path, leaf in with_paths:
        part, t, f = _split_leaf(
            leaf, path_to_str(path), train_dense=train_dense, train_scale=train_scale
        )
        parts.append(part)
        train.append(t)
        frozen.append(f)

    def assemble(train: list, frozen: list, finish: bool = False) -> Any:
        leaves = [
            part.finish(t, f) if finish else part.dense(t, f)
            for part, t, f in zip(parts, train, frozen, strict=True)
        ]
        return combine(jax.tree_util.tree_unflatten(treedef, leaves), rest)

    def teacher_run(teacher: Any, x: Any) -> tuple[Any, Any]:
        if where is None:
            return teacher_apply(teacher, x), None
        return traced_features(teacher_apply, teacher, x, where=where)

    def student_run(params: Any, x: Any) -> tuple[Any, Any]:
        if where is None:
            return student_fn(params, x), None
        return traced_features(student_fn, params, x, where=where)

    def losses(student_out: Any, teacher_out: Any) -> tuple[jax.Array, jax.Array]:
        """``(output loss, feature loss)``; the feature loss is 0 without features."""
        out = loss_fn(student_out[0], teacher_out[0])
        if where is None:
            return out, jnp.zeros((), jnp.float32)
        return out, feature_loss(student_out[1], teacher_out[1])

    names: tuple[str, ...] = ()
    if where is not None:
        # Traced once here (abstractly) so a set the two sides disagree on is named now.
        teacher_shapes = jax.eval_shape(teacher_run, teacher_arrays, held_out[0])[1]
        student_shapes = jax.eval_shape(
            lambda t, f, x: student_run(assemble(t, f), x), train, frozen, held_out[0]
        )[1]
        names = tuple(teacher_shapes)
        if set(student_shapes) != set(names):
            raise ValueError(
                f"distill: the student's traced features {sorted(student_shapes)} differ "
                f"from the teacher's {sorted(names)}"
            )

    def objective(train, frozen, teacher_out, x):
        out, feats = losses(student_run(assemble(train, frozen), x), teacher_out)
        return out + feature_weight * feats

    replicated = batch_sharding = None
    if mesh is not None:
        replicated = NamedSharding(mesh, PartitionSpec())
        batch_sharding = NamedSharding(mesh, PartitionSpec(mesh.axis_names[0]))
        teacher_arrays, train, frozen = jax.device_put((teacher_arrays, train, frozen), replicated)

    def place(x: Any) -> Any:
        return x if batch_sharding is None else jax.device_put(x, batch_sharding)

    def step(train, opt_state, frozen, teacher, x):
        teacher_out = jax.lax.stop_gradient(teacher_run(teacher, x))
        value, grads = jax.value_and_grad(objective)(train, frozen, teacher_out, x)
        # optax's Adam mixes float and int32 (its bias correction), which a user's strict
        # dtype promotion refuses; the optimizer's own arithmetic runs under the standard one.
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optimizer.update(grads, opt_state, train)
        return optax.apply_updates(train, updates), opt_state, value

    # On a mesh the new state is pinned replicated, as it came in.
    jitted_step = jax.jit(step, out_shardings=replicated)

    @jax.jit
    def evaluate(dense, teacher, x):
        return losses(student_run(combine(dense, rest), x), teacher_run(teacher, x))

    def mean_losses(tree: Any) -> tuple[float, float]:
        dense = materialize(split_arrays(tree)[0])
        if replicated is not None:
            dense = jax.device_put(dense, replicated)
        pairs = [evaluate(dense, teacher_arrays, place(x)) for x in held_out]
        values = np.array([[float(v) for v in pair] for pair in pairs])
        return float(values[:, 0].mean()), float(values[:, 1].mean())

    before, features_before = mean_losses(student)
    with jax.numpy_dtype_promotion("standard"):
        opt_state = optimizer.init(train)
    if replicated is not None:
        opt_state = jax.device_put(opt_state, replicated)
    history = np.zeros(steps, np.float32)
    start = 0
    checkpoints = None
    if checkpoint_dir is not None:
        fingerprint = {
            "transform": tx.name,
            "loss": loss_name,
            "temperature": float(temperature),
            "features": list(names) if where is not None else None,
            "feature_weight": feature_weight,
            "student": digest((train, frozen)),
            "key": None if key is None else digest(key),
            "batches": [len(train_batches), repr(_signature(train_batches[0]))],
        }
        checkpoints = LoopCheckpoints(
            checkpoint_dir, fingerprint=fingerprint, every=checkpoint_every, caller="distill"
        )
    try:
        if checkpoints is not None:
            resumed = checkpoints.restore(train, opt_state)
            if resumed is not None:
                if resumed.step > steps:
                    raise ValueError(
                        f"distill: the checkpoint in {checkpoint_dir} is at step "
                        f"{resumed.step}, past steps={steps}"
                    )
                start, train, opt_state = resumed.step, resumed.train, resumed.opt_state
                history[:start] = resumed.history
        todo = range(start, steps)
        for i in over_steps(todo, total=len(todo), description="distill", enabled=progress):
            x = place(train_batches[i % len(train_batches)])
            train, opt_state, value = jitted_step(train, opt_state, frozen, teacher_arrays, x)
            history[i] = float(value)
            if checkpoints is not None:
                checkpoints.save(i + 1, train, opt_state, history[: i + 1], force=i + 1 == steps)
    finally:
        if checkpoints is not None:
            checkpoints.close()
    result = assemble(train, frozen, finish=True)
    after, features_after = mean_losses(result)
    report = DistillReport(
        steps=steps,
        loss=history,
        before=before,
        after=after,
        eval_on="batches" if eval_batches is None else "eval_batches",
        loss_name=loss_name,
        seconds=time.perf_counter() - started,
        features=names,
        features_before=None if where is None else features_before,
        features_after=None if where is None else features_after,
        resumed_from=start,
    )
    return result, report
