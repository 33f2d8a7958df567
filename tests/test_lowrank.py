"""low_rank: Eckart–Young optimality, energy, randomized, whitening, skips, bad input,
linen/nnx models, jit, sharding, save/load."""

import json
import struct
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from calibration_stats import stats_of as _stats_of  # tests/ is on sys.path
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxcompress as jc
from jaxcompress.arrays import LowRank
from jaxcompress.calibration.calibrate import InputStats
from jaxcompress.examples.models import LeNet300100, LeNet300100NNX
from jaxcompress.methods.lowrank import energy_rank, low_rank


def _weight(shape, seed=0, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def _matrix(x, fan_in_axes):
    x = np.asarray(x, np.float64)
    return x.reshape(int(np.prod(x.shape[:fan_in_axes])), -1)


def _with_spectrum(sigma, m, n, seed=0):
    """An m x n float32 matrix with exactly the singular values ``sigma`` (random bases)."""
    rng = np.random.default_rng(seed)
    left = np.linalg.qr(rng.normal(size=(m, len(sigma))))[0]
    right = np.linalg.qr(rng.normal(size=(n, len(sigma))))[0]
    return jnp.asarray((left * np.asarray(sigma)) @ right.T, jnp.float32)


def _correlated_inputs(rows, features, seed=0):
    """Strongly correlated inputs with a mean offset: the case whitening is for."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(features, features)) * np.logspace(0, -2, features)[None, :]
    return (rng.normal(size=(rows, features)) @ mixing.T + 0.5).astype(np.float32)


# ---------------------------------------------------------------- optimality


@pytest.mark.parametrize(
    ("shape", "rank"), [((64, 32), 4), ((32, 80), 10), ((50, 50), 12), ((3, 3, 8, 16), 6)]
)
def test_eckart_young_error_is_the_optimum(shape, rank):
    weight = _weight(shape)
    compressed, stats = low_rank(rank, where="w")({"w": weight})
    leaf = compressed["w"]
    fan_in = len(shape) - 1 if len(shape) > 2 else 1
    matrix = _matrix(weight, fan_in)
    m, n = matrix.shape
    assert isinstance(leaf, LowRank) and leaf.fan_in_axes == fan_in and leaf.rank == rank
    assert leaf.u.shape == (m, rank) and leaf.v.shape == (rank, n)
    assert leaf.u.dtype == leaf.v.dtype == jnp.float32
    sigma = np.linalg.svd(matrix, compute_uv=False)
    optimum = np.sqrt(np.sum(sigma[rank:] ** 2))
    dense = np.asarray(jc.materialize(compressed)["w"], np.float64)
    assert dense.shape == shape
    error = np.linalg.norm(dense - np.asarray(weight, np.float64))
    assert abs(error - optimum) <= 1e-4 * optimum
    # Balanced split: column j of u and row j of v both have norm sqrt(sigma_j).
    np.testing.assert_allclose(np.linalg.norm(leaf.u, axis=0), np.sqrt(sigma[:rank]), rtol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(leaf.v, axis=1), np.sqrt(sigma[:rank]), rtol=1e-4)
    leaf_stats = stats["w"]
    assert (leaf_stats["rank"], leaf_stats["m"], leaf_stats["n"]) == (rank, m, n)
    assert leaf_stats["bytes_before"] == m * n * 4 == jc.nbytes(weight)
    assert leaf_stats["bytes_after"] == rank * (m + n) * 4 == leaf.nbytes
    relative = float(leaf_stats["relative_error"])
    np.testing.assert_allclose(relative, optimum / np.linalg.norm(matrix), rtol=1e-4)


def test_bfloat16_weights_get_bfloat16_factors():
    weight = _weight((64, 48), dtype=jnp.bfloat16)
    compressed, stats = low_rank(8)({"w": weight})
    leaf = compressed["w"]
    assert leaf.u.dtype == leaf.v.dtype == jnp.bfloat16 and leaf.dtype == jnp.bfloat16
    assert stats["w"]["bytes_after"] == 8 * (64 + 48) * 2 == leaf.nbytes
    assert jc.materialize(compressed)["w"].dtype == jnp.bfloat16
    assert float(stats["w"]["relative_error"]) < 0.9


def test_energy_picks_the_smallest_rank_reaching_the_fraction():
    sigma = np.array([10.0, 8.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.5, 1.0, 0.5])
    weight = _with_spectrum(sigma, 60, 40)
    fraction = np.cumsum(sigma**2) / np.sum(sigma**2)  # what each rank keeps, by hand
    for expected in (1, 4, 7):
        # Just above what rank expected - 1 keeps, and just at what rank expected keeps.
        below = fraction[expected - 2] if expected > 1 else 0.0
        cases = [(below + 1e-3, "svd"), (fraction[expected - 1] - 1e-6, "svd")]
        cases.append((fraction[expected - 1] - 1e-6, "randomized"))
        for energy, method in cases:
            tx = low_rank(energy=float(energy), method=method)
            compressed, stats = tx({"w": weight}, key=jax.random.key(0))
            assert stats["w"]["rank"] == expected, (energy, method)
            assert compressed["w"].rank == expected
    assert energy_rank(sigma, 1.0) == 10
    assert energy_rank(sigma, 0.5, total=1e9) is None


def test_randomized_is_within_a_few_percent_of_the_svd_on_low_rank_plus_noise():
    rng = np.random.default_rng(3)
    signal = rng.normal(size=(120, 12)) @ rng.normal(size=(12, 90))
    weight = jnp.asarray(signal + 0.3 * rng.normal(size=(120, 90)), jnp.float32)
    sigma = np.linalg.svd(np.asarray(weight, np.float64), compute_uv=False)
    for rank in (6, 12):
        optimum = np.sqrt(np.sum(sigma[rank:] ** 2))
        tx = low_rank(rank, method="randomized")
        compressed, _ = tx({"w": weight}, key=jax.random.key(1))
        error = np.linalg.norm(np.asarray(jc.materialize(compressed)["w"]) - np.asarray(weight))
        assert optimum <= error * (1 + 1e-5) and error <= 1.03 * optimum, (rank, error, optimum)
        again, _ = tx({"w": weight}, key=jax.random.key(1))
        np.testing.assert_array_equal(again["w"].u, compressed["w"].u)


# ---------------------------------------------------------------- whitening


@pytest.mark.parametrize("method", ["svd", "randomized"])
def test_whitening_minimizes_the_output_error(method):
    rows, m, n, rank = 4096, 48, 40, 10
    x = _correlated_inputs(rows, m)
    weight = _weight((m, n), seed=1)
    data = {"w": _stats_of(x)}
    key = jax.random.key(2)
    plain, _ = low_rank(rank, method=method)({"w": weight}, key=key)
    whitened, stats = low_rank(rank, whiten=True, method=method)({"w": weight}, key=key, data=data)
    x64, w64 = x.astype(np.float64), np.asarray(weight, np.float64)

    def output_error(tree):
        return np.linalg.norm(x64 @ (w64 - np.asarray(jc.materialize(tree)["w"], np.float64)))

    # The optimum: sqrt(N) times the tail of the singular values of G^{1/2} W.
    gram = np.asarray(data["w"].gram, np.float64)
    eigenvalues, vectors = np.linalg.eigh(gram)
    root = (vectors * np.sqrt(np.maximum(eigenvalues, 0.0))) @ vectors.T
    sigma = np.linalg.svd(root @ w64, compute_uv=False)
    optimum = np.sqrt(rows) * np.sqrt(np.sum(sigma[rank:] ** 2))
    assert output_error(whitened) < 0.6 * output_error(plain)
    tolerance = 1e-3 if method == "svd" else 0.03
    assert optimum * (1 - 1e-4) <= output_error(whitened) <= optimum * (1 + tolerance)
    # The stats' estimate from G is the measured relative output error.
    measured = output_error(whitened) / np.linalg.norm(x64 @ w64)
    np.testing.assert_allclose(float(stats["w"]["relative_output_error"]), measured, rtol=1e-3)
    assert float(stats["w"]["relative_error"]) > 0


def test_whitening_with_identity_second_moment_is_the_plain_factorization():
    weight = _weight((40, 30), seed=4)
    identity = InputStats(jnp.float32(1), jnp.zeros(40), jnp.eye(40), None, None)
    whitened, stats = low_rank(7, whiten=True)({"w": weight}, data={"w": identity})
    plain, plain_stats = low_rank(7)({"w": weight})
    np.testing.assert_allclose(
        jc.materialize(whitened)["w"], jc.materialize(plain)["w"], rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(
        float(stats["w"]["relative_output_error"]),
        float(plain_stats["w"]["relative_error"]),
        rtol=1e-4,
    )


def test_whitening_survives_rank_deficient_inputs_and_works_under_jit():
    # 20 input rows for 32 features: G is singular; damping keeps its inverse root finite.
    x = _correlated_inputs(20, 32, seed=5)
    weight = _weight((32, 24), seed=6)
    data = {"w": _stats_of(x)}
    tx = low_rank(6, whiten=True)
    eager, stats = tx({"w": weight}, data=data)
    jitted, _ = jax.jit(tx)({"w": weight}, data=data)
    dense = np.asarray(jc.materialize(eager)["w"])
    assert np.isfinite(dense).all() and float(stats["w"]["relative_output_error"]) < 0.5
    np.testing.assert_allclose(jc.materialize(jitted)["w"], dense, rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------- skipping and bad input


def test_leaves_whose_factors_would_not_shrink_stay_dense():
    params = {"tall": _weight((64, 32)), "square": _weight((40, 40), seed=1)}
    # rank 20: 20 * 96 < 64 * 32 shrinks; 20 * 80 == 40 * 40 does not.
    compressed, stats = low_rank(20)(params)
    assert isinstance(compressed["tall"], LowRank)
    assert compressed["square"] is params["square"]
    reason = stats["square"]["skipped"]
    assert isinstance(reason, str) and "1600 >= m * n = 1600" in reason
    assert stats["square"]["bytes_after"] == stats["square"]["bytes_before"] == 6400
    assert "skipped" not in stats["tall"]
    _, jitted_stats = jax.jit(low_rank(20))(params)
    assert bool(jitted_stats["square"]["skipped"])
    # An energy that needs nearly every singular value is skipped too.
    _, stats = low_rank(energy=0.9999, where="square")(params)
    assert "energy=0.9999 needs rank" in stats["square"]["skipped"]
    tx = low_rank(energy=0.9999, method="randomized", where="square")
    assert "skipped" in tx(params, key=jax.random.key(0))[1]["square"]


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        (dict(rank=0), ValueError, "rank must be at least 1"),
        (dict(rank=-3), ValueError, "rank must be at least 1"),
        (dict(rank=2.5), TypeError, "rank must be an integer"),
        (dict(rank=True), TypeError, "rank must be an integer"),
        (dict(energy=0.0), ValueError, r"energy must be in \(0, 1\]"),
        (dict(energy=1.01), ValueError, r"energy must be in \(0, 1\]"),
        (dict(energy=-0.5), ValueError, r"energy must be in \(0, 1\]"),
        (dict(energy="half"), TypeError, "energy must be a real"),
        (dict(), ValueError, "exactly one of rank= and energy="),
        (dict(rank=2, energy=0.5), ValueError, "exactly one of rank= and energy="),
        (dict(rank=2, method="qr"), ValueError, "method must be one of"),
        (dict(rank=2, fan_in_axes=0), ValueError, "fan_in_axes"),
        (dict(rank=2, oversample=-1), ValueError, "oversample"),
        (dict(rank=2, power_iterations=1.5), ValueError, "power_iterations"),
    ],
)
def test_bad_options_name_the_argument(options, error, match):
    with pytest.raises(error, match=match):
        low_rank(**options)


def test_bad_leaves_and_calls_name_the_leaf():
    params = {"dense": {"kernel": _weight((64, 32))}}
    with pytest.raises(ValueError, match=r"rank=32 must be below min\(m, n\) = 32.*dense/kernel"):
        low_rank(32, where="kernel")(params)
    with pytest.raises(ValueError, match="fan_in_axes=2 leaves no output axes.*dense/kernel"):
        low_rank(2, fan_in_axes=2)(params)
    with pytest.raises(ValueError, match="pass key="):
        low_rank(2, method="randomized")(params)
    with pytest.raises(ValueError, match="whiten=True needs data="):
        low_rank(2, whiten=True)(params)
    stats = _stats_of(_correlated_inputs(100, 64))
    with pytest.raises(ValueError, match="no InputStats for leaf 'dense/kernel'"):
        low_rank(2, whiten=True)(params, data={"other": {"kernel": stats}})
    small = _stats_of(_correlated_inputs(100, 8))
    with pytest.raises(ValueError, match=r"'dense/kernel' has shape \(8, 8\).*\(64, 64\)"):
        low_rank(2, whiten=True)(params, data={"dense": {"kernel": small}})
    with pytest.raises(ValueError, match="energy= .*outside jax.jit"):
        jax.jit(low_rank(energy=0.5))(params)
    with pytest.raises(ValueError, match="'b' of shape \\(5,\\) is not a matrix"):
        low_rank(2, where="b")({"b": jnp.ones(5)})
    with pytest.raises(ValueError, match="NaN or Inf"):
        low_rank(2)({"w": jnp.full((8, 8), jnp.nan)})


def test_compressed_and_integer_leaves_are_refused():
    pruned, _ = jc.prune(0.5)({"w": _weight((16, 16))})
    with pytest.raises(TypeError, match="'w' is already compressed \\(Sparse\\)"):
        low_rank(2)(pruned)
    factored, _ = low_rank(2)({"w": _weight((16, 16))})
    with pytest.raises(TypeError, match="already compressed \\(LowRank\\)"):
        low_rank(2)(factored)
    with pytest.raises(TypeError, match="only floating-point"):
        low_rank(2, where="w")({"w": jnp.ones((8, 8), jnp.int32)})


# ---------------------------------------------------------------- models, jit, sharding


def _decaying(params):
    """Kernels ``sum_i exp(-i) a_i b_iᵀ`` (random unit-ish a_i, b_i): a decaying spectrum,
    unlike a random init's flat one, so a high rank keeps nearly everything."""

    def replace(path, leaf):
        if leaf.ndim != 2:
            return leaf
        m, n = leaf.shape
        k = min(m, n)
        rng = np.random.default_rng(m * 1000 + n)
        left = rng.normal(size=(m, k)) / np.sqrt(m)
        right = rng.normal(size=(n, k)) / np.sqrt(n)
        return jnp.asarray((left * np.exp(-np.arange(k))) @ right.T, leaf.dtype)

    return jax.tree_util.tree_map_with_path(replace, params)


# Each layer's rank must stay below min(m, n) and save bytes; dense3 is 100 x 10.
_RANKS = {"dense1": 32, "dense2": 32, "dense3": 8}


def _factorize_layers(params, jit=False):
    tx = jc.chain(*(jc.masked(low_rank(r), f"{name}/kernel") for name, r in _RANKS.items()))
    return (jax.jit(tx) if jit else tx)(params)


def test_linen_lenet_logits_stay_close_eagerly_and_under_jit():
    model = LeNet300100()
    x = _weight((16, 64), seed=7)
    # The model's own params structure (eval_shape skips the slow eager init), filled
    # with small random biases and kernels with a decaying spectrum.
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    leaves, treedef = jax.tree.flatten(shapes)
    filled = [_weight(leaf.shape, seed=i) * 0.1 for i, leaf in enumerate(leaves)]
    params = _decaying(jax.tree.unflatten(treedef, filled))
    dense_logits = model.apply({"params": params}, x)
    compressed, stats = _factorize_layers(params)
    assert all(isinstance(compressed[name]["kernel"], LowRank) for name in _RANKS)
    assert jc.nbytes(compressed) < 0.6 * jc.nbytes(params)
    logits = model.apply({"params": jc.materialize(compressed)}, x)
    scale = float(jnp.max(jnp.abs(dense_logits)))
    np.testing.assert_allclose(logits, dense_logits, atol=1e-3 * scale)
    jitted, _ = _factorize_layers(params, jit=True)
    jitted_logits = jax.jit(model.apply)({"params": jc.materialize(jitted)}, x)
    np.testing.assert_allclose(jitted_logits, logits, atol=1e-5 * scale)
    assert stats[0]["dense1/kernel"]["rank"] == 32


def test_nnx_lenet_state_round_trip_eagerly_and_under_jit():
    model = LeNet300100NNX(rngs=nnx.Rngs(0))
    x = _weight((16, 64), seed=8)
    state = _decaying(nnx.state(model, nnx.Param))
    nnx.update(model, state)
    dense_logits = model(x)
    scale = float(jnp.max(jnp.abs(dense_logits)))
    for jit in (False, True):
        compressed, _ = _factorize_layers(state, jit=jit)
        assert isinstance(compressed["dense2"]["kernel"].get_value(), LowRank)
        copy = LeNet300100NNX(rngs=nnx.Rngs(1))
        nnx.update(copy, jc.materialize(compressed))
        np.testing.assert_allclose(copy(x), dense_logits, atol=1e-3 * scale)


@pytest.mark.parametrize("spec", [P("data", "model"), P("model", None)])
def test_sharded_weight_gives_the_unsharded_result(mesh8, spec):
    weight = _weight((64, 32), seed=9)
    sharded = jax.device_put(weight, NamedSharding(mesh8, spec))
    want = np.asarray(jc.materialize(low_rank(8)({"w": weight})[0])["w"])
    for tx in (low_rank(8), jax.jit(low_rank(8))):
        got, stats = tx({"w": sharded})
        leaf = got["w"]
        np.testing.assert_allclose(np.asarray(leaf.materialize()), want, rtol=1e-4, atol=1e-5)
        assert float(stats["w"]["relative_error"]) > 0
    # Eagerly, u is split like the weight's rows, v like its columns, the rank axis whole.
    leaf = low_rank(8)({"w": sharded})[0]["w"]
    assert leaf.u.sharding.spec == P(spec[0], None)
    assert leaf.v.sharding.spec == P(None, spec[1])
    dense = jc.materialize({"w": leaf})["w"]
    assert dense.sharding.spec == spec
    np.testing.assert_allclose(np.asarray(dense), want, rtol=1e-4, atol=1e-5)


def test_conv_kernel_factors_keep_an_in_channel_sharding(mesh8):
    kernel = _weight((3, 3, 8, 16), seed=10)
    sharded = jax.device_put(kernel, NamedSharding(mesh8, P(None, None, "data", "model")))
    leaf = low_rank(6)({"w": sharded})[0]["w"]
    assert leaf.u.sharding.spec == P("data", None) and leaf.v.sharding.spec == P(None, "model")
    dense = jc.materialize({"w": leaf})["w"]
    assert dense.sharding.spec == P(None, None, "data", "model")
    want = jc.materialize(low_rank(6)({"w": kernel})[0])["w"]
    np.testing.assert_allclose(np.asarray(dense), np.asarray(want), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- files


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A file holding a Dense and a conv LowRank leaf and a bias, with its report and tree."""
    tree = {
        "dense": low_rank(8)({"kernel": _weight((64, 32))})[0],
        "conv": low_rank(5)({"kernel": _weight((3, 3, 8, 16), seed=1)})[0],
        "bias": jnp.zeros(32),
    }
    path = tmp_path_factory.mktemp("lowrank") / "lowrank.jxc"
    return path, jc.save(path, tree), tree


def test_save_load_round_trip_and_inspect(saved):
    path, report, tree = saved
    restored = jc.load(path)
    for name in ("dense", "conv"):
        before, after = tree[name]["kernel"], restored[name]["kernel"]
        assert isinstance(after, LowRank)
        assert (after.shape, after.dtype, after.fan_in_axes) == (
            before.shape,
            before.dtype,
            before.fan_in_axes,
        )
        np.testing.assert_array_equal(after.u, before.u)
        np.testing.assert_array_equal(after.v, before.v)
        np.testing.assert_array_equal(after.materialize(), before.materialize())
    leaves = {leaf.path: leaf for leaf in report.leaves}
    dense = leaves["dense/kernel"]
    assert dense.kind == "lowrank" and dense.encoding == "u=raw v=raw"
    assert dense.stored_bytes == tree["dense"]["kernel"].nbytes == 8 * 96 * 4
    assert dense.dense_bytes == 64 * 32 * 4 and dense.shape == (64, 32)
    assert report.file_bytes == report.header_bytes + jc.nbytes(tree)


def test_load_places_factors_like_the_weight(saved, mesh8):
    path, _, tree = saved
    sharding = NamedSharding(mesh8, P("data", "model"))
    restored = jc.load(path, sharding=lambda path, shape: sharding if len(shape) == 2 else None)
    leaf = restored["dense"]["kernel"]
    assert leaf.u.sharding.spec == P("data", None) and leaf.v.sharding.spec == P(None, "model")
    dense = jc.materialize(restored)["dense"]["kernel"]
    assert dense.sharding.spec == P("data", "model")
    want = tree["dense"]["kernel"].materialize()
    np.testing.assert_allclose(np.asarray(dense), want, rtol=1e-5, atol=1e-6)


def _with_header(data, edit):
    """The file ``data`` with its JSON header edited and its checksum redone."""
    length = struct.unpack("<Q", data[-20:-12])[0]
    start = len(data) - 20 - length
    header = json.loads(zlib.decompress(data[start:-20]))
    edit(header)
    text = zlib.compress(json.dumps(header).encode())
    return data[:start] + text + struct.pack("<QI", len(text), zlib.crc32(text)) + data[-8:]


def _lowrank_node(header, name="dense"):
    items = dict(header["tree"]["items"])
    return dict(items[name]["items"])["kernel"]


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        # Same byte counts, so only the LowRank checks can catch these.
        (lambda node: node["u"].update(shape=[8, 64]), r"u has shape \(8, 64\), expected \(64,"),
        (
            lambda node: node["v"].update(shape=[32, 8]),
            r"v has shape \(32, 8\), expected \(8, 32\)",
        ),
        (lambda node: node["u"].update(dtype="int32"), "factors are floating-point"),
        (lambda node: node.update(fan_in_axes=2), "fan_in_axes"),
        (lambda node: node.update(fan_in_axes=0), "fan_in_axes"),
        (lambda node: node.update(shape=[64, 33]), r"v has shape \(8, 32\), expected \(8, 33\)"),
        (lambda node: node.update(dtype="int8"), "floating dtype"),
        (lambda node: node.pop("v"), "expected an array node"),
    ],
)
def test_crafted_headers_raise_file_format_errors(saved, tmp_path, edit, match):
    path, _, _ = saved
    bad = tmp_path / "bad.jxc"
    bad.write_bytes(_with_header(path.read_bytes(), lambda h: edit(_lowrank_node(h))))
    with pytest.raises(jc.FileFormatError, match=match):
        jc.load(bad)
