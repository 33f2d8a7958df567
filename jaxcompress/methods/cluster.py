"""Weight sharing by 1-D k-means into :class:`~jaxcompress.Clustered` leaves.

The k-means numerics live in :mod:`jaxcompress.numerics.kmeans1d` (plain) and
:mod:`jaxcompress.numerics.weighted_kmeans` (weighted, and GPTQ with codebook
rounding); this module checks the options and the data, and builds the leaves.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import numbers
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.arrays import Clustered, Sparse
from jaxcompress.arrays.leading import from_leading, to_leading
from jaxcompress.calibration.calibrate import InputStats
from jaxcompress.calibration.lookup import LeafGram, leaf_gram, require_data
from jaxcompress.core.bitpack import pack, packed_length
from jaxcompress.core.checks import is_traced
from jaxcompress.core.mesh import place_like, unsharded
from jaxcompress.core.paths import path_to_str
from jaxcompress.numerics import kmeans1d
from jaxcompress.numerics.obs import (
    check_block_size,
    check_damp,
    check_factorized,
    mesh_scope,
    relative_output_error,
)
from jaxcompress.numerics.weighted_kmeans import codebook_gptq, fit_weighted
from jaxcompress.transforms.base import Transform
from jaxcompress.transforms.engine import per_leaf
from jaxcompress.transforms.filters import Filter, kernels
from jaxcompress.transforms.stats import ClusterStats

_INITS = ("linear", "density", "kmeans++", "random")
_METHODS = ("lloyd", "optimal", "gptq")
_WEIGHTS = (None, "hessian", "fisher")
_KEYED_INITS = ("kmeans++", "random")


def cluster_array(
    weight: jax.Array,
    *,
    k: int,
    init: str = "linear",
    per_channel: bool = False,
    method: str = "lloyd",
    max_iter: int = 1000,
    tol: float = 1e-6,
    codebook_dtype: jax.typing.DTypeLike = jnp.float32,
    key: jax.Array | None = None,
    weights: jax.Array | None = None,
    gram: jax.Array | None = None,
    damp: float | jax.Array = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    count: jax.Array | None = None,
    non_finite: bool = False,
) -> tuple[Clustered, dict]:
    """Clusters one array into a :class:`~jaxcompress.Clustered` leaf.

    The arguments are those of :func:`cluster`, already validated, plus the data:
    ``weights`` (shaped like ``weight``) are each entry's sensitivity for weighted
    k-means (see :mod:`jaxcompress.weighted_kmeans`); ``gram`` is the ``(m, m)`` input
    Gram of ``weight``'s matrix view ``weight.reshape(m, -1)``, which
    ``method="gptq"`` sweeps (and which adds ``"relative_output_error"`` to the
    stats). ``count`` (histogram path only) says that a 1-D ``weight`` holds ``count``
    real values followed by padding copies of its first value; the padding changes
    nothing but the shape, and gets code 0. Works under ``jit``.

    ``non_finite=True`` (for a traced leaf, which may hold NaN or Inf) fits the
    codebook with each non-finite entry standing in as one value far above the finite
    ones (per channel with ``per_channel``), which k-means gives a centroid of its
    own, then sets that centroid to NaN (the whole codebook with ``method="gptq"``).

    Returns:
        ``(leaf, stats)`` with stats ``{"k", "inertia", "relative_error",
        "iterations", "distinct"}`` (arrays, except ``k``); with ``weights`` also
        ``"weighted_relative_error"``, with ``gram`` ``"relative_output_error"``, with
        ``method="gptq"`` ``"damping"`` and ``"factorized"``.

    Example:
        >>> import jax.numpy as jnp
        >>> leaf, stats = cluster_array(jnp.array([[0.0, 0.1], [2.0, 2.1]]), k=2)
        >>> [round(c, 3) for c in leaf.codebook.tolist()], int(stats["iterations"]) > 0
        ([0.05, 2.05], True)
        >>> leaf, _ = cluster_array(jnp.array([[0.0, 0.1], [2.0, 2.1]]), k=2,
        ...                         weights=jnp.array([[1.0, 3.0], [1.0, 1.0]]))
        >>> [round(c, 3) for c in leaf.codebook.tolist()]
        [0.075, 2.05]
    """
    shape = tuple(weight.shape)
    per_channel = per_channel and len(shape) >= 2
    gptq = method == "gptq"
    # GPTQ fits its codebook as method="lloyd" does, then sweeps the rows.
    fit_method = "lloyd" if gptq else method
    data_aware = gptq or weights is not None
    histogram = (
        not per_channel
        and not data_aware
        and kmeans1d.uses_histogram(math.prod(shape), method, init)
    )
    if not histogram:
        # Sorting (and per-channel regrouping) needs the leaf in one piece.
        weight = unsharded(weight)
    values = weight.astype(jnp.float32)
    # (finite entries, stand-in value) of a leaf that may hold NaN or Inf.
    outlier: tuple[jax.Array, jax.Array] | None = None
    if non_finite:
        values, finite, stand_in = _outlier_stand_in(values, per_channel=per_channel)
        outlier = (finite, stand_in)
    bits = max(1, (k - 1).bit_length())
    options = kmeans1d.FitOptions(
        k=k,
        init=init,
        method=fit_method,
        max_iter=max_iter,
        tol=tol,
        codebook_dtype=np.dtype(codebook_dtype),
    )
    fit = functools.partial(kmeans1d.fit, **options)
    if weights is not None:
        weights = unsharded(weights).astype(jnp.float32).reshape(shape)
        weighted_fit = functools.partial(fit_weighted, **options)

    def fit_one(x, w, key):
        return fit(x, key) if w is None else weighted_fit(x, w, key)

    with mesh_scope(weight) if data_aware else contextlib.nullcontext():
        if per_channel:
            channels = values.reshape(-1, shape[-1]).T
            keys = None if key is None else jax.random.split(key, shape[-1])
            channel_weights = None if weights is None else weights.reshape(-1, shape[-1]).T
            if method == "optimal":
                # The DP holds a P x P table; one channel at a time bounds the memory.
                codebook, iterations, distinct = jax.lax.map(
                    lambda a: fit_one(*a), (channels, channel_weights, keys)
                )
            else:
                codebook, iterations, distinct = jax.vmap(fit_one)(channels, channel_weights, keys)
            iterations, distinct = jnp.max(iterations), jnp.min(distinct)
        elif histogram:
            # Kept in its own shape (and sharding): nothing here flattens or gathers it.
            codebook, iterations, distinct = fit(values, key, histogram=True, count=count)
        elif weights is None:
            codebook, iterations, distinct = fit(values.reshape(-1), key, histogram=False)
        else:
            codebook, iterations, distinct = weighted_fit(
                values.reshape(-1), weights.reshape(-1), key
            )
        extra: dict[str, Any] = {}
        if gptq:
            # cluster() always passes the Gram with method="gptq" (it requires data=).
            assert gram is not None
            codes, approx, extra = codebook_gptq(
                values.reshape(gram.shape[0], -1),
                unsharded(gram),
                codebook,
                damp=damp,
                block_size=block_size,
                act_order=act_order,
            )
            codes, approx = codes.reshape(shape), approx.reshape(shape)
        elif per_channel:
            codes = jax.vmap(kmeans1d.assign)(channels, codebook).T.reshape(shape)
            channel = jnp.arange(shape[-1], dtype=jnp.int32)
            flat = codes.reshape(-1, shape[-1]).astype(jnp.int32)
            approx = codebook.astype(jnp.float32)[channel[None, :], flat].reshape(shape)
        elif histogram:
            low, high = jnp.min(values), jnp.max(values)
            codes, inertia = kmeans1d.assign_blocks(values, codebook, low, high, count)
        else:
            codes = kmeans1d.assign(values, codebook)
            approx = jnp.take(codebook.astype(jnp.float32), codes.astype(jnp.int32))
    if outlier is not None:
        finite, stand_in = outlier
        codebook = _poison_centroids(
            codebook, stand_in, finite, per_channel=per_channel, whole=gptq
        )
    if not histogram:
        inertia = jnp.sum(jnp.square(values - approx))
    squares = jnp.square(values)
    if count is not None:
        squares = squares * kmeans1d.valid_entries(values, count)
    norm = jnp.sqrt(jnp.sum(squares))
    relative = jnp.where(norm > 0, jnp.sqrt(inertia) / jnp.maximum(norm, 1e-30), 0.0)
    leaf = Clustered(pack(codes, bits), codebook, shape, np.dtype(weight.dtype), bits)
    stats = {
        "k": k,
        "inertia": inertia,
        "relative_error": relative,
        "iterations": iterations,
        "distinct": distinct,
    }
    if weights is not None:
        w = jnp.maximum(weights, 0.0)
        total = jnp.sum(w * jnp.square(values))
        safe = jnp.where(total > 0, total, 1.0)
        error = jnp.sum(w * jnp.square(values - approx))
        stats["weighted_relative_error"] = jnp.where(total > 0, jnp.sqrt(error / safe), 0.0)
    if gram is not None and not gptq:
        m = gram.shape[0]
        stats["relative_output_error"] = relative_output_error(
            values.reshape(m, -1), approx.reshape(m, -1), unsharded(gram)
        )
    return leaf, {**stats, **extra}


# Compiled once per shape and options, so eager calls do not retrace the loops;
# under an outer jit it is simply inlined.
cluster_array_compiled = jax.jit(
    cluster_array,
    static_argnames=(
        "k",
        "init",
        "per_channel",
        "method",
        "max_iter",
        "tol",
        "codebook_dtype",
        "block_size",
        "act_order",
        "non_finite",
    ),
)


def _outlier_stand_in(
    values: jax.Array, *, per_channel: bool
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(values, finite, stand_in)``: NaN and Inf replaced by a value far above the rest.

    More than three ranges above the largest finite value, the stand-in is nearer its
    own centroid than any finite value can be, so k-means fits the finite values with
    the other ``k - 1`` centroids as if the non-finite entries were not there.
    """
    finite = jnp.isfinite(values)
    axes = tuple(range(values.ndim - 1)) if per_channel else None
    high = jnp.max(jnp.where(finite, values, -jnp.inf), axis=axes, keepdims=True)
    low = jnp.min(jnp.where(finite, values, jnp.inf), axis=axes, keepdims=True)
    some_finite = jnp.isfinite(high)
    high = jnp.where(some_finite, high, jnp.zeros_like(high))
    low = jnp.where(some_finite, low, jnp.zeros_like(low))
    stand_in = high + 3 * (high - low) + jnp.abs(high) + 1
    return jnp.where(finite, values, stand_in), finite, stand_in


def _poison_centroids(
    codebook: jax.Array, stand_in: jax.Array, finite: jax.Array, *, per_channel: bool, whole: bool
) -> jax.Array:
    """NaN in the centroid the stand-in of a non-finite entry takes, per leaf or channel.

    Every such entry holds the stand-in, so all take its centroid; no scatter over the
    (possibly sharded) codes is needed. ``whole=True`` (GPTQ, whose sweep moves the
    stand-ins) makes the whole codebook NaN instead.
    """
    positions = jnp.arange(codebook.shape[-1], dtype=jnp.int32)
    if per_channel:
        holds = ~jnp.all(finite.reshape(-1, codebook.shape[0]), axis=0)[:, None]
        code = jax.vmap(kmeans1d.assign)(stand_in.reshape(-1, 1), codebook)
        positions = positions[None, :]
    else:
        holds = ~jnp.all(finite)
        code = kmeans1d.assign(stand_in.reshape(1), codebook)
    hit = jnp.ones(codebook.shape, bool) if whole else positions == code.astype(jnp.int32)
    return jnp.where(hit & holds, jnp.full_like(codebook, jnp.nan), codebook)


def bucket_length(n: int) -> int:
    """``n`` rounded up to one of 8 lengths per power of two (at most 1/8 more).

    Example:
        >>> bucket_length(16), bucket_length(17), bucket_length(1000)
        (16, 18, 1024)
    """
    step = 1 << max(0, n.bit_length() - 4)
    return -(-n // step) * step


def _pads_to_bucket(weight, sparse, data_args, options) -> bool:
    """Whether a Sparse leaf's kept values go through the histogram path padded.

    Under a global threshold every leaf keeps a different count of values, and
    compiling the clustering once per count dominated big models; padded to a few
    bucket lengths, leaves share programs. Only eager, unsharded, plain histogram runs.
    """
    return (
        sparse is not None
        and not data_args
        and not is_traced(weight)
        and _in_one_piece(weight)
        and kmeans1d.uses_histogram(weight.shape[0], options["method"], options["init"])
        and bucket_length(weight.shape[0]) != weight.shape[0]
    )


def _in_one_piece(x: Any) -> bool:
    """Whether ``x`` sits on one device; a host (NumPy) array has no sharding and does."""
    sharding = getattr(x, "sharding", None)
    return sharding is None or len(sharding.device_set) == 1


def _cluster_padded(values: jax.Array, options: dict, key) -> tuple[Clustered, dict]:
    """:func:`cluster_array` on 1-D ``values`` padded to a bucket length, then cut back."""
    n = values.shape[0]
    padded = _pad_with_first(values, size=bucket_length(n))
    leaf, stats = cluster_array_compiled(padded, **options, key=key, count=jnp.int32(n))
    indices = jax.lax.slice(leaf.indices, (0,), (packed_length(n, leaf.bits),))
    return dataclasses.replace(leaf, indices=indices, shape=(n,)), stats


@functools.partial(jax.jit, static_argnames=("size",))
def _pad_with_first(values: jax.Array, *, size: int) -> jax.Array:
    """``values`` then copies of its first value up to ``size``, as one program.

    Every kept count needs its own program; one (not three eager ops) holds less
    compiled code per leaf.
    """
    n = values.shape[0]
    return jnp.concatenate([values, jnp.broadcast_to(values[:1], (size - n,))])


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"cluster: {name} must be an integer, got {value!r}")
    return int(value)


def _replicated(x: jax.Array, reference) -> jax.Array:
    """Codebooks are tiny and read by every shard: replicate them on the weight's mesh."""
    if reference is None:
        return x
    return place_like(x, jax.sharding.NamedSharding(reference.mesh, jax.sharding.PartitionSpec()))


def _placed(leaf: Clustered, reference) -> Clustered:
    return Clustered(
        place_like(leaf.indices, reference),
        _replicated(leaf.codebook, reference),
        leaf.shape,
        leaf.dtype,
        leaf.bits,
    )


def _data_leaves(data: Any) -> dict[str, Any]:
    """The leaves of a ``data=`` pytree by path, :class:`InputStats` kept whole."""
    flat, _ = jax.tree_util.tree_flatten_with_path(
        data, is_leaf=lambda x: isinstance(x, InputStats)
    )
    return {path_to_str(path): leaf for path, leaf in flat}


def _leaf_gram(name: str, option: str, path: str, found: Any, by_path: dict, shape) -> LeafGram:
    """The Gram of leaf ``path`` from calibration statistics (``found`` is what ``data=``
    holds at that path), with errors naming it."""
    if found is not None and not isinstance(found, InputStats):
        raise ValueError(
            f"{name}: {option} reads calibration statistics (InputStats from "
            f"jaxcompress.calibrate) for leaf {path!r}, but data= holds an array of shape "
            f"{tuple(getattr(found, 'shape', ()))} there; a per-weight Fisher diagonal goes "
            "with weights='fisher'"
        )
    return leaf_gram(name, option, path, by_path, shape)


def _fisher_weights(name: str, path: str, found: Any, shape) -> jax.Array:
    """The Fisher diagonal of leaf ``path`` from ``data=``, checked against its shape."""
    if found is None:
        raise ValueError(
            f"{name}: weights='fisher' but data= has no Fisher diagonal for leaf {path!r}; "
            "give an array shaped like it (see jaxcompress.fisher_diagonal) or "
            "exclude it with where="
        )
    if isinstance(found, InputStats):
        raise ValueError(
            f"{name}: weights='fisher' needs the Fisher diagonal of leaf {path!r} (an array "
            f"of its shape {tuple(shape)}), but data= holds calibration statistics "
            "(InputStats) there; those are for weights='hessian' and method='gptq'"
        )
    found_shape = tuple(getattr(found, "shape", ()))
    if found_shape != tuple(shape) or not jnp.issubdtype(
        getattr(found, "dtype", np.float32), jnp.number
    ):
        raise ValueError(
            f"{name}: the Fisher diagonal in data= for leaf {path!r} has shape {found_shape}, "
            f"but the leaf has shape {tuple(shape)}; it needs one value per weight"
        )
    if not is_traced(found) and not bool(jnp.all(jnp.isfinite(found) & (found >= 0))):
        raise ValueError(
            f"{name}: the Fisher diagonal of leaf {path!r} has NaN, Inf or negative values"
        )
    return jnp.asarray(found)


def _kept(values: jax.Array, sparse: Sparse) -> jax.Array:
    """The entries of ``values`` (shaped like ``sparse``) at its kept positions, in order."""
    keep = sparse.keep_mask().reshape(-1)
    (index,) = jnp.nonzero(keep, size=sparse.nnz, fill_value=0)
    return unsharded(values).reshape(-1)[index]


def fisher_diagonal(
    loss_fn: Callable[[Any, Any], jax.Array], params: Any, batches: Iterable[Any]
) -> Any:
    """The per-weight Fisher diagonal for ``cluster(weights="fisher")``: mean squared gradients.

    For each batch, ``jax.grad(loss_fn)(params, batch)`` is squared entry by entry;
    the result is the mean over the batches, laid out like ``params`` (float32). With
    one example per batch this is the empirical Fisher diagonal ``E[g²]`` (SqueezeLLM's
    sensitivity); larger batches square each batch's mean gradient. The gradient is
    compiled once per batch shape.

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar``.
        params: the parameter pytree (linen params, ``nnx.State``, dict) of floats.
        batches: an iterable of batches, each passed to ``loss_fn`` as it is (an
            array, a tuple of inputs and labels, ...).

    Returns:
        A pytree like ``params`` of float32 arrays: pass it as ``data=``.

    Raises:
        ValueError: ``batches`` is empty.

    Example:
        >>> import jax.numpy as jnp
        >>> params = {"w": jnp.array([[1.0, 2.0], [3.0, 4.0]])}
        >>> batches = [jnp.array([[1.0, 0.0]]), jnp.array([[0.0, 2.0]])]
        >>> loss = lambda p, x: jnp.sum(x @ p["w"])
        >>> fisher_diagonal(loss, params, batches)["w"].tolist()
        [[0.5, 0.5], [2.0, 2.0]]
    """
    grad = jax.jit(jax.grad(loss_fn))
    total, count = None, 0
    for batch in batches:
        squared = jax.tree.map(lambda g: jnp.square(g.astype(jnp.float32)), grad(params, batch))
        total = squared if total is None else jax.tree.map(jnp.add, total, squared)
        count += 1
    if total is None:
        raise ValueError("fisher_diagonal: batches is empty; give at least one batch")
    return jax.tree.map(lambda t: t / np.float32(count), total)


def cluster(
    bits: int | None = None,
    *,
    k: int | None = None,
    init: str = "linear",
    per_channel: bool = False,
    method: str = "lloyd",
    max_iter: int = 1000,
    tol: float = 1e-6,
    codebook_dtype: jax.typing.DTypeLike = jnp.float32,
    weights: str | None = None,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    where: Filter = kernels,
    progress: bool = False,
) -> Transform:
    """Weight sharing: 1-D k-means of each selected leaf into a codebook and indices.

    Each selected leaf becomes a :class:`~jaxcompress.Clustered` leaf: ``ceil(log2 k)``
    -bit indices, bit-packed, plus a sorted codebook. A selected
    :class:`~jaxcompress.Sparse` leaf (from :func:`jaxcompress.prune`) has only its
    kept values clustered and stays sparse, so its zeros stay exact:
    ``chain(prune(0.9), cluster(bits=5))`` is Deep Compression's first two stages.

    ``method="lloyd"`` sorts the values once, takes prefix sums, and iterates
    ``k - 1`` binary searches for the midpoints between centroids plus prefix-sum
    differences: ``O(k log n)`` per iteration after an ``O(n log n)`` sort. It
    stops when no centroid moves more than ``tol * (max - min)`` or after
    ``max_iter`` iterations. An empty cluster never yields NaN: it keeps its
    centroid, or (one per iteration) moves into the widest populated cluster, which
    can only lower the error.

    Leaves of more than 65536 values with a ``"linear"`` or ``"density"`` init skip
    the sort: one pass bins them into ``B = 16384`` equal-width bins of width
    ``h = (max - min) / B``, Lloyd runs on the bins' means (weighted by their
    counts), then one exact Lloyd step on all values (assign, exact cluster means)
    and the final assignment. Each value is within ``h`` of its bin's mean, so the
    binned codebook's root-mean-square error on the data is at most its error on
    the bins plus ``h``; the exact step and reassignment can only lower it. Its
    ``"distinct"`` stat is then the number of occupied bins (a lower bound). This
    path keeps the leaf in its shape and never gathers a sharded leaf: on
    ``Explicit`` mesh axes each shard bins its block and ``psum``/``pmin``/``pmax``
    combine them; ``Auto`` shardings are partitioned by XLA. Its codes come out
    sharded like the leaf. (Partitioned sums round differently, so a sharded leaf's
    codebook matches an unsharded run's to float32 rounding.) Per-channel codebooks
    and the sorted path reshard a sharded leaf to replicated first.

    ``method="optimal"`` finds the globally optimal k-means of a weighted version of
    the data by an exact dynamic program, then polishes with Lloyd on the full data
    (which only lowers the error). Up to 2048 values the DP runs on the values
    themselves and the result is exact. Larger leaves are binned into 2048
    equal-width bins of width ``h``, each standing for its points by their mean;
    moving every point by at most ``h`` changes the root-mean-square error of any
    codebook by at most ``h``, so before the polish
    ``rms_error <= optimal_rms_error + 2 h`` (``h = (max - min) / 2048``). It ignores
    ``init``. Its DP costs ``O(k * 2048^2)`` time and ``O(2048^2)`` memory.

    ``weights=`` makes it sensitivity-weighted k-means (SqueezeLLM): the codebook
    minimizes ``Σ s_ij (w_ij − ŵ_ij)²``. Assignments stay nearest-centroid, so
    clusters are still runs of the sorted values and a centroid is its run's
    ``Σ s w / Σ s`` from weighted prefix sums (``"optimal"``: the same DP on prefix
    sums of ``s``, ``s w``, ``s w²``); weighted leaves always take the sorted path.
    ``s`` comes from ``data=``: ``"hessian"`` weighs every entry of row ``i`` of the
    ``(m, n)`` matrix view (input feature ``i``; ``m`` the fan-in read off the
    statistics, as for GPTQ) by ``G_ii``, the diagonal of its input Gram from
    :func:`jaxcompress.calibrate` (the OBS/GPTQ Hessian diagonal); ``"fisher"``
    reads, for each leaf, an array of its shape holding the per-weight Fisher
    diagonal (mean squared gradient), e.g. from :func:`fisher_diagonal`. Weights
    are rescaled first (:func:`jaxcompress.weighted_kmeans.normalized_weights`), so
    uniform weights give exactly plain k-means' codebook and indices. ``"linear"``
    and ``"random"`` inits ignore the weights; ``"density"`` takes weighted quantiles
    and ``"kmeans++"`` draws with probability ``~ s · D²``.

    ``method="gptq"`` (GPTQ with codebook rounding) first fits the codebook as
    ``"lloyd"`` does (with ``init`` and ``weights``), then sweeps the ``m`` rows of
    the matrix view in blocks of ``block_size`` as :func:`jaxcompress.quantize`'s
    GPTQ does, rounding each entry to its nearest codebook entry (its channel's, per
    channel) instead of to a uniform grid and feeding each row's error into the rows
    not yet rounded through the upper Cholesky factor of
    ``(G + damp · mean(diag G) · I)⁻¹``. It needs ``data=`` calibration statistics,
    lowers the layer's output error ``‖X W − X Ŵ‖`` rather than the weight error,
    and keeps the layout and ``nbytes`` of plain clustering. With a diagonal Gram it
    is plain nearest-centroid assignment of the fitted codebook.

    A leaf with at most ``k`` distinct values gets those values as its codebook
    (padded with the largest), so it is reconstructed exactly, and its stats get a
    ``"note"`` (outside ``jit``). On the histogram path this is decided from the
    histogram alone: at most ``k`` occupied bins, each holding a single value
    (``"iterations"`` is then 0). Distinct values closer than ``h`` can share a bin;
    such a leaf gets the binned Lloyd codebook instead, which need not be exact.

    NaN and Inf: an eager call raises. Under ``jax.jit`` every NaN or Inf entry is
    assigned a centroid of its own, which is NaN (per channel with
    ``per_channel=True``); the other ``k - 1`` centroids are fitted on the finite
    entries, which take the nearest of them. Only the non-finite entries materialize
    to NaN. ``method="gptq"``, whose sweep moves every entry, makes the whole codebook
    NaN. With ``weights=`` this is untested; wrap such calls in
    :func:`jaxcompress.checked` to raise instead.

    Args:
        bits: index width, 1 to 8; ``k = 2**bits``. Give exactly one of ``bits``, ``k``.
        k: number of clusters, 2 to 256.
        init: Lloyd's starting centroids. ``"linear"`` (evenly spaced between min
            and max, Deep Compression's best), ``"density"`` (evenly spaced
            quantiles), ``"kmeans++"`` (1-D k-means++ seeding, ``O(n k)``) or
            ``"random"`` (``k`` values drawn without replacement). The last two need
            ``key=``.
        per_channel: one codebook per output channel (the last axis), of shape
            ``(channels, k)``. Leaves with one dimension use one codebook.
        method: ``"lloyd"``, ``"optimal"`` or ``"gptq"`` (needs ``data=``
            calibration statistics; not with a ``Sparse`` leaf or ``weights="fisher"``).
        max_iter: most Lloyd iterations.
        tol: stop when the largest centroid move is at most ``tol * (max - min)``.
        codebook_dtype: the dtype the codebook is stored in; indices are assigned to
            the nearest stored centroid.
        weights: ``None`` (plain k-means), ``"hessian"`` (each weight by its input's
            ``G_ii``; ``data=`` from :func:`jaxcompress.calibrate`) or ``"fisher"``
            (``data=`` a pytree like the params holding each selected leaf's Fisher
            diagonal, see :func:`fisher_diagonal`). A ``Sparse`` leaf's kept values
            take the weights at their positions.
        damp: GPTQ's damping, relative to the mean diagonal of the Gram; the absolute
            ``λ`` added is reported in the stats. ``0`` needs a positive definite Gram.
        block_size: GPTQ's rows per block of lazy updates (the result does not depend
            on it beyond float rounding).
        act_order: GPTQ only: round the rows in order of decreasing ``diag(G)``.
        where: which leaves to cluster; by default floating leaves with ndim >= 2.

        progress: show a bar on stderr, by leaf and bytes, while it runs (not under
            ``jit``).
    Returns:
        A transform ``tx(params, *, key=None, data=None)`` returning
        ``(compressed, stats)``; ``stats`` maps each clustered leaf path to
        ``{"k", "inertia", "relative_error", "iterations", "distinct"}`` (plus
        ``"note"`` where there is something to say); with ``weights`` also
        ``"weighted_relative_error"`` (``√(Σ s e² / Σ s w²)``); with calibration
        statistics (``"hessian"``, GPTQ) ``"relative_output_error"``
        (``√(tr(Eᵀ G E) / tr(Wᵀ G W))``); with GPTQ ``"damp"``, ``"damping"`` (the ``λ``
        added) and ``"factorized"`` (whether the Cholesky factor was finite).

    Raises:
        ValueError: neither or both of ``bits`` and ``k``, ``k`` outside 2..256,
            ``bits`` outside 1..8, an unknown ``init``, ``method`` or ``weights``,
            ``method="gptq"`` with ``weights="fisher"``, ``act_order`` without GPTQ,
            bad ``damp`` or ``block_size``, a missing ``key`` for a random init, a
            selected scalar, empty or non-finite leaf; with ``weights`` or GPTQ: no
            ``data=``, no statistics (or Fisher diagonal) for a selected leaf, the
            wrong kind of them, statistics whose feature size fits no fan-in of the
            leaf, a Fisher diagonal of another shape, or (outside ``jit``) non-finite
            statistics or a Gram not positive definite after damping.
        TypeError: a selected integer leaf, a compressed leaf other than ``Sparse``,
            or a ``Sparse`` leaf with GPTQ.

    Example:
        >>> import jax
        >>> import jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> w = jax.random.normal(jax.random.key(0), (64, 32))
        >>> clustered, stats = jax.jit(jc.cluster(bits=4))({"dense": {"kernel": w}})
        >>> leaf = clustered["dense"]["kernel"]
        >>> leaf.codebook.shape, leaf.indices.shape, leaf.nbytes  # 64 * 16 + 16 * 4
        ((16,), (64, 16), 1088)
        >>> float(stats["dense/kernel"]["relative_error"]) < 0.15
        True
        >>> pruned, _ = jc.chain(jc.prune(0.9), jc.cluster(bits=5))({"w": w})
        >>> type(pruned["w"].values).__name__
        'Clustered'

        GPTQ with codebook rounding (here on a Hessian-weighted codebook), from the
        calibration statistics of a layer with correlated inputs:

        >>> model = lambda p, x: x @ p["dense"]["kernel"]
        >>> x = jax.random.normal(jax.random.key(1), (256, 8)) @ jax.random.normal(
        ...     jax.random.key(2), (8, 64))
        >>> params = {"dense": {"kernel": w}}
        >>> data = jc.calibrate(model, params, [x])
        >>> tx = jc.cluster(bits=3, method="gptq", weights="hessian")
        >>> gptq, gptq_stats = tx(params, data=data)
        >>> plain, _ = jc.cluster(bits=3)(params)
        >>> gptq["dense"]["kernel"].nbytes == plain["dense"]["kernel"].nbytes
        True
        >>> error = lambda t: float(jnp.linalg.norm(model(jc.materialize(t), x) - x @ w))
        >>> error(gptq) < error(plain)
        True

        Fisher-weighted (SqueezeLLM) from squared gradients:

        >>> from jaxcompress import fisher_diagonal
        >>> loss = lambda p, x: jnp.mean(jnp.square(model(p, x)))
        >>> fisher = fisher_diagonal(loss, params, [x[:128], x[128:]])
        >>> squeezed, stats = jc.cluster(bits=3, weights="fisher")(params, data=fisher)
        >>> sorted(stats["dense/kernel"])
        ['distinct', 'inertia', 'iterations', 'k', 'relative_error', 'weighted_relative_error']
    """
    if (bits is None) == (k is None):
        raise ValueError(f"cluster: give exactly one of bits and k, got bits={bits!r}, k={k!r}")
    if bits is not None:
        bits = _check_positive_int("bits", bits)
        if not 1 <= bits <= 8:
            raise ValueError(f"cluster: bits must be from 1 to 8, got {bits!r}")
        k = 2**bits
    k = _check_positive_int("k", k)
    if not 2 <= k <= 256:
        raise ValueError(f"cluster: k must be from 2 to 256 (8-bit indices), got k={k!r}")
    if init not in _INITS:
        raise ValueError(f"cluster: init must be one of {_INITS}, got {init!r}")
    if method not in _METHODS:
        raise ValueError(f"cluster: method must be one of {_METHODS}, got {method!r}")
    if weights not in _WEIGHTS:
        raise ValueError(f"cluster: weights must be one of {_WEIGHTS}, got {weights!r}")
    if method == "gptq" and weights == "fisher":
        raise ValueError(
            "cluster: method='gptq' reads calibration statistics from data= and "
            "weights='fisher' reads Fisher diagonals from it; one data= cannot hold both, "
            "so use weights='hessian' (or None) with GPTQ"
        )
    if not isinstance(act_order, bool | np.bool_):
        raise ValueError(f"cluster: act_order must be a bool, got {act_order!r}")
    if act_order and method != "gptq":
        raise ValueError("cluster: act_order=True only applies to method='gptq'")
    damp_value = check_damp("cluster", damp)
    block_size = check_block_size("cluster", block_size)
    max_iter = _check_positive_int("max_iter", max_iter)
    if max_iter < 1:
        raise ValueError(f"cluster: max_iter must be at least 1, got {max_iter!r}")
    if not isinstance(tol, numbers.Real) or not tol >= 0:
        raise ValueError(f"cluster: tol must be a non-negative number, got {tol!r}")
    dtype = np.dtype(codebook_dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"cluster: codebook_dtype must be floating, got {dtype.name}")
    needs_key = method != "optimal" and init in _KEYED_INITS
    name = f"cluster(k={k}, init={init}, method={method}, per_channel={per_channel})"
    if weights is not None:
        name = name[:-1] + f", weights={weights})"
    if act_order:
        name = name[:-1] + ", act_order=True)"
    gptq = method == "gptq"
    # The option that needs calibration statistics, for error messages.
    stats_option = "method='gptq'" if gptq else "weights='hessian'"
    needs_stats = gptq or weights == "hessian"
    options = dict(
        k=k,
        init=init,
        per_channel=per_channel,
        method=method,
        max_iter=max_iter,
        tol=float(tol),
        codebook_dtype=dtype,
    )
    if gptq:
        options.update(block_size=block_size, act_order=bool(act_order))

    def prepare(key, data):
        """``(by_path, found)``: the calibration statistics and ``data=`` leaves by path."""
        if needs_key and key is None:
            raise ValueError(f"cluster: init={init!r} draws random centroids; pass key=")
        if weights == "fisher" and data is None:
            raise ValueError(
                f"{name}: weights='fisher' needs data=, a pytree laid out like the params "
                "holding each selected leaf's Fisher diagonal (an array of the leaf's shape; "
                "see jaxcompress.fisher_diagonal)"
            )
        by_path = require_data(name, stats_option, data) if needs_stats else {}
        found = _data_leaves(data) if needs_stats or weights is not None else {}
        return by_path, found

    def check(entry, values, context):
        """Checks one selected leaf's data: ``(sparse, gram, weights)``."""
        by_path, found = context
        sparse = entry.leaf if isinstance(entry.leaf, Sparse) else None
        if gptq and sparse is not None:
            raise TypeError(
                f"{name}: leaf {entry.path!r} is Sparse; GPTQ needs the dense matrix "
                "(its kept values have no row layout): use method='lloyd' for it "
                "(exclude it with where=) or cluster before pruning"
            )
        shape = tuple(entry.leaf.shape)
        stats = None
        if needs_stats:
            stats = _leaf_gram(
                name, stats_option, entry.path, found.get(entry.path), by_path, shape
            )
        trailing = stats is not None and stats.trailing
        if trailing and gptq and per_channel:
            raise ValueError(
                f"{name}: leaf {entry.path!r} is contracted over its trailing axes (an "
                "(out, in) weight), whose output channels are not its last axis, where "
                "per_channel=True keeps one codebook each; use per_channel=False"
            )
        leaf_weights = None
        if weights == "hessian":
            # Each input feature's diagonal, over the weight's input axes.
            diagonal = jnp.maximum(jnp.diagonal(stats.gram).astype(jnp.float32), 0.0)
            outputs = math.prod(shape) // diagonal.shape[0]
            if trailing:
                leaf_weights = jnp.broadcast_to(diagonal[None, :], (outputs, diagonal.shape[0]))
            else:
                leaf_weights = jnp.broadcast_to(diagonal[:, None], (diagonal.shape[0], outputs))
            leaf_weights = leaf_weights.reshape(shape)
        elif weights == "fisher":
            leaf_weights = _fisher_weights(name, entry.path, found.get(entry.path), shape)
        # GPTQ rounds rows of inputs: a trailing-input weight is clustered inputs first.
        inputs = stats.fan_in if trailing and gptq else None
        if inputs is not None and leaf_weights is not None:
            leaf_weights = to_leading(leaf_weights, inputs)
        return sparse, None if stats is None else stats.gram, leaf_weights, inputs

    def step(item, leaf_key) -> tuple[Clustered, ClusterStats]:
        """One checked leaf clustered: ``(Clustered, leaf stats)``."""
        weight, (sparse, gram, leaf_weights, inputs) = item.weight, item.plan
        if inputs is not None:
            weight = to_leading(weight, inputs)
        data_args = {}
        if leaf_weights is not None:
            if sparse is not None:
                leaf_weights = _kept(leaf_weights, sparse)
            data_args["weights"] = leaf_weights
        if gram is not None and sparse is None:
            data_args["gram"] = gram
        if gptq:
            data_args["damp"] = jnp.float32(damp_value)
        leaf_options = {**options, "per_channel": per_channel and sparse is None}
        if _pads_to_bucket(weight, sparse, data_args, leaf_options):
            clustered, leaf_stats = _cluster_padded(weight, leaf_options, leaf_key)
        else:
            clustered, leaf_stats = cluster_array_compiled(
                weight,
                **leaf_options,
                key=leaf_key,
                # Only a traced leaf can hold NaN or Inf: eager calls refuse them.
                non_finite=is_traced(weight),
                **data_args,
            )
        if gptq:
            check_factorized(name, item.entry.path, leaf_stats, damp)
            leaf_stats["damp"] = damp_value
        distinct = leaf_stats["distinct"]
        if not isinstance(distinct, jax.core.Tracer) and int(distinct) < k:
            leaf_stats["note"] = f"{int(distinct)} distinct values < k={k}: exact codebook"
        return (clustered if inputs is None else from_leading(clustered, inputs)), leaf_stats

    return per_leaf(
        name,
        where,
        prepare=prepare,
        check=check,
        step=step,
        place=_placed,
        progress=progress,
        nests_in_sparse=True,
    )
