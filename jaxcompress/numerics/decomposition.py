"""Linear dimensionality reduction in pure JAX: PCA and Fisher LDA.

Two fits from data and two from streaming statistics, all jit-friendly (the number of
components is static) and all returning small frozen dataclasses registered as
pytrees, with a ``transform(x) = (x - mean) @ components.T``:

* :func:`pca_fit` -- principal components of ``x`` (``"full"``: an exact
  eigendecomposition of the ``d x d`` covariance for tall data, an SVD otherwise;
  ``"randomized"``: randomized block Krylov for tall data, Halko et al.'s range
  finder for wide data; ``"auto"`` picks). A randomized result is returned only
  after a residual check certifies it, else the exact path runs;
  :func:`pca_fit_checked` also returns that check.
* :func:`pca_from_statistics` -- the same from count, mean and second moment.
* :func:`lda_fit` -- Fisher's linear discriminants of labelled ``x``.
* :func:`lda_from_statistics` -- the same from count, mean, second moment and the
  per-class counts and means; :func:`lda_fit` computes those and calls it.

Everything runs in float32, or in float64 when the input is float64 and
``jax_enable_x64`` is on, with ``Precision.HIGHEST`` matmuls. Components follow
scikit-learn's sign convention (``svd_flip`` on the rows of ``Vt``): in each
component the entry largest in absolute value is positive.

Rows of ``x`` may be sharded over a mesh (``Auto`` or ``Explicit`` axes): every
reduction over rows (means, covariances, the small Gram matrices that orthonormalize
a sketch) becomes an all-reduce to a replicated result; only the exact SVD of a wide
``x`` (``method="full"`` with ``n <= d``) gathers ``x`` first.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from jaxcompress.core.checks import is_traced
from jaxcompress.core.mesh import unsharded

__all__ = [
    "LDAResult",
    "PCA_PATHS",
    "PCACheck",
    "PCAResult",
    "lda_fit",
    "lda_from_statistics",
    "pca_fit",
    "pca_fit_checked",
    "pca_from_statistics",
]

_PCA_METHODS = ("auto", "full", "randomized")
# lda(shrinkage=None) adds this ridge, relative to the mean within-class variance.
_AUTO_RIDGE = 1e-6
# "auto" picks "full" when max(n, d) <= _AUTO_MIN_SIZE or k >= _AUTO_FRACTION * min(n, d)
# (scikit-learn's rule), and for n >= d when the Krylov space is wider than
# _AUTO_KRYLOV_FRACTION * d and cannot be built from passes over x: there the exact
# O(d³) eigh costs about as much as the Krylov iterations on the covariance (measured on
# 10000 x 784 float32, 2-core CPU: 480 Krylov columns took 80 % of the eigh path's time).
_AUTO_MIN_SIZE = 500
_AUTO_FRACTION = 0.8
_AUTO_KRYLOV_FRACTION = 0.5
# Krylov space of the tall "randomized" path: blocks of k rounded up to 16 columns, at
# most _KRYLOV_MAX_BLOCK, and max(3 k, k + _KRYLOV_EXTRA) columns in all.
_KRYLOV_MAX_BLOCK = 128
_KRYLOV_EXTRA = 64
# The certificate of the approximate paths (see _certify): the promise is the summed
# explained variance within _EV_RTOL of exact; the residual bound must show a quarter
# of it, leaving the rest to float32 rounding. Each kept component's residual
# ‖A v − θ v‖ must also be at most _RESIDUAL_RTOL θ₁ (A the scatter, θ₁ its largest
# Ritz value), so sin∠(v, exact) ≤ _RESIDUAL_RTOL θ₁ / gap (Davis-Kahan). A failed
# check whose bound is within _RETRY_FACTOR of the tolerance retries with a space (or
# power iterations) twice as large; any other failure takes the exact path.
_EV_RTOL = 1e-4
_CERTIFY_RTOL = _EV_RTOL / 4
_RESIDUAL_RTOL = 1e-4
_RETRY_FACTOR = 100.0
# Time per flop of a thin product with x (16 to 128 columns), relative to the blocked
# Gram matrix's, measured on 10000 x 784 float32 (2-core CPU).
_PASS_COST = 1.6


# --------------------------------------------------------------------------- helpers


def _is_int(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _mm(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def _explicit_rows(*arrays: jax.Array) -> NamedSharding | None:
    """A replicated sharding on the mesh of the first array whose type is explicitly
    sharded, else ``None``. Contractions over sharded rows need it as ``out_sharding``."""
    for a in arrays:
        sharding = jax.typeof(a).sharding
        mesh = getattr(sharding, "mesh", None)
        if (
            mesh is not None
            and any(t == AxisType.Explicit for t in mesh.axis_types)
            and any(entry is not None for entry in sharding.spec)
        ):
            return NamedSharding(mesh, PartitionSpec())
    return None


def _tmm(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a.T @ b``, contracting the (possibly sharded) rows; the result is replicated."""
    return jnp.matmul(
        a.T, b, precision=jax.lax.Precision.HIGHEST, out_sharding=_explicit_rows(a, b)
    )


def blocked_gram(x: jax.Array) -> jax.Array:
    """``x.T @ x`` (``(d, d)``, replicated), computing each off-diagonal block once.

    Columns are split into ``_gram_blocks(d)`` blocks and only the blocks on and above
    the diagonal are multiplied: ``(B + 1) / 2B`` of the flops of a plain product, which
    is what a BLAS ``syrk`` saves (XLA has no symmetric rank-k update). Measured on a
    100000 x 1024 float32 matrix: 4 blocks take about 30 % less CPU time than one
    product, about as much as NumPy's ``x.T @ x`` (which calls ``syrk``).

    Example:
        >>> import jax.numpy as jnp
        >>> blocked_gram(jnp.array([[1.0, 2.0], [3.0, 4.0]])).tolist()
        [[10.0, 14.0], [14.0, 20.0]]
    """
    d = x.shape[1]
    edges = np.linspace(0, d, _gram_blocks(d) + 1).astype(int).tolist()
    if len(edges) == 2:
        return _sym(_tmm(x, x))
    parts = [x[:, lo:hi] for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
    upper = {
        (i, j): _tmm(parts[i], parts[j]) for i in range(len(parts)) for j in range(i, len(parts))
    }
    rows = [
        [upper[(i, j)] if j >= i else upper[(j, i)].T for j in range(len(parts))]
        for i in range(len(parts))
    ]
    return jnp.block(rows)


def _gram_blocks(d: int) -> int:
    return 4 if d >= 512 else 2 if d >= 256 else 1


def _sym(a: jax.Array) -> jax.Array:
    return (a + a.T) * 0.5


def _x64_enabled() -> bool:
    # jax adds its flags to Config at run time, so the checker sees no such attribute.
    return jax.config.jax_enable_x64  # type: ignore[attr-defined]


def _float_dtype(dtype: Any) -> Any:
    """float64 for float64 input with x64 enabled, float32 otherwise."""
    if np.dtype(dtype) == np.float64 and _x64_enabled():
        return jnp.float64
    return jnp.float32


def _as_array(name: str, arg: str, x: Any, ndim: int | None) -> Any:
    if not (hasattr(x, "dtype") and hasattr(x, "shape")):
        try:
            x = np.asarray(x)
        except Exception as err:  # pragma: no cover - odd objects
            raise TypeError(f"{name}: {arg} must be an array, got {type(x).__name__}") from err
    if ndim is not None and len(x.shape) != ndim:
        raise ValueError(
            f"{name}: {arg} must be {ndim}-D, got shape {tuple(x.shape)}"
            + (" (samples as rows, features as columns)" if ndim == 2 else "")
        )
    return x


def _as_float_matrix(name: str, arg: str, x: Any) -> jax.Array:
    """``x`` as a 2-D real floating array in the compute dtype, checked."""
    x = _as_array(name, arg, x, 2)
    kind = np.dtype(x.dtype).kind
    if kind not in "iuf":
        raise TypeError(
            f"{name}: {arg} must hold real numbers (integer or floating), got dtype "
            f"{np.dtype(x.dtype).name}"
        )
    if 0 in x.shape:
        raise ValueError(f"{name}: {arg} is empty (shape {tuple(x.shape)})")
    return jnp.asarray(x, dtype=_float_dtype(x.dtype))


def _check_finite(name: str, what: str, flag: jax.Array) -> None:
    """Raises if a concrete ``flag`` (``isfinite`` of a reduction of the data) is false."""
    if not is_traced(flag) and not bool(flag):
        raise ValueError(f"{name}: {what} contains NaN or Inf values (or overflows)")


def _flip_signs(components: jax.Array) -> jax.Array:
    """scikit-learn's ``svd_flip(u_based_decision=False)``: each row's largest-|entry|
    (first one on ties) is made positive."""
    pivot = jnp.argmax(jnp.abs(components), axis=1)
    value = jnp.take_along_axis(components, pivot[:, None], axis=1)
    signs = jnp.where(value < 0, -1.0, 1.0).astype(components.dtype)
    return components * signs


def _project(name: str, x: Any, mean: jax.Array, components: jax.Array) -> jax.Array:
    x = _as_array(name, "x", x, None)
    d = components.shape[1]
    if len(x.shape) == 0 or x.shape[-1] != d:
        raise ValueError(f"{name}: x must have {d} features in its last axis, got {x.shape}")
    if np.dtype(x.dtype).kind not in "iuf":
        raise TypeError(f"{name}: x must hold real numbers, got {np.dtype(x.dtype).name}")
    return _project_jit(jnp.asarray(x, dtype=components.dtype), mean, components)


@jax.jit
def _project_jit(x: jax.Array, mean: jax.Array, components: jax.Array) -> jax.Array:
    centered = x - mean.reshape((1,) * (x.ndim - 1) + mean.shape)
    return _mm(centered, components.T)


# --------------------------------------------------------------------------- results


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PCAResult:
    """A fitted PCA, returned by :func:`pca_fit` and :func:`pca_from_statistics`.

    Attributes:
        components: ``(k, d)`` principal axes, orthonormal rows, in order of
            decreasing variance; in each row the entry largest in absolute value is
            positive (scikit-learn's ``svd_flip`` convention).
        explained_variance: ``(k,)`` variance along each axis (``n - 1`` normalization).
        explained_variance_ratio: ``(k,)`` that variance over the total variance.
        mean: ``(d,)`` the per-feature mean that was subtracted (zeros if not centered).
        singular_values: ``(k,)`` singular values of the centered data,
            ``sqrt(explained_variance * (n - 1))``.

    Example:
        >>> import jax.numpy as jnp
        >>> x = jnp.array([[0.0, 0.0], [2.0, 0.0], [4.0, 0.0]])
        >>> pca = pca_fit(x, 1)
        >>> pca.components.tolist(), pca.explained_variance.tolist()
        ([[1.0, 0.0]], [4.0])
        >>> pca.transform(jnp.array([[3.0, 1.0]])).tolist()
        [[1.0]]
    """

    components: jax.Array
    explained_variance: jax.Array
    explained_variance_ratio: jax.Array
    mean: jax.Array
    singular_values: jax.Array

    def transform(self, x: jax.Array) -> jax.Array:
        """Projects ``x`` (``(..., d)``) onto the components: ``(x - mean) @ components.T``."""
        return _project("PCAResult.transform", x, self.mean, self.components)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LDAResult:
    """A fitted Fisher LDA, returned by :func:`lda_fit` and :func:`lda_from_statistics`.

    Attributes:
        components: ``(k, d)`` discriminant directions, in order of decreasing Fisher
            ratio, scaled so that the projected data has unit within-class variance
            (``v Sw vᵀ = 1`` for the regularized within-class covariance ``Sw``, as
            scikit-learn's ``scalings_`` with ``solver="eigen"``); in each row the
            entry largest in absolute value is positive.
        mean: ``(d,)`` the overall mean of the data.
        explained_variance_ratio: ``(k,)`` each direction's generalized eigenvalue
            over the sum of all of them (scikit-learn's ``explained_variance_ratio_``).

    Example:
        >>> import jax.numpy as jnp
        >>> x = jnp.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [3.0, 0.0], [4.0, 0.0], [3.0, 1.0]])
        >>> lda = lda_fit(x, jnp.array([0, 0, 0, 1, 1, 1]))
        >>> lda.components.shape, [round(v, 2) for v in lda.transform(x)[:, 0].tolist()]
        ((1, 2), [-4.9, -2.45, -3.67, 2.45, 4.9, 3.67])
    """

    components: jax.Array
    mean: jax.Array
    explained_variance_ratio: jax.Array

    def transform(self, x: jax.Array) -> jax.Array:
        """Projects ``x`` (``(..., d)``) onto the directions: ``(x - mean) @ components.T``."""
        return _project("LDAResult.transform", x, self.mean, self.components)


PCA_PATHS = ("full", "randomized", "randomized, larger space", "full after a failed check")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PCACheck:
    """How :func:`pca_fit_checked` reached its result, and the certificate it checked.

    Attributes:
        path: int32 scalar, an index into ``PCA_PATHS``: ``0`` the exact path was
            asked for or chosen, ``1`` the randomized result passed its check, ``2``
            a retry with a space twice as large passed it, ``3`` the exact path ran
            after the check failed.
        error_bound: the randomized result's bound on the relative error of the
            summed explained variance (``0`` when only the exact path ran).
        max_residual: its largest ``‖A v − θ v‖ / θ₁`` over the kept components
            (``A`` the scatter matrix, ``θ₁`` the largest Ritz value; ``0`` likewise).

    Example:
        >>> import jax
        >>> x = jax.random.normal(jax.random.key(0), (50, 4))
        >>> pca, check = pca_fit_checked(x, 2)
        >>> check.path_name, float(check.error_bound)
        ('full', 0.0)
    """

    path: jax.Array
    error_bound: jax.Array
    max_residual: jax.Array

    @property
    def path_name(self) -> str:
        """``PCA_PATHS[path]`` (needs a concrete ``path``, i.e. outside ``jit``)."""
        return PCA_PATHS[int(self.path)]


def _exact_check(dtype: Any) -> PCACheck:
    zero = jnp.zeros((), dtype)
    return PCACheck(path=jnp.zeros((), jnp.int32), error_bound=zero, max_residual=zero)


# --------------------------------------------------------------------------- PCA


def _check_n_components(name: str, n_components: Any, limit: int, why: str) -> int:
    if not _is_int(n_components):
        raise TypeError(f"{name}: n_components must be an int, got {type(n_components).__name__}")
    if not 1 <= n_components <= limit:
        raise ValueError(
            f"{name}: n_components must be in [1, {limit}] ({why}), got {n_components}"
        )
    return int(n_components)


def _pca_from_covariance(cov: jax.Array, count: jax.Array, mean: jax.Array, k: int) -> PCAResult:
    """PCA from an unbiased covariance (``n - 1`` normalization) and the sample count."""
    cov = _sym(unsharded(cov))
    values, vectors = jnp.linalg.eigh(cov)  # ascending
    variance = jnp.maximum(values[::-1][:k], 0.0)
    components = _flip_signs(vectors[:, ::-1][:, :k].T)
    total = jnp.trace(cov)
    return PCAResult(
        components=components,
        explained_variance=variance,
        explained_variance_ratio=variance / total,
        mean=mean,
        singular_values=jnp.sqrt(variance * (count - 1)),
    )


def _center(x: jax.Array, center: bool) -> tuple[jax.Array, jax.Array]:
    if center:
        mean = jnp.mean(x, axis=0)
        return x - mean[None, :], mean
    return x, jnp.zeros((x.shape[1],), x.dtype)


@functools.partial(jax.jit, static_argnames=("k", "center"))
def _pca_covariance(x: jax.Array, k: int, center: bool) -> tuple[PCAResult, jax.Array]:
    n = x.shape[0]
    xc, mean = _center(x, center)
    cov = blocked_gram(xc) / (n - 1)
    result = _pca_from_covariance(cov, jnp.asarray(n, x.dtype), mean, k)
    return result, jnp.isfinite(jnp.trace(cov))


def _from_svd(
    s: jax.Array, vt: jax.Array, mean: jax.Array, total: jax.Array, n: int, k: int
) -> PCAResult:
    variance = s[:k] ** 2 / (n - 1)
    return PCAResult(
        components=_flip_signs(vt[:k]),
        explained_variance=variance,
        explained_variance_ratio=variance / total,
        mean=mean,
        singular_values=s[:k],
    )


@functools.partial(jax.jit, static_argnames=("k", "center"))
def _pca_svd(x: jax.Array, k: int, center: bool) -> tuple[PCAResult, jax.Array]:
    n = x.shape[0]
    xc, mean = _center(x, center)
    _, s, vt = jnp.linalg.svd(unsharded(xc), full_matrices=False)
    total = jnp.sum(s**2) / (n - 1)
    return _from_svd(s, vt, mean, total, n, k), jnp.isfinite(total)


def _inverse_cholesky(g: jax.Array, floor: jax.Array) -> jax.Array:
    """``W = L⁻ᵀ`` for the Cholesky factor ``g = L Lᵀ`` of a small SPD ``g``, so that
    ``Wᵀ g W = I``; pivots below ``floor`` are raised to it.

    Two loops over the ``l`` columns in plain XLA ops (``O(l³)`` in all): on CPU the
    LAPACK kernels behind ``jnp.linalg.cholesky`` / ``eigh`` / ``qr`` run on their
    own BLAS thread pool, and a call made right after an XLA computation can wait
    tens of milliseconds for its threads (measured on a 2-core machine); the power
    iterations make dozens of such calls.
    """
    size = g.shape[0]
    index = jnp.arange(size)
    eye = jnp.eye(size, dtype=g.dtype)

    def cholesky_column(j: jax.Array, lower: jax.Array) -> jax.Array:
        # Columns >= j of `lower` are still zero, so this is g[:, j] - Σ_{k<j} L[:, k] L[j, k].
        residual = g[:, j] - _mm(lower, lower[j])
        pivot = jnp.sqrt(jnp.maximum(residual[j], floor))
        column = jnp.where(index > j, residual / pivot, jnp.where(index == j, pivot, 0.0))
        return lower.at[:, j].set(column)

    lower = jax.lax.fori_loop(0, size, cholesky_column, jnp.zeros_like(g))

    def inverse_row(i: jax.Array, inverse: jax.Array) -> jax.Array:
        # Forward substitution: rows >= i of `inverse` are still zero.
        return inverse.at[i].set((eye[i] - _mm(lower[i], inverse)) / lower[i, i])

    inverse = jax.lax.fori_loop(0, size, inverse_row, jnp.zeros_like(g))
    return inverse.T


def _orthonormal(y: jax.Array, passes: int = 2, *, robust: bool = True) -> jax.Array:
    """An orthonormal basis of the columns of a tall ``y`` (``(m, l)``, rows may be sharded).

    Shifted Cholesky QR (Fukaya et al. 2020): the first pass factors ``yᵀ y + s I``
    with a shift ``s`` of about ``eps (sqrt(m) + l) trace(yᵀ y)``, so it never breaks
    down (a rank-deficient ``y`` included); directions with singular values below
    ``sqrt(s)`` come out under-scaled, not lost, and the next passes (with only an
    ``eps``-sized guard) restore them. Two passes give a well-conditioned basis of the
    same span, three an orthonormal one to rounding. ``robust=False`` skips the large
    shift, for a ``y`` known to be well conditioned (the first pass's shift would
    otherwise leave ``yᵀ y`` about ``I - s I``). Only ``l x l`` matrices are
    reduced over the rows of ``y``; everything is matmuls and small XLA loops.
    """
    m, width = y.shape
    eps = jnp.finfo(y.dtype).eps
    tiny = jnp.finfo(y.dtype).tiny
    eye = jnp.eye(width, dtype=y.dtype)
    for i in range(passes):
        g = _tmm(y, y)
        g = (g + g.T) * 0.5
        trace = jnp.maximum(jnp.trace(g), tiny)
        shift = eps * (m**0.5 + width) * trace if i == 0 and robust else eps * trace / width
        y = _mm(y, _inverse_cholesky(g + shift * eye, shift))
    return y


@functools.partial(jax.jit, static_argnames=("k", "center", "width", "n_iter"))
def _pca_sketch_data(
    x: jax.Array, key: jax.Array, k: int, center: bool, width: int, n_iter: int
) -> tuple[PCAResult, tuple[jax.Array, jax.Array, jax.Array]]:
    """Halko et al. (2011), Algorithms 4.4 + 5.1, on the centered data: ``2 n_iter + 3``
    passes over ``x`` with ``width = k + oversamples`` columns, and one more for the
    residuals of the certificate.

    The passes back to feature space are written ``qᵀ x`` (``(width, d)``), not
    ``xᵀ q``: on CPU, XLA runs the latter about 5x slower (it relayouts ``x``).
    """
    n, d = x.shape
    xc, mean = _center(x, center)
    total = jnp.sum(xc * xc) / (n - 1)
    omega = jax.random.normal(key, (d, width), x.dtype)
    q = _orthonormal(_mm(xc, omega))

    def power(_: int, q: jax.Array) -> jax.Array:
        z = _orthonormal(_tmm(q, xc).T)  # (d, width), from qᵀ xc
        return _orthonormal(_mm(xc, z))  # (n, width)

    q = _orthonormal(jax.lax.fori_loop(0, n_iter, power, q), passes=1, robust=False)
    b = _tmm(q, xc)  # (width, d) = qᵀ xc
    _, s, vt = jnp.linalg.svd(b, full_matrices=False)
    result = _from_svd(s, vt, mean, total, n, k)
    vectors = vt[: min(k + 1, width)].T
    check = _certify(s**2, vectors, _scatter_times(xc, vectors), k, jnp.isfinite(total))
    return result, check


def krylov_shape(k: int, d: int, n_iter: int | None) -> tuple[int, int]:
    """Block width and number of blocks of the tall "randomized" path's Krylov space.

    The width is ``k`` rounded up to a multiple of 16 (at most 128; XLA's thin
    products run slowest at odd widths); by default there are enough blocks for a
    space of ``max(3 k, k + 64)`` columns, the smallest that matched the exact
    explained-variance sum within 1e-5 on the benchmark's slowly decaying spectrum.
    With ``n_iter`` there are ``n_iter + 1`` blocks. A space of ``d`` columns or more
    is one block of ``d``: Rayleigh-Ritz on it is an exact eigendecomposition.

    Example:
        >>> krylov_shape(16, 784, None), krylov_shape(4, 24, None)
        ((16, 5), (24, 1))
    """
    block = min(-(-k // 16) * 16, _KRYLOV_MAX_BLOCK)
    blocks = -(-max(3 * k, k + _KRYLOV_EXTRA) // block) if n_iter is None else n_iter + 1
    if block * blocks >= d:  # the space would be all of R^d: one block of d columns
        return d, 1
    return block, blocks


def krylov_on_data(n: int, d: int, block: int, blocks: int) -> bool:
    """Whether the Krylov space is built from passes over ``x`` rather than from the
    ``d x d`` covariance: its ``2 blocks - 1`` thin passes (``2 n d block`` flops
    each) against the blocked Gram matrix's ``n d² (g + 1) / g`` for ``g`` column
    blocks, a thin product's flop counted at _PASS_COST times a Gram flop.

    Example:
        >>> krylov_on_data(10000, 784, 16, 5), krylov_on_data(10000, 784, 64, 3)
        (True, False)
    """
    g = _gram_blocks(d)
    return _PASS_COST * 2 * block * (2 * blocks - 1) <= d * (g + 1) / g


def auto_method(n: int, d: int, k: int) -> str:
    """The ``method="auto"`` choice for ``k`` components of ``n`` samples of ``d`` features.

    Example:
        >>> auto_method(10000, 784, 16), auto_method(100, 10, 2)
        ('randomized', 'full')
    """
    if max(n, d) <= _AUTO_MIN_SIZE or k >= _AUTO_FRACTION * min(n, d):
        return "full"
    if n >= d:
        block, blocks = krylov_shape(k, d, None)
        if block * blocks > _AUTO_KRYLOV_FRACTION * d and not krylov_on_data(n, d, block, blocks):
            return "full"
    return "randomized"


def _next_block(image: jax.Array, blocks: list[jax.Array]) -> jax.Array:
    """The next orthonormal Krylov block: ``image`` with the previous blocks projected
    out, orthonormalized, and both again. Once the space has converged, what is left
    after one projection is mostly rounding error along the previous blocks; the
    second round removes it (block classical Gram-Schmidt, "twice is enough")."""
    basis = jnp.concatenate(blocks, axis=1)
    for _ in range(2):
        image = _orthonormal(image - _mm(basis, _mm(basis.T, image)))
    return image


def _ritz(
    basis: jax.Array, t: jax.Array, k: int, n: int, total: jax.Array, mean: jax.Array
) -> tuple[PCAResult, jax.Array, jax.Array]:
    """Rayleigh-Ritz: the top ``k`` eigenpairs of ``t = basisᵀ A basis`` (``A`` the
    scatter matrix, ``(n - 1)`` times the covariance), mapped back to feature space.

    Also returns what :func:`_certify` needs: every Ritz value of the space
    (descending, of ``A``) and the top ``min(k + 1, width)`` Ritz vectors ``(d, m)``.
    """
    values, vectors = jnp.linalg.eigh(_sym(t))  # ascending
    values, vectors = values[::-1], vectors[:, ::-1]
    variance = jnp.maximum(values[:k], 0.0) / (n - 1)
    ritz_vectors = _mm(basis, vectors[:, : min(k + 1, t.shape[0])])
    result = PCAResult(
        components=_flip_signs(ritz_vectors[:, :k].T),
        explained_variance=variance,
        explained_variance_ratio=variance / (total / (n - 1)),
        mean=mean,
        singular_values=jnp.sqrt(variance * (n - 1)),
    )
    return result, values, ritz_vectors


def _certify(
    values: jax.Array, vectors: jax.Array, images: jax.Array, k: int, finite: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The certificate of an approximate top-``k`` eigendecomposition of the scatter
    ``A``: ``(error_bound, max_residual, passed)``.

    ``values`` are the approximate eigenvalues (descending, all of the space),
    ``vectors`` ``(d, m)`` the top ``m = min(k + 1, width)`` approximate eigenvectors and
    ``images`` ``A vectors``, computed afresh. With residuals ``rᵢ = ‖A vᵢ − θᵢ vᵢ‖``:
    each ``θᵢ`` is within ``rᵢ`` of an eigenvalue (Weyl), so the kept sum is within
    ``Σ rᵢ``; and when ``δ = θ_k − (θ_{k+1} + r_{k+1}) > 0`` separates the kept Ritz
    values from the rest of the spectrum, within ``Σ rᵢ² / δ`` (the quadratic residual
    bound of the 2 x 2 block form of ``A`` in the Ritz basis). A Rayleigh-Ritz sum is
    never above the exact one (Ky Fan), so this bounds the shortfall. Like every
    residual test it assumes no eigenvalue above ``θ_k`` was missed by the whole space,
    which a Gaussian start makes improbable, not impossible.
    """
    m = vectors.shape[1]
    residuals = jnp.linalg.norm(images - vectors * values[None, :m], axis=0)
    kept_residuals = residuals[:k]
    tiny = jnp.finfo(values.dtype).tiny
    bound = jnp.sum(kept_residuals)
    if m > k:
        gap = values[k - 1] - values[k] - residuals[k]
        quadratic = jnp.sum(kept_residuals**2) / jnp.maximum(gap, tiny)
        bound = jnp.where(gap > 0, jnp.minimum(bound, quadratic), bound)
    error_bound = bound / jnp.maximum(jnp.sum(jnp.maximum(values[:k], 0.0)), tiny)
    max_residual = jnp.max(kept_residuals) / jnp.maximum(values[0], tiny)
    passed = finite & (error_bound <= _CERTIFY_RTOL) & (max_residual <= _RESIDUAL_RTOL)
    return error_bound, max_residual, passed


def _scatter_times(xc: jax.Array, v: jax.Array) -> jax.Array:
    """``xcᵀ (xc v)`` (``(d, m)``) in two thin passes, the second written ``yᵀ xc``: XLA
    runs ``xcᵀ y`` about 5x slower on CPU."""
    return _tmm(_mm(xc, v), xc).T


@functools.partial(jax.jit, static_argnames=("k", "center", "block", "blocks"))
def _pca_krylov_data(
    x: jax.Array, key: jax.Array, k: int, center: bool, block: int, blocks: int
) -> tuple[PCAResult, tuple[jax.Array, jax.Array, jax.Array]]:
    """Randomized block Krylov (Musco & Musco 2015) on the scatter ``A = xcᵀ xc`` of
    the centered ``xc = x - mean``, with a Rayleigh-Ritz step on the whole space:
    ``blocks - 1`` full passes over ``xc``, a final half pass, and one full pass for
    the residuals of the certificate.

    ``xc`` is formed once: centering implicitly (``x v - mean·v``) cancels
    catastrophically in float32 when the mean is large against the spread (an offset
    of 300 cost 0.27 % of the explained variance). ``basisᵀ A basis`` comes from the
    stored images, except the last block's ``yᵀ y``, which needs only ``y``: a space
    of ``blocks`` blocks for ``2 blocks - 1`` thin products.
    """
    n, d = x.shape
    xc, mean = _center(x, center)
    total = jnp.sum(xc * xc)
    v = _orthonormal(jax.random.normal(key, (d, block), x.dtype))
    vs, images = [], []
    for _ in range(blocks - 1):
        vs.append(v)
        images.append(_scatter_times(xc, v))
        v = _next_block(images[-1], vs)
    y = _mm(xc, v)
    vs.append(v)
    basis = jnp.concatenate(vs, axis=1)
    last = _tmm(y, y)
    if images:
        known = _mm(basis.T, jnp.concatenate(images, axis=1))  # (blocks b, (blocks-1) b)
        t = jnp.concatenate([known, jnp.concatenate([known[-block:].T, last], axis=0)], axis=1)
    else:
        t = last
    result, values, vectors = _ritz(basis, t, k, n, total, mean)
    check = _certify(values, vectors, _scatter_times(xc, vectors), k, jnp.isfinite(total))
    return result, check


@functools.partial(
    jax.jit, static_argnames=("k", "center", "block", "sizes", "first_path", "certify")
)
def _pca_krylov_covariance(
    x: jax.Array,
    key: jax.Array,
    k: int,
    center: bool,
    block: int,
    sizes: tuple[int, ...],
    first_path: int,
    certify: bool,
) -> tuple[PCAResult, PCACheck, jax.Array]:
    """Randomized block Krylov on the ``d x d`` scatter matrix, with the whole fallback
    ladder on that one matrix: ``(result, check, finite)``.

    One pass over ``x`` for the (blocked) Gram matrix, then for each attempt ``blocks``
    products of ``O(d² block)`` each, a Rayleigh-Ritz step instead of a full ``O(d³)``
    eigh, and one more product for the residuals of the certificate. ``sizes`` are the
    block counts to try in order (``PCACheck.path`` ``first_path``, ``first_path + 1``,
    …); a later one runs only when the previous bound was within ``_RETRY_FACTOR`` of
    the tolerance. When every attempt fails, the exact ``eigh`` runs on the same
    scatter: the Gram matrix, the dominant cost at ``n >> d``, is never computed twice.
    With ``certify=False`` the first attempt is returned unchecked.
    """
    n, _ = x.shape
    xc, mean = _center(x, center)
    scatter = blocked_gram(xc)
    total = jnp.trace(scatter)
    finite = jnp.isfinite(total)
    start = _orthonormal(jax.random.normal(key, (scatter.shape[0], block), x.dtype))

    def attempt(i: int) -> tuple[PCAResult, PCACheck, jax.Array]:
        v, vs, images = start, [], []
        for j in range(sizes[i]):
            vs.append(v)
            images.append(_mm(scatter, v))
            if j + 1 < sizes[i]:
                v = _next_block(images[-1], vs)
        basis = jnp.concatenate(vs, axis=1)
        t = _mm(basis.T, jnp.concatenate(images, axis=1))
        result, values, vectors = _ritz(basis, t, k, n, total, mean)
        bound, residual, passed = _certify(values, vectors, _mm(scatter, vectors), k, finite)
        path = jnp.asarray(first_path + i, jnp.int32)
        return result, PCACheck(path=path, error_bound=bound, max_residual=residual), passed

    def exact(check: PCACheck) -> tuple[PCAResult, PCACheck]:
        path = jnp.asarray(len(PCA_PATHS) - 1, jnp.int32)
        cov = scatter / (n - 1)
        return _pca_from_covariance(cov, jnp.asarray(n, x.dtype), mean, k), dataclasses.replace(
            check, path=path
        )

    def ladder(i: int) -> tuple[PCAResult, PCACheck]:
        result, check, passed = attempt(i)
        if not certify:
            return result, check
        if i + 1 < len(sizes):
            near = check.error_bound <= _RETRY_FACTOR * _CERTIFY_RTOL
            failed = functools.partial(
                jax.lax.cond, near, lambda: ladder(i + 1), lambda: exact(check)
            )
        else:
            failed = functools.partial(exact, check)
        return jax.lax.cond(passed, lambda: (result, check), failed)

    result, check = ladder(0)
    return result, check, finite


def pca_fit(
    x: jax.Array,
    n_components: int,
    *,
    method: str = "auto",
    key: jax.Array | None = None,
    center: bool = True,
    n_oversamples: int = 10,
    n_iter: int | None = None,
    certify: bool = True,
) -> PCAResult:
    """Principal component analysis of the rows of ``x``.

    Methods (``k = n_components``, ``l = min(k + n_oversamples, n, d)``):

    * ``"full"`` -- exact. When ``n > d`` it eigendecomposes the ``d x d``
      covariance ``(x - mean)ᵀ (x - mean) / (n - 1)``: one pass over ``x`` and an
      ``O(d³)`` ``eigh``, the fast exact path for tall data (scikit-learn's
      ``svd_solver="covariance_eigh"``). Otherwise it takes the SVD of the centered
      ``x``.
    * ``"randomized"`` -- when ``n >= d``: randomized block Krylov (Musco & Musco
      2015) from a Gaussian block, ``b`` = ``k`` rounded up to a multiple of 16 (at
      most 128) columns per block and ``ceil(max(3 k, k + 64) / b)`` blocks, then a
      Rayleigh-Ritz step on the whole space. The space is built from thin passes
      over ``x`` with implicit centering (``x`` is read, never copied) when
      ``1.6 * 2 b (2 blocks - 1) <= d (g + 1) / g`` (its flops against the blocked
      Gram matrix's, ``g`` column blocks, a thin product's flop measured at 1.6 Gram
      flops), else from the ``d x d`` covariance. A space of ``d`` columns or more is
      exact. When ``n < d``: Halko, Martinsson & Tropp (2011), a Gaussian sketch of
      ``l`` columns and ``n_iter`` power iterations re-orthonormalized on both sides.
      Every randomized result is checked before it is returned (``certify``): one
      more product with the scatter matrix ``A`` gives the residuals
      ``rᵢ = ‖A vᵢ − θᵢ vᵢ‖`` of the kept components, which must bound the relative
      error of the summed explained variance by 2.5e-5 (so it is within 1e-4 of
      exact after float32 rounding) and each ``rᵢ`` by ``1e-4 θ₁``, which puts each
      component within ``sin∠ ≤ rᵢ / gapᵢ`` of the exact one (Davis-Kahan). A result
      that fails is recomputed with a space (or ``n_iter``) twice as large when its
      bound is within 100x of the tolerance, else, or if that fails too, by the exact
      path. When the space is built from the covariance, the retry and the exact
      ``eigh`` reuse that covariance (one ``jit`` call, ``lax.cond`` between the
      steps): flat spectra (no decay past ``k``) then cost the exact path plus a
      Krylov attempt on the ``d x d`` matrix, not a second pass over ``x``. Under
      :func:`jax.jit` the attempts on the data are not retried: the exact path runs
      (inside a ``lax.cond``) when their check fails.
    * ``"auto"`` -- ``"full"`` when ``max(n, d) <= 500`` or ``k >= 0.8 min(n, d)``
      (scikit-learn's rule), and also when ``n >= d``, the Krylov space has more
      than ``d / 2`` columns and would be built from the covariance (e.g. ``k = 256``,
      ``d = 784``: there the exact ``eigh`` costs about as much, as measured on CPU);
      otherwise ``"randomized"``. See ``benchmarks/pca_vs_sklearn.py``.

    Computes in float32 (float64 when ``x`` is float64 and ``jax_enable_x64`` is
    on). Under :func:`jax.jit`, mark ``n_components`` (and the other options) static;
    NaN or Inf in ``x`` then propagates instead of raising.

    Args:
        x: ``(n, d)`` data, samples as rows; integer or floating. Rows may be
            sharded over a mesh.
        n_components: How many components ``k`` to keep, ``1 <= k <= min(n, d)``.
        method: ``"auto"``, ``"full"`` or ``"randomized"``.
        key: PRNG key of the randomized sketch; ``None`` means ``jax.random.key(0)``,
            so results are deterministic. Ignored by ``"full"``.
        center: Subtract the per-feature mean first (as PCA does). With ``False`` the
            mean is zeros and the components are the right singular vectors of ``x``
            itself; variances are then second moments about zero.
        n_oversamples: Extra sketch columns of ``"randomized"`` for ``n < d``
            (default 10, as scikit-learn); the Krylov path sizes its space by ``k``.
        n_iter: Iterations of ``"randomized"``. For ``n >= d``: the Krylov space has
            ``n_iter + 1`` blocks (``None``: the default size above). For ``n < d``:
            power iterations; ``None`` means scikit-learn's default, 7 if
            ``k < 0.1 min(n, d)`` else 4.
        certify: Check the randomized result and fall back as above (default). With
            ``False`` the first randomized attempt is returned unchecked: faster, and
            accurate only on spectra that decay past ``k``.

    Returns:
        A :class:`PCAResult`.

    Raises:
        TypeError: If ``x`` is not real-valued or ``n_components`` is not an int.
        ValueError: If ``x`` is not 2-D, has fewer than 2 rows, contains NaN or Inf,
            or ``n_components``, ``method``, ``n_oversamples`` or ``n_iter`` is out of
            range.

    Example:
        >>> import jax
        >>> scale = jax.numpy.arange(1.0, 6.0)
        >>> x = jax.random.normal(jax.random.key(0), (200, 5)) * scale[None, :]
        >>> pca = pca_fit(x, 2, method="full")
        >>> pca.components.shape, pca.transform(x).shape
        ((2, 5), (200, 2))
        >>> [round(r, 2) for r in pca.explained_variance_ratio.tolist()]
        [0.46, 0.3]
    """
    return _pca("pca_fit", x, n_components, method, key, center, n_oversamples, n_iter, certify)[0]


def pca_fit_checked(
    x: jax.Array,
    n_components: int,
    *,
    method: str = "auto",
    key: jax.Array | None = None,
    center: bool = True,
    n_oversamples: int = 10,
    n_iter: int | None = None,
    certify: bool = True,
) -> tuple[PCAResult, PCACheck]:
    """:func:`pca_fit` (same arguments), also returning how the result was reached.

    Returns:
        ``(result, check)``: the :class:`PCAResult` and a :class:`PCACheck` with the
        path taken and the certificate of the randomized attempt, if any.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> scales = 0.5 ** jnp.arange(40.0)
        >>> x = jax.random.normal(jax.random.key(0), (2000, 40)) * scales[None, :]
        >>> pca, check = pca_fit_checked(x, 4, method="randomized")
        >>> check.path_name, bool(check.error_bound <= 2.5e-5)
        ('randomized', True)
    """
    return _pca(
        "pca_fit_checked", x, n_components, method, key, center, n_oversamples, n_iter, certify
    )


def _pca(
    name: str,
    x: Any,
    n_components: Any,
    method: Any,
    key: jax.Array | None,
    center: Any,
    n_oversamples: Any,
    n_iter: Any,
    certify: Any,
) -> tuple[PCAResult, PCACheck]:
    x = _as_float_matrix(name, "x", x)
    n, d = x.shape
    if n < 2:
        raise ValueError(f"{name}: x needs at least 2 rows (samples), got {n}")
    k = _check_n_components(name, n_components, min(n, d), "at most min(n_samples, n_features)")
    if not isinstance(method, str) or method not in _PCA_METHODS:
        raise ValueError(f"{name}: method must be one of {_PCA_METHODS}, got {method!r}")
    for flag, value in (("center", center), ("certify", certify)):
        if not isinstance(value, bool):
            raise TypeError(f"{name}: {flag} must be a bool, got {type(value).__name__}")
    if not _is_int(n_oversamples) or n_oversamples < 0:
        raise ValueError(f"{name}: n_oversamples must be an int >= 0, got {n_oversamples!r}")
    if n_iter is not None and (not _is_int(n_iter) or n_iter < 0):
        raise ValueError(f"{name}: n_iter must be an int >= 0 or None, got {n_iter!r}")
    if method == "auto":
        method = auto_method(n, d, k)
    if method == "full":
        result, finite = _pca_exact(x, k, center)
        _check_finite(name, "x", finite)
        return result, _exact_check(x.dtype)
    key = jax.random.key(0) if key is None else key
    attempts, ladder = _attempts(n, d, k, int(n_oversamples), n_iter)
    check = _exact_check(x.dtype)
    for path, attempt in enumerate(attempts, start=1):
        result, (error_bound, max_residual, passed) = attempt(x, key, k, center)
        check = PCACheck(
            path=jnp.asarray(path, jnp.int32), error_bound=error_bound, max_residual=max_residual
        )
        if not certify:
            _check_finite(name, "x", jnp.isfinite(error_bound))
            return result, check
        if is_traced(passed):
            # Inside the caller's jit: no retry, the exact path runs only if the check fails.
            redo = functools.partial(_exact_instead, k=k, center=center)
            return jax.lax.cond(passed, _keep, redo, result, check, x)
        _check_finite(name, "x", jnp.isfinite(jnp.sum(result.explained_variance)))
        if bool(passed):
            return result, check
        if not float(error_bound) <= _RETRY_FACTOR * _CERTIFY_RTOL:
            break  # far from converged: the exact path is cheaper than growing the space
    else:
        if ladder is not None:
            block, sizes = ladder
            result, check, finite = _pca_krylov_covariance(
                x, key, k, center, block, sizes, len(attempts) + 1, certify
            )
            _check_finite(name, "x", finite)
            return result, check
    result, finite = _pca_exact(x, k, center)
    _check_finite(name, "x", finite)
    return result, dataclasses.replace(check, path=jnp.asarray(len(PCA_PATHS) - 1, jnp.int32))


def _keep(result: PCAResult, check: PCACheck, x: jax.Array) -> tuple[PCAResult, PCACheck]:
    return result, check


def _exact_instead(
    result: PCAResult, check: PCACheck, x: jax.Array, *, k: int, center: bool
) -> tuple[PCAResult, PCACheck]:
    """The exact result in place of a randomized one that failed its check."""
    path = jnp.asarray(len(PCA_PATHS) - 1, jnp.int32)
    return _pca_exact(x, k, center)[0], dataclasses.replace(check, path=path)


def _pca_exact(x: jax.Array, k: int, center: bool) -> tuple[PCAResult, jax.Array]:
    n, d = x.shape
    return _pca_covariance(x, k, center) if n > d else _pca_svd(x, k, center)


def _attempts(
    n: int, d: int, k: int, n_oversamples: int, n_iter: int | None
) -> tuple[list[Any], tuple[int, tuple[int, ...]] | None]:
    """The randomized attempts, in order: the default (or asked-for) size, then one twice
    as large when that is still well below an exact eigendecomposition's cost.

    Returns ``(attempts, ladder)``: the attempts that pass over ``x`` (each returns
    ``(result, (error_bound, max_residual, passed))``), then ``(block, sizes)`` of the
    Krylov attempts on the ``d x d`` scatter, which run last, in one call, with the
    exact fallback on the same scatter (``None`` when there are none).
    """
    if n >= d:
        block, blocks = krylov_shape(k, d, n_iter)
        sizes = [blocks]
        if block * 2 * blocks <= _AUTO_KRYLOV_FRACTION * d:
            sizes.append(2 * blocks)
        on_data = [size for size in sizes if krylov_on_data(n, d, block, size)]
        # krylov_on_data holds for the smaller sizes first: the data attempts lead.
        on_covariance = tuple(sizes[len(on_data) :])
        attempts = [
            functools.partial(_pca_krylov_data, block=block, blocks=size) for size in on_data
        ]
        return attempts, ((block, on_covariance) if on_covariance else None)
    width = min(k + n_oversamples, n, d)
    iterations = (7 if k < 0.1 * min(n, d) else 4) if n_iter is None else n_iter
    return [
        functools.partial(_pca_sketch_data, width=width, n_iter=it)
        for it in (iterations, 2 * iterations + 1)
    ], None


def _stat_dtype(*arrays: Any) -> Any:
    return (
        jnp.float64
        if all(np.dtype(a.dtype) == np.float64 for a in arrays) and _x64_enabled()
        else jnp.float32
    )


def _check_statistics(
    name: str, count: Any, mean: Any, gram: Any
) -> tuple[jax.Array, jax.Array, jax.Array, int]:
    mean = _as_array(name, "mean", mean, 1)
    gram = _as_array(name, "gram", gram, 2)
    d = mean.shape[0]
    if tuple(gram.shape) != (d, d):
        raise ValueError(f"{name}: gram must be ({d}, {d}) to match mean, got {gram.shape}")
    for arg, a in (("mean", mean), ("gram", gram)):
        if np.dtype(a.dtype).kind not in "iuf":
            raise TypeError(f"{name}: {arg} must be real, got {np.dtype(a.dtype).name}")
    dtype = _stat_dtype(mean, gram)
    if not hasattr(count, "dtype") and (
        not isinstance(count, numbers.Real) or isinstance(count, bool)
    ):
        raise TypeError(f"{name}: count must be a number, got {type(count).__name__}")
    count = jnp.asarray(count, dtype=dtype)
    if count.ndim != 0:
        raise ValueError(f"{name}: count must be a scalar, got shape {count.shape}")
    return count, jnp.asarray(mean, dtype), jnp.asarray(gram, dtype), d


@functools.partial(jax.jit, static_argnames=("k",))
def _pca_statistics(
    count: jax.Array, mean: jax.Array, gram: jax.Array, k: int
) -> tuple[PCAResult, jax.Array]:
    cov = (gram - mean[:, None] * mean[None, :]) * (count / (count - 1))
    return _pca_from_covariance(cov, count, mean, k), jnp.isfinite(jnp.trace(cov))


def pca_from_statistics(
    count: jax.Array | float,
    mean: jax.Array,
    gram: jax.Array,
    n_components: int,
) -> PCAResult:
    """PCA from streaming statistics: eigendecomposition of the covariance.

    The covariance is ``(gram - mean meanᵀ) * count / (count - 1)`` (the unbiased
    ``n - 1`` normalization, as scikit-learn's ``explained_variance_``), so on the
    statistics of a data set this equals ``pca_fit(x, k, method="full")`` up to
    float rounding. Forming ``gram - mean meanᵀ`` loses precision in float32 when
    the mean is large against the spread; center the data (or accumulate about a
    rough mean) when that matters.

    Args:
        count: Number of rows ``n`` seen (``> 1``); a number or scalar array.
        mean: ``(d,)`` their mean.
        gram: ``(d, d)`` the uncentered second moment ``E[x xᵀ] = xᵀ x / n``.
        n_components: How many components ``k`` to keep, ``1 <= k <= d``.

    Returns:
        A :class:`PCAResult` (``mean`` is the given mean).

    Raises:
        TypeError: If an argument is not numeric or ``n_components`` is not an int.
        ValueError: On mismatched shapes, ``count <= 1``, non-finite statistics or
            ``n_components`` out of range.

    Example:
        >>> import jax.numpy as jnp
        >>> x = jnp.array([[0.0, 1.0], [2.0, 1.0], [4.0, 1.0]])
        >>> pca = pca_from_statistics(3, x.mean(0), x.T @ x / 3, 1)
        >>> pca.components.tolist(), pca.explained_variance.round(4).tolist()
        ([[1.0, 0.0]], [4.0])
    """
    name = "pca_from_statistics"
    count, mean, gram, d = _check_statistics(name, count, mean, gram)
    if not is_traced(count) and not float(count) > 1:
        raise ValueError(f"{name}: count must be > 1, got {float(count)}")
    k = _check_n_components(name, n_components, d, "at most n_features")
    result, finite = _pca_statistics(count, mean, gram, k)
    _check_finite(name, "the statistics", finite)
    return result


# --------------------------------------------------------------------------- LDA


def _check_shrinkage(name: str, shrinkage: Any) -> float | None:
    if shrinkage is None:
        return None
    if not isinstance(shrinkage, numbers.Real) or isinstance(shrinkage, bool):
        raise TypeError(
            f"{name}: shrinkage must be None or a float in [0, 1], got {type(shrinkage).__name__}"
        )
    if not 0.0 <= float(shrinkage) <= 1.0:
        raise ValueError(f"{name}: shrinkage must be in [0, 1], got {shrinkage}")
    return float(shrinkage)


@functools.partial(jax.jit, static_argnames=("k", "shrinkage"))
def _lda_statistics(
    count: jax.Array,
    mean: jax.Array,
    gram: jax.Array,
    class_count: jax.Array,
    class_mean: jax.Array,
    k: int,
    shrinkage: float | None,
) -> tuple[LDAResult, jax.Array]:
    d = mean.shape[0]
    eye = jnp.eye(d, dtype=mean.dtype)
    # Covariances normalized by the count (scikit-learn's covariance_ with class
    # frequencies as priors): total St, between Sb, within Sw = St - Sb.
    total = gram - mean[:, None] * mean[None, :]
    prior = class_count / count
    offset = class_mean - mean[None, :]
    between = _sym(_mm((offset * prior[:, None]).T, offset))
    within = _sym(total) - between
    if shrinkage is None:
        within = within + (_AUTO_RIDGE * jnp.trace(within) / d) * eye
    else:
        # scikit-learn (solver="eigen") shrinks every class covariance and the total
        # covariance toward (trace / d) I; both are linear, so Sw and Sb = St - Sw
        # are shrunk the same way.
        s = shrinkage
        within = (1.0 - s) * within + (s * jnp.trace(within) / d) * eye
        between = (1.0 - s) * between + (s * jnp.trace(between) / d) * eye
    # Sb v = λ Sw v by whitening: with the Jacobi scaling S = diag(Sw)^-1/2 and
    # S Sw S = U Λ Uᵀ, W = S U Λ^-1/2 gives Wᵀ Sw W = I; the eigenvectors z of
    # Wᵀ Sb W then give v = W z. The scaling keeps features of very different
    # variance (or none: constant features) from leaking into each other.
    tiny = jnp.finfo(mean.dtype).tiny
    scale = jax.lax.rsqrt(jnp.maximum(jnp.diagonal(within), tiny))
    lam, u = jnp.linalg.eigh(_sym(within * scale[:, None] * scale[None, :]))
    floor = jnp.maximum(jnp.finfo(mean.dtype).eps * jnp.max(jnp.abs(lam)), tiny)
    whiten = (scale[:, None] * u) * jax.lax.rsqrt(jnp.maximum(lam, floor))[None, :]
    reduced = _sym(_mm(_mm(whiten.T, between), whiten))
    values, vectors = jnp.linalg.eigh(reduced)  # ascending
    values = jnp.maximum(values[::-1], 0.0)
    directions = _mm(whiten, vectors[:, ::-1][:, :k])  # (d, k)
    result = LDAResult(
        components=_flip_signs(directions.T),
        mean=mean,
        explained_variance_ratio=values[:k] / jnp.sum(values),
    )
    return result, jnp.isfinite(jnp.trace(total))


def _lda_components(name: str, n_components: Any, c: int, d: int) -> int:
    limit = min(c - 1, d)
    if n_components is None:
        return limit
    if not _is_int(n_components):
        raise TypeError(
            f"{name}: n_components must be an int or None, got {type(n_components).__name__}"
        )
    if n_components >= c:
        raise ValueError(
            f"{name}: n_components={n_components} must be less than the number of "
            f"classes ({c}); LDA has at most c - 1 = {c - 1} discriminant directions"
        )
    return _check_n_components(name, n_components, limit, "at most min(classes - 1, features)")


def lda_from_statistics(
    count: jax.Array | float,
    mean: jax.Array,
    gram: jax.Array,
    class_count: jax.Array,
    class_mean: jax.Array,
    n_components: int | None = None,
    *,
    shrinkage: float | None = None,
) -> LDAResult:
    """Fisher LDA from streaming statistics.

    With ``N`` rows, mean ``μ``, second moment ``G = E[x xᵀ]`` and per-class counts
    ``n_c`` and means ``μ_c``, the within-class scatter is
    ``Sw = N G - Σ_c n_c μ_c μ_cᵀ`` and the between-class scatter
    ``Sb = Σ_c n_c (μ_c - μ)(μ_c - μ)ᵀ`` (both are used divided by ``N``, i.e. as
    scikit-learn's prior-weighted covariances). The directions solve the generalized
    eigenproblem ``Sb v = λ Sw v``: ``Sw`` is whitened through the eigendecomposition
    of its diagonally scaled (unit-diagonal) form, and the top-``k`` eigenvectors of
    the whitened ``Sb`` are mapped back.

    Regularization of a singular ``Sw`` (``d`` = number of features):

    * ``shrinkage=None`` adds a tiny ridge ``1e-6 * trace(Sw) / d`` to ``Sw``.
    * ``shrinkage=s`` in ``[0, 1]`` is scikit-learn's ``shrinkage=s`` with
      ``solver="eigen"``: ``Sw -> (1 - s) Sw + s trace(Sw) / d I``, and since
      scikit-learn shrinks the total covariance the same way,
      ``Sb -> (1 - s) Sb + s trace(Sb) / d I``.

    ``gram - μ μᵀ`` loses precision in float32 when the mean is large against the
    spread; :func:`lda_fit` therefore passes statistics of the centered data.

    Args:
        count: Number of rows ``N``; a number or scalar array.
        mean: ``(d,)`` their mean.
        gram: ``(d, d)`` the uncentered second moment ``xᵀ x / N``.
        class_count: ``(c,)`` rows per class (a class with count 0 is ignored).
        class_mean: ``(c, d)`` the mean of each class.
        n_components: Directions ``k`` to keep, ``1 <= k <= min(c - 1, d)``;
            ``None`` keeps ``min(c - 1, d)``.
        shrinkage: ``None`` (tiny ridge) or a float in ``[0, 1]``, see above.

    Returns:
        An :class:`LDAResult`; its ``components`` have unit within-class variance
        (``v Sw vᵀ = 1``, ``Sw`` regularized and divided by ``N``).

    Raises:
        TypeError: If an argument is not numeric, or ``n_components`` /
            ``shrinkage`` has the wrong type.
        ValueError: On mismatched shapes, fewer than 2 classes, ``n_components``
            or ``shrinkage`` out of range, or non-finite statistics.

    Example:
        >>> import jax.numpy as jnp
        >>> x = jnp.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [3.0, 0.0], [4.0, 0.0], [3.0, 1.0]])
        >>> class_count = jnp.array([3.0, 3.0])
        >>> class_mean = jnp.stack([x[:3].mean(0), x[3:].mean(0)])
        >>> lda = lda_from_statistics(6, x.mean(0), x.T @ x / 6, class_count, class_mean)
        >>> [round(v, 3) for v in lda.components[0].tolist()], lda.explained_variance_ratio.tolist()
        ([2.449, 1.225], [1.0])
    """
    name = "lda_from_statistics"
    count, mean, gram, d = _check_statistics(name, count, mean, gram)
    class_count = _as_array(name, "class_count", class_count, 1)
    class_mean = _as_array(name, "class_mean", class_mean, 2)
    c = class_count.shape[0]
    if tuple(class_mean.shape) != (c, d):
        raise ValueError(
            f"{name}: class_mean must be ({c}, {d}) (classes x features), got {class_mean.shape}"
        )
    for arg, a in (("class_count", class_count), ("class_mean", class_mean)):
        if np.dtype(a.dtype).kind not in "iuf":
            raise TypeError(f"{name}: {arg} must be real, got {np.dtype(a.dtype).name}")
    if c < 2:
        raise ValueError(f"{name}: LDA needs at least 2 classes, got {c}")
    if not is_traced(count) and not float(count) > 0:
        raise ValueError(f"{name}: count must be > 0, got {float(count)}")
    k = _lda_components(name, n_components, c, d)
    shrinkage = _check_shrinkage(name, shrinkage)
    dtype = mean.dtype
    result, finite = _lda_statistics(
        count,
        mean,
        gram,
        jnp.asarray(class_count, dtype),
        jnp.asarray(class_mean, dtype),
        k,
        shrinkage,
    )
    _check_finite(name, "the statistics", finite)
    return result


@jax.jit
def _lda_moments(
    x: jax.Array, y: jax.Array, classes: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Statistics of ``x - mean``: (mean, its second moment, class counts, class means)."""
    n = x.shape[0]
    mean = jnp.mean(x, axis=0)
    xc = x - mean[None, :]
    onehot = (y[:, None] == classes[None, :]).astype(x.dtype)  # (n, c)
    class_count = jnp.sum(onehot, axis=0)
    class_mean = _tmm(onehot, xc) / jnp.maximum(class_count, 1.0)[:, None]
    gram = blocked_gram(xc) / n
    return mean, gram, class_count, class_mean


def lda_fit(
    x: jax.Array,
    y: jax.Array,
    n_components: int | None = None,
    *,
    shrinkage: float | None = None,
    n_classes: int | None = None,
) -> LDAResult:
    """Fisher linear discriminant analysis of labelled rows.

    Computes the count, mean, second moment and per-class counts and means of
    ``x`` -- of ``x`` minus its mean, which is exact in float32 -- and solves
    ``Sb v = λ Sw v`` with :func:`lda_from_statistics` (see there for the scatter
    matrices and ``shrinkage``). The directions span the same subspace as
    scikit-learn's ``LinearDiscriminantAnalysis(solver="eigen",
    shrinkage=...).scalings_[:, :k]``, with the same scaling.

    Labels: the classes are the distinct values of ``y`` (any integers, e.g. 3, 7
    and 9 need no remapping). Under :func:`jax.jit` with a traced ``y`` the classes
    cannot be read, so pass ``n_classes=c``: labels must then be ``0 .. c-1``
    (others are ignored by the class statistics) and NaN checks are skipped.

    Args:
        x: ``(n, d)`` data, samples as rows; integer or floating. Rows may be
            sharded over a mesh.
        y: ``(n,)`` integer class labels.
        n_components: Directions ``k`` to keep, ``1 <= k <= min(c - 1, d)``;
            ``None`` keeps ``min(c - 1, d)``.
        shrinkage: ``None`` for a tiny automatic ridge ``1e-6 * trace(Sw) / d``, or
            a float in ``[0, 1]``: scikit-learn's Ledoit-Wolf-style convex shrinkage
            toward ``trace / d * I`` (use it when ``Sw`` is singular, e.g. constant
            features).
        n_classes: The number of classes when labels are ``0 .. c-1``; required when
            ``y`` is traced, optional otherwise.

    Returns:
        An :class:`LDAResult` whose ``mean`` is the mean of ``x``.

    Raises:
        TypeError: If ``x`` is not real, ``y`` is not integer, or an option has the
            wrong type.
        ValueError: On mismatched lengths, fewer than 2 classes, ``n_components``
            not below the number of classes, ``shrinkage`` outside ``[0, 1]``, labels
            outside ``0 .. n_classes-1``, or NaN / Inf in ``x``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> y = jnp.arange(300) % 3
        >>> centers = jnp.array([[0.0, 0.0, 0.0], [4.0, 0.0, 0.0], [0.0, 4.0, 0.0]])
        >>> x = centers[y] + jax.random.normal(jax.random.key(0), (300, 3))
        >>> lda = lda_fit(x, y, 2)
        >>> z = lda.transform(x)
        >>> z.shape, [round(float(r), 2) for r in lda.explained_variance_ratio.sum(keepdims=True)]
        ((300, 2), [1.0])
    """
    name = "lda_fit"
    x = _as_float_matrix(name, "x", x)
    y = _as_array(name, "y", y, 1)
    if not (np.issubdtype(np.dtype(y.dtype), np.integer)):
        raise TypeError(
            f"{name}: y must hold integer class labels, got dtype {np.dtype(y.dtype).name}"
            " (convert with y.astype(int) if the values are whole numbers)"
        )
    n, d = x.shape
    if y.shape[0] != n:
        raise ValueError(f"{name}: x has {n} rows but y has {y.shape[0]} labels")
    if n_classes is not None:
        if not _is_int(n_classes):
            raise TypeError(f"{name}: n_classes must be an int, got {type(n_classes).__name__}")
        if n_classes < 2:
            raise ValueError(f"{name}: LDA needs at least 2 classes, got n_classes={n_classes}")
        classes = np.arange(n_classes)
        if not is_traced(y):
            labels = np.asarray(y)
            if labels.min() < 0 or labels.max() >= n_classes:
                raise ValueError(
                    f"{name}: labels must be in 0..{n_classes - 1} with n_classes={n_classes}, "
                    f"got values in [{labels.min()}, {labels.max()}]"
                )
    elif is_traced(y):
        raise ValueError(
            f"{name}: y is traced (inside jit), so its classes cannot be read; pass "
            "n_classes=c with labels 0..c-1"
        )
    else:
        classes = np.unique(np.asarray(y))
        if classes.size < 2:
            raise ValueError(
                f"{name}: LDA needs at least 2 classes, y has {classes.size} ({classes.tolist()})"
            )
    _lda_components(name, n_components, classes.size, d)
    _check_shrinkage(name, shrinkage)
    y = jnp.asarray(y)
    mean, gram, class_count, class_mean = _lda_moments(x, y, jnp.asarray(classes, dtype=y.dtype))
    _check_finite(name, "x", jnp.isfinite(jnp.trace(gram)))
    result = lda_from_statistics(
        jnp.asarray(n, x.dtype),
        jnp.zeros((d,), x.dtype),
        gram,
        class_count,
        class_mean,
        n_components,
        shrinkage=shrinkage,
    )
    return dataclasses.replace(result, mean=mean)
