"""cluster with data=: sensitivity-weighted k-means (weights="hessian" / "fisher"), GPTQ
with codebook rounding (method="gptq"), fisher_diagonal, and their errors.

Small layers (64 x 48, 64 x 32, a 3x3 conv, a 16-32-8 MLP in linen and nnx) keep the
file fast; the references are plain k-means and a NumPy weighted DP.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from calibration_stats import gram_stats as _gram_stats
from calibration_stats import stats_of as _stats_of  # tests/ is on sys.path
from flax import linen as nn
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxcompress as jc
from jaxcompress.arrays import Sparse
from jaxcompress.methods.cluster import cluster_array, fisher_diagonal
from jaxcompress.methods.prune import magnitude_sparse

M, N = 64, 32


def _correlated(rows=512, features=M, seed=0):
    """Strongly correlated inputs with unequal scales: where data-aware methods help."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(features, features)) * np.logspace(0, -1.5, features)[None, :]
    return (rng.normal(size=(rows, features)) @ mixing.T + 0.3).astype(np.float32)


X = _correlated()
W = np.random.default_rng(1).normal(size=(M, N)).astype(np.float32)
DATA = {"w": _stats_of(X)}


def _same(a, b):
    """Bit-for-bit equal codebooks and packed indices."""
    return np.array_equal(np.asarray(a.codebook), np.asarray(b.codebook)) and np.array_equal(
        np.asarray(a.indices), np.asarray(b.indices)
    )


def _output_error(leaf, x=X, w=W):
    return float(np.linalg.norm(x @ w - x @ np.asarray(leaf.materialize(), np.float32)))


def _weighted_sse(x, w, codebook):
    x, w = np.asarray(x, np.float64).reshape(-1), np.asarray(w, np.float64).reshape(-1)
    c = np.asarray(codebook, np.float64)
    return float((w * np.min((x[:, None] - c[None, :]) ** 2, axis=1)).sum())


def _weighted_optimum(x, w, k):
    """The least weighted k-means cost of 1-D data, by an O(k n²) DP in float64."""
    order = np.argsort(x)
    x, w = np.asarray(x, np.float64)[order], np.asarray(w, np.float64)[order]
    s0 = np.concatenate([[0], np.cumsum(w)])
    s1 = np.concatenate([[0], np.cumsum(w * x)])
    s2 = np.concatenate([[0], np.cumsum(w * x * x)])
    n = len(x)

    def cost(a, b):  # points a..b-1
        mass = s0[b] - s0[a]
        return 0.0 if mass <= 0 else s2[b] - s2[a] - (s1[b] - s1[a]) ** 2 / mass

    best = np.array([cost(0, i) for i in range(n + 1)])
    for _ in range(1, k):
        best = np.array([min(best[m] + cost(m, i) for m in range(i + 1)) for i in range(n + 1)])
    return float(best[n])


# ---------------------------------------------------------------- weighted k-means


@pytest.mark.bitwise
@pytest.mark.parametrize(
    ("init", "method", "per_channel"),
    [
        ("linear", "lloyd", False),
        ("density", "lloyd", False),
        ("kmeans++", "lloyd", False),
        ("random", "lloyd", True),
        ("linear", "optimal", False),  # 3072 values: the DP runs on 2048 weighted bins
    ],
)
def test_uniform_weights_give_exactly_plain_kmeans(init, method, per_channel):
    w = jnp.asarray(np.random.default_rng(0).normal(size=(64, 48)), jnp.float32)
    key = jax.random.key(3)
    options = dict(k=12, init=init, method=method, per_channel=per_channel)
    plain, plain_stats = jc.cluster(**options)({"w": w}, key=key)
    fisher = jc.cluster(**options, weights="fisher")
    hessian = jc.cluster(**options, weights="hessian")
    for tx, data in (
        (fisher, {"w": jnp.full(w.shape, 0.37, jnp.float32)}),
        (fisher, {"w": jnp.full(w.shape, 3e-5, jnp.float32)}),
        (hessian, {"w": _gram_stats(2.5 * np.eye(64))}),
    ):
        weighted, stats = tx({"w": w}, key=key, data=data)
        assert _same(weighted["w"], plain["w"]), (tx.name, data)
        assert int(stats["w"]["iterations"]) == int(plain_stats["w"]["iterations"])
        assert float(stats["w"]["inertia"]) == float(plain_stats["w"]["inertia"])


def test_weighted_optimal_is_the_exact_weighted_optimum():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(8, 5)).astype(np.float32)
    # A few heavy weights: the weighted optimum differs from the plain one.
    s = np.where(rng.uniform(size=x.shape) < 0.15, 50.0, rng.uniform(0.1, 1.0, x.shape))
    s = s.astype(np.float32)
    tx = jc.cluster(k=4, method="optimal", weights="fisher")
    clustered, stats = tx({"w": jnp.asarray(x)}, data={"w": jnp.asarray(s)})
    best = _weighted_optimum(x.reshape(-1), s.reshape(-1), 4)
    got = _weighted_sse(x, s, clustered["w"].codebook)
    assert got == pytest.approx(best, rel=1e-5)
    plain, _ = jc.cluster(k=4, method="optimal")({"w": jnp.asarray(x)})
    assert _weighted_sse(x, s, plain["w"].codebook) > best * 1.05
    relative = np.sqrt(got / float((s * x.astype(np.float64) ** 2).sum()))
    assert float(stats["w"]["weighted_relative_error"]) == pytest.approx(relative, rel=1e-4)


def test_weighted_lloyd_converges_to_weighted_cluster_means():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(64, 48)).astype(np.float32)
    s = rng.lognormal(sigma=1.5, size=x.shape).astype(np.float32)
    clustered, _ = jc.cluster(k=8, weights="fisher", tol=0.0)({"w": jnp.asarray(x)}, data={"w": s})
    leaf = clustered["w"]
    codes = np.asarray(leaf.codes()).reshape(-1)
    codebook = np.asarray(leaf.codebook, np.float64)
    flat, weight = x.reshape(-1).astype(np.float64), s.reshape(-1).astype(np.float64)
    # Nearest-centroid assignment, and each centroid the weighted mean of its points.
    np.testing.assert_array_equal(codes, np.argmin(np.abs(flat[:, None] - codebook), axis=1))
    for c in range(8):
        chosen = codes == c
        mean = (weight[chosen] * flat[chosen]).sum() / weight[chosen].sum()
        assert codebook[c] == pytest.approx(mean, abs=1e-5)
    # The plain codebook is a different fixed point, worse in the weighted error.
    plain, _ = jc.cluster(k=8)({"w": jnp.asarray(x)})
    assert _weighted_sse(x, s, codebook) < _weighted_sse(x, s, plain["w"].codebook)


@pytest.mark.bitwise
@pytest.mark.parametrize("shape", [(M, N), (3, 3, 4, 8)])
def test_hessian_weights_are_the_input_gram_diagonal_of_each_row(shape):
    rng = np.random.default_rng(4)
    w = jnp.asarray(rng.normal(size=shape), jnp.float32)
    m = int(np.prod(shape[:-1]))
    features = rng.normal(size=(256, m)) * np.logspace(-1, 1, m)[None, :]
    stats = _stats_of(features)
    diagonal = np.diagonal(np.asarray(stats.gram))
    fisher = np.broadcast_to(diagonal[:, None], (m, shape[-1])).reshape(shape)
    # Exact DP (at most 2048 values): the weighted optimum for the diagonal weights.
    hessian, h_stats = jc.cluster(bits=3, method="optimal", weights="hessian")(
        {"w": w}, data={"w": stats}
    )
    same, _ = jc.cluster(bits=3, method="optimal", weights="fisher")(
        {"w": w}, data={"w": jnp.asarray(fisher)}
    )
    plain, _ = jc.cluster(bits=3, method="optimal")({"w": w})
    assert _same(hessian["w"], same["w"])
    assert _weighted_sse(w, fisher, hessian["w"].codebook) < 0.99 * _weighted_sse(
        w, fisher, plain["w"].codebook
    )
    assert set(h_stats["w"]) >= {"weighted_relative_error", "relative_output_error"}


@pytest.mark.bitwise
def test_sparse_leaf_with_weights_clusters_its_kept_values_with_their_weights():
    w = jnp.asarray(W)
    sparse = magnitude_sparse(w, M * N // 2)
    s = np.random.default_rng(6).lognormal(size=W.shape).astype(np.float32)
    clustered, _ = jc.cluster(bits=3, weights="fisher")({"w": sparse}, data={"w": s})
    leaf = clustered["w"]
    assert isinstance(leaf, Sparse) and isinstance(leaf.values, jc.Clustered)
    keep = np.asarray(sparse.keep_mask())
    assert np.all(np.asarray(leaf.materialize())[~keep] == 0)
    want, _ = cluster_array(sparse.values, k=8, weights=jnp.asarray(s[keep]))
    assert _same(leaf.values, want)
    hessian, _ = jc.cluster(bits=3, weights="hessian")({"w": sparse}, data=DATA)
    diagonal = np.broadcast_to(np.diagonal(np.asarray(DATA["w"].gram))[:, None], W.shape)
    want, _ = cluster_array(sparse.values, k=8, weights=jnp.asarray(diagonal[keep]))
    assert _same(hessian["w"].values, want)


# ---------------------------------------------------------------- GPTQ with a codebook


@pytest.mark.bitwise
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"per_channel": True, "block_size": 16},
        {"act_order": True, "weights": "hessian"},
    ],
)
def test_gptq_with_a_diagonal_gram_is_nearest_codebook_assignment(options):
    w = {"w": jnp.asarray(W)}
    for gram in (np.eye(M), np.diag(np.random.default_rng(7).uniform(0.5, 2.0, M))):
        data = {"w": _gram_stats(gram)}
        gptq, stats = jc.cluster(bits=3, method="gptq", **options)(w, data=data)
        lloyd = {key: value for key, value in options.items() if key in ("per_channel", "weights")}
        plain, _ = jc.cluster(bits=3, **lloyd)(w, data=data)
        assert _same(gptq["w"], plain["w"])
        assert float(stats["w"]["damp"]) == 0.01
        assert float(stats["w"]["damping"]) == pytest.approx(0.01 * np.mean(np.diagonal(gram)))


@pytest.mark.bitwise
@pytest.mark.parametrize(("bits", "per_channel"), [(3, False), (4, False), (3, True)])
def test_gptq_output_error_is_below_plain_kmeans(bits, per_channel):
    params = {"w": jnp.asarray(W)}
    plain, _ = jc.cluster(bits, per_channel=per_channel)(params)
    gptq, stats = jc.cluster(bits, per_channel=per_channel, method="gptq")(params, data=DATA)
    leaf = gptq["w"]
    assert isinstance(leaf, jc.Clustered) and leaf.k == 2**bits
    assert leaf.nbytes == plain["w"].nbytes
    # Same codebook (fitted as plain k-means), different assignment.
    np.testing.assert_array_equal(np.asarray(leaf.codebook), np.asarray(plain["w"].codebook))
    assert _output_error(leaf) < 0.75 * _output_error(plain["w"])
    gram = np.asarray(DATA["w"].gram, np.float64)
    error = W - np.asarray(leaf.materialize(), np.float64)
    relative = np.sqrt(np.sum(error * (gram @ error)) / np.sum(W * (gram @ W)))
    assert float(stats["w"]["relative_output_error"]) == pytest.approx(relative, rel=1e-3)
    assert bool(stats["w"]["factorized"])


def test_gptq_block_size_changes_nothing_but_rounding():
    params = {"w": jnp.asarray(W)}
    big, _ = jc.cluster(3, method="gptq", block_size=128)(params, data=DATA)
    small, _ = jc.cluster(3, method="gptq", block_size=5)(params, data=DATA)
    differ = np.mean(np.asarray(big["w"].codes()) != np.asarray(small["w"].codes()))
    assert differ <= 0.01
    assert _output_error(small["w"]) == pytest.approx(_output_error(big["w"]), rel=0.02)


# ---------------------------------------------------------------- models, jit, sharding


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(8, name="dense2")(nn.relu(nn.Dense(32, name="dense1")(x)))


class _MLPNNX(nnx.Module):
    def __init__(self, rngs):
        self.dense1 = nnx.Linear(16, 32, rngs=rngs)
        self.dense2 = nnx.Linear(32, 8, rngs=rngs)

    def __call__(self, x):
        return self.dense2(nnx.relu(self.dense1(x)))


def _check_model(params, apply, x, unwrap, hessian_lloyd=True):
    data = jc.calibrate(apply, params, [x[:32], x[32:]])
    dense_out = apply(params, x)
    plain, _ = jc.cluster(bits=3)(params)
    plain_error = np.linalg.norm(apply(jc.materialize(plain), x) - dense_out)
    fisher = fisher_diagonal(lambda p, b: jnp.mean(jnp.square(apply(p, b))), params, [x])
    txs = [
        (jc.cluster(bits=3, method="gptq", weights="hessian"), data),
        (jc.cluster(bits=3, weights="fisher"), fisher),
    ]
    if hessian_lloyd:
        txs.append((jc.cluster(bits=3, weights="hessian"), data))
    for tx, tx_data in txs:
        eager, stats = tx(params, data=tx_data)
        jitted, jit_stats = jax.jit(tx)(params, data=tx_data)
        for path in ("dense1/kernel", "dense2/kernel"):
            assert set(stats[path]) == set(jit_stats[path])
        for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
        kernel = unwrap(eager["dense1"]["kernel"])
        assert isinstance(kernel, jc.Clustered) and kernel.k == 8
        assert not jc.is_compressed(unwrap(eager["dense1"]["bias"]))
        if "gptq" in tx.name:
            error = np.linalg.norm(apply(jc.materialize(eager), x) - dense_out)
            assert error < plain_error


def test_linen_mlp_through_calibrate_eagerly_and_under_jit():
    model = _MLP()
    x = jnp.asarray(_correlated(rows=64, features=16, seed=9))
    params = model.init(jax.random.key(0), x)["params"]
    _check_model(params, lambda p, x: model.apply({"params": p}, x), x, lambda leaf: leaf)


def test_nnx_model_through_calibrate_eagerly_and_under_jit():
    graphdef, state = nnx.split(_MLPNNX(nnx.Rngs(0)))
    x = jnp.asarray(_correlated(rows=64, features=16, seed=9))
    # weights="hessian" with Lloyd was checked on the linen MLP of the same shapes.
    _check_model(
        state,
        lambda s, x: nnx.merge(graphdef, s)(x),
        x,
        lambda variable: variable.get_value(),
        hessian_lloyd=False,
    )


@pytest.mark.bitwise
def test_explicitly_sharded_weight_gives_the_unsharded_result():
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    sharded = jax.device_put(jnp.asarray(W), NamedSharding(mesh, P("data", "model")))
    for tx in (
        jc.cluster(3, method="gptq", weights="hessian", where="w"),
        jc.cluster(3, weights="fisher", per_channel=True, where="w"),
    ):
        data = DATA if "gptq" in tx.name else {"w": jnp.asarray(np.abs(W))}
        want, _ = tx({"w": jnp.asarray(W)}, data=data)
        got, _ = tx({"w": sharded}, data=data)
        assert _same(got["w"], want["w"])


# ---------------------------------------------------------------- fisher_diagonal


def test_fisher_diagonal_is_the_mean_of_squared_gradients():
    rng = np.random.default_rng(8)
    params = {"a": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32), "b": jnp.ones(2)}
    batches = [jnp.asarray(rng.normal(size=(4, 3)), jnp.float32) for _ in range(3)]

    def loss(p, x):
        return jnp.sum(jnp.tanh(x @ p["a"] + p["b"][None, :]) ** 2)

    grads = [jax.grad(loss)(params, x) for x in batches]
    fisher = fisher_diagonal(loss, params, batches)
    for name in ("a", "b"):
        want = np.mean([np.asarray(g[name]) ** 2 for g in grads], axis=0)
        np.testing.assert_allclose(np.asarray(fisher[name]), want, rtol=1e-5)
    assert jc.fisher_diagonal is fisher_diagonal
    with pytest.raises(ValueError, match="batches is empty"):
        fisher_diagonal(loss, params, [])


# ---------------------------------------------------------------- errors


def test_missing_or_wrong_data_raises_naming_the_option_and_leaf():
    params = {"dense": {"kernel": jnp.asarray(W), "bias": jnp.zeros(N)}}
    stats = _stats_of(X)
    fisher = jnp.ones((M, N))
    for tx, option in (
        (jc.cluster(3, weights="hessian"), "weights='hessian'"),
        (jc.cluster(3, method="gptq"), "method='gptq'"),
    ):
        with pytest.raises(ValueError, match=f"{option} needs data="):
            tx(params)
        with pytest.raises(ValueError, match="no InputStats for leaf 'dense/kernel'"):
            tx(params, data={"other": {"kernel": stats}})
        with pytest.raises(
            ValueError, match=r"leaf 'dense/kernel' have a gram of shape \(10, 10\)"
        ):
            tx(params, data={"dense": {"kernel": _stats_of(X[:, :10])}})
        with pytest.raises(
            ValueError, match=f"{option} reads calibration statistics.*leaf 'dense/kernel'.*"
        ):
            tx(params, data={"dense": {"kernel": fisher}})
        with pytest.raises(ValueError, match=re.escape(tx.name) + ".*NaN or Inf"):
            tx(params, data={"dense": {"kernel": _gram_stats(np.full((M, M), np.nan))}})
    tx = jc.cluster(3, weights="fisher")
    with pytest.raises(ValueError, match="weights='fisher' needs data="):
        tx(params)
    with pytest.raises(ValueError, match="no Fisher diagonal for leaf 'dense/kernel'"):
        tx(params, data={"other": fisher})
    with pytest.raises(ValueError, match="leaf 'dense/kernel'.*holds calibration statistics"):
        tx(params, data={"dense": {"kernel": stats}})
    with pytest.raises(ValueError, match=r"'dense/kernel' has shape \(32, 64\).*\(64, 32\)"):
        tx(params, data={"dense": {"kernel": fisher.T}})
    for bad in (np.nan, -1.0):
        with pytest.raises(ValueError, match="'dense/kernel' has NaN, Inf or negative"):
            tx(params, data={"dense": {"kernel": fisher.at[0, 0].set(bad)}})


def test_bad_options_raise():
    params = {"w": jnp.asarray(W)}
    with pytest.raises(ValueError, match="weights must be one of"):
        jc.cluster(3, weights="gradient")
    with pytest.raises(ValueError, match="method must be one of"):
        jc.cluster(3, method="awq")
    with pytest.raises(ValueError, match="method='gptq'.*weights='fisher'"):
        jc.cluster(3, method="gptq", weights="fisher")
    with pytest.raises(ValueError, match="act_order=True only applies"):
        jc.cluster(3, act_order=True)
    with pytest.raises(ValueError, match="damp must be"):
        jc.cluster(3, method="gptq", damp=-1.0)
    with pytest.raises(ValueError, match="block_size must be"):
        jc.cluster(3, method="gptq", block_size=0)
    with pytest.raises(ValueError, match="key="):
        jc.cluster(3, method="gptq", init="kmeans++")(params, data=DATA)
    sparse = {"w": magnitude_sparse(jnp.asarray(W), 100)}
    with pytest.raises(TypeError, match="leaf 'w' is Sparse"):
        jc.cluster(3, method="gptq")(sparse, data=DATA)
    # A singular Gram with no damping cannot be factorized.
    ones = {"w": _gram_stats(np.ones((M, M)))}
    with pytest.raises(ValueError, match="not positive definite.*raise damp="):
        jc.cluster(3, method="gptq", damp=0.0)(params, data=ones)
