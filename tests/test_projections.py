"""pca and lda: projections of a layer's input features from calibration statistics.

Statistics are built by hand with numpy from the activations a layer sees, laid out
like the params, so these tests do not depend on jaxcompress.calibrate's tracing.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.linalg import subspace_angles
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

import jaxcompress as jc
from jaxcompress.arrays import LowRank
from jaxcompress.calibration.calibrate import InputStats
from jaxcompress.examples.classifier import fit_classifier
from jaxcompress.examples.data import load_digits
from jaxcompress.examples.models import LeNet300100, LeNet300100NNX
from jaxcompress.methods.projections import lda, pca


def input_stats(x, labels=None, classes=None) -> InputStats:
    """The InputStats of rows ``x`` (float64 numpy, stored as float32), with labels."""
    x = np.asarray(x, np.float64)
    n = x.shape[0]
    class_count = class_mean = None
    if labels is not None:
        classes = int(labels.max()) + 1 if classes is None else classes
        counts = np.bincount(labels, minlength=classes)
        means = np.stack(
            [x[labels == c].mean(0) if counts[c] else np.zeros(x.shape[1]) for c in range(classes)]
        )
        class_count = jnp.asarray(counts, jnp.float32)
        class_mean = jnp.asarray(means, jnp.float32)
    return InputStats(
        count=jnp.float32(n),
        mean=jnp.asarray(x.mean(0), jnp.float32),
        gram=jnp.asarray(x.T @ x / n, jnp.float32),
        class_count=class_count,
        class_mean=class_mean,
    )


def dense_params(w, b=None) -> dict:
    layer = {"kernel": jnp.asarray(w, jnp.float32)}
    if b is not None:
        layer["bias"] = jnp.asarray(b, jnp.float32)
    return {"dense": layer}


def low_rank_inputs(rows=2000, m=32, rank=4, noise=1e-3, seed=0):
    """Inputs of intrinsic dimension ``rank`` (plus tiny noise) with a non-zero mean."""
    rng = np.random.default_rng(seed)
    scales = np.linspace(3.0, 1.0, rank)
    latent = rng.standard_normal((rows, rank)) * scales
    mixing = np.linalg.qr(rng.standard_normal((m, rank)))[0].T
    return latent @ mixing + rng.standard_normal(m) + noise * rng.standard_normal((rows, m))


def rel_rms(a, b) -> float:
    return float(np.sqrt(np.mean((a - b) ** 2) / np.mean(b**2)))


# ---- pca ----------------------------------------------------------------------------


def test_pca_dense_layer_reconstructs_outputs_and_matches_numpy_eigh():
    x = low_rank_inputs()
    rng = np.random.default_rng(1)
    w, b = rng.standard_normal((32, 16)), rng.standard_normal(16)
    stats = input_stats(x)
    out, info = pca(4)(dense_params(w, b), data={"dense": {"kernel": stats, "bias": None}})
    leaf = out["dense"]["kernel"]
    assert isinstance(leaf, LowRank)
    assert (leaf.rank, leaf.shape, leaf.fan_in_axes) == (4, (32, 16), 1)
    u, v = np.asarray(leaf.u, np.float64), np.asarray(leaf.v, np.float64)
    new_b = np.asarray(out["dense"]["bias"], np.float64)

    # The components are the top eigenvectors of the covariance, up to sign.
    cov = np.cov(x, rowvar=False, bias=True)
    values, vectors = np.linalg.eigh(cov)
    top = vectors[:, ::-1][:, :4]
    np.testing.assert_allclose(np.abs(u.T @ top), np.eye(4), atol=1e-4)
    np.testing.assert_allclose(v, u.T @ w, rtol=1e-5, atol=1e-5)

    # The compressed layer reproduces the outputs; exactly so on the calibration mean.
    expected = x @ w + b
    assert rel_rms(x @ u @ v + new_b, expected) < 1e-3
    mean = x.mean(0)
    np.testing.assert_allclose(mean @ u @ v + new_b, mean @ w + b, rtol=1e-5, atol=1e-4)

    stats_out = info["dense/kernel"]
    assert (stats_out["k"], stats_out["m"], stats_out["n"]) == (4, 32, 16)
    assert stats_out["skipped"] is False and stats_out["bias_folded"] is True
    explained = values[::-1][:4].sum() / values.sum()
    np.testing.assert_allclose(float(stats_out["explained_variance"]), explained, rtol=1e-5)
    # relative_error is the relative RMS output error over the calibration rows (here
    # ~6e-4, where the float32 covariance G - μμᵀ resolves it to a few percent).
    measured = np.sqrt(np.mean(((x - mean) @ (w - u @ v)) ** 2) / np.mean((x @ w) ** 2))
    np.testing.assert_allclose(float(stats_out["relative_error"]), measured, rtol=5e-2)
    np.testing.assert_allclose(
        float(stats_out["offset_norm"]), np.linalg.norm(mean @ (w - u @ v)), rtol=1e-3
    )


def test_pca_without_bias_reports_the_uncorrected_offset():
    x = low_rank_inputs(noise=0.05)
    w = np.random.default_rng(2).standard_normal((32, 8))
    out, info = pca(4)(dense_params(w), data={"dense": {"kernel": input_stats(x)}})
    assert set(out["dense"]) == {"kernel"}
    leaf = out["dense"]["kernel"]
    u, v = np.asarray(leaf.u, np.float64), np.asarray(leaf.v, np.float64)
    error = w - u @ v
    offset = np.linalg.norm(x.mean(0) @ error)
    assert info["dense/kernel"]["bias_folded"] is False
    assert offset > 1e-3
    np.testing.assert_allclose(float(info["dense/kernel"]["offset_norm"]), offset, rtol=1e-3)
    # Without a bias to absorb it, the error estimate includes the mean's part.
    measured = np.sqrt(np.mean((x @ error) ** 2) / np.mean((x @ w) ** 2))
    np.testing.assert_allclose(float(info["dense/kernel"]["relative_error"]), measured, rtol=1e-2)


@pytest.mark.parametrize("energy", [0.3, 0.7, 0.9, 0.99, 0.999])
def test_pca_energy_picks_the_smallest_k(energy):
    rng = np.random.default_rng(3)
    scales = np.array([8.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.25, 0.1] + [0.01] * 24)
    basis = np.linalg.qr(rng.standard_normal((32, 32)))[0]
    x = (rng.standard_normal((4000, 32)) * scales) @ basis.T
    values = np.linalg.eigvalsh(np.cov(x, rowvar=False, bias=True))[::-1]
    fractions = np.cumsum(values) / values.sum()
    expected = int(np.argmax(fractions >= energy)) + 1
    w = rng.standard_normal((32, 64))
    out, info = pca(energy=energy)(dense_params(w), data={"dense": {"kernel": input_stats(x)}})
    assert info["dense/kernel"]["k"] == expected == out["dense"]["kernel"].rank
    kept = float(info["dense/kernel"]["explained_variance"])
    assert kept >= energy * (1 - 1e-6)
    assert expected == 1 or fractions[expected - 2] < energy


def test_pca_leaves_a_layer_dense_when_the_factors_save_nothing():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((500, 8))
    w = rng.standard_normal((8, 2))  # 2 * (8 + 2) >= 8 * 2
    params = dense_params(w, np.zeros(2))
    data = {"dense": {"kernel": input_stats(x)}}
    out, info = pca(2)(params, data=data)
    assert out["dense"]["kernel"] is params["dense"]["kernel"]
    assert out["dense"]["bias"] is params["dense"]["bias"]
    assert info["dense/kernel"] == {"rank": 2, "k": 2, "m": 8, "n": 2, "skipped": True}
    # energy=1 on full-rank inputs needs every component: also skipped.
    out, info = pca(energy=1.0)(dense_params(rng.standard_normal((8, 32))), data=data)
    assert not jc.is_compressed(out["dense"]["kernel"])
    assert info["dense/kernel"]["skipped"] is True and info["dense/kernel"]["k"] == 8


def test_pca_conv_kernel_uses_the_im2col_view_and_runs_under_jit():
    rng = np.random.default_rng(5)
    patches = low_rank_inputs(rows=1000, m=18, rank=3)  # 3 x 3 x 2 patches
    kernel = rng.standard_normal((3, 3, 2, 8))
    params = {"conv": {"kernel": jnp.asarray(kernel, jnp.float32), "bias": jnp.zeros(8)}}
    data = {"conv": {"kernel": input_stats(patches)}}
    out, info = jax.jit(pca(3))(params, data=data)
    leaf = out["conv"]["kernel"]
    assert (leaf.shape, leaf.fan_in_axes, leaf.rank) == ((3, 3, 2, 8), 3, 3)
    dense = np.asarray(jc.materialize(out)["conv"]["kernel"], np.float64).reshape(18, 8)
    result = patches @ dense + np.asarray(out["conv"]["bias"])
    assert rel_rms(result, patches @ kernel.reshape(18, 8)) < 1e-3
    eager, _ = pca(3)(params, data=data)
    np.testing.assert_allclose(eager["conv"]["kernel"].u, leaf.u, atol=1e-5)
    assert int(info["conv/kernel"]["k"]) == 3


# ---- lda ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits()
    x_test, y_test = load_digits(split="test")
    return x.astype(np.float64), y, x_test.astype(np.float64), y_test


@pytest.fixture(scope="module")
def ridge_head(digits):
    """A linear classifier (64 x 10) fit in closed form: ridge regression on one-hot labels."""
    x, y, _, _ = digits
    targets = np.eye(10)[y]
    mean = x.mean(0)
    centred = x - mean
    w = np.linalg.solve(centred.T @ centred + np.eye(64), centred.T @ (targets - targets.mean(0)))
    return w, targets.mean(0) - mean @ w


def accuracy(x, labels, w, b) -> float:
    return float(np.mean(np.argmax(x @ w + b, axis=1) == labels))


def test_lda_compresses_a_classifier_head_on_digits(digits, ridge_head):
    x, y, x_test, y_test = digits
    w, b = ridge_head
    out, info = lda(9)(dense_params(w, b), data={"dense": {"kernel": input_stats(x, y)}})
    leaf = out["dense"]["kernel"]
    assert isinstance(leaf, LowRank) and leaf.rank == 9
    u, v = np.asarray(leaf.u, np.float64), np.asarray(leaf.v, np.float64)
    new_b = np.asarray(out["dense"]["bias"], np.float64)
    before = accuracy(x, y, w, b), accuracy(x_test, y_test, w, b)
    after = accuracy(x, y, u @ v, new_b), accuracy(x_test, y_test, u @ v, new_b)
    # Observed: train accuracy 0.946 -> 0.948, test 0.936 -> 0.936 (relative_error 0.058).
    assert abs(after[0] - before[0]) <= 0.02 and abs(after[1] - before[1]) <= 0.02
    assert after[1] > 0.9
    # v is the least-squares map from the projected centred features to the outputs.
    centred = x - x.mean(0)
    fitted = np.linalg.lstsq(centred @ u, centred @ w, rcond=None)[0]
    np.testing.assert_allclose(v, fitted, atol=1e-3 * np.abs(fitted).max())
    # The bias correction makes the head exact on the calibration mean.
    mean = x.mean(0)
    np.testing.assert_allclose(mean @ u @ v + new_b, mean @ w + b, atol=1e-4)
    stats_out = info["dense/kernel"]
    assert (stats_out["k"], stats_out["m"], stats_out["n"]) == (9, 64, 10)
    assert stats_out["bias_folded"] is True and stats_out["skipped"] is False
    assert float(stats_out["explained_ratio"]) > 0.999  # ten classes: Sb has rank 9
    assert float(stats_out["relative_error"]) < 0.1


class _RidgeCovariance:
    """A covariance estimator adding ``delta * I``: sklearn then solves ``Sb v = λ (Sw + δ I) v``.

    (sklearn's float ``shrinkage=`` shrinks the total scatter too, so its ``Sb = St - Sw``
    gains a ``s * trace(Sb) / m * I`` term and its subspace differs; a constant ridge
    cancels in ``St - Sw``.)
    """

    def __init__(self, delta):
        self.delta = delta

    def fit(self, x):
        centred = x - x.mean(0)
        self.covariance_ = centred.T @ centred / len(x) + self.delta * np.eye(x.shape[1])
        return self


@pytest.mark.parametrize("shrinkage", [0.01, 0.1, 0.5])
def test_lda_subspace_matches_sklearn_eigen_solver(digits, ridge_head, shrinkage):
    x, y, _, _ = digits
    w, b = ridge_head
    out, _ = lda(9, shrinkage=shrinkage)(
        dense_params(w, b), data={"dense": {"kernel": input_stats(x, y)}}
    )
    # Our Sw <- (1 - s) Sw + s tr(Sw)/m I has the eigenvectors of Sw + s/(1 - s) tr(Sw)/m I.
    within = sum(np.cov(x[y == c], rowvar=False, bias=True) * np.mean(y == c) for c in range(10))
    delta = shrinkage / (1 - shrinkage) * np.trace(within) / 64
    reference = LinearDiscriminantAnalysis(
        solver="eigen", covariance_estimator=_RidgeCovariance(delta)
    ).fit(x, y)
    angles = subspace_angles(
        np.asarray(out["dense"]["kernel"].u, np.float64), reference.scalings_[:, :9]
    )
    assert np.degrees(angles.max()) < 0.05


# ---- bad input ----------------------------------------------------------------------


def _two_layer_setup():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((200, 6))
    labels = np.arange(200) % 3
    params = {
        "a": {"kernel": jnp.ones((6, 4)), "bias": jnp.zeros(4)},
        "b": {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(4)},
    }
    return x, labels, params


def test_bad_options_are_refused_up_front():
    for make in (
        lambda: pca(),
        lambda: pca(2, energy=0.5),
        lambda: pca(0),
        lambda: pca(2.0),
        lambda: pca(True),
        lambda: pca(energy=0.0),
        lambda: pca(energy=1.5),
        lambda: lda(0),
        lambda: lda(2, shrinkage=1.5),
        lambda: lda(2, shrinkage=-0.1),
        lambda: lda(2, shrinkage="auto"),
    ):
        with pytest.raises(ValueError, match=r"pca|lda"):
            make()
    with pytest.raises(ValueError, match="regular expression"):
        pca(2, where="(")


def test_missing_data_and_missing_stats_name_the_leaf():
    x, labels, params = _two_layer_setup()
    for tx in (pca(2), lda(2)):
        with pytest.raises(ValueError, match="needs data="):
            tx(params)
        with pytest.raises(ValueError, match="no InputStats for leaf 'b/kernel'"):
            tx(params, data={"a": {"kernel": input_stats(x, labels)}})
    # Statistics that do not fit the weight's fan-in.
    with pytest.raises(ValueError, match="'a/kernel'.*5 input features"):
        pca(2)(
            params,
            data={"a": {"kernel": input_stats(x[:, :5])}},
        )


def test_lda_needs_labels_and_enough_classes():
    x, labels, params = _two_layer_setup()
    only_a = r"^a/kernel"
    with pytest.raises(ValueError, match="'a/kernel' have no class statistics"):
        lda(1, where=only_a)(params, data={"a": {"kernel": input_stats(x)}})
    one_class = input_stats(x, np.zeros(200, np.int64), classes=3)  # counts (200, 0, 0)
    with pytest.raises(ValueError, match="'a/kernel' has 1 class"):
        lda(1, where=only_a)(params, data={"a": {"kernel": one_class}})
    with pytest.raises(ValueError, match="n_components=3 must be less than the 3 classes"):
        lda(3, where=only_a)(params, data={"a": {"kernel": input_stats(x, labels)}})
    many = input_stats(x, np.arange(200) % 8)
    with pytest.raises(ValueError, match="less than the 6 input features of leaf 'a/kernel'"):
        lda(6, where=only_a)(params, data={"a": {"kernel": many}})
    # An empty class does not count: two classes with examples allow one direction.
    two = input_stats(x, np.arange(200) % 2, classes=3)
    out, _ = lda(1, where=only_a)(params, data={"a": {"kernel": two}})
    assert out["a"]["kernel"].rank == 1
    with pytest.raises(ValueError, match="n_components=2 must be less than the 2 classes"):
        lda(2, where=only_a)(params, data={"a": {"kernel": two}})


def test_pca_refuses_too_many_components_and_compressed_leaves():
    x, _, params = _two_layer_setup()
    data = {"a": {"kernel": input_stats(x)}}
    with pytest.raises(ValueError, match="n_components=6 must be less than the 6 input features"):
        pca(6, where=r"^a/kernel")(params, data=data)
    compressed, _ = pca(1, where=r"^a/kernel")({"a": {"kernel": jnp.ones((6, 40))}}, data=data)
    with pytest.raises(TypeError, match="'a/kernel' is already compressed"):
        pca(1, where=r"^a/kernel")(compressed, data=data)


# ---- models -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lenet(digits):
    """LeNet-300-100 trained briefly on digits, its params, and its hidden activations."""
    x, y, _, _ = digits
    model = LeNet300100()
    params = model.init(jax.random.key(0), jnp.zeros((1, 64)))["params"]
    params = fit_classifier(
        model, params, x.astype(np.float32), y, epochs=5, learning_rate=1e-3, seed=0
    )
    as64 = {k: {n: np.asarray(a, np.float64) for n, a in v.items()} for k, v in params.items()}
    h1 = np.maximum(x @ as64["dense1"]["kernel"] + as64["dense1"]["bias"], 0.0)
    h2 = np.maximum(h1 @ as64["dense2"]["kernel"] + as64["dense2"]["bias"], 0.0)
    return model, params, h1, h2


def _model_accuracy(model, params, x, y) -> float:
    logits = model.apply({"params": jc.materialize(params)}, jnp.asarray(x, jnp.float32))
    return float(np.mean(np.argmax(np.asarray(logits), axis=1) == y))


def test_linen_lenet_pca_on_dense2_and_lda_on_the_head(digits, lenet):
    x, y, x_test, y_test = digits
    model, params, h1, h2 = lenet
    base = _model_accuracy(model, params, x_test, y_test)
    data = {"dense2": {"kernel": input_stats(h1)}, "dense3": {"kernel": input_stats(h2, y)}}
    tx = jc.chain(pca(energy=0.99, where="dense2/kernel"), lda(9, where="dense3/kernel"))
    out, (pca_info, lda_info) = tx(params, data=data)
    assert isinstance(out["dense2"]["kernel"], LowRank)
    assert isinstance(out["dense3"]["kernel"], LowRank)
    assert not jc.is_compressed(out["dense1"]["kernel"])
    k = pca_info["dense2/kernel"]["k"]
    assert k < 100 and jc.nbytes(out["dense2"]) < jc.nbytes(params["dense2"])
    compressed = _model_accuracy(model, out, x_test, y_test)
    # Observed test accuracy: 0.942 dense, 0.953 compressed (dense2 keeps k = 64 of its
    # 300 input features, 0.99 of their variance; the head keeps 9 of its 100).
    assert base > 0.9 and abs(compressed - base) <= 0.02
    assert lda_info["dense3/kernel"]["bias_folded"] is True


def test_nnx_lenet_state_gets_the_same_projection(digits, lenet):
    x, y, x_test, y_test = digits
    linen_model, params, h1, _ = lenet
    model = LeNet300100NNX(rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    # Paths line up, so the trained linen weights load leaf for leaf.
    state = jax.tree.unflatten(jax.tree.structure(state), jax.tree.leaves(params))
    nnx.update(model, state)
    data = {"dense2": {"kernel": input_stats(h1)}}
    out, info = pca(32, where="dense2/kernel")(state, data=data)
    linen_out, linen_info = pca(32, where="dense2/kernel")(params, data=data)
    assert isinstance(out, nnx.State)
    assert isinstance(out["dense2"]["kernel"].get_value(), LowRank)
    np.testing.assert_allclose(
        out["dense2"]["kernel"].get_value().u, linen_out["dense2"]["kernel"].u, atol=1e-6
    )
    nnx.update(model, jc.materialize(out))
    logits = model(jnp.asarray(x_test, jnp.float32))
    nnx_accuracy = float(np.mean(np.argmax(np.asarray(logits), axis=1) == y_test))
    np.testing.assert_allclose(
        nnx_accuracy, _model_accuracy(linen_model, linen_out, x_test, y_test), atol=1e-9
    )
    # Observed test accuracy: 0.942 dense, 0.936 with dense2 reading 32 of 300 features.
    assert abs(nnx_accuracy - _model_accuracy(linen_model, params, x_test, y_test)) <= 0.02
    assert info["dense2/kernel"]["bias_folded"] is True


def test_pca_energy_refuses_traced_statistics():
    x = low_rank_inputs(rows=200, m=8, rank=2)
    data = {"dense": {"kernel": input_stats(x)}}
    with pytest.raises(ValueError, match="energy= chooses k.*'dense/kernel'.*traced"):
        jax.jit(pca(energy=0.9))(dense_params(np.ones((8, 16))), data=data)


def test_pca_on_a_sharded_weight(mesh8):
    from jax.sharding import NamedSharding, PartitionSpec

    x = low_rank_inputs(rows=1000, m=32, rank=4)
    w = np.random.default_rng(7).standard_normal((32, 16))
    sharding = NamedSharding(mesh8, PartitionSpec("data", "model"))
    params = {"dense": {"kernel": jax.device_put(jnp.asarray(w, jnp.float32), sharding)}}
    out, _ = pca(4)(params, data={"dense": {"kernel": input_stats(x)}})
    leaf = out["dense"]["kernel"]
    # The factors are placed like the weight: u (32, 4) and v (4, 16) divide the 4 x 2 mesh.
    assert leaf.u.sharding == leaf.v.sharding == sharding
    dense = np.asarray(jc.materialize(out)["dense"]["kernel"], np.float64)
    centred = x - x.mean(0)
    assert rel_rms(centred @ dense, centred @ w) < 5e-3  # the dropped noise: ~1e-3
