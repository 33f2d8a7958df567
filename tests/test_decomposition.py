"""PCA and Fisher LDA in pure JAX (jaxcompress.decomposition) against scikit-learn.

Tolerances: explained-variance ratios are compared in absolute terms (they are
fractions of 1); variances and singular values relatively; components entrywise
(both sides use scikit-learn's svd_flip sign convention) or, for LDA, through the
orthogonal projectors onto the spanned subspaces. scikit-learn gets float64 data
and is the reference; ours runs in float32.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from sklearn.decomposition import PCA
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

from jaxcompress.examples.data import load_digits
from jaxcompress.numerics.decomposition import (
    LDAResult,
    PCAResult,
    lda_fit,
    lda_from_statistics,
    pca_fit,
    pca_from_statistics,
)


def spectrum_data(n, d, scales, noise=0.01, offset=2.0, seed=0):
    """``n x d`` float32 data: len(scales) directions with those standard deviations
    (well separated), isotropic noise, and a constant offset."""
    rng = np.random.default_rng(seed)
    scales = np.asarray(scales, np.float64)
    basis = np.linalg.qr(rng.standard_normal((d, scales.size)))[0].T
    x = (rng.standard_normal((n, scales.size)) * scales) @ basis
    x += noise * rng.standard_normal((n, d)) + offset
    return x.astype(np.float32)


SCALES = [10.0, 7.0, 5.0, 3.5, 2.5, 1.7, 1.2, 0.8]


def blobs(n, d, c, seed=0, sample=0):
    """Gaussian blobs (centers from ``seed``) with a shared, moderately anisotropic
    within-class covariance; ``sample`` draws a fresh sample of the same distribution."""
    rng = np.random.default_rng(seed)
    centers = 0.8 * rng.standard_normal((c, d))
    mix = np.eye(d) + 0.4 * rng.standard_normal((d, d)) / np.sqrt(d)
    mix *= np.linspace(0.5, 2.0, d)[None, :]
    y = np.arange(n) % c
    noise = np.random.default_rng([seed, sample + 1]).standard_normal((n, d))
    return (centers[y] + noise @ mix).astype(np.float32), y.astype(np.int32)


def projector(vectors):
    """Orthogonal projector onto the span of the columns of ``vectors``."""
    q = np.linalg.qr(np.asarray(vectors, np.float64))[0]
    return q @ q.T


def assert_pca_matches(ours, sk, *, ratio_atol=1e-4, comp_atol=2e-3, rel=1e-3):
    np.testing.assert_allclose(
        ours.explained_variance_ratio, sk.explained_variance_ratio_, atol=ratio_atol
    )
    np.testing.assert_allclose(ours.explained_variance, sk.explained_variance_, rtol=rel)
    np.testing.assert_allclose(ours.singular_values, sk.singular_values_, rtol=rel)
    np.testing.assert_allclose(ours.mean, sk.mean_, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours.components, sk.components_, atol=comp_atol)


# ------------------------------------------------------------------------------ PCA


@pytest.mark.parametrize(
    ("n", "d"),
    [(800, 24), (64, 300), (600, 300)],
    ids=["tall", "wide", "square-ish"],
)
def test_pca_full_matches_sklearn(n, d):
    x = spectrum_data(n, d, SCALES, noise=0.05)
    ours = pca_fit(x, 4, method="full")
    sk = PCA(4, svd_solver="full").fit(x.astype(np.float64))
    assert_pca_matches(ours, sk)
    assert isinstance(ours, PCAResult)
    assert ours.components.dtype == jnp.float32
    np.testing.assert_allclose(ours.components @ ours.components.T, np.eye(4), atol=1e-5)
    np.testing.assert_allclose(
        ours.transform(x), sk.transform(x.astype(np.float64)), rtol=1e-3, atol=2e-3
    )


def _randomized_path(n, d, k):
    from jaxcompress.numerics.decomposition import krylov_on_data, krylov_shape

    if n < d:
        return "wide-sketch"
    block, blocks = krylov_shape(k, d, None)
    return "krylov-data" if krylov_on_data(n, d, block, blocks) else "krylov-covariance"


@pytest.mark.parametrize(
    ("n", "d", "path"),
    [
        (800, 24, "krylov-covariance"),  # one block of all d columns: exact
        (3000, 200, "krylov-covariance"),
        (2000, 600, "krylov-data"),
        (64, 300, "wide-sketch"),
    ],
)
@pytest.mark.parametrize("offset", [2.0, 300.0])
def test_pca_randomized_matches_sklearn_on_low_rank_data(n, d, path, offset):
    k = 4
    assert _randomized_path(n, d, k) == path
    x = spectrum_data(n, d, SCALES, noise=0.01, offset=offset, seed=1)
    ours = pca_fit(x, k, method="randomized", key=jax.random.key(3))
    solver = "covariance_eigh" if n > d else "full"  # both exact in float64
    sk = PCA(k, svd_solver=solver).fit(x.astype(np.float64))
    assert_pca_matches(ours, sk)
    np.testing.assert_allclose(
        float(ours.explained_variance_ratio.sum()), sk.explained_variance_ratio_.sum(), atol=1e-5
    )


def decaying_data(n, d, offset, seed=0):
    """The benchmark's spectrum: 128 directions with standard deviations ``3 * 0.97^i``
    (no clear gap anywhere), isotropic noise 0.02 and a constant offset."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((d, 128)))[0].T
    x = (rng.standard_normal((n, 128)) * 3.0 * 0.97 ** np.arange(128)) @ basis
    return (x + 0.02 * rng.standard_normal((n, d)) + offset).astype(np.float32)


@pytest.mark.parametrize(
    ("d", "k", "path"),
    [(600, 16, "krylov-data"), (600, 64, "krylov-covariance"), (1024, 64, "krylov-data")],
)
@pytest.mark.parametrize("offset", [1.0, 100.0])
def test_pca_krylov_explained_variance_on_a_slow_spectrum(d, k, path, offset):
    """The default Krylov space captures the exact explained variance (the benchmark's
    acceptance test) even without a spectral gap, and with a mean far from zero."""
    n = 4000
    assert _randomized_path(n, d, k) == path
    x = decaying_data(n, d, offset, seed=d + k)
    ours = pca_fit(x, k, method="randomized")
    exact = PCA(k, svd_solver="covariance_eigh").fit(x.astype(np.float64))
    assert (
        abs(float(ours.explained_variance_ratio.sum()) - exact.explained_variance_ratio_.sum())
        < 1e-4
    )
    np.testing.assert_allclose(ours.mean, exact.mean_, rtol=1e-5, atol=1e-4 * offset)
    # The leading components are well separated from their neighbours: they match.
    np.testing.assert_allclose(ours.components[:4], exact.components_[:4], atol=5e-3)
    np.testing.assert_allclose(ours.explained_variance, exact.explained_variance_, rtol=2e-2)


def test_pca_auto_and_default_key():
    from jaxcompress.numerics.decomposition import auto_method

    assert auto_method(10000, 784, 16) == "randomized"  # Krylov on the data
    assert auto_method(10000, 784, 64) == "randomized"  # Krylov on the covariance
    assert auto_method(100000, 1024, 64) == "randomized"  # Krylov on the data
    assert auto_method(10000, 784, 256) == "full"  # eigh cheaper than 768 Krylov columns
    assert auto_method(800, 24, 4) == "full"  # small
    x = spectrum_data(64, 600, SCALES, seed=2)  # wide: data sketch
    a = pca_fit(x, 4)
    b = pca_fit(x, 4, method="randomized", key=jax.random.key(0))
    np.testing.assert_array_equal(a.components, b.components)
    full = pca_fit(x, 4, method="full")
    np.testing.assert_allclose(a.components, full.components, atol=1e-4)
    small = spectrum_data(100, 10, SCALES[:3])
    np.testing.assert_array_equal(
        pca_fit(small, 2).components, pca_fit(small, 2, method="full").components
    )


def test_pca_uncentered_is_svd_of_x():
    x = spectrum_data(300, 20, SCALES[:4], offset=1.0)
    ours = pca_fit(x, 3, method="full", center=False)
    _, s, vt = np.linalg.svd(x.astype(np.float64), full_matrices=False)
    np.testing.assert_array_equal(ours.mean, np.zeros(20, np.float32))
    np.testing.assert_allclose(ours.singular_values, s[:3], rtol=1e-4)
    np.testing.assert_allclose(np.abs(ours.components), np.abs(vt[:3]), atol=1e-3)
    np.testing.assert_allclose(ours.explained_variance_ratio, s[:3] ** 2 / np.sum(s**2), atol=1e-5)


def test_pca_from_statistics_equals_pca_fit():
    x = spectrum_data(2000, 30, SCALES, offset=0.5)
    fitted = pca_fit(x, 5, method="full")
    xj = jnp.asarray(x)
    stats = pca_from_statistics(x.shape[0], xj.mean(0), xj.T @ xj / x.shape[0], 5)
    for field in ("components", "explained_variance", "explained_variance_ratio", "mean"):
        np.testing.assert_allclose(
            getattr(stats, field), getattr(fitted, field), rtol=1e-4, atol=2e-4
        )
    np.testing.assert_allclose(stats.singular_values, fitted.singular_values, rtol=1e-4)


def test_krylov_rule():
    # Blocks of k rounded up to 16; max(3 k, k + 64) columns; all of R^d as one block.
    from jaxcompress.numerics.decomposition import krylov_on_data, krylov_shape

    assert krylov_shape(16, 784, None) == (16, 5)
    assert krylov_shape(64, 1024, None) == (64, 3)
    assert krylov_shape(300, 4096, None) == (128, 8)
    assert krylov_shape(16, 784, 2) == (16, 3)
    assert krylov_shape(4, 24, None) == (24, 1)
    # Passes over x when 1.6 x their 2 n d b (2 blocks - 1) flops <= the Gram's n d² (5/4).
    assert krylov_on_data(10000, 1024, 64, 3)
    assert not krylov_on_data(10000, 784, 64, 3)
    assert krylov_on_data(10000, 784, 16, 5)


@pytest.mark.parametrize("d", [7, 300, 601])
def test_blocked_gram_is_the_plain_product(d):
    from jaxcompress.numerics.decomposition import blocked_gram

    x = np.random.default_rng(d).standard_normal((50, d)).astype(np.float32)
    np.testing.assert_allclose(blocked_gram(jnp.asarray(x)), x.T @ x, rtol=1e-5, atol=1e-4)


def test_pca_is_a_pytree_and_jits():
    x = jnp.asarray(spectrum_data(800, 24, SCALES, seed=4))
    fit = jax.jit(functools.partial(pca_fit, n_components=4, method="randomized"))
    jitted = fit(x, key=jax.random.key(1))
    eager = pca_fit(x, 4, method="randomized", key=jax.random.key(1))
    assert isinstance(jitted, PCAResult)
    assert len(jax.tree.leaves(jitted)) == 5
    np.testing.assert_allclose(jitted.components, eager.components, atol=1e-5)
    z = jax.jit(lambda r, x: r.transform(x))(jitted, x)
    assert z.shape == (800, 4) and z.dtype == jnp.float32
    assert jitted.transform(x[0]).shape == (4,)


def test_pca_float64_with_x64():
    x = spectrum_data(500, 20, SCALES).astype(np.float64)
    with jax.enable_x64(True):
        ours = pca_fit(x, 3, method="full")
        assert ours.components.dtype == jnp.float64
        sk = PCA(3, svd_solver="full").fit(x)
        np.testing.assert_allclose(ours.components, sk.components_, atol=1e-10)
        np.testing.assert_allclose(ours.explained_variance, sk.explained_variance_, rtol=1e-10)
    assert pca_fit(x, 3, method="full").components.dtype == jnp.float32


def test_pca_integer_input():
    x = np.random.default_rng(0).integers(0, 10, (100, 6))
    ours = pca_fit(x, 2)
    sk = PCA(2, svd_solver="full").fit(x.astype(np.float64))
    assert_pca_matches(ours, sk)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"x": np.ones((5,))}, ValueError, "2-D"),
        ({"x": np.ones((1, 4))}, ValueError, "at least 2 rows"),
        ({"x": np.ones((5, 4), np.complex64)}, TypeError, "real numbers"),
        ({"x": np.array([["a", "b"], ["c", "d"]])}, TypeError, "real numbers"),
        ({"n_components": 0}, ValueError, "n_components"),
        ({"n_components": 5}, ValueError, r"\[1, 4\]"),
        ({"n_components": 2.0}, TypeError, "int"),
        ({"method": "arpack"}, ValueError, "method"),
        ({"n_oversamples": -1}, ValueError, "n_oversamples"),
        ({"n_iter": 1.5, "method": "randomized"}, ValueError, "n_iter"),
        ({"center": 1}, TypeError, "center"),
        ({"x": np.array([[1.0, np.nan]] * 6)}, ValueError, "NaN"),
        (
            {"x": np.array([[1.0, np.inf]] * 6), "method": "randomized", "n_components": 1},
            ValueError,
            "NaN",
        ),
    ],
)
def test_pca_bad_inputs(kwargs, error, match):
    args = {"x": np.random.default_rng(0).standard_normal((6, 4)), "n_components": 2, **kwargs}
    with pytest.raises(error, match=match):
        pca_fit(args.pop("x"), args.pop("n_components"), **args)


def test_pca_from_statistics_bad_inputs():
    with pytest.raises(ValueError, match="gram must be"):
        pca_from_statistics(10, jnp.zeros(3), jnp.eye(2), 1)
    with pytest.raises(ValueError, match="count must be > 1"):
        pca_from_statistics(1, jnp.zeros(3), jnp.eye(3), 1)
    with pytest.raises(ValueError, match="n_components"):
        pca_from_statistics(10, jnp.zeros(3), jnp.eye(3), 4)
    with pytest.raises(ValueError, match="NaN"):
        pca_from_statistics(10, jnp.zeros(3), jnp.full((3, 3), jnp.nan), 1)


# ------------------------------------------------------------------------------ LDA


def nearest_mean_accuracy(z_train, y_train, z_test, y_test):
    classes = np.unique(y_train)
    means = np.stack([z_train[y_train == c].mean(0) for c in classes])
    dist = ((z_test[:, None, :] - means[None, :, :]) ** 2).sum(-1)
    return float((classes[dist.argmin(1)] == y_test).mean())


def test_lda_digits_matches_sklearn_with_shrinkage():
    x, y = load_digits()
    x_test, y_test = load_digits(split="test")
    ours = lda_fit(x, y, shrinkage=0.1)
    sk = LinearDiscriminantAnalysis(solver="eigen", shrinkage=0.1).fit(x.astype(np.float64), y)
    assert ours.components.shape == (9, 64)
    np.testing.assert_allclose(
        ours.explained_variance_ratio, sk.explained_variance_ratio_[:9], atol=1e-5
    )
    # The 4 constant pixels make a degenerate eigenvalue trace(Sb)/trace(Sw) under
    # scikit-learn's shrinkage, tied with the 9th; the first 8 directions are unique
    # and match up to sign, with the same scaling.
    v, s = np.asarray(ours.components, np.float64).T[:, :8], sk.scalings_[:, :8]
    np.testing.assert_allclose(projector(v), projector(s), atol=1e-4)
    signs = np.sign((v * s).sum(0))
    np.testing.assert_allclose(v, s * signs, atol=1e-3 * np.abs(s).max())
    acc_ours = nearest_mean_accuracy(
        np.asarray(ours.transform(x)), y, np.asarray(ours.transform(x_test)), y_test
    )
    acc_sk = nearest_mean_accuracy(sk.transform(x), y, sk.transform(x_test), y_test)
    assert abs(acc_ours - acc_sk) <= 1 / 360 + 1e-9
    assert acc_ours > 0.9


def test_lda_digits_ridge_matches_sklearn_without_constant_pixels():
    x, y = load_digits()
    keep = x.std(0) > 0
    ours = lda_fit(x, y)  # shrinkage=None: tiny ridge on the singular Sw
    sk = LinearDiscriminantAnalysis(solver="eigen").fit(x[:, keep].astype(np.float64), y)
    v = np.asarray(ours.components, np.float64).T
    assert np.abs(v[~keep]).max() < 1e-3 * np.abs(v).max()  # nothing on constant pixels
    np.testing.assert_allclose(projector(v[keep]), projector(sk.scalings_[:, :9]), atol=2e-3)
    np.testing.assert_allclose(
        ours.explained_variance_ratio, sk.explained_variance_ratio_[:9], atol=1e-4
    )


@pytest.mark.parametrize("shrinkage", [None, 0.3])
def test_lda_blobs_matches_sklearn(shrinkage):
    x, y = blobs(3000, 12, 5)
    x_test, y_test = blobs(1000, 12, 5, sample=1)
    k = 3
    ours = lda_fit(x, y, k, shrinkage=shrinkage)
    sk = LinearDiscriminantAnalysis(n_components=k, solver="eigen", shrinkage=shrinkage)
    sk = sk.fit(x.astype(np.float64), y)
    v, s = np.asarray(ours.components, np.float64).T, sk.scalings_[:, :k]
    np.testing.assert_allclose(projector(v), projector(s), atol=1e-4)
    np.testing.assert_allclose(v, s * np.sign((v * s).sum(0)), atol=1e-3 * np.abs(s).max())
    np.testing.assert_allclose(
        ours.explained_variance_ratio, sk.explained_variance_ratio_[:k], atol=1e-4
    )
    np.testing.assert_allclose(ours.mean, x.mean(0), atol=1e-5)
    # Unit within-class variance along each direction, as scikit-learn's scalings_.
    z = np.asarray(ours.transform(x), np.float64)
    within = sum(np.cov(z[y == c].T, bias=True) * np.mean(y == c) for c in range(5))
    if shrinkage is None:
        np.testing.assert_allclose(within, np.eye(k), atol=1e-3)
    acc_ours = nearest_mean_accuracy(z, y, np.asarray(ours.transform(x_test)), y_test)
    acc_sk = nearest_mean_accuracy(sk.transform(x), y, sk.transform(x_test), y_test)
    assert abs(acc_ours - acc_sk) <= 2e-3


def test_lda_from_statistics_agrees_with_lda_fit():
    x, y = blobs(2000, 10, 4, seed=2)
    x = x + 5.0  # an offset the centered statistics of lda_fit do not mind
    fitted = lda_fit(x, y, 3, shrinkage=0.2)
    xj = jnp.asarray(x, jnp.float64 if False else jnp.float32)
    counts = np.bincount(y).astype(np.float32)
    class_mean = np.stack([x[y == c].mean(0) for c in range(4)])
    stats = lda_from_statistics(
        len(y), xj.mean(0), xj.T @ xj / len(y), counts, class_mean, 3, shrinkage=0.2
    )
    assert isinstance(stats, LDAResult)
    np.testing.assert_allclose(
        projector(stats.components.T), projector(fitted.components.T), atol=2e-3
    )
    np.testing.assert_allclose(
        stats.explained_variance_ratio, fitted.explained_variance_ratio, atol=1e-4
    )
    np.testing.assert_allclose(stats.mean, fitted.mean, rtol=1e-5)


def test_lda_arbitrary_labels_and_jit():
    x, y = blobs(900, 6, 3, seed=3)
    base = lda_fit(x, y)
    relabelled = lda_fit(x, np.array([3, 7, 9])[y])
    np.testing.assert_allclose(relabelled.components, base.components, atol=1e-5)
    fit = jax.jit(functools.partial(lda_fit, n_components=2, n_classes=3))
    jitted = fit(jnp.asarray(x), jnp.asarray(y))
    np.testing.assert_allclose(jitted.components, base.components, rtol=1e-4, atol=1e-4)
    closed = jax.jit(lambda x: lda_fit(x, y, 1, shrinkage=0.5).transform(x))(jnp.asarray(x))
    assert closed.shape == (900, 1)


@pytest.mark.parametrize(
    ("x", "y", "kwargs", "error", "match"),
    [
        (np.ones((4, 2)), np.zeros(4, np.int32), {}, ValueError, "at least 2 classes"),
        (np.ones((4, 2)), np.array([0.0, 1.0, 0.0, 1.0]), {}, TypeError, "integer class labels"),
        (np.ones((4, 2)), np.array([0, 1, 0]), {}, ValueError, "4 rows but y has 3"),
        (np.ones((4, 2)), np.array([[0, 1, 0, 1]]), {}, ValueError, "1-D"),
        (
            np.ones((6, 3)),
            np.array([0, 1, 2] * 2),
            {"n_components": 3},
            ValueError,
            "less than the number of classes",
        ),
        (np.ones((6, 3)), np.array([0, 1, 2] * 2), {"n_components": 0}, ValueError, "n_components"),
        (np.ones((6, 3)), np.array([0, 1] * 3), {"shrinkage": 1.5}, ValueError, "shrinkage"),
        (np.ones((6, 3)), np.array([0, 1] * 3), {"shrinkage": "auto"}, TypeError, "shrinkage"),
        (
            np.ones((6, 3)),
            np.array([0, 1, 5] * 2),
            {"n_classes": 3},
            ValueError,
            "labels must be in",
        ),
        (np.array([[np.nan, 1.0]] * 4), np.array([0, 1] * 2), {}, ValueError, "NaN"),
    ],
)
def test_lda_bad_inputs(x, y, kwargs, error, match):
    with pytest.raises(error, match=match):
        lda_fit(x, y, **kwargs)


def test_lda_traced_labels_need_n_classes():
    with pytest.raises(ValueError, match="n_classes"):
        jax.jit(lda_fit)(jnp.ones((4, 2)), jnp.array([0, 1, 0, 1]))


def test_lda_from_statistics_bad_inputs():
    with pytest.raises(ValueError, match="class_mean must be"):
        lda_from_statistics(4, jnp.zeros(2), jnp.eye(2), jnp.ones(2), jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match="at least 2 classes"):
        lda_from_statistics(4, jnp.zeros(2), jnp.eye(2), jnp.ones(1), jnp.zeros((1, 2)))


# ------------------------------------------------------------------------------ sharding


def _check_sharded_pca(rows, x, kwargs):
    plain = pca_fit(x, 4, **kwargs)
    sharded_x = jax.device_put(x, rows)
    sharded = pca_fit(sharded_x, 4, **kwargs)
    for field in ("components", "explained_variance_ratio", "mean"):
        np.testing.assert_allclose(
            getattr(sharded, field), getattr(plain, field), atol=2e-4, err_msg=str(kwargs)
        )
    np.testing.assert_allclose(sharded.explained_variance, plain.explained_variance, rtol=1e-4)
    np.testing.assert_allclose(sharded.transform(sharded_x), plain.transform(x), atol=2e-3)


def _check_sharded_lda(rows, host_labels):
    x, y = blobs(800, 12, 4, seed=7)
    plain = lda_fit(x, y, 3)
    labels = y if host_labels else jax.device_put(y, rows)
    sharded = lda_fit(jax.device_put(x, rows), labels, 3)
    np.testing.assert_allclose(sharded.components, plain.components, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(sharded.mean, plain.mean, atol=1e-5)


def test_sharded_rows_give_the_same_result():
    """Rows sharded over 8 devices (``jax.make_mesh`` default: Explicit axes)."""
    mesh = jax.make_mesh((8,), ("data",))
    assert mesh.axis_types == (AxisType.Explicit,)
    rows = NamedSharding(mesh, P("data"))
    tall = spectrum_data(800, 24, SCALES, seed=4)
    _check_sharded_pca(rows, tall, {"method": "full"})  # covariance eigh
    _check_sharded_pca(
        rows, spectrum_data(264, 256, SCALES, seed=8), {"method": "full"}
    )  # 2x2 blocks
    for n, d in ((2000, 600), (3000, 200)):  # Krylov on the data, on the covariance
        _check_sharded_pca(rows, spectrum_data(n, d, SCALES, seed=6), {"method": "randomized"})
    wide = spectrum_data(64, 300, SCALES, seed=5)
    _check_sharded_pca(rows, wide, {"method": "randomized"})  # sketch of the data
    _check_sharded_pca(rows, wide, {"method": "full"})  # SVD of a gathered wide x
    _check_sharded_lda(rows, host_labels=False)


def test_sharded_rows_auto_axes():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    rows = NamedSharding(mesh, P("data"))
    _check_sharded_pca(rows, spectrum_data(64, 300, SCALES, seed=5), {"method": "randomized"})
    _check_sharded_lda(rows, host_labels=True)
