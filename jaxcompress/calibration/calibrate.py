"""Input statistics of each weight, captured by tracing the model: what data-aware
transforms (whitened low-rank, PCA, LDA) need.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxcompress.arrays.tree import on_arrays, split_arrays
from jaxcompress.core.paths import path_to_str
from jaxcompress.jaxpr import graph


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class InputStats:
    """Streaming statistics of the input features one weight sees.

    The features are the weight's contracted inputs in the order of its matrix view
    (:func:`jaxcompress.arrays.lowrank.matrix_shape`): for a Dense kernel ``(m, n)``
    the ``m`` input features; for a conv kernel ``(h, w, in, out)`` the im2col patch
    of ``h * w * in`` values ordered like ``kernel.reshape(-1, out)``; for a
    DenseGeneral kernel, its contracted axes flattened row-major. Every row of
    features counts once (a token, a pixel position, an example).

    Attributes:
        count: number of feature rows seen (float32 scalar).
        mean: their mean, ``(m,)``.
        gram: the uncentered second moment ``E[x xᵀ]``, ``(m, m)``; the covariance is
            ``gram - outer(mean, mean)``.
        class_count: rows seen per class, ``(c,)``, or ``None`` without labels.
        class_mean: per-class means, ``(c, m)``, or ``None`` without labels.
        trailing: the features are the weight's trailing axes, flattened row-major: a
            weight stored output first and used as ``weight @ x``, such as equinox's
            ``Linear`` ``(out, in)`` or ``Conv`` ``(out, in, h, w)``.
        stacked: ``None``, or for a weight of stacked layers run by a ``scan`` (one
            slice per iteration) the weight's axis the scan runs over: then ``mean``,
            ``gram`` (and ``class_mean``) carry a leading axis with the statistics of
            each slice, ``gram[i]`` for ``jnp.take(weight, i, axis=stacked)``.
            :func:`slice_stats` picks one.

    Example:
        >>> import jax.numpy as jnp
        >>> x = jnp.array([[1.0, 0.0], [3.0, 2.0]])
        >>> s = InputStats(count=jnp.float32(2), mean=x.mean(0), gram=x.T @ x / 2,
        ...                class_count=None, class_mean=None)
        >>> s.covariance().tolist()
        [[1.0, 1.0], [1.0, 1.0]]
    """

    count: jax.Array
    mean: jax.Array
    gram: jax.Array
    class_count: jax.Array | None
    class_mean: jax.Array | None
    trailing: bool = dataclasses.field(default=False, metadata={"static": True})
    stacked: int | None = dataclasses.field(default=None, metadata={"static": True})

    def covariance(self) -> jax.Array:
        """The (population) covariance of the features, ``gram - mean meanᵀ``."""
        return self.gram - self.mean[..., :, None] * self.mean[..., None, :]


def slice_stats(stats: InputStats, index: int) -> InputStats:
    """The statistics of slice ``index`` of a stacked weight (see ``InputStats.stacked``).

    Example:
        >>> import jax.numpy as jnp
        >>> s = InputStats(jnp.float32(4), jnp.zeros((3, 2)), jnp.stack([jnp.eye(2)] * 3),
        ...                None, None, stacked=0)
        >>> one = slice_stats(s, 2)
        >>> one.gram.shape, one.stacked
        ((2, 2), None)
    """
    if stats.stacked is None:
        raise ValueError("slice_stats needs stacked statistics (InputStats.stacked is None)")
    return InputStats(
        count=stats.count,
        mean=stats.mean[index],
        gram=stats.gram[index],
        class_count=stats.class_count,
        class_mean=None if stats.class_mean is None else stats.class_mean[index],
        trailing=stats.trailing,
    )


def stats_by_path(data: object) -> dict[str, InputStats]:
    """The :class:`InputStats` of a calibration pytree, keyed by leaf path (``a/b/kernel``).

    ``data`` is laid out like the params, with an :class:`InputStats` where a weight
    was calibrated and ``None`` elsewhere; transforms look their leaves up by path.

    Example:
        >>> import jax.numpy as jnp
        >>> s = InputStats(jnp.float32(1), jnp.zeros(2), jnp.eye(2), None, None)
        >>> list(stats_by_path({"dense": {"kernel": s, "bias": None}}))
        ['dense/kernel']
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(
        data, is_leaf=lambda x: isinstance(x, InputStats)
    )
    return {path_to_str(path): leaf for path, leaf in flat if isinstance(leaf, InputStats)}


# --------------------------------------------------------------------------------------
# calibrate: stream batches through the model and accumulate InputStats per weight.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Site:
    """One calibrated use of a weight, as planned for one batch shape."""

    use: Any  # graph.WeightUse
    rows: int  # feature rows the use yields per batch
    example_dim: int | None  # activation dim holding the examples (with labels)
    per_example: int  # rows of that dim per example (tokens merged into it)
    one_iteration: bool = False  # a stacked weight's use captured at one scan iteration


@dataclasses.dataclass
class _Plan:
    """What one jitted step computes for one batch shape."""

    sites: dict[str, list[_Site]]
    step: Callable[..., Any]


def _explicit_mesh(x: jax.Array) -> Any:
    """The abstract mesh of ``x``'s sharding type when it has explicit axes, else None."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or mesh.empty:
        return None
    if not any(t == AxisType.Explicit for t in mesh.axis_types):
        return None
    return mesh


def _keep_only(x: jax.Array, dims: Sequence[int]) -> jax.Array:
    """Under explicit sharding, unshards every dim of ``x`` except ``dims``."""
    mesh = _explicit_mesh(x)
    if mesh is None:
        return x
    spec = tuple(jax.typeof(x).sharding.spec) + (None,) * x.ndim
    new = P(*(spec[d] if d in dims else None for d in range(x.ndim)))
    if tuple(new) == spec[: x.ndim]:
        return x
    return jax.sharding.reshard(x, NamedSharding(mesh, new))


def _contract(a: jax.Array, b: jax.Array, dims: Sequence[int]) -> jax.Array:
    """Sums ``a[..., i] * b[..., j]`` over the shared leading ``dims``, in float32."""
    mesh = _explicit_mesh(a)
    dims = tuple(dims)
    return lax.dot_general(
        a,
        b,
        ((dims, dims), ((), ())),
        precision=lax.Precision.HIGHEST,
        preferred_element_type=jnp.float32,
        out_sharding=None if mesh is None else NamedSharding(mesh, P()),
    )


def _site_sums(site: _Site, activation: jax.Array, onehot: jax.Array | None) -> dict:
    if site.use.stacked is not None and not site.one_iteration:
        # One iteration's rows per slice of the stacked weight (capture stacks them).
        return jax.vmap(lambda a: _slice_sums(site, a, onehot))(activation)
    return _slice_sums(site, activation, onehot)


def _slice_sums(site: _Site, activation: jax.Array, onehot: jax.Array | None) -> dict:
    use = site.use
    if use.primitive == graph.CONV:
        keep = [use.conv.dimension_numbers.lhs_spec[0]]
    else:
        keep = [d for d in range(activation.ndim) if d not in use.activation_contracting_dims]
    activation = _keep_only(activation.astype(jnp.float32), keep)
    features, row_dims = graph.input_features(use, activation)
    rows = tuple(range(len(row_dims)))
    sums = {
        "sum": jnp.sum(features, axis=rows),
        "gram": _contract(features, features, rows),
    }
    if onehot is not None:
        if site.example_dim not in row_dims:
            raise ValueError(
                f"{use.path}: the examples' dim {site.example_dim} of its input is contracted"
            )
        axis = row_dims.index(site.example_dim)
        per_example = jnp.sum(features, axis=tuple(r for r in rows if r != axis))
        if site.per_example != 1:
            per_example = per_example.reshape(onehot.shape[0], site.per_example, -1).sum(1)
        sums["class_sum"] = _contract(onehot, per_example, (0,))
    return sums


def _check_batch(x: Any, expected: Any, index: int) -> jax.Array:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(
            f"each batch must be one array (labels go in labels=), got {type(x).__name__}"
        )
    if len(x.shape) < 1 or x.shape[0] == 0:
        raise ValueError(f"a batch needs a non-empty leading batch dim, got shape {x.shape}")
    if expected is not None and np.dtype(x.dtype) != expected:
        raise ValueError(
            f"batch {index} has dtype {np.dtype(x.dtype)}, the first batch {expected}: "
            "every batch must have the first one's dtype"
        )
    return x


def _geometry(sites: dict[str, list[_Site]]) -> dict[str, tuple]:
    """What a weight's pooled statistics depend on: features, fan-in side, stacking."""
    return {
        path: (
            _features(ss[0].use),
            graph.fan_in_axes(ss[0].use) is None,
            ss[0].use.stacked,
            _stacked_length(ss[0].use),
        )
        for path, ss in sites.items()
    }


def _check_labels(y: Any, batch: int, num_classes: int, index: int) -> np.ndarray:
    y = np.asarray(y)
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels of batch {index} must be integers, got {y.dtype}")
    if y.shape != (batch,):
        raise ValueError(f"labels of batch {index} have shape {y.shape}, expected ({batch},)")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(
            f"labels of batch {index} must lie in [0, {num_classes}), "
            f"got min {y.min()} max {y.max()}"
        )
    return y


def _example_dims(
    apply_fn, params, x, extra, paths, uses
) -> dict[tuple[str, int], tuple[int, int]]:
    """For each use, ``(activation dim of the examples, rows of it per example)``.

    Found by tracing again with twice the batch: the one activation dim that doubles.
    """
    batch = x.shape[0]
    probe = jax.ShapeDtypeStruct((2 * batch, *x.shape[1:]), x.dtype)
    try:
        closed, _ = graph.trace_jaxpr(apply_fn, params, probe, *extra)
    except Exception as error:  # noqa: BLE001 - any failure means we cannot tell
        raise ValueError(
            "labels need the examples' dim of each weight's input, found by tracing with "
            f"batch {2 * batch}, which failed: {error}"
        ) from error
    probed = graph.uses_in_jaxpr(closed, paths)
    out = {}
    for path, path_uses in uses.items():
        for i, use in enumerate(path_uses):
            other = probed[path][i] if i < len(probed[path]) else None
            before, after = use.activation_shape, other.activation_shape if other else ()
            grown = [
                d for d in range(len(before)) if len(after) == len(before) and after[d] != before[d]
            ]
            if (
                other is None
                or len(grown) != 1
                or after[grown[0]] != 2 * before[grown[0]]
                or before[grown[0]] % batch
            ):
                raise ValueError(
                    f"{path}: cannot tell which dim of its input {before} holds the "
                    f"{batch} examples of the batch (needed for labels)"
                )
            out[(path, i)] = (grown[0], before[grown[0]] // batch)
    return out


def _rows(use: Any) -> int:
    shape = jax.ShapeDtypeStruct(use.activation_shape, jnp.float32)
    features = jax.eval_shape(lambda a: graph.input_features(use, a)[0], shape)
    return math.prod(features.shape[:-1])


def _select(
    uses: dict[str, list[Any]],
    hidden: dict[str, list[str]],
    ranks: dict[str, int],
    *,
    labelled: bool,
) -> tuple[dict[str, list[Any]], dict[str, str]]:
    """The weights every use of which can be calibrated, and why the others cannot."""
    chosen, skipped = {}, {}
    for path, path_uses in uses.items():
        reasons = []
        # A vector that only enters a scan or a kernel is a bias or a scale: no warning.
        if hidden.get(path) and (path_uses or ranks.get(path, 2) >= 2):
            # Its rows there are unseen: statistics of the other uses alone would be wrong.
            reasons.append(f"it enters {', '.join(hidden[path])}, whose code calibrate cannot read")
        elif not path_uses:
            continue
        for use in path_uses:
            fan_in = graph.fan_in_axes(use)
            if use.note:
                reasons.append(use.note)
            elif labelled and use.gathered is not None:
                reasons.append(
                    "used inside a shard_map: with labels, the order of the examples "
                    "across its devices is unknown"
                )
            elif fan_in is None and graph.trailing_fan_in_axes(use) is None:
                reasons.append(
                    use.note
                    or f"contracted axes {use.contracting_axes} are neither its leading nor "
                    "its trailing axes"
                )
            elif use.conv is not None and (
                use.conv.feature_group_count != 1 or use.conv.batch_group_count != 1
            ):
                reasons.append("grouped convolution")
        # Read only without reasons, that is where every use has a fan-in.
        fans = {
            (graph.fan_in_axes(use), graph.trailing_fan_in_axes(use), use.stacked)
            for use in path_uses
        }
        if not reasons and len(fans) != 1:
            reasons.append(f"its uses disagree on the fan-in ({sorted(fans)})")
        if reasons:
            skipped[path] = "; ".join(dict.fromkeys(reasons))
        else:
            chosen[path] = path_uses
    return chosen, skipped


def _build_plan(
    apply_fn, params, x, key, num_classes, mesh, only=None, iteration=None
) -> tuple[_Plan, dict]:
    """Plans and jits the accumulation step for the batch shape of ``x``.

    The model is traced here with one device's share of the batch (all of it without a
    mesh) to choose the weights and learn their geometry; the step traces it again
    inside :func:`jax.jit` (inside :func:`jax.shard_map` with a mesh) and replays that
    jaxpr, so its recorded shardings fit the context it runs in.
    """
    axis = None if mesh is None else mesh.axis_names[0]
    shards = 1 if mesh is None else mesh.shape[axis]
    local = jax.ShapeDtypeStruct((x.shape[0] // shards, *x.shape[1:]), x.dtype)
    extra = () if key is None else (key,)
    labelled = num_classes is not None
    closed, paths = graph.trace_jaxpr(apply_fn, params, local, *extra)
    leaves = jax.tree.leaves(params)
    ranks = {p: len(getattr(leaf, "shape", ())) for p, leaf in zip(paths, leaves, strict=True)}
    uses, skipped = _select(
        graph.uses_in_jaxpr(closed, paths),
        graph.opaque_uses(closed, paths),
        ranks,
        labelled=labelled,
    )
    if only is not None:
        uses = {p: u for p, u in uses.items() if p in only}
        skipped = {p: r for p, r in skipped.items() if p in only}
    if iteration is not None:
        unstacked = sorted(p for p, u in uses.items() if any(use.stacked is None for use in u))
        if unstacked:
            raise ValueError(
                f"iteration= calibrates weights a scan runs over, but {unstacked} are not "
                "(name only stacked weights in paths=)"
            )
    examples = _example_dims(apply_fn, params, local, extra, paths, uses) if labelled else {}
    sites = {
        path: [
            _Site(
                use,
                _rows(use) * shards,
                examples.get((path, i), (None, 1))[0],
                examples.get((path, i), (None, 1))[1],
                one_iteration=iteration is not None,
            )
            for i, use in enumerate(path_uses)
        ]
        for path, path_uses in uses.items()
    }
    treedef = jax.tree_util.tree_structure(params)

    def local_sums(flat_params, x, onehot, *extra):
        tree = jax.tree_util.tree_unflatten(treedef, flat_params)
        here, _ = graph.trace_jaxpr(apply_fn, tree, x, *extra)
        found = graph.uses_in_jaxpr(here, paths)
        matched = {}
        for path, path_sites in sites.items():
            again = found[path]
            if [(u.primitive, u.contracting_axes) for u in again] != [
                (s.use.primitive, s.use.contracting_axes) for s in path_sites
            ]:
                raise ValueError(f"{path}: the model traces differently inside the step")
            matched[path] = [
                dataclasses.replace(s, use=u) for s, u in zip(path_sites, again, strict=True)
            ]
        wanted = [(s.use.site, 1 - s.use.operand) for ss in matched.values() for s in ss]
        flat_args = [*flat_params, *jax.tree_util.tree_leaves((x, *extra))]
        acts = graph.capture(here, wanted, *flat_args, iteration=iteration)
        sums = {}
        for path, path_sites in matched.items():
            acc: dict[str, jax.Array] = {}
            for s in path_sites:
                one = _site_sums(s, acts[(s.use.site, 1 - s.use.operand)], onehot)
                acc = {k: acc[k] + v if k in acc else v for k, v in one.items()}
            sums[path] = acc
        if axis is not None:
            sums = lax.psum(sums, axis)
        return sums

    if mesh is None:
        partial_sums = local_sums
        out_sharding = None
    else:
        partial_sums = jax.shard_map(
            local_sums,
            mesh=mesh,
            in_specs=(P(), P(axis), P(axis), *(P() for _ in extra)),
            out_specs=P(),
            axis_names={axis},
            # the replayed primitives are bound directly, without jnp's pvary insertion
            check_vma=False,
        )
        out_sharding = NamedSharding(mesh, P())

    def step(flat_params, totals, x, labels, index, key):
        onehot = None
        if labels is not None:
            onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
        extra = () if key is None else (jax.random.fold_in(key, index),)
        sums = partial_sums(flat_params, x, onehot, *extra)
        return jax.tree_util.tree_map(jnp.add, totals, sums)

    return _Plan(sites, jax.jit(step, out_shardings=out_sharding)), skipped


def calibrate(
    apply_fn: Callable[..., Any],
    params: Any,
    batches: Iterable[Any],
    *,
    labels: Iterable[Any] | None = None,
    num_classes: int | None = None,
    key: jax.Array | None = None,
    mesh: Mesh | None = None,
    paths: Collection[str] | None = None,
    iteration: int | None = None,
    progress: bool = False,
) -> Any:
    """Streams batches through the model and returns each weight's :class:`InputStats`.

    ``apply_fn(params, x)`` is traced once per batch shape (see
    :func:`jaxcompress.graph.trace_uses`); for every weight consumed by a
    ``dot_general`` or a convolution as the kernel, the rows of input features its
    matrix view sees (Dense: every token's activation; conv: the im2col patch of every
    output position, ordered like ``kernel.reshape(h * w * in, out)``) are summed per
    batch by one jitted function per batch shape, in float32, and divided at the end.
    A weight used more than once (tied) pools the rows of all its uses.

    A weight stored output first (equinox's ``(out, in)`` ``Linear``, ``(out, in, h, w)``
    ``Conv``) contracted over its trailing axes gets statistics of those axes' features,
    marked ``trailing=True``. Weights whose uses cannot be put in that form are left out
    with a warning: contracted axes that are neither the leading nor the trailing ones,
    grouped/depthwise convolutions, a weight with ``dot_general`` batch
    axes, or one reached only through a reshape that splits its axes.

    Inside the model, ``jit``, ``remat``, ``custom_jvp`` and ``custom_vjp`` bodies are
    seen through, and so are ``shard_map`` bodies for a weight passed in replicated:
    the per-device inputs are gathered over the mesh axes they vary along, so each row
    counts once. A weight is left out with a warning naming it, never calibrated on
    part of its uses, when the ``shard_map`` splits it across devices or runs with
    ``check_vma=False`` or nested in another, when it is used inside a ``shard_map``
    and ``labels`` are given, or when it (2-D or more) enters code that is not read:
    a Pallas kernel, a ``while``/``cond`` body, an ``ffi_call``, a ``scan`` it is passed
    to whole (a constant or a carry of the loop).

    A weight a ``scan`` runs over (stacked layers: ``nn.scan``, ``lax.scan`` over a
    stacked state, one slice per iteration) is calibrated slice by slice: its
    :class:`InputStats` carry a leading axis with each slice's statistics and name the
    weight's stacked axis in ``stacked`` (:func:`slice_stats` takes one out). Such
    statistics feed :func:`jaxcompress.sequential`; the data-aware transforms read
    one ``(m, m)`` Gram per leaf and refuse them.

    Args:
        apply_fn: ``apply_fn(params, x) -> output``, or ``apply_fn(params, x, key)`` when
            ``key`` is given. For nnx, ``graphdef, state = nnx.split(model)`` and
            ``apply_fn = lambda s, x: nnx.merge(graphdef, s)(x)`` with ``params=state``.
        params: the parameter pytree (linen params, ``nnx.State``, dict, an equinox
            module); may be sharded. Leaves that are not arrays are passed through to
            ``apply_fn`` as they are.
        batches: an iterable of input arrays ``(batch, *features)``, all of one dtype.
            The shapes may vary, feature dims included (sentences grouped by length,
            each group one batch without padding): each distinct shape is traced and
            compiled once, and every batch's rows are pooled into one sum per weight,
            so the result is that of all rows together, whatever batches they came in.
            Every shape must reach the same weights, with the same input features.
        labels: optional iterable of integer arrays ``(batch,)``, one per batch, in the
            same order, for the class-conditional statistics. The rows a weight sees
            are attributed to their example's class; the examples' dim of its input is
            found by tracing once more with twice the batch size (a dim that merges
            examples with tokens, ``(batch * tokens, d)``, must be batch-major).
        num_classes: number of classes; with ``labels`` and ``None``, the labels are
            read first and ``max + 1`` is used.
        key: optional PRNG key for stochastic models: batch ``i`` gets
            ``jax.random.fold_in(key, i)`` as the third argument of ``apply_fn``.
        mesh: optional mesh for data parallelism: each batch (and its labels) is
            sharded over the mesh's first axis (the batch size must divide by its size)
            and every device runs the model on its share inside a :func:`jax.shard_map`
            that is manual over that axis only (params replicated over it; sharding
            over the other axes is kept); the sums are ``psum``-reduced across devices
            and come back replicated.
        paths: calibrate only the weights at these paths (``a/b/kernel``); the others
            get ``None``, and nothing is computed for them.
        iteration: for weights a ``scan`` runs over (``paths`` must name only such
            weights), the statistics of slice ``iteration`` alone, not stacked: the
            model runs only up to that iteration of the scan (counted from the end for
            a reverse scan), so later layers cost nothing.
        progress: show a rich progress bar over the batches.

    Returns:
        A pytree laid out like ``params`` (an ``nnx.State`` stays an ``nnx.State``) with
        an :class:`InputStats` for each calibrated weight and ``None`` elsewhere; read it
        with :func:`stats_by_path`. ``class_mean`` rows of classes never seen are zero.

    Raises:
        ValueError: for no batches, a batch whose dtype differs from the first one's,
            a batch shape that reaches other weights than the first one's (or the same
            weights with other input features), labels that are not integers in
            ``[0, num_classes)`` of shape ``(batch,)``, labels that do not pair up with
            the batches, a batch size the mesh does not divide, or (with labels) a
            weight whose input has no recognisable examples' dim (the error names its
            path).
        TypeError: for a batch that is not one array (for example an ``(x, y)`` pair).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jaxcompress.examples.models import LeNet300100
        >>> model = LeNet300100()
        >>> x = jax.random.normal(jax.random.key(0), (32, 64))
        >>> params = jax.jit(model.init)(jax.random.key(1), x)["params"]
        >>> data = calibrate(lambda p, x: model.apply({"params": p}, x), params,
        ...                  [x[:16], x[16:]], labels=[jnp.arange(16) % 3] * 2)
        >>> s = stats_by_path(data)["dense2/kernel"]
        >>> float(s.count), s.mean.shape, s.gram.shape, s.class_mean.shape
        (32.0, (300,), (300, 300), (3, 300))
        >>> data["dense1"]["bias"] is None
        True
    """
    if isinstance(paths, str):
        raise TypeError(f"paths must be a collection of leaf paths, got the string {paths!r}")
    paths = None if paths is None else set(paths)
    # Only arrays cross the jit boundary; other leaves (an equinox module's activation)
    # are bound into the function, and get None in the result.
    params, rest = split_arrays(params)
    apply_fn = on_arrays(apply_fn, rest)
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    flat_params = [leaf for _, leaf in flat]
    if labels is not None and num_classes is None:
        labels = [np.asarray(y) for y in labels]
        if not labels:
            raise ValueError("labels is empty")
        num_classes = int(max(int(y.max()) if y.size else -1 for y in labels)) + 1
    if num_classes is not None and num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    # Read only where labels are given, which set num_classes above.
    n_classes = num_classes or 0
    label_iter = None if labels is None else iter(labels)
    data_axis = None if mesh is None else mesh.axis_names[0]
    replicated = None if mesh is None else NamedSharding(mesh, P())
    if key is not None and replicated is not None:
        key = jax.device_put(key, replicated)

    plans: dict[tuple[int, ...], _Plan] = {}
    first: Any = None  # the first batch's dtype
    calibrated: dict[str, list[Any]] | None = None
    geometry: dict[str, tuple] = {}
    totals: dict[str, dict[str, Any]] = {}  # numpy zeros until the first step
    counts: dict[str, int] = {}
    class_counts: dict[str, np.ndarray] = {}

    try:
        total = len(batches)  # type: ignore[arg-type]
    except TypeError:
        total = None
    bar = None
    if progress:
        from rich.progress import Progress

        bar = Progress(transient=False)
        task = bar.add_task("calibrating", total=total)
        bar.start()
    n_batches = 0
    try:
        for index, x in enumerate(batches):
            x = _check_batch(x, first, index)
            if first is None:
                first = np.dtype(x.dtype)
            batch = x.shape[0]
            y = None
            if label_iter is not None:
                try:
                    y = next(label_iter)
                except StopIteration:
                    raise ValueError(f"labels ran out at batch {index}") from None
                y = _check_labels(y, batch, n_classes, index)
            if mesh is not None:
                size = mesh.shape[data_axis]
                if batch % size:
                    raise ValueError(
                        f"batch {index} has {batch} examples, which mesh axis "
                        f"{data_axis!r} of size {size} does not divide"
                    )
                sharding = NamedSharding(mesh, P(data_axis))
                x = jax.device_put(x, sharding)
            else:
                sharding = None
                x = jnp.asarray(x)
            plan = plans.get(tuple(x.shape))
            if plan is None:
                classes = None if y is None else num_classes
                try:
                    plan, skipped = _build_plan(
                        apply_fn, params, x, key, classes, mesh, paths, iteration
                    )
                except Exception as error:
                    if not plans:  # the first shape: the model's own error
                        raise
                    # A later shape: say so, the model's error alone would not.
                    raise ValueError(
                        f"batch {index} of shape {tuple(x.shape)} cannot be calibrated "
                        f"like the first batch, of shape {next(iter(plans))}: "
                        f"{type(error).__name__}: {error}"
                    ) from error
                if calibrated is None:
                    for path, reason in skipped.items():
                        warnings.warn(f"calibrate: not calibrating {path}: {reason}", stacklevel=2)
                    calibrated = {p: [s.use for s in ss] for p, ss in plan.sites.items()}
                    geometry = _geometry(plan.sites)
                    for path, path_sites in plan.sites.items():
                        m = _features(path_sites[0].use)
                        lead = () if iteration is not None else _stacked_length(path_sites[0].use)
                        zeros = {
                            "sum": np.zeros((*lead, m), np.float32),
                            "gram": np.zeros((*lead, m, m), np.float32),
                        }
                        if y is not None:
                            zeros["class_sum"] = np.zeros((*lead, n_classes, m), np.float32)
                        if replicated is not None:
                            zeros = jax.device_put(zeros, replicated)
                        totals[path] = zeros
                        counts[path] = 0
                        class_counts[path] = np.zeros(n_classes, np.int64)
                elif set(plan.sites) != set(calibrated):
                    raise ValueError(
                        f"batch {index} of shape {tuple(x.shape)} traces to different "
                        f"calibrated weights: {sorted(plan.sites)} vs {sorted(calibrated)}"
                    )
                elif (now := _geometry(plan.sites)) != geometry:
                    bad = sorted(p for p in now if now[p] != geometry[p])
                    raise ValueError(
                        f"batch {index} of shape {tuple(x.shape)} uses {bad} differently "
                        "from the first batch (input features, fan-in side or stacking), "
                        "so their statistics cannot be pooled"
                    )
                plans[tuple(x.shape)] = plan
            y_dev = y if y is None or sharding is None else jax.device_put(y, sharding)
            totals = plan.step(flat_params, totals, x, y_dev, np.int32(index), key)
            for path, path_sites in plan.sites.items():
                for s in path_sites:
                    counts[path] += s.rows
                    if y is not None:
                        per_row = s.rows // batch
                        class_counts[path] += np.bincount(y, minlength=n_classes) * per_row
            n_batches += 1
            if bar is not None:
                bar.advance(task)
    finally:
        if bar is not None:
            bar.stop()
    if n_batches == 0:
        raise ValueError("batches is empty: calibrate needs at least one batch")
    if label_iter is not None and next(label_iter, None) is not None:
        raise ValueError(f"there are more labels than the {n_batches} batches")

    assert calibrated is not None  # set by the first batch
    stats = {
        path: dataclasses.replace(
            _finish(
                acc,
                np.float32(counts[path]),
                class_counts[path].astype(np.float32) if "class_sum" in acc else None,
            ),
            trailing=graph.fan_in_axes(calibrated[path][0]) is None,
            stacked=None if iteration is not None else calibrated[path][0].stacked,
        )
        for path, acc in totals.items()
    }
    return jax.tree_util.tree_map_with_path(lambda p, _: stats.get(path_to_str(p)), params)


@jax.jit
def _finish(acc: dict[str, jax.Array], count: jax.Array, class_count: jax.Array | None):
    """Divides the accumulated sums into an :class:`InputStats`."""
    class_mean = None
    if class_count is not None:
        class_mean = acc["class_sum"] / jnp.maximum(class_count, 1.0)[:, None]  # (..., c, m)
    return InputStats(
        count=count,
        mean=acc["sum"] / count,
        gram=acc["gram"] / count,
        class_count=class_count,
        class_mean=class_mean,
    )


def _stacked_length(use: Any) -> tuple[int, ...]:
    """``(layers,)`` for a use of one slice of a stacked weight, else ``()``."""
    return () if use.stacked is None else (use.weight_shape[use.stacked],)


def _features(use: Any) -> int:
    """``m``: the number of input features of a use."""
    return math.prod(use.weight_shape[a] for a in use.contracting_axes)
