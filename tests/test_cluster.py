"""cluster: codebook/indices invariants, Lloyd and optimal k-means, exactness, inits,
Sparse nesting, per-channel, jit, linen/nnx, sharding, bad input, properties."""

import math

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxcompress as jc
from jaxcompress.examples.models import LeNet5, LeNet300100NNX
from jaxcompress.methods.cluster import bucket_length, cluster_array_compiled
from jaxcompress.numerics import kmeans1d

# Lloyd–Max MSE of the optimal k-level quantizer of N(0, 1), k = 2..32.
LLOYD_MAX = {1: 0.3634, 2: 0.1175, 3: 0.03455, 4: 0.00950, 5: 0.00250}


def _weight(shape=(64, 48), seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _linear_init_sse(w, k):
    flat = np.asarray(w, np.float64).reshape(-1)
    centroids = np.linspace(flat.min(), flat.max(), k)
    return float(np.min((flat[:, None] - centroids[None, :]) ** 2, axis=1).sum())


def _check_leaf(leaf, w, k):
    assert isinstance(leaf, jc.Clustered)
    assert leaf.codebook.shape[-1] <= k
    codes = np.asarray(leaf.codes())
    assert codes.shape == w.shape and codes.max() < k
    assert leaf.materialize().shape == w.shape and leaf.materialize().dtype == w.dtype


@pytest.mark.parametrize("bits", [3, 8])
def test_codebook_size_indices_and_exact_nbytes(bits):
    w = _weight((37, 19))
    clustered, stats = jc.cluster(bits)({"w": w})
    leaf, k = clustered["w"], 2**bits
    _check_leaf(leaf, w, k)
    assert leaf.bits == bits and stats["w"]["k"] == k
    assert leaf.indices.dtype == jnp.uint8
    assert leaf.indices.shape == (37, math.ceil(19 * bits / 8))
    assert leaf.nbytes == 37 * math.ceil(19 * bits / 8) + k * 4


def test_k_not_a_power_of_two_and_a_half_precision_codebook():
    w = _weight((37, 19))
    half = jc.cluster(k=5, codebook_dtype=jnp.float16)({"w": w})[0]["w"]
    _check_leaf(half, w, 5)
    assert half.bits == 3 and half.codebook.dtype == jnp.float16
    assert half.nbytes == 37 * math.ceil(19 * 3 / 8) + 5 * 2


@pytest.mark.parametrize("init", ["linear", "density", "kmeans++", "random"])
def test_lloyd_assigns_each_weight_to_its_nearest_centroid(init):
    w = _weight()
    clustered, stats = jc.cluster(k=12, init=init)({"w": w}, key=jax.random.key(3))
    leaf = clustered["w"]
    _check_leaf(leaf, w, 12)
    codebook = np.asarray(leaf.codebook, np.float64)
    distance = np.abs(np.asarray(w, np.float64).reshape(-1, 1) - codebook[None, :])
    chosen = distance[np.arange(w.size), np.asarray(leaf.codes()).reshape(-1)]
    np.testing.assert_allclose(chosen, distance.min(axis=1), rtol=0, atol=1e-6)
    dense = np.asarray(leaf.materialize(), np.float64)
    np.testing.assert_allclose(
        float(stats["w"]["inertia"]), ((dense - np.asarray(w)) ** 2).sum(), rtol=1e-4
    )
    relative = np.linalg.norm(dense - np.asarray(w)) / np.linalg.norm(np.asarray(w))
    np.testing.assert_allclose(float(stats["w"]["relative_error"]), relative, rtol=1e-4)


def _init_sse(w, centroids):
    flat = np.asarray(w, np.float64).reshape(-1, 1)
    return float(np.min((flat - np.asarray(centroids, np.float64)[None, :]) ** 2, axis=1).sum())


@pytest.mark.parametrize("init", ["linear", "density", "random"])
def test_lloyd_never_ends_above_its_init(init):
    w = _weight()
    key = jax.random.key(3)
    _, stats = jc.cluster(k=12, init=init)({"w": w}, key=key)
    flat = np.sort(np.asarray(w).reshape(-1))
    if init == "linear":
        start = _init_sse(w, np.linspace(flat[0], flat[-1], 12))
    elif init == "density":
        start = _init_sse(
            w, flat[np.round((np.arange(12) + 0.5) / 12 * (flat.size - 1)).astype(int)]
        )
    else:
        # Random seeds are not reproducible here; Lloyd never ends above its first step.
        start = float(jc.cluster(k=12, init=init, max_iter=1)({"w": w}, key=key)[1]["w"]["inertia"])
    assert float(stats["w"]["inertia"]) <= start * (1 + 1e-6)
    assert int(stats["w"]["iterations"]) >= 1


@pytest.mark.parametrize("init", ["kmeans++", "random"])
def test_random_inits_need_a_key(init):
    with pytest.raises(ValueError, match="key="):
        jc.cluster(k=4, init=init)({"w": _weight()})


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5])
def test_optimal_matches_lloyd_max_on_a_million_gaussians(bits):
    x = jnp.asarray(np.random.default_rng(bits).standard_normal((1000, 1000)), jnp.float32)
    _, stats = jc.cluster(bits, method="optimal")({"w": x})
    mse = float(stats["w"]["inertia"]) / x.size
    assert abs(mse / LLOYD_MAX[bits] - 1) < 0.01, (bits, mse)


@pytest.mark.parametrize("seed", range(4))
def test_optimal_is_never_worse_than_lloyd(seed):
    rng = np.random.default_rng(seed)
    # A mixture with uneven clusters, where Lloyd from the linear init can get stuck.
    x = np.concatenate([rng.normal(0, 1, 900), rng.normal(8, 0.1, 60), rng.normal(-20, 3, 40)])
    w = jnp.asarray(rng.permutation(x).reshape(50, 20), jnp.float32)
    for init in ("linear", "density"):
        _, lloyd = jc.cluster(k=6, init=init)({"w": w})
        _, optimal = jc.cluster(k=6, method="optimal")({"w": w})
        assert float(optimal["w"]["inertia"]) <= float(lloyd["w"]["inertia"]) * (1 + 1e-5)


def test_optimal_is_exact_on_small_inputs():
    # Brute force over all split points of 12 sorted values into 3 clusters.
    values = np.array([0.0, 0.1, 0.2, 1.0, 1.3, 1.4, 5.0, 5.5, 6.0, 9.0, 9.1, 20.0])
    best = min(
        sum(((part - part.mean()) ** 2).sum() for part in np.split(values, [a, b]))
        for a in range(1, 11)
        for b in range(a + 1, 12)
    )
    w = jnp.asarray(np.random.default_rng(0).permutation(values).reshape(3, 4), jnp.float32)
    _, stats = jc.cluster(k=3, method="optimal")({"w": w})
    np.testing.assert_allclose(float(stats["w"]["inertia"]), best, rtol=1e-4)


@pytest.mark.parametrize("method", ["lloyd", "optimal"])
def test_fewer_distinct_values_than_k_is_exact_with_a_note(method):
    w = jnp.array([[0.5, -1.25, 3.0, 0.5], [3.0, 3.0, -1.25, 0.5]], jnp.float32)
    clustered, stats = jc.cluster(k=16, method=method)({"w": w})
    leaf = clustered["w"]
    _check_leaf(leaf, w, 16)
    np.testing.assert_array_equal(leaf.materialize(), w)
    assert stats["w"]["note"] == "3 distinct values < k=16: exact codebook"
    assert float(stats["w"]["inertia"]) == 0.0
    # A constant leaf is the extreme case.
    constant = jc.cluster(k=16, method=method)({"w": jnp.full((2, 4), 2.5)})[0]["w"]
    np.testing.assert_array_equal(constant.materialize(), jnp.full((2, 4), 2.5))


def test_empty_clusters_do_not_make_nan():
    # Two far groups and 8 centroids: most linear-init centroids start with no points.
    w = jnp.asarray([[0.0, 0.01, 0.02, 0.03, 100.0, 100.01, 100.02, 100.03, 50.0, 0.04]])
    leaf = jc.cluster(k=8)({"w": w})[0]["w"]
    assert np.isfinite(np.asarray(leaf.codebook)).all()
    assert np.isfinite(np.asarray(leaf.materialize())).all()


def test_sparse_leaf_keeps_exact_zeros():
    w = _weight((40, 30), seed=2)
    tx = jc.chain(jc.prune(0.9), jc.cluster(bits=5))
    compressed, (prune_stats, cluster_stats) = tx({"w": w})
    leaf = compressed["w"]
    assert isinstance(leaf, jc.Sparse) and isinstance(leaf.values, jc.Clustered)
    assert leaf.values.shape == (120,) and leaf.values.k == 32
    dense = np.asarray(jc.materialize(compressed)["w"])
    assert (dense == 0).sum() == prune_stats["w"]["pruned"] == 1080
    assert cluster_stats["w"]["k"] == 32
    assert leaf.nbytes == leaf.values.nbytes + leaf.mask.size
    assert leaf.values.nbytes == math.ceil(120 * 5 / 8) + 32 * 4


def test_per_channel_codebooks():
    w = _weight((50, 6))
    clustered, stats = jc.cluster(bits=2, per_channel=True)({"w": w})
    leaf = clustered["w"]
    assert leaf.per_channel and leaf.codebook.shape == (6, 4)
    assert leaf.nbytes == 50 * 2 + 6 * 4 * 4  # 6 two-bit codes per row: 2 bytes
    dense = np.asarray(leaf.materialize())
    # Each channel is clustered on its own: exactly as if it were a leaf by itself.
    single_inertia = 0.0
    for channel in range(6):
        one, one_stats = jc.cluster(bits=2)({"w": w[:, channel : channel + 1]})
        np.testing.assert_allclose(leaf.codebook[channel], one["w"].codebook, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(dense[:, channel], one["w"].materialize()[:, 0], rtol=1e-5)
        single_inertia += float(one_stats["w"]["inertia"])
    np.testing.assert_allclose(float(stats["w"]["inertia"]), single_inertia, rtol=1e-5)


def test_linen_cnn_under_jit():
    model = LeNet5()
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(4, 8, 8, 1)), jnp.float32)
    params = model.init(jax.random.key(0), x)["params"]
    # Both convolutions and the first dense kernel; biases are never selected.
    tx = jc.cluster(bits=5, where=jc.filters.all_of(jc.filters.kernels, "conv|dense1"))
    clustered, stats = jax.jit(tx)(params)
    assert isinstance(clustered["conv1"]["kernel"], jc.Clustered)
    assert not jc.is_compressed(clustered["conv1"]["bias"])
    assert clustered["conv1"]["kernel"].k == 32
    assert len(np.unique(np.asarray(jc.materialize(clustered)["conv1"]["kernel"]))) <= 32
    dense_out = model.apply({"params": params}, x)
    out = jax.jit(lambda p: model.apply({"params": jc.materialize(p)}, x))(clustered)
    relative = float(jnp.linalg.norm(out - dense_out) / jnp.linalg.norm(dense_out))
    assert relative < 0.3
    assert all(float(s["relative_error"]) < 0.1 for s in stats.values())


def test_nnx_state_round_trip_under_jit():
    model = LeNet300100NNX(rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    clustered, stats = jax.jit(jc.cluster(bits=4))(params)
    assert set(stats) == {"dense1/kernel", "dense2/kernel", "dense3/kernel"}
    assert clustered["dense1"]["kernel"].get_value().k == 16
    restored = nnx.merge(graphdef, jc.materialize(clustered), rest)
    kernel = np.asarray(restored.dense1.kernel.get_value())
    assert len(np.unique(kernel)) <= 16
    x = jnp.ones((2, 64))
    assert restored(x).shape == (2, 10)


def test_sharded_equals_unsharded(mesh8):
    params = {"a": _weight((64, 128)), "b": _weight((32, 16), seed=1)}
    spec = P("data", "model")
    sharded = jax.device_put(params, NamedSharding(mesh8, spec))
    # One per-tensor and one per-channel leaf, both sharded along both axes.
    tx = jc.chain(jc.cluster(bits=3, where="a"), jc.cluster(bits=3, per_channel=True, where="b"))
    want, (want_a, want_b) = tx(params)
    got, (got_a, got_b) = tx(sharded)
    assert got["b"].per_channel and not got["a"].per_channel
    for path, got_stats, want_stats in (("a", got_a, want_a), ("b", got_b, want_b)):
        np.testing.assert_array_equal(got[path].indices, want[path].indices)
        # Partitioned sums may round differently in the last bits; indices match exactly.
        np.testing.assert_allclose(got[path].codebook, want[path].codebook, rtol=1e-5, atol=1e-6)
        # Indices are laid out like the weight and keep its row sharding.
        assert got[path].indices.sharding.spec[0] == spec[0]
        np.testing.assert_allclose(
            jc.materialize(got)[path], jc.materialize(want)[path], rtol=1e-5, atol=1e-6
        )
        np.testing.assert_allclose(
            float(got_stats[path]["inertia"]), float(want_stats[path]["inertia"]), rtol=1e-5
        )
    # A compressed tree built from sharded weights materializes under jit too.
    np.testing.assert_allclose(
        jax.jit(jc.materialize)(got)["b"], jc.materialize(want)["b"], rtol=1e-5, atol=1e-6
    )


def test_jitted_cluster_on_a_sharded_weight_never_gathers_it(mesh8):
    # 512 x 1024 over a 4 x 2 mesh takes the histogram path; a full-size all-gather
    # would show as [512,1024] (or its 524288-element flattening) in the compiled program.
    weight = _weight((512, 1024))
    few = jnp.asarray(np.resize(np.float32([-1.5, 0.25, 0.5, 7.0]), (512, 1024)))
    params = {"w": weight, "few": few}
    sharded = jax.device_put(params, NamedSharding(mesh8, P("data", "model")))
    tx = jc.cluster(k=16)
    compiled = jax.jit(tx).lower(sharded).compile().as_text()
    gathers = [line for line in compiled.splitlines() if "all-gather(" in line]
    assert not [line for line in gathers if "[512,1024]" in line or "[524288]" in line]
    got, got_stats = jax.jit(tx)(sharded)
    want, want_stats = tx(params)
    # Partitioned sums round differently, so the codebooks agree to float32 rounding ...
    np.testing.assert_allclose(got["w"].codebook, want["w"].codebook, rtol=1e-5)
    np.testing.assert_allclose(
        float(got_stats["w"]["inertia"]), float(want_stats["w"]["inertia"]), rtol=1e-5
    )
    # ... and the few values within rounding of a midpoint may pick the other side,
    # at the same error.
    got_codes, want_codes = np.asarray(got["w"].codes()), np.asarray(want["w"].codes())
    differ = got_codes != want_codes
    assert differ.sum() <= 16
    w = np.asarray(weight)
    got_error = np.abs(np.asarray(jc.materialize(got)["w"]) - w)[differ]
    want_error = np.abs(np.asarray(jc.materialize(want)["w"]) - w)[differ]
    np.testing.assert_allclose(got_error, want_error, rtol=0, atol=2e-5)
    # Four distinct values: exact from the histogram alone, sharded or not.
    np.testing.assert_array_equal(got["few"].codes(), want["few"].codes())
    np.testing.assert_array_equal(got["few"].codebook, want["few"].codebook)
    np.testing.assert_array_equal(jc.materialize(got)["few"], few)
    assert int(got_stats["few"]["distinct"]) == 4
    # The packed indices stay split like the weight.
    assert got["w"].indices.sharding.spec == P("data", "model")


def test_bad_arguments():
    with pytest.raises(ValueError, match="k="):
        jc.cluster(k=1)
    with pytest.raises(ValueError, match="k="):
        jc.cluster(k=257)
    for bits in (0, 9):
        with pytest.raises(ValueError, match="bits"):
            jc.cluster(bits)
    with pytest.raises(ValueError, match="exactly one"):
        jc.cluster(4, k=16)
    with pytest.raises(ValueError, match="exactly one"):
        jc.cluster()
    with pytest.raises(ValueError, match="init"):
        jc.cluster(4, init="kmeans")
    with pytest.raises(ValueError, match="method"):
        jc.cluster(4, method="elkan")
    with pytest.raises(TypeError, match="k must be an integer"):
        jc.cluster(k=4.0)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_weights_name_the_leaf(bad):
    w = np.ones((4, 4), np.float32)
    w[1, 2] = bad
    with pytest.raises(ValueError, match="'enc/kernel'.*NaN or Inf"):
        jc.cluster(bits=2)({"enc": {"kernel": jnp.asarray(w)}})


def test_bad_leaves_name_the_path():
    with pytest.raises(TypeError, match="'q'"):
        jc.cluster(bits=2, where="q")({"q": jnp.ones((4, 4), jnp.int32)})
    clustered, _ = jc.cluster(bits=2)({"w": _weight((8, 8))})
    with pytest.raises(TypeError, match="'w'.*already compressed"):
        jc.cluster(bits=2)(clustered)
    with pytest.raises(ValueError, match="scalar"):
        jc.cluster(bits=2, where="s")({"s": jnp.float32(1.0)})


@settings(max_examples=20, deadline=None)
@given(
    w=hnp.arrays(
        np.float32,
        (6, 8),
        elements=st.one_of(
            st.floats(-100, 100, width=32, allow_subnormal=False),
            st.sampled_from([0.0, 1.5, -2.25, 1e-3]),
        ),
    ),
    bits=st.sampled_from([1, 3]),
)
def test_property_codebook_size_indices_and_error(w, bits):
    # One shape keeps compilation to one program per bit width.
    k = 2**bits
    weight = jnp.asarray(w)
    clustered, stats = jc.cluster(bits)({"w": weight})
    leaf = clustered["w"]
    _check_leaf(leaf, weight, k)
    error = float(jnp.sum((leaf.materialize() - weight) ** 2))
    linear = _linear_init_sse(w, k)
    assert error <= linear * (1 + 1e-4) + 1e-3
    if len(np.unique(w)) <= k:
        np.testing.assert_array_equal(leaf.materialize(), weight)


@pytest.mark.parametrize("k", [16, 256])
def test_histogram_path_on_large_leaves(k):

    rng = np.random.default_rng(k)
    # Above the histogram threshold: a Gaussian with a small far cluster.
    n = kmeans1d.HISTOGRAM_MIN + 4096
    x = np.concatenate([rng.standard_normal(n - 2000), rng.normal(9.0, 0.2, 2000)])
    x = rng.permutation(x).astype(np.float32)
    w = jnp.asarray(x.reshape(-1, 64))
    clustered, stats = jax.jit(jc.cluster(k=k))({"w": w})
    leaf = clustered["w"]
    _check_leaf(leaf, w, k)
    codebook = np.asarray(leaf.codebook, np.float64)
    assert np.isfinite(codebook).all() and (np.diff(codebook) >= 0).all()
    # Every value goes to its nearest centroid, and the inertia is exact.
    distance = np.abs(x.astype(np.float64)[:, None] - codebook[None, :])
    chosen = distance[np.arange(x.size), np.asarray(leaf.codes()).reshape(-1)]
    np.testing.assert_allclose(chosen, distance.min(axis=1), rtol=0, atol=1e-6)
    inertia = float(stats["w"]["inertia"])
    dense = np.asarray(leaf.materialize(), np.float64).reshape(-1)
    np.testing.assert_allclose(inertia, ((dense - x) ** 2).sum(), rtol=1e-4)
    # Never above the linear init; and within the stated bound of the sorted path:
    # rms <= (rms of the binned solution) + h, which here stays within h of sorted Lloyd.
    assert inertia <= _linear_init_sse(w, k) * (1 + 1e-6)
    options = dict(
        k=k, init="linear", method="lloyd", max_iter=1000, tol=1e-6, codebook_dtype=np.float32
    )
    sorted_codebook = jax.jit(lambda v: kmeans1d.fit(v, None, histogram=False, **options)[0])(
        jnp.asarray(x)
    )
    sorted_sse = _init_sse(w, sorted_codebook)
    h = (x.max() - x.min()) / kmeans1d.HISTOGRAM_BINS
    assert math.sqrt(inertia / x.size) <= math.sqrt(sorted_sse / x.size) + h
    assert int(stats["w"]["iterations"]) >= 1 and int(stats["w"]["distinct"]) > k


def test_histogram_path_falls_back_to_an_exact_codebook():

    n = kmeans1d.HISTOGRAM_MIN + 64
    values = np.array([-1.5, 0.25, 0.5, 7.0], np.float32)
    w = jnp.asarray(np.resize(values, n).reshape(-1, 64))
    clustered, stats = jc.cluster(k=16)({"w": w})
    np.testing.assert_array_equal(clustered["w"].materialize(), w)
    assert stats["w"]["note"] == "4 distinct values < k=16: exact codebook"


def test_a_sparse_leaf_with_host_values_clusters_as_on_device():
    # jax.device_get turns a Sparse leaf's children into NumPy arrays, which have no
    # sharding; deciding whether to pad them once crashed on that.
    weight = jax.random.normal(jax.random.key(4), (64, 32))
    pruned, _ = jc.prune(0.5)({"w": weight})
    host = jax.device_get(pruned)
    assert isinstance(host["w"].values, np.ndarray)
    clustered, stats = jc.cluster(bits=3)(host)
    reference, reference_stats = jc.cluster(bits=3)(pruned)
    got, want = clustered["w"].values, reference["w"].values
    np.testing.assert_array_equal(np.asarray(got.indices), np.asarray(want.indices))
    np.testing.assert_array_equal(np.asarray(got.codebook), np.asarray(want.codebook))
    assert float(stats["w"]["inertia"]) == float(reference_stats["w"]["inertia"])


@pytest.mark.bitwise
@pytest.mark.parametrize("init", ["linear", "density"])
def test_sparse_values_padded_to_a_shared_length_cluster_bit_for_bit_as_unpadded(init):
    # Kept counts that differ per leaf are padded to a few lengths so leaves share one
    # compiled program; the padding must change nothing.
    weight = jax.random.normal(jax.random.key(3), (700, 300))
    pruned, _ = jc.prune(0.37)({"w": weight})
    sparse = pruned["w"]
    assert bucket_length(sparse.nnz) != sparse.nnz  # the padded path is the one tested
    clustered, stats = jc.cluster(bits=4, init=init)(pruned)
    reference, reference_stats = cluster_array_compiled(
        sparse.values, k=16, init=init, per_channel=False, method="lloyd",
        max_iter=1000, tol=1e-6, codebook_dtype=np.dtype("float32"),
    )  # fmt: skip
    got = clustered["w"].values
    assert got.shape == reference.shape == (sparse.nnz,)
    np.testing.assert_array_equal(np.asarray(got.indices), np.asarray(reference.indices))
    np.testing.assert_array_equal(np.asarray(got.codebook), np.asarray(reference.codebook))
    for name in ("inertia", "relative_error", "iterations"):
        assert float(stats["w"][name]) == float(reference_stats[name]), name
