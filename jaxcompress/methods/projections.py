"""Data-aware projections of a layer's input features: :func:`pca` and :func:`lda`.

Both transforms look at the calibration statistics of the features a weight ``W``
sees (:class:`~jaxcompress.InputStats`: count ``N``, mean ``μ``, second
moment ``G = E[x xᵀ]``, covariance ``C = G - μ μᵀ`` and, for LDA, per-class counts
``n_c`` and means ``μ_c``) and replace ``W`` -- viewed as an ``(m, n)`` matrix, see
:func:`~jaxcompress.arrays.lowrank.matrix_shape` -- by a
:class:`~jaxcompress.arrays.LowRank` leaf ``u @ v`` with ``u`` of shape ``(m, k)``.
The layer then computes ``(x u) v``: its ``m`` input features are projected onto
``k`` directions first, so its fan-in drops from ``m`` to ``k``.

* :func:`pca` keeps the top-``k`` eigenvectors ``P`` of ``C`` and sets ``v = Pᵀ W``.
* :func:`lda` keeps the top-``k`` Fisher directions ``V`` (generalized eigenvectors
  of ``Sb v = λ Sw v``) and sets ``v`` to the least-squares map from the projected
  centred features to the layer's centred outputs: ``(uᵀ C u)⁻¹ uᵀ C W``.

**Bias correction.** A projection keeps the centred part of the input:
``x ≈ μ + (x - μ) u u⁺``, so ``x W ≈ x u v + μ (W - u v)``. The constant
``c = μ (W - u v)`` is added to the layer's bias when the weight has a sibling leaf
``bias`` (same parent, shaped like the weight's output axes, not compressed), so the
compressed layer is exact on the calibration mean. Otherwise ``c`` is left out and
its norm is reported as an uncorrected offset. Restrict these transforms with
``where=`` rather than :func:`jaxcompress.masked`, which hides the bias from them.

**Error estimate.** ``relative_error`` is the root-mean-square output error over the
calibration distribution relative to the root-mean-square output:
``sqrt(E‖x E‖² / E‖x W‖²)`` with ``E = W - u v``, where the bias correction removes
the mean part, so the numerator is ``tr(Eᵀ C E)`` when the bias was folded and
``tr(Eᵀ G E) = tr(Eᵀ C E) + ‖μ E‖²`` otherwise; the denominator is ``tr(Wᵀ G W)``.

All linear algebra runs in float32 at the highest matmul precision; the factors are
stored in the weight's dtype. With ``n_components`` given, both transforms also run
under ``jit`` (``pca(energy=...)`` needs concrete statistics to choose ``k``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.arrays import LowRank, is_compressed
from jaxcompress.arrays.checks import check_selected_leaf
from jaxcompress.arrays.lowrank import matrix_shape
from jaxcompress.calibration.calibrate import InputStats, stats_by_path
from jaxcompress.calibration.lookup import refuse_trailing
from jaxcompress.core.checks import is_traced
from jaxcompress.core.mesh import named_sharding_of, place_like, unsharded
from jaxcompress.core.progress import leaf_bytes, over_leaves
from jaxcompress.transforms.base import LeafEntry, Transform, select_leaves
from jaxcompress.transforms.filters import Filter, compile_filter, kernels

__all__ = ["lda", "pca"]

# Automatic ridge of lda(shrinkage=None), relative to the mean within-class variance.
_AUTO_RIDGE = 1e-6
# Guard ridge on the k x k normal equations of the least-squares factor.
_SOLVE_RIDGE = 1e-6
# Slack when comparing a cumulative variance fraction with energy= (float rounding).
_ENERGY_SLACK = 1e-6


def _is_int(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _mm(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def _sym(a: jax.Array) -> jax.Array:
    return (a + a.T) * 0.5


def _f32(x: Any) -> jax.Array:
    return unsharded(jnp.asarray(x, dtype=jnp.float32))


def _concrete(*arrays: Any) -> bool:
    return not any(is_traced(a) for a in arrays if a is not None)


@dataclasses.dataclass
class _Plan:
    """One selected weight, checked, with what its projection needs."""

    entry: LeafEntry
    weight: jax.Array
    stats: InputStats
    fan_in_axes: int
    m: int
    n: int
    k: int | None
    bias: LeafEntry | None


def _stats_map(name: str, data: Any) -> dict[str, InputStats]:
    if data is None:
        raise ValueError(
            f"{name}: needs data= with the InputStats of each selected weight (a pytree laid "
            "out like the params, as jaxcompress.calibrate produces); got data=None"
        )
    return stats_by_path(data)


def _leaf_stats(name: str, path: str, stats_map: dict[str, InputStats]) -> InputStats:
    stats = stats_map.get(path)
    if stats is None:
        known = sorted(stats_map)
        raise ValueError(
            f"{name}: no InputStats for leaf {path!r} in data= (statistics found for "
            f"{known if known else 'no leaf'}); calibrate it or exclude it with where="
        )
    refuse_trailing(name, "data=", path, stats)
    mean, gram = stats.mean, stats.gram
    if getattr(mean, "ndim", None) != 1 or getattr(gram, "ndim", None) != 2:
        raise ValueError(
            f"{name}: the InputStats of leaf {path!r} need a 1-D mean and a 2-D gram, got "
            f"shapes {getattr(mean, 'shape', None)} and {getattr(gram, 'shape', None)}"
        )
    m = mean.shape[0]
    if tuple(gram.shape) != (m, m):
        raise ValueError(
            f"{name}: the InputStats of leaf {path!r} have a mean of {m} features but a gram "
            f"of shape {tuple(gram.shape)}"
        )
    if _concrete(stats.count, mean, gram):
        if not float(np.asarray(stats.count)) > 0:
            raise ValueError(f"{name}: the InputStats of leaf {path!r} saw no rows (count=0)")
        if not (np.isfinite(np.asarray(mean)).all() and np.isfinite(np.asarray(gram)).all()):
            raise ValueError(f"{name}: the InputStats of leaf {path!r} contain NaN or Inf")
    return stats


def _fan_in_axes(name: str, path: str, shape: tuple[int, ...], m: int) -> int:
    """The number of leading axes of ``shape`` that the ``m`` input features flatten."""
    for axes in range(1, len(shape)):
        if math.prod(shape[:axes]) == m:
            return axes
    raise ValueError(
        f"{name}: the InputStats of leaf {path!r} describe {m} input features, but no "
        f"leading axes of its shape {shape} multiply to {m}"
    )


def _sibling_bias(
    plan_path: str, out_shape: tuple[int, ...], by_path: dict[str, LeafEntry], selected: set[str]
) -> LeafEntry | None:
    parent = plan_path.rpartition("/")[0]
    bias_path = f"{parent}/bias" if parent else "bias"
    entry = by_path.get(bias_path)
    if entry is None or bias_path in selected or is_compressed(entry.leaf):
        return None
    leaf = entry.leaf
    dtype = getattr(leaf, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        return None
    if tuple(getattr(leaf, "shape", ())) != out_shape:
        return None
    return entry


def _plan(
    name: str,
    entry: LeafEntry,
    stats_map: dict[str, InputStats],
    by_path: dict[str, LeafEntry],
    selected: set[str],
) -> _Plan:
    weight = check_selected_leaf(name, entry.path, entry.leaf)
    shape = tuple(weight.shape)
    if len(shape) < 2:
        raise ValueError(
            f"{name}: where= selected leaf {entry.path!r} of shape {shape}; a projection "
            "needs a weight with input and output axes"
        )
    stats = _leaf_stats(name, entry.path, stats_map)
    axes = _fan_in_axes(name, entry.path, shape, stats.mean.shape[0])
    m, n = matrix_shape(shape, axes)
    if m < 2:
        raise ValueError(
            f"{name}: leaf {entry.path!r} has a single input feature; nothing to project"
        )
    bias = _sibling_bias(entry.path, shape[axes:], by_path, selected)
    return _Plan(entry, weight, stats, axes, m, n, None, bias)


def _fix_signs(basis: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Flips each column so its largest-magnitude entry is positive; returns the signs."""
    rows = jnp.argmax(jnp.abs(basis), axis=0)
    peaks = jnp.take_along_axis(basis, rows[None, :], axis=0)[0]
    signs = jnp.where(peaks < 0, -1.0, 1.0).astype(basis.dtype)
    return basis * signs[None, :], signs


def _fraction(values: jax.Array, k: int) -> jax.Array:
    total = jnp.sum(values)
    safe = jnp.where(total > 0, total, jnp.ones_like(total))
    return jnp.where(total > 0, jnp.sum(values[:k]) / safe, jnp.ones_like(total))


# The numerical kernels are jitted: eagerly, each small op would compile on its own.


@jax.jit
def _moments(mean: jax.Array, gram: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The symmetrized second moment and covariance ``G - μ μᵀ``."""
    gram = _sym(gram)
    return gram, _sym(gram - mean[:, None] * mean[None, :])


@jax.jit
def _pca_spectrum(cov: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Eigenvalues (descending, clipped at 0) and eigenvectors of ``cov``."""
    values, vectors = jnp.linalg.eigh(cov)
    return jnp.maximum(values[::-1], 0.0), vectors[:, ::-1]


@functools.partial(jax.jit, static_argnames="k")
def _pca_factors(values: jax.Array, vectors: jax.Array, w: jax.Array, *, k: int):
    """``(P, Pᵀ W, explained fraction)`` for the top ``k`` components."""
    basis, _ = _fix_signs(vectors[:, :k])
    return basis, _mm(basis.T, w), _fraction(values, k)


def _energy_rank(values: jax.Array, energy: float) -> int:
    """The smallest ``k`` whose top-``k`` eigenvalues hold ``energy`` of the variance."""
    spectrum = np.asarray(values, dtype=np.float64)
    total = spectrum.sum()
    if total <= 0:
        return 1
    fractions = np.cumsum(spectrum) / total
    return int(np.argmax(fractions >= energy * (1.0 - _ENERGY_SLACK))) + 1


def _lda_spectrum(count, mean, gram, class_count, class_mean, shrink, ridge):
    """Fisher directions ``V`` (``Vᵀ Sw V = I``, descending) and their eigenvalues.

    Scatters are divided by ``N`` (which changes no direction):
    ``Sw/N = G - Σ p_c μ_c μ_cᵀ`` and ``Sb/N = Σ p_c (μ_c - μ)(μ_c - μ)ᵀ``, ``p_c = n_c/N``.
    """
    present = class_count > 0
    class_mean = jnp.where(present[:, None], class_mean, 0.0)
    weights = class_count / count
    within = _sym(gram - _mm(class_mean.T * weights[None, :], class_mean))
    offsets = jnp.where(present[:, None], class_mean - mean[None, :], 0.0)
    between = _sym(_mm(offsets.T * weights[None, :], offsets))
    m = within.shape[0]
    identity = jnp.eye(m, dtype=jnp.float32)
    scale = jnp.trace(within) / m
    scale = jnp.where(scale > 0, scale, jnp.ones_like(scale))
    # (1 - s) Sw + (s + r) tr(Sw)/m I: s = shrinkage (or 0), r = the automatic ridge (or 0).
    within = (1.0 - shrink) * within + ((shrink + ridge) * scale) * identity
    # Whiten Sw, then an ordinary eigh. Eigenvalues of Sw are floored at the float32
    # resolution of its spectrum, m * eps * λ_max: below that they are rounding noise.
    values, vectors = jnp.linalg.eigh(within)
    top = jnp.max(jnp.abs(values))
    floor = jnp.maximum(top * (m * float(jnp.finfo(jnp.float32).eps)), jnp.float32(1e-30))
    whiten = vectors * jax.lax.rsqrt(jnp.maximum(values, floor))[None, :]
    ratios, rotations = jnp.linalg.eigh(_sym(_mm(whiten.T, _mm(between, whiten))))
    ratios, rotations = ratios[::-1], rotations[:, ::-1]
    return _mm(whiten, rotations), jnp.maximum(ratios, 0.0)


def _least_squares_factor(basis: jax.Array, cov: jax.Array, w: jax.Array) -> jax.Array:
    """``argmin_V' E‖(x - μ) W - (x - μ) basis V'‖² = (Bᵀ C B)⁻¹ Bᵀ C W``."""
    cov_basis = _mm(cov, basis)
    normal = _sym(_mm(basis.T, cov_basis))
    k = normal.shape[0]
    ridge = _SOLVE_RIDGE * jnp.trace(normal) / k
    ridge = jnp.where(ridge > 0, ridge, jnp.float32(1e-30))
    normal = normal + ridge * jnp.eye(k, dtype=jnp.float32)
    return jnp.linalg.solve(normal, _mm(cov_basis.T, w))


@functools.partial(jax.jit, static_argnames="k")
def _lda_factors(count, mean, gram, class_count, class_mean, cov, w, shrink, ridge, *, k):
    """``(u, v, explained ratio)``: unit-norm Fisher directions and the least-squares factor."""
    directions, ratios = _lda_spectrum(count, mean, gram, class_count, class_mean, shrink, ridge)
    directions = directions[:, :k]
    factor = _least_squares_factor(directions, cov, w)
    norms = jnp.sqrt(jnp.sum(jnp.square(directions), axis=0))
    norms = jnp.where(norms > 0, norms, jnp.ones_like(norms))
    basis, signs = _fix_signs(directions / norms[None, :])
    return basis, factor * (norms * signs)[:, None], _fraction(ratios, k)


@functools.partial(jax.jit, static_argnames="folded")
def _error_terms(u, v, w, mean, gram, cov, *, folded: bool):
    """The bias correction ``μ E``, the relative error estimate and ``‖μ E‖``."""
    error = w - _mm(u, v)
    correction = _mm(mean[None, :], error)[0]
    centred = jnp.sum(error * _mm(cov, error))
    offset = jnp.sum(jnp.square(correction))
    total = jnp.sum(w * _mm(gram, w))
    squared = centred if folded else centred + offset
    safe = jnp.where(total > 0, total, jnp.ones_like(total))
    relative = jnp.where(total > 0, jnp.sqrt(jnp.maximum(squared, 0.0) / safe), 0.0)
    return correction, relative, jnp.sqrt(offset)


def _finish(
    plan: _Plan, u: jax.Array, v: jax.Array, mean: jax.Array, gram: jax.Array, cov: jax.Array
) -> tuple[LowRank, jax.Array | None, dict]:
    """Stores the factors, computes the bias correction and the error statistics."""
    weight = plan.weight
    dtype = np.dtype(weight.dtype)
    reference = named_sharding_of(weight)
    u_stored = place_like(u.astype(dtype), reference)
    v_stored = place_like(v.astype(dtype), reference)
    # The correction uses the stored (rounded) factors, so the fold is exact for them.
    correction, relative, offset_norm = _error_terms(
        _f32(u_stored),
        _f32(v_stored),
        _f32(weight).reshape(plan.m, plan.n),
        mean,
        gram,
        cov,
        folded=plan.bias is not None,
    )
    new_bias = None
    if plan.bias is not None:
        bias = plan.bias.leaf
        folded = _f32(bias) + correction.reshape(tuple(bias.shape))
        new_bias = place_like(folded.astype(bias.dtype), named_sharding_of(bias))
    leaf = LowRank(
        u=u_stored,
        v=v_stored,
        shape=tuple(weight.shape),
        dtype=dtype,
        fan_in_axes=plan.fan_in_axes,
    )
    stats = {
        "relative_error": relative,
        "bias_folded": plan.bias is not None,
        "offset_norm": offset_norm,
    }
    return leaf, new_bias, stats


def _run(name: str, params: Any, data: Any, where: Filter, *, check, project, progress: bool):
    """The shared driver: plan and check every leaf first, then project each one.

    ``check(plan)`` validates method-specific conditions and returns the plan;
    ``project(plan, mean, gram, cov)`` returns ``(u, v, extra_stats)`` in float32, or
    ``(None, None, extra_stats)`` to leave the leaf dense.
    """
    stats_map = _stats_map(name, data)
    selected, entries, treedef = select_leaves(params, where, name=name)
    by_path = {entry.path: entry for entry in entries}
    selected_paths = {entry.path for entry in selected}
    # Every leaf is checked before anything is computed, so nothing is half done.
    plans = [check(_plan(name, entry, stats_map, by_path, selected_paths)) for entry in selected]
    leaves = [entry.leaf for entry in entries]
    claimed: set[str] = set()
    out_stats = {}
    for plan in over_leaves(
        plans,
        sizes=[leaf_bytes(plan.weight) for plan in plans],
        description=name,
        enabled=progress and not any(is_traced(plan.weight) for plan in plans),
    ):
        if plan.bias is not None and plan.bias.path in claimed:
            plan.bias = None  # a bias takes the correction of one weight only
        mean = _f32(plan.stats.mean)
        gram, cov = _moments(mean, _f32(plan.stats.gram))
        u, v, extra = project(plan, mean, gram, cov)
        k = extra.pop("k", plan.k)
        # "k" is the old name of "rank", kept for compatibility.
        base = {"rank": k, "k": k, "m": plan.m, "n": plan.n}
        if u is None:
            out_stats[plan.entry.path] = {**base, "skipped": True, **extra}
            continue
        leaf, new_bias, error_stats = _finish(plan, u, v, mean, gram, cov)
        leaves[plan.entry.index] = leaf
        if new_bias is not None:
            leaves[plan.bias.index] = new_bias
            claimed.add(plan.bias.path)
        out_stats[plan.entry.path] = {**base, "skipped": False, **extra, **error_stats}
    return jax.tree_util.tree_unflatten(treedef, leaves), out_stats


def _apply(name, where, check, project, progress, params, *, key=None, data=None):
    del key  # deterministic
    return _run(name, params, data, where, check=check, project=project, progress=progress)


def _saves_storage(k: int, m: int, n: int) -> bool:
    return k * (m + n) < m * n


def pca(
    n_components: int | None = None,
    *,
    energy: float | None = None,
    where: Filter = kernels,
    progress: bool = False,
) -> Transform:
    """Projects each selected layer's input features onto their top principal components.

    From the calibrated covariance ``C`` of a weight's input features, the top-``k``
    eigenvectors ``P`` (``m x k``, orthonormal) are kept and the weight becomes
    ``LowRank(u=P, v=Pᵀ W)``: the layer computes ``(x P)(Pᵀ W)``, so its fan-in drops
    from ``m`` to ``k``. The constant ``μ (I - P Pᵀ) W`` that the projection drops is
    folded into the sibling ``bias`` when there is one (see the module docstring), so
    the layer stays exact on the calibration mean. A leaf where ``k * (m + n) >= m * n``
    (no storage saved) is left dense.

    Args:
        n_components: the number of components ``k`` to keep, ``1 <= k < m`` for every
            selected leaf. Give exactly one of ``n_components`` and ``energy``.
        energy: keep, per leaf, the smallest ``k`` whose components hold at least this
            fraction of the input variance, in ``(0, 1]``. Needs concrete (not traced)
            statistics.
        where: which leaves to project; by default :func:`jaxcompress.filters.kernels`.
        progress: show a bar on stderr, by leaf and bytes, while it runs (not under
            ``jit``).

    Returns:
        A transform ``tx(params, *, key=None, data=...)``; ``data`` is a pytree laid out
        like the params with an :class:`~jaxcompress.InputStats` for every
        selected leaf. Its stats map each selected leaf path to a dict with ``rank``
        (the ``k`` kept; also under its old key ``k``), ``m``, ``n``, ``skipped`` and,
        unless skipped by ``n_components``,
        ``explained_variance`` (fraction of the input variance the ``k`` components
        hold); for projected leaves also ``relative_error`` (estimated relative RMS
        output error, see the module docstring), ``bias_folded`` and ``offset_norm``
        (the norm of the bias correction: folded into the bias if ``bias_folded``,
        otherwise an offset the compressed layer's outputs carry).

    Raises:
        ValueError: bad options; ``data`` missing; a selected leaf without statistics,
            with statistics that do not fit its shape, or with ``n_components >= m``;
            ``energy`` with traced statistics.
        TypeError: a selected integer or already compressed leaf.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jaxcompress import InputStats
        >>> from jaxcompress import pca
        >>> mix = jax.random.normal(jax.random.key(1), (2, 16))
        >>> x = jax.random.normal(jax.random.key(0), (256, 2)) @ mix  # 2 directions
        >>> stats = InputStats(jnp.float32(256), x.mean(0), x.T @ x / 256, None, None)
        >>> params = {"dense": {"kernel": jnp.ones((16, 32)), "bias": jnp.zeros(32)}}
        >>> out, info = pca(energy=0.99)(params, data={"dense": {"kernel": stats}})
        >>> out["dense"]["kernel"].rank, info["dense/kernel"]["bias_folded"]
        (2, True)
        >>> round(float(info["dense/kernel"]["explained_variance"]), 3)
        1.0
    """
    if (n_components is None) == (energy is None):
        raise ValueError("pca: give exactly one of n_components and energy")
    if n_components is not None and (not _is_int(n_components) or n_components < 1):
        raise ValueError(f"pca: n_components must be a positive integer, got {n_components!r}")
    if energy is not None and (not _is_real(energy) or not 0.0 < float(energy) <= 1.0):
        raise ValueError(f"pca: energy must be a number in (0, 1], got {energy!r}")
    compile_filter(where)
    if n_components is not None:
        n_components = int(n_components)
        name = f"pca({n_components})"
    else:
        assert energy is not None  # exactly one of the two is given (checked above)
        energy = float(energy)
        name = f"pca(energy={energy})"

    def check(plan: _Plan) -> _Plan:
        if n_components is not None:
            if n_components >= plan.m:
                raise ValueError(
                    f"{name}: n_components={n_components} must be less than the {plan.m} "
                    f"input features of leaf {plan.entry.path!r}"
                )
            plan.k = n_components
        elif not _concrete(plan.stats.mean, plan.stats.gram):
            raise ValueError(
                f"{name}: energy= chooses k from the statistics of leaf {plan.entry.path!r}, "
                "which are traced; call it outside jit or give n_components"
            )
        return plan

    def project(plan: _Plan, mean, gram, cov):
        k = plan.k
        if k is not None and not _saves_storage(k, plan.m, plan.n):
            return None, None, {}
        values, vectors = _pca_spectrum(cov)
        if k is None:
            assert energy is not None  # k is left unset only when energy was given
            k = _energy_rank(values, energy)
        if k >= plan.m or not _saves_storage(k, plan.m, plan.n):
            return None, None, {"k": k, "explained_variance": _fraction(values, k)}
        w = _f32(plan.weight).reshape(plan.m, plan.n)
        basis, factor, explained = _pca_factors(values, vectors, w, k=k)
        return basis, factor, {"k": k, "explained_variance": explained}

    return Transform(functools.partial(_apply, name, where, check, project, progress), name)


def lda(
    n_components: int,
    *,
    shrinkage: float | None = None,
    where: Filter = kernels,
    progress: bool = False,
) -> Transform:
    """Projects each selected layer's input features onto their top Fisher directions.

    Supervised: from the class-conditional statistics of a weight's input features
    (``class_count``, ``class_mean`` of its :class:`~jaxcompress.InputStats`,
    so calibrate with labels), with ``N = count``, ``μ = mean`` and ``G = gram``,

    * within-class scatter ``Sw = N G - Σ_c n_c μ_c μ_cᵀ``,
    * between-class scatter ``Sb = Σ_c n_c (μ_c - μ)(μ_c - μ)ᵀ``,

    the top-``k`` generalized eigenvectors ``V`` of ``Sb v = λ Sw v`` span the
    directions that separate the classes best. Since ``V`` is not orthonormal, the
    output factor is the least-squares map from the projected centred features
    ``z = (x - μ) V`` to the centred outputs, ``W' = (Vᵀ C V)⁻¹ Vᵀ C W`` (``C`` the
    covariance), and the weight becomes ``LowRank(u=V, v=W')`` (``V``'s columns scaled
    to unit norm). The constant ``μ (W - V W')`` is folded into the sibling ``bias`` as
    in :func:`pca`. Use it to compress a classifier head or the layer reading the
    penultimate features. Every selected leaf is factored, even where ``k * (m + n)``
    exceeds ``m * n`` (the gain is the reduced fan-in, not storage).

    Args:
        n_components: the number of directions ``k``: less than the number of classes
            with examples and less than the ``m`` input features of every selected leaf.
        shrinkage: regularizes a singular ``Sw``. ``None``: a ridge of
            ``1e-6 * trace(Sw) / m``. A number ``s`` in ``[0, 1]``:
            ``Sw <- (1 - s) Sw + s (trace(Sw) / m) I``.
        where: which leaves to project; by default :func:`jaxcompress.filters.kernels`.
        progress: show a bar on stderr, by leaf and bytes, while it runs (not under
            ``jit``).

    Returns:
        A transform ``tx(params, *, key=None, data=...)`` (``data`` as for :func:`pca`,
        with class statistics). Its stats map each selected leaf path to a dict with
        ``rank`` (also under its old key ``k``), ``m``, ``n``, ``skipped`` (always
        ``False``), ``explained_ratio`` (the kept share of the sum of Fisher eigenvalues
        ``λ``), ``relative_error``,
        ``bias_folded`` and ``offset_norm`` (as for :func:`pca`).

    Raises:
        ValueError: bad options; ``data`` missing; a selected leaf without statistics,
            without class statistics, with fewer than two classes with examples, with
            ``n_components`` not below both its number of classes and ``m``.
        TypeError: a selected integer or already compressed leaf.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jaxcompress import InputStats
        >>> from jaxcompress import lda
        >>> labels = jnp.arange(300) % 3
        >>> centres = 4.0 * jax.random.normal(jax.random.key(0), (3, 8))
        >>> x = centres[labels] + jax.random.normal(jax.random.key(1), (300, 8))
        >>> counts = jnp.bincount(labels, length=3).astype(jnp.float32)
        >>> stats = InputStats(jnp.float32(300), x.mean(0), x.T @ x / 300, counts,
        ...                    jnp.stack([x[labels == c].mean(0) for c in range(3)]))
        >>> params = {"head": {"kernel": jnp.ones((8, 3)), "bias": jnp.zeros(3)}}
        >>> out, info = lda(2)(params, data={"head": {"kernel": stats}})
        >>> out["head"]["kernel"].rank, round(float(info["head/kernel"]["explained_ratio"]), 3)
        (2, 1.0)
    """
    if not _is_int(n_components) or n_components < 1:
        raise ValueError(f"lda: n_components must be a positive integer, got {n_components!r}")
    if shrinkage is not None and (not _is_real(shrinkage) or not 0.0 <= float(shrinkage) <= 1.0):
        raise ValueError(f"lda: shrinkage must be None or a number in [0, 1], got {shrinkage!r}")
    compile_filter(where)
    k = int(n_components)
    shrinkage = None if shrinkage is None else float(shrinkage)
    name = f"lda({k}, shrinkage={shrinkage})"

    def check(plan: _Plan) -> _Plan:
        path, stats = plan.entry.path, plan.stats
        if stats.class_count is None or stats.class_mean is None:
            raise ValueError(
                f"{name}: the InputStats of leaf {path!r} have no class statistics "
                "(class_count/class_mean are None); calibrate with labels"
            )
        counts_shape = tuple(getattr(stats.class_count, "shape", ()))
        means_shape = tuple(getattr(stats.class_mean, "shape", ()))
        if len(counts_shape) != 1 or means_shape != (counts_shape[0], plan.m):
            raise ValueError(
                f"{name}: the class statistics of leaf {path!r} have class_count of shape "
                f"{counts_shape} and class_mean of shape {means_shape}; expected (c,) and "
                f"(c, {plan.m})"
            )
        classes = counts_shape[0]
        if _concrete(stats.class_count, stats.class_mean):
            counts = np.asarray(stats.class_count)
            means = np.asarray(stats.class_mean)
            classes = int((counts > 0).sum())
            if not np.isfinite(means[counts > 0]).all():
                raise ValueError(
                    f"{name}: the class means of leaf {path!r} contain NaN or Inf values"
                )
        if classes < 2:
            raise ValueError(
                f"{name}: leaf {path!r} has {classes} class(es) with examples; LDA needs at least 2"
            )
        if k >= classes:
            raise ValueError(
                f"{name}: n_components={k} must be less than the {classes} classes with "
                f"examples of leaf {path!r} (Sb has rank at most classes - 1)"
            )
        if k >= plan.m:
            raise ValueError(
                f"{name}: n_components={k} must be less than the {plan.m} input features "
                f"of leaf {path!r}"
            )
        plan.k = k
        return plan

    def project(plan: _Plan, mean, gram, cov):
        stats = plan.stats
        basis, factor, explained = _lda_factors(
            _f32(stats.count),
            mean,
            gram,
            _f32(stats.class_count),
            _f32(stats.class_mean),
            cov,
            _f32(plan.weight).reshape(plan.m, plan.n),
            jnp.float32(0.0 if shrinkage is None else shrinkage),
            jnp.float32(_AUTO_RIDGE if shrinkage is None else 0.0),
            k=k,
        )
        return basis, factor, {"explained_ratio": explained}

    return Transform(functools.partial(_apply, name, where, check, project, progress), name)
