"""Low-rank factorization into :class:`~jaxcompress.arrays.LowRank` leaves.

A weight viewed as an ``m x n`` matrix ``W`` (see
:func:`~jaxcompress.arrays.lowrank.matrix_shape`) is replaced by ``u @ v`` with ``u``
of shape ``(m, r)`` and ``v`` of shape ``(r, n)``, which stores ``r * (m + n)``
numbers instead of ``m * n``.

* **Plain** (``whiten=False``): the truncated SVD ``W = U S Vᵀ``, the best rank-``r``
  approximation in the Frobenius norm (Eckart–Young).
* **Whitened** (``whiten=True``, SVD-LLM style): with ``G = E[x xᵀ]`` the uncentered
  second moment of the weight's inputs, ``‖X W − X W'‖_F² = N ‖G^{1/2} (W − W')‖_F²``
  for the ``N`` calibration rows ``X``, so the rank-``r`` ``W'`` with the least
  *output* error is ``G^{-1/2} [G^{1/2} W]_r``, where ``[A]_r`` is ``A``'s truncated
  SVD. Its output error is exactly ``√N · √(Σ_{i>r} σ_i(G^{1/2} W)²)``, never more
  than the plain factorization's (up to the eigenvalue floor of :func:`low_rank`).

  Why: with ``E = W − W'`` and ``S = G^{1/2}``,
  ``‖X E‖_F² = tr(Eᵀ XᵀX E) = N tr(Eᵀ G E) = N ‖S E‖_F²``. For invertible ``S``,
  ``W' ↦ S W'`` maps the rank-``r`` matrices onto themselves, so minimizing
  ``‖S W − S W'‖_F`` is Eckart–Young for ``S W``: ``S W' = [S W]_r``.

The singular values are split evenly: ``u = U_r √S_r`` and ``v = √S_r V_rᵀ`` (for
the whitened case ``u = G^{-1/2} U_r √Σ_r``, ``v = √Σ_r V_rᵀ``).
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.arrays import LowRank
from jaxcompress.arrays.leading import from_leading, leading_shape, to_leading
from jaxcompress.arrays.lowrank import factor_shardings, matrix_shape
from jaxcompress.calibration.calibrate import stats_by_path
from jaxcompress.calibration.lookup import leaf_gram
from jaxcompress.core.checks import is_traced
from jaxcompress.core.mesh import place_like, unsharded
from jaxcompress.transforms.base import Transform
from jaxcompress.transforms.engine import Unfit, per_leaf
from jaxcompress.transforms.filters import Filter, kernels
from jaxcompress.transforms.stats import LowRankStats

_METHODS = ("svd", "randomized")
# Eigenvalues of the input second moment are clamped at this fraction of their mean.
_DAMPING = 1e-6
_HIGHEST = jax.lax.Precision.HIGHEST


def _matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.matmul(a, b, precision=_HIGHEST)


def _compute_dtype(dtype: Any) -> Any:
    return jnp.float64 if np.dtype(dtype) == np.float64 else jnp.float32


def _is_int(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


# ---------------------------------------------------------------- the numerics


def _whitener(gram: jax.Array, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """``(G^{1/2}, G^{-1/2})`` of a PSD ``gram``, its eigenvalues clamped from below.

    The floor is ``1e-6 * trace(G) / m`` (``1`` for an all-zero ``G``), so a rank
    deficient or slightly indefinite ``G`` (float rounding) still inverts stably.
    """
    g = gram.astype(dtype)
    g = (g + g.T) * jnp.asarray(0.5, dtype)
    eigenvalues, vectors = jnp.linalg.eigh(g)
    size = g.shape[0]
    trace = jnp.sum(eigenvalues)
    floor = jnp.where(trace > 0, trace * jnp.asarray(_DAMPING / size, dtype), 1.0)
    root = jnp.sqrt(jnp.maximum(eigenvalues, floor.astype(dtype)))
    root = root[None, :]
    return _matmul(vectors * root, vectors.T), _matmul(vectors / root, vectors.T)


def _orthonormal(y: jax.Array) -> jax.Array:
    return jnp.linalg.qr(y, mode="reduced")[0]


def _randomized_svd(
    a: jax.Array, key: jax.Array, sketch: int, power_iterations: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The top-``sketch`` SVD of ``a`` by a randomized range finder (Halko et al. 2011).

    ``q`` power (subspace) iterations, each re-orthonormalized, sharpen the range
    when the spectrum decays slowly.
    """
    omega = jax.random.normal(key, (a.shape[1], sketch), a.dtype)
    q = _orthonormal(_matmul(a, omega))
    for _ in range(power_iterations):
        q = _orthonormal(_matmul(a, _orthonormal(_matmul(a.T, q))))
    small_u, sigma, vt = jnp.linalg.svd(_matmul(q.T, a), full_matrices=False)
    return _matmul(q, small_u), sigma, vt


def _decompose_impl(weight, gram, key, *, fan_in_axes, sketch, method, power_iterations):
    """``(U, σ, Vᵀ, G^{-1/2} or None, ‖A‖_F²)`` of ``A = W`` or ``A = G^{1/2} W``.

    With ``method="svd"`` all ``min(m, n)`` singular triplets; with
    ``"randomized"`` the top ``sketch``.
    """
    dtype = _compute_dtype(weight.dtype)
    # Whole-matrix algorithms need the leaf in one piece (Explicit mesh axes).
    w = unsharded(weight).astype(dtype)
    w = w.reshape(matrix_shape(w.shape, fan_in_axes))
    inverse_root = None
    a = w
    if gram is not None:
        root, inverse_root = _whitener(unsharded(gram), dtype)
        a = _matmul(root, w)
    if method == "svd":
        u, sigma, vt = jnp.linalg.svd(a, full_matrices=False)
    else:
        u, sigma, vt = _randomized_svd(a, key, sketch, power_iterations)
    return u, sigma, vt, inverse_root, jnp.sum(jnp.square(a))


def _relative(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    safe = jnp.where(denominator > 0, denominator, jnp.ones_like(denominator))
    return jnp.where(denominator > 0, jnp.sqrt(jnp.maximum(numerator, 0.0) / safe), 0.0)


def _truncate_impl(weight, gram, u_all, sigma, vt, inverse_root, *, fan_in_axes, rank):
    """The balanced rank-``rank`` factors (in the weight's dtype) and their errors."""
    dtype = _compute_dtype(weight.dtype)
    root_sigma = jnp.sqrt(jnp.maximum(sigma[:rank], 0.0))
    u = u_all[:, :rank] * root_sigma[None, :]
    if inverse_root is not None:
        u = _matmul(inverse_root, u)
    v = root_sigma[:, None] * vt[:rank]
    u, v = u.astype(weight.dtype), v.astype(weight.dtype)
    # Errors of the factors as stored (rounded to the weight's dtype).
    w = unsharded(weight).astype(dtype)
    w = w.reshape(matrix_shape(w.shape, fan_in_axes))
    error = w - _matmul(u.astype(dtype), v.astype(dtype))
    stats = {"relative_error": _relative(jnp.sum(jnp.square(error)), jnp.sum(jnp.square(w)))}
    if gram is not None:
        g = unsharded(gram).astype(dtype)
        stats["relative_output_error"] = _relative(
            jnp.sum(error * _matmul(g, error)), jnp.sum(w * _matmul(g, w))
        )
    return u, v, stats


_DECOMPOSE_STATIC = ("fan_in_axes", "sketch", "method", "power_iterations")
_decompose = jax.jit(_decompose_impl, static_argnames=_DECOMPOSE_STATIC)
_truncate = jax.jit(_truncate_impl, static_argnames=("fan_in_axes", "rank"))


@functools.partial(jax.jit, static_argnames=(*_DECOMPOSE_STATIC, "rank"))
def _factor_at_rank(weight, gram, key, *, fan_in_axes, sketch, method, power_iterations, rank):
    """:func:`_decompose_impl` then :func:`_truncate_impl`, compiled as one program."""
    u_all, sigma, vt, inverse_root, _ = _decompose_impl(
        weight,
        gram,
        key,
        fan_in_axes=fan_in_axes,
        sketch=sketch,
        method=method,
        power_iterations=power_iterations,
    )
    return _truncate_impl(
        weight, gram, u_all, sigma, vt, inverse_root, fan_in_axes=fan_in_axes, rank=rank
    )


def energy_rank(sigma: Any, energy: float, total: float | None = None) -> int | None:
    """The smallest ``k`` whose top ``k`` squared singular values reach ``energy`` of ``total``.

    Args:
        sigma: singular values, largest first.
        energy: the fraction to keep, in ``(0, 1]``.
        total: the whole energy (``‖A‖_F²``); by default ``sum(sigma**2)``, which is it
            when ``sigma`` holds all the singular values.

    Returns:
        The rank (at least 1), or ``None`` when ``sigma`` does not reach the fraction.

    Example:
        >>> energy_rank([3.0, 2.0, 1.0], 0.9), energy_rank([3.0, 2.0, 1.0], 0.95)
        (2, 3)
    """
    squares = np.square(np.asarray(sigma, np.float64))
    cumulative = np.cumsum(squares)
    total = float(cumulative[-1]) if total is None else float(total)
    if total <= 0:
        return 1
    reached = np.nonzero(cumulative >= energy * total)[0]
    return int(reached[0]) + 1 if reached.size else None


# ---------------------------------------------------------------- the transform


def _check_options(rank, energy, method, fan_in_axes, oversample, power_iterations) -> None:
    if (rank is None) == (energy is None):
        raise ValueError("low_rank: give exactly one of rank= and energy=")
    if rank is not None:
        if not _is_int(rank):
            raise TypeError(f"low_rank: rank must be an integer, got {rank!r}")
        if rank < 1:
            raise ValueError(f"low_rank: rank must be at least 1, got {rank!r}")
    if energy is not None:
        if isinstance(energy, bool) or not isinstance(energy, numbers.Real):
            raise TypeError(f"low_rank: energy must be a real number in (0, 1], got {energy!r}")
        if not 0.0 < float(energy) <= 1.0:
            raise ValueError(f"low_rank: energy must be in (0, 1], got {energy!r}")
    if method not in _METHODS:
        raise ValueError(f"low_rank: method must be one of {_METHODS}, got {method!r}")
    if fan_in_axes is not None and (not _is_int(fan_in_axes) or fan_in_axes < 1):
        raise ValueError(
            f"low_rank: fan_in_axes must be None or a positive integer, got {fan_in_axes!r}"
        )
    for option, value in (("oversample", oversample), ("power_iterations", power_iterations)):
        if not _is_int(value) or value < 0:
            raise ValueError(f"low_rank: {option} must be a non-negative integer, got {value!r}")


def _leaf_fan_in(name: str, path: str, shape: tuple[int, ...], fan_in_axes: int | None) -> int:
    if len(shape) < 2:
        raise ValueError(
            f"{name}: leaf {path!r} of shape {shape} is not a matrix; low-rank needs 2 or "
            "more dimensions (exclude it with where=)"
        )
    if fan_in_axes is None:
        return 1 if len(shape) == 2 else len(shape) - 1
    if fan_in_axes >= len(shape):
        raise ValueError(
            f"{name}: fan_in_axes={fan_in_axes} leaves no output axes for leaf {path!r} of "
            f"shape {shape}; it must be 1 to {len(shape) - 1}"
        )
    return fan_in_axes


def _is_trailing(by_path: dict, path: str) -> bool:
    """Whether ``path``'s statistics are of its trailing axes (an ``(out, in)`` weight)."""
    stats = by_path.get(path)
    return stats is not None and stats.trailing


def _leaf_gram(name: str, path: str, by_path: dict, m: int) -> jax.Array:
    stats = by_path.get(path)
    if stats is None:
        raise ValueError(
            f"{name}: whiten=True but data= has no InputStats for leaf {path!r}; calibrate "
            "that weight or exclude it with where="
        )
    gram = stats.gram
    if tuple(getattr(gram, "shape", ())) != (m, m):
        raise ValueError(
            f"{name}: the InputStats gram of leaf {path!r} has shape "
            f"{tuple(getattr(gram, 'shape', ()))}, but its matrix view needs ({m}, {m}); "
            "check fan_in_axes="
        )
    if not is_traced(gram) and not bool(jnp.isfinite(gram).all()):
        raise ValueError(f"{name}: the InputStats gram of leaf {path!r} has NaN or Inf values")
    return gram


def low_rank(
    rank: int | None = None,
    *,
    energy: float | None = None,
    whiten: bool = False,
    method: str = "svd",
    fan_in_axes: int | None = None,
    where: Filter = kernels,
    oversample: int = 10,
    power_iterations: int = 2,
    progress: bool = False,
) -> Transform:
    """Factorizes each selected weight as ``u @ v`` of rank ``r`` (a ``LowRank`` leaf).

    The weight is viewed as an ``m x n`` matrix whose rows are its first
    ``fan_in_axes`` axes flattened (row-major) and whose columns are the rest. The
    factors are ``u = U_r √S_r`` of shape ``(m, r)`` and ``v = √S_r V_rᵀ`` of shape
    ``(r, n)``: the singular values are split evenly between them. They are stored
    in the weight's dtype (computed in float32, or float64 for float64 weights).

    A leaf whose factors would not save bytes (``r * (m + n) >= m * n``) is left
    dense, and its stats say so under ``"skipped"``.

    NaN and Inf: an eager call raises. Under ``jax.jit`` the factors are those of the
    matrix view with its NaN and Inf entries set to zero, and each row of ``u`` whose
    matrix row held one is NaN: factored entry ``(i, j)`` is ``u[i] @ v[:, j]``, so a
    row is the smallest part that can carry NaN to it. Exactly those rows of the
    matrix view materialize to NaN.

    Args:
        rank: the rank ``r`` of every selected leaf, ``1 <= r < min(m, n)``.
        energy: instead of ``rank``, per leaf the smallest rank whose squared
            singular values sum to at least this fraction of the total, in
            ``(0, 1]`` (those of ``G^{1/2} W`` when whitened). Ranks then depend on
            the data, so this needs concrete arrays: call it outside ``jax.jit``.
        whiten: minimize the error of the layer's output ``‖X W − X u v‖_F`` on
            calibration inputs ``X`` instead of ``‖W − u v‖_F``: with
            ``G = E[x xᵀ]``, ``u v = G^{-1/2} [G^{1/2} W]_r`` (SVD-LLM). ``G``'s
            eigenvalues are clamped below at ``1e-6 * trace(G) / m`` so its inverse
            root is stable. Needs ``data=`` in the transform call. A weight whose
            statistics are of its trailing axes (equinox's ``(out, in)``) is
            factorized as its ``W.T`` and stored with ``u`` on its output side:
            ``u`` ``(out, r)``, ``v`` ``(r, in)``, ``fan_in_axes`` counting its
            output axes.
        method: ``"svd"`` (exact) or ``"randomized"`` (a randomized range finder of
            ``r + oversample`` columns with ``power_iterations`` subspace iterations;
            needs ``key=`` in the transform call). With ``energy`` the sketch has
            enough columns for the largest rank that could save bytes, and the total
            energy is the exact ``‖A‖_F²``.
        fan_in_axes: how many leading axes are inputs. ``None``: 1 for a 2-D leaf
            (a Dense ``(in, out)`` kernel), ``ndim - 1`` for 3 or more dimensions
            (a conv ``(h, w, in, out)`` kernel gives ``m = h * w * in``). Give an
            integer for other layouts, for example 1 for a DenseGeneral
            ``(in, heads, head_dim)`` kernel. An equinox layer's weight, stored
            output first, is split after its output axis: ``m = out``,
            ``n = in * kernel`` (its ``fan_in_axes`` then counts that output axis).
        where: which leaves to factorize; by default
            :func:`jaxcompress.filters.kernels`. Under the default filter, a leaf
            with ``rank >= min(m, n)`` (a 10-class head, a first conv layer) is
            skipped (left dense, stats ``{"skipped": reason}``, one warning per
            call); a filter of your own that selects such a leaf raises.
        oversample: extra sketch columns for ``method="randomized"``.
        power_iterations: subspace iterations for ``method="randomized"``.
        progress: show a bar on stderr, by leaf and bytes, while it runs (not under
            ``jit``).

    Returns:
        A transform ``tx(params, *, key=None, data=None)``. ``data`` is a calibration
        pytree laid out like the params with
        :class:`~jaxcompress.InputStats` leaves (only read when
        whitening). Its stats map each selected leaf path to ``{"rank", "m", "n",
        "bytes_before", "bytes_after", "relative_error"}`` (``‖W − u v‖ / ‖W‖``),
        plus ``"relative_output_error"`` when whitening
        (``√(tr(Eᵀ G E) / tr(Wᵀ G W))`` with ``E = W − u v``). A skipped leaf has
        ``"skipped"`` (the reason; ``True`` under ``jit``, where strings can't be
        returned) and no errors. Ranks selected with ``energy`` are in ``"rank"``.

    Raises:
        ValueError: neither or both of ``rank`` and ``energy``; ``rank < 1``;
            ``energy`` outside ``(0, 1]``; an unknown ``method``; a bad
            ``fan_in_axes``, ``oversample`` or ``power_iterations``; a leaf your own
            ``where`` selects with ``rank >= min(m, n)``; a leaf with fewer than 2
            dimensions or non-finite values;
            ``whiten`` without ``data`` or without stats for a leaf; ``randomized``
            without ``key``; ``energy`` under ``jit``. Leaves are named.
        TypeError: a non-integer ``rank``, a non-real ``energy``, or a selected
            integer or already compressed (``Sparse``, ``Quantized``, ...) leaf.

    Example:
        >>> import jax
        >>> import jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> from jaxcompress import low_rank
        >>> a = jax.random.normal(jax.random.key(0), (64, 8))
        >>> b = jax.random.normal(jax.random.key(1), (8, 32))
        >>> params = {"dense": {"kernel": a @ b, "bias": jnp.zeros(32)}}  # rank 8
        >>> compressed, stats = jax.jit(low_rank(8))(params)
        >>> compressed["dense"]["kernel"]
        LowRank(shape=(64, 32), dtype=float32, rank=8)
        >>> int(stats["dense/kernel"]["bytes_before"]), int(stats["dense/kernel"]["bytes_after"])
        (8192, 3072)
        >>> float(stats["dense/kernel"]["relative_error"]) < 1e-5
        True
    """
    _check_options(rank, energy, method, fan_in_axes, oversample, power_iterations)
    whiten = bool(whiten)
    # _check_options let exactly one of rank and energy through.
    target = f"energy={float(energy)!r}" if energy is not None else f"rank={rank}"
    name = f"low_rank({target}, whiten={whiten}, method={method})"

    def prepare(key, data):
        if method == "randomized" and key is None:
            raise ValueError(f"{name}: method='randomized' draws a random sketch; pass key=")
        if whiten and data is None:
            raise ValueError(
                f"{name}: whiten=True needs data=, a calibration pytree of InputStats laid "
                "out like the params (see jaxcompress.calibrate)"
            )
        return stats_by_path(data) if whiten else {}

    def check(entry, weight, by_path):
        """``(gram, fan_in, m, n, trailing)`` of one leaf, its rank checked against its shape.

        A weight whose statistics are of its trailing axes (equinox's ``(out, in)``) is
        factorized inputs first (``trailing`` is then its number of input axes).
        """
        shape = tuple(weight.shape)
        trailing = None
        if whiten and _is_trailing(by_path, entry.path):
            if fan_in_axes is not None:
                raise ValueError(
                    f"{name}: leaf {entry.path!r} is contracted over its trailing axes (an "
                    "(out, in) weight), whose inputs its statistics give; fan_in_axes counts "
                    "leading input axes: leave it None"
                )
            trailing = leaf_gram(name, "whiten=True", entry.path, by_path, shape).fan_in
            shape = leading_shape(shape, trailing)
        if trailing is None and fan_in_axes is None and entry.trailing_inputs:
            # An equinox (out, in, *kernel) weight: its matrix view is out by in * kernel
            # (LowRank's leading axes are then its outputs, as from_leading stores them).
            leaf_fan_in = len(shape) - entry.trailing_inputs
        else:
            leaf_fan_in = trailing or _leaf_fan_in(name, entry.path, shape, fan_in_axes)
        m, n = matrix_shape(shape, leaf_fan_in)
        if rank is not None and rank >= min(m, n):
            raise Unfit(
                f"{name}: rank={rank} must be below min(m, n) = {min(m, n)} for leaf "
                f"{entry.path!r} (shape {shape}, matrix {m}x{n})"
            )
        gram = _leaf_gram(name, entry.path, by_path, m) if whiten else None
        if energy is not None and (is_traced(weight) or is_traced(gram)):
            raise ValueError(
                f"{name}: energy= picks each leaf's rank from its singular values, so "
                "its storage size depends on the data; call it outside jax.jit or give "
                "rank="
            )
        return gram, leaf_fan_in, m, n, trailing

    def step(item, leaf_key) -> tuple[LowRank | None, LowRankStats]:
        gram, leaf_fan_in, m, n, trailing = item.plan
        weight = item.weight if trailing is None else to_leading(item.weight, trailing)
        finite_rows = None
        if is_traced(weight):
            # Only a traced leaf can hold NaN or Inf (eager calls refuse them).
            weight, finite_rows = _zero_non_finite(weight, m, n)
        leaf, leaf_stats = _factorize(
            weight,
            gram,
            leaf_key,
            leaf_fan_in,
            m,
            n,
            rank=rank,
            energy=energy,
            method=method,
            oversample=oversample,
            power_iterations=power_iterations,
        )
        if leaf is not None and finite_rows is not None:
            leaf = _poison_rows(leaf, finite_rows)
        if leaf is not None and trailing is not None:
            leaf = from_leading(leaf, trailing)
        return leaf, leaf_stats

    return per_leaf(
        name,
        where,
        prepare=prepare,
        check=check,
        step=step,
        place=_place_factors,
        progress=progress,
        default_where=kernels,
    )


def _zero_non_finite(weight: jax.Array, m: int, n: int) -> tuple[jax.Array, jax.Array]:
    """``weight`` with NaN and Inf set to zero, and which rows of its matrix view had none."""
    finite = jnp.isfinite(weight)
    rows = jnp.all(finite.reshape(m, n), axis=1)
    return jnp.where(finite, weight, jnp.zeros_like(weight)), rows


def _poison_rows(leaf: LowRank, finite_rows: jax.Array) -> LowRank:
    """NaN in the rows of ``u`` whose weights held NaN or Inf.

    Entry ``(i, j)`` is ``u[i] @ v[:, j]``, so a row of ``u`` is the smallest part of
    the factors that can carry NaN to it.
    """
    u = jnp.where(finite_rows[:, None], leaf.u, jnp.full_like(leaf.u, jnp.nan))
    return dataclasses.replace(leaf, u=u)


def _place_factors(leaf: LowRank, reference) -> LowRank:
    """The factors laid out as the weight's rows and columns are."""
    if reference is None:
        return leaf
    u_reference, v_reference = factor_shardings(reference, leaf.shape, leaf.fan_in_axes)
    return dataclasses.replace(
        leaf, u=place_like(leaf.u, u_reference), v=place_like(leaf.v, v_reference)
    )


def _factorize(
    weight, gram, key, fan_in, m, n, *, rank, energy, method, oversample, power_iterations
) -> tuple[LowRank | None, LowRankStats]:
    """One leaf: its ``LowRank`` (``None`` when skipped) and stats."""
    itemsize = np.dtype(weight.dtype).itemsize
    dense_bytes = m * n * itemsize
    # The largest rank whose factors are smaller than the dense matrix.
    saving_limit = (m * n - 1) // (m + n)
    if rank is not None and rank > saving_limit:
        return None, _skipped(weight, rank, m, n, dense_bytes)
    wanted = saving_limit if rank is None else rank
    options = dict(
        fan_in_axes=fan_in,
        sketch=min(wanted + oversample, m, n) if method == "randomized" else 0,
        method=method,
        power_iterations=power_iterations,
    )
    if rank is not None:
        u, v, errors = _factor_at_rank(weight, gram, key, rank=rank, **options)
    else:
        u_all, sigma, vt, inverse_root, total = _decompose(weight, gram, key, **options)
        # Randomized sketches see only the top singular values; the total is exact.
        rank = energy_rank(sigma, float(energy), None if method == "svd" else total)
        if rank is None or rank > saving_limit:
            return None, _skipped(weight, rank, m, n, dense_bytes, energy=energy)
        u, v, errors = _truncate(
            weight, gram, u_all, sigma, vt, inverse_root, fan_in_axes=fan_in, rank=rank
        )
    leaf = LowRank(
        u=u, v=v, shape=tuple(weight.shape), dtype=np.dtype(weight.dtype), fan_in_axes=fan_in
    )
    stats: LowRankStats = {
        "rank": rank,
        "m": m,
        "n": n,
        "bytes_before": dense_bytes,
        "bytes_after": rank * (m + n) * itemsize,
        **errors,
    }
    return leaf, stats


def _skipped(weight, rank, m, n, dense_bytes, *, energy=None) -> LowRankStats:
    if rank is None:
        reason = (
            f"the sketched singular values do not reach energy={energy}, and no rank that "
            f"saves bytes could (r * (m + n) >= m * n = {m * n})"
        )
    else:
        chosen = f"energy={energy} needs rank {rank}; " if energy is not None else ""
        reason = (
            f"{chosen}rank {rank} factors hold r * (m + n) = {rank * (m + n)} >= m * n = "
            f"{m * n} entries, so the leaf is left dense"
        )
    return {
        "skipped": True if is_traced(weight) else reason,
        "rank": rank,
        "m": m,
        "n": n,
        "bytes_before": dense_bytes,
        "bytes_after": dense_bytes,
    }
