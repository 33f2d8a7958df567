"""Data-aware compression: GPTQ (quantize(method="gptq")), Wanda and SparseGPT (prune(importance=)).

Small layers (64 x 32, a 3x3 conv, a 16-32-8 MLP in linen and nnx) keep the file fast;
the reference checks run a plain NumPy GPTQ / magnitude pruning. The MLPs' two layers
share one shape, so each per-layer program compiles once.
"""

import math
import re
from fractions import Fraction

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
from jaxcompress.arrays import Quantized, Sparse
from jaxcompress.methods.prune import magnitude_sparse
from jaxcompress.numerics.sparsegpt import prefix_counts

M, N = 64, 32


def _correlated(rows=512, features=M, seed=0):
    """Strongly correlated inputs with unequal scales: where data-aware methods help."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(features, features)) * np.logspace(0, -1.5, features)[None, :]
    return (rng.normal(size=(rows, features)) @ mixing.T + 0.3).astype(np.float32)


X = _correlated()
W = np.random.default_rng(1).normal(size=(M, N)).astype(np.float32)
DATA = {"w": _stats_of(X)}


def _output_error(leaf, x=X, w=W):
    return float(np.linalg.norm(x @ w - x @ np.asarray(leaf.materialize(), np.float32)))


# ---------------------------------------------------------------- GPTQ


@pytest.mark.bitwise
@pytest.mark.parametrize(
    ("shape", "options"),
    [
        ((M, N), {}),
        ((M, N), {"group_size": 16, "symmetric": False}),
        ((M, N), {"axis": None, "act_order": True}),
        ((3, 3, 4, 8), {"group_size": 12, "act_order": True}),
    ],
)
def test_gptq_with_identity_gram_and_no_damping_is_round_to_nearest(shape, options):
    weight = jnp.asarray(np.random.default_rng(2).normal(size=shape), jnp.float32)
    m = math.prod(shape[:-1])
    data = {"w": _gram_stats(np.eye(m))}
    gptq, stats = jc.quantize(4, method="gptq", damp=0.0, where="w", **options)(
        {"w": weight}, data=data
    )
    rtn_options = {k: v for k, v in options.items() if k != "act_order"}
    rtn, _ = jax.jit(jc.quantize(4, where="w", **rtn_options))({"w": weight})
    got, want = gptq["w"], rtn["w"]
    assert isinstance(got, Quantized) and repr(got) == repr(want)
    np.testing.assert_array_equal(np.asarray(got.codes), np.asarray(want.codes))
    np.testing.assert_array_equal(np.asarray(got.scale), np.asarray(want.scale))
    if want.zero_point is not None:
        np.testing.assert_array_equal(np.asarray(got.zero_point), np.asarray(want.zero_point))
    assert float(stats["w"]["damping"]) == 0.0 and stats["w"]["damp"] == 0.0


@pytest.mark.parametrize(("bits", "group_size"), [(4, None), (3, 16)])
def test_gptq_output_error_is_below_round_to_nearest(bits, group_size):
    params = {"w": jnp.asarray(W)}
    gptq, stats = jc.quantize(bits, group_size=group_size, method="gptq", where="w")(
        params, data=DATA
    )
    rtn, _ = jax.jit(jc.quantize(bits, group_size=group_size, where="w"))(params)
    assert _output_error(gptq["w"]) < 0.7 * _output_error(rtn["w"])
    # Same layout, so the same size; the codes decode with the stored scales.
    assert gptq["w"].nbytes == rtn["w"].nbytes
    assert gptq["w"].scale.shape == rtn["w"].scale.shape
    relative = _output_error(gptq["w"]) / np.linalg.norm(X @ W)
    np.testing.assert_allclose(float(stats["w"]["relative_output_error"]), relative, rtol=1e-2)
    assert stats["w"]["damp"] == 0.01 and bool(stats["w"]["factorized"])
    gram = np.asarray(DATA["w"].gram)
    np.testing.assert_allclose(float(stats["w"]["damping"]), 0.01 * np.mean(np.diag(gram)), 1e-5)


def _reference_absmax_scale(rows, half):
    """Symmetric absmax scale per column: the finer step of the 2**b-level grid that holds
    the column to within half a step, the short side to half - 1/2 steps (its sign puts
    the extra level on the larger side), or the old max|w| / (half - 1) where that rounds
    the column with less squared error."""
    low, high = np.minimum(rows.min(axis=0), 0), np.maximum(rows.max(axis=0), 0)
    long_side, short_side = np.float32(1.0 / half), np.float32(1.0 / (half - 0.5))
    negative_long = np.maximum(-low * long_side, high * short_side)
    positive_long = np.maximum(high * long_side, -low * short_side)
    new = np.where(negative_long <= positive_long, negative_long, -positive_long)
    old = np.maximum(-low, high) * np.float32(1.0 / (half - 1))

    def error(scale):
        q = np.clip(np.round(rows / scale), -half, half - 1) * scale
        return np.sum(np.square(q - rows), axis=0)

    return np.where(error(old) < error(new), old, new)


def _reference_gptq(w, gram, *, bits, group_size, damp):
    """Plain GPTQ, one row at a time, no blocks: symmetric absmax, groups from current rows."""
    w = w.astype(np.float32).copy()
    m, n = w.shape
    h = gram.astype(np.float64) + damp * np.mean(np.diag(gram)) * np.eye(m)
    upper = np.linalg.cholesky(np.linalg.inv(h)).T.astype(np.float32)
    half = 2 ** (bits - 1)
    restored = np.zeros_like(w)
    for i in range(m):
        if i % group_size == 0:
            scale = _reference_absmax_scale(w[i : i + group_size], half)
        q = np.clip(np.round(w[i] / scale), -half, half - 1) * scale
        restored[i] = q
        w[i + 1 :] -= np.outer(upper[i, i + 1 :], (w[i] - q) / upper[i, i])
    return restored


@pytest.mark.parametrize("block_size", [16, 128])
def test_gptq_blocks_and_group_scales_match_a_plain_reference(block_size):
    gram = np.asarray(DATA["w"].gram)
    want = _reference_gptq(W, gram, bits=3, group_size=16, damp=0.01)
    got, _ = jc.quantize(3, group_size=16, method="gptq", block_size=block_size, where="w")(
        {"w": jnp.asarray(W)}, data=DATA
    )
    restored = np.asarray(got["w"].materialize())
    assert np.mean(np.isclose(restored, want, rtol=1e-4, atol=1e-6)) > 0.95
    np.testing.assert_allclose(_output_error(got["w"]), np.linalg.norm(X @ W - X @ want), rtol=0.05)


def test_gptq_act_order_helps_on_uneven_inputs():
    params = {"w": jnp.asarray(W)}
    plain, _ = jc.quantize(4, method="gptq", where="w")(params, data=DATA)
    ordered, _ = jc.quantize(4, method="gptq", act_order=True, where="w")(params, data=DATA)
    assert _output_error(ordered["w"]) < _output_error(plain["w"])


# ---------------------------------------------------------------- Wanda


def test_wanda_with_unit_activation_norms_is_magnitude_pruning():
    # Unit diagonal, correlated off-diagonal: only the diagonal matters to Wanda.
    correlation = np.corrcoef(X.T).astype(np.float32)
    np.fill_diagonal(correlation, 1.0)
    data = {"w": _gram_stats(correlation)}
    weight = jnp.asarray(np.round(W, 1))  # many ties, broken the same way
    for sparsity in (0.29, 0.9):
        wanda, stats = jc.prune(sparsity, importance="wanda", where="w")({"w": weight}, data=data)
        magnitude, _ = jax.jit(jc.prune(sparsity, where="w"))({"w": weight})
        np.testing.assert_array_equal(np.asarray(wanda["w"].mask), np.asarray(magnitude["w"].mask))
        np.testing.assert_array_equal(
            np.asarray(wanda["w"].values), np.asarray(magnitude["w"].values)
        )
        assert stats["w"]["pruned"] == math.floor(sparsity * M * N)
        assert wanda["w"].nbytes == magnitude["w"].nbytes


def test_wanda_scores_inputs_by_their_norm_and_per_output_groups():
    norms = np.linspace(0.1, 3.0, M).astype(np.float32)
    data = {"w": _gram_stats(np.diag(norms**2))}
    sparsity = 0.37
    pruned, stats = jc.prune(sparsity, importance="wanda", comparison="output", where="w")(
        {"w": jnp.asarray(W)}, data=data
    )
    kept = np.asarray(pruned["w"].materialize()) != 0
    per_column = M - kept.sum(0)
    assert list(per_column) == prefix_counts(Fraction("0.37"), [1] * N, M)
    assert per_column.sum() == math.floor(sparsity * M * N) == stats["w"]["pruned"]
    # Within each output column the lowest |w| * norm go.
    score = np.abs(W) * norms[:, None]
    for j in range(N):
        assert score[~kept[:, j], j].max() <= score[kept[:, j], j].min()


def test_wanda_global_scope_matches_magnitude_with_unit_norms():
    rng = np.random.default_rng(3)
    params = {"a": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32), "b": jnp.asarray(W)}
    data = {"a": _gram_stats(np.eye(16)), "b": _gram_stats(np.eye(M))}
    wanda, stats = jc.prune(0.6, scope="global", importance="wanda")(params, data=data)
    # Global magnitude pruning: the smallest |w| over both leaves (ties in leaf order).
    flat = np.concatenate([np.abs(np.asarray(params[p])).ravel() for p in ("a", "b")])
    total = math.floor(0.6 * flat.size)
    pruned = np.zeros(flat.size, bool)
    pruned[np.argsort(flat, kind="stable")[:total]] = True
    want = {"a": ~pruned[:128].reshape(16, 8), "b": ~pruned[128:].reshape(M, N)}
    for path in ("a", "b"):
        kept = np.unpackbits(np.asarray(wanda[path].mask), axis=-1, bitorder="little")
        np.testing.assert_array_equal(kept[:, : want[path].shape[1]].astype(bool), want[path])
        assert stats[path]["pruned"] == int((~want[path]).sum())


# ---------------------------------------------------------------- SparseGPT


def test_sparsegpt_output_error_is_below_magnitude_pruning_with_exact_counts():
    params = {"w": jnp.asarray(W)}
    magnitude, _ = jax.jit(jc.prune(0.5, where="w"))(params)
    for block_size in (16, 128):
        sparse, stats = jc.prune(0.5, importance="sparsegpt", block_size=block_size, where="w")(
            params, data=DATA
        )
        leaf = sparse["w"]
        assert isinstance(leaf, Sparse) and leaf.nnz == M * N // 2
        assert int(np.sum(np.asarray(leaf.materialize()) == 0)) >= M * N // 2
        assert _output_error(leaf) < 0.8 * _output_error(magnitude["w"])
        assert leaf.nbytes == magnitude["w"].nbytes
        assert bool(stats["w"]["factorized"]) and stats["w"]["damp"] == 0.01
    wanda, _ = jc.prune(0.5, importance="wanda", where="w")(params, data=DATA)
    assert _output_error(sparse["w"]) < _output_error(wanda["w"])


@pytest.mark.parametrize("sparsity", [0.0, 0.29, 0.9])
def test_sparsegpt_prunes_exactly_floor_of_the_sparsity(sparsity):
    # 50 rows in blocks of 16: the blocks' counts add up to the layer's.
    x = _correlated(rows=256, features=50, seed=4)
    weight = jnp.asarray(np.random.default_rng(5).normal(size=(50, 7)), jnp.float32)
    tx = jc.prune(sparsity, importance="sparsegpt", block_size=16, where="w")
    sparse, stats = tx({"w": weight}, data={"w": _stats_of(x)})
    assert sparse["w"].nnz == 350 - math.floor(sparsity * 350) == 350 - stats["w"]["pruned"]
    mask = np.unpackbits(np.asarray(sparse["w"].mask), axis=-1, bitorder="little")[:, :7]
    assert int(mask.sum()) == sparse["w"].nnz


def test_sparsegpt_on_a_conv_kernel_uses_the_im2col_view():
    shape = (3, 3, 4, 8)
    m = 36
    x = _correlated(rows=256, features=m, seed=6)
    weight = np.random.default_rng(7).normal(size=shape).astype(np.float32)
    data = {"conv": {"kernel": _stats_of(x)}}
    params = {"conv": {"kernel": jnp.asarray(weight)}}
    sparse, stats = jc.prune(0.5, importance="sparsegpt")(params, data=data)
    magnitude, _ = jax.jit(jc.prune(0.5))(params)
    matrix = weight.reshape(m, 8)

    def error(leaf):
        restored = np.asarray(leaf.materialize()).reshape(m, 8)
        return float(np.linalg.norm(x @ matrix - x @ restored))

    assert sparse["conv"]["kernel"].shape == shape and sparse["conv"]["kernel"].nnz == 144
    assert error(sparse["conv"]["kernel"]) < error(magnitude["conv"]["kernel"])


def test_dead_inputs_are_pruned_first_and_need_no_damping():
    x = _correlated(rows=256, features=M, seed=8)
    x[:, :8] = 0.0  # eight inputs never seen
    data = {"w": _stats_of(x)}
    sparse, stats = jc.prune(0.2, importance="sparsegpt", damp=0.0, where="w")(
        {"w": jnp.asarray(W)}, data=data
    )
    dense = np.asarray(sparse["w"].materialize())
    assert np.all(dense[:8] == 0.0) and bool(stats["w"]["factorized"])
    quantized, stats = jc.quantize(4, method="gptq", damp=0.0, where="w")(
        {"w": jnp.asarray(W)}, data=data
    )
    assert bool(stats["w"]["factorized"]) and np.isfinite(float(stats["w"]["relative_error"]))


# ---------------------------------------------------------------- models and jit


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(16, name="dense2")(nn.relu(nn.Dense(16, name="dense1")(x)))


class _MLPNNX(nnx.Module):
    def __init__(self, rngs):
        self.dense1 = nnx.Linear(16, 16, rngs=rngs)
        self.dense2 = nnx.Linear(16, 16, rngs=rngs)

    def __call__(self, x):
        return self.dense2(nnx.relu(self.dense1(x)))


def _check_model(params, data, apply, *, baselines=True):
    x = jnp.asarray(_correlated(rows=64, features=16, seed=9))
    dense_out = apply(params, x)
    quantize = jc.quantize(3, group_size=8, method="gptq")
    prune = jc.prune(0.5, importance="sparsegpt")
    for tx, baseline in ((quantize, jc.quantize(3, group_size=8)), (prune, jc.prune(0.5))):
        eager, stats = tx(params, data=data)
        if tx is quantize and not baselines:
            continue  # the jitted transform was checked on the linen MLP
        jitted, jit_stats = jax.jit(tx)(params, data=data)
        for path in ("dense1/kernel", "dense2/kernel"):
            assert float(jit_stats[path]["relative_output_error"]) == pytest.approx(
                float(stats[path]["relative_output_error"]), rel=1e-3, abs=1e-6
            )
        out = apply(jc.materialize(eager), x)
        np.testing.assert_allclose(apply(jc.materialize(jitted), x), out, rtol=1e-3, atol=1e-4)
        if baselines:
            plain, _ = jax.jit(baseline)(params)
            assert jc.nbytes(eager) == jc.nbytes(plain)
            base_out = apply(jc.materialize(plain), x)
            assert np.linalg.norm(out - dense_out) < np.linalg.norm(base_out - dense_out)
    return eager


def test_linen_mlp_through_calibrate_eagerly_and_under_jit():
    model = _MLP()
    x = jnp.asarray(_correlated(rows=64, features=16, seed=9))
    params = model.init(jax.random.key(0), x)["params"]

    def apply(p, x):
        return model.apply({"params": p}, x)

    data = jc.calibrate(apply, params, [x[:32], x[32:]])
    _check_model(params, data, apply)


def test_nnx_model_through_calibrate_eagerly_and_under_jit():
    graphdef, state = nnx.split(_MLPNNX(nnx.Rngs(0)))

    def apply(s, x):
        return nnx.merge(graphdef, s)(x)

    x = jnp.asarray(_correlated(rows=64, features=16, seed=9))
    data = jc.calibrate(apply, state, [x])
    # The baselines were checked on the linen MLP of the same shapes.
    pruned = _check_model(state, data, apply, baselines=False)
    assert isinstance(pruned["dense1"]["kernel"].get_value(), Sparse)
    compressed, _ = jc.prune(0.5, importance="wanda")(state, data=data)
    assert compressed["dense2"]["kernel"].get_value().nnz == 128


def test_explicitly_sharded_weight_gives_the_unsharded_result():
    # Explicit mesh axes are the strict case: the sweeps' buffers must share the mesh.
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    sharded = jax.device_put(jnp.asarray(W), NamedSharding(mesh, P("data", "model")))
    for tx in (
        jc.quantize(4, method="gptq", where="w"),
        jc.prune(0.5, importance="sparsegpt", where="w"),
    ):
        want, _ = tx({"w": jnp.asarray(W)}, data=DATA)
        got, _ = tx({"w": sharded}, data=DATA)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- errors


def test_missing_or_mismatched_data_raises_naming_the_transform_and_leaf():
    params = {"dense": {"kernel": jnp.asarray(W), "bias": jnp.zeros(N)}}
    stats = _stats_of(X)
    for tx, option in (
        (jc.prune(0.5, importance="wanda"), "importance='wanda' needs data="),
        (jc.prune(0.5, importance="sparsegpt"), "importance='sparsegpt' needs data="),
        (jc.quantize(4, method="gptq"), "method='gptq' needs data="),
    ):
        with pytest.raises(ValueError, match=option):
            tx(params)
        with pytest.raises(ValueError, match="no InputStats for leaf 'dense/kernel'"):
            tx(params, data={"other": {"kernel": stats}})
        small = _stats_of(X[:, :10])
        with pytest.raises(
            ValueError, match=r"leaf 'dense/kernel' have a gram of shape \(10, 10\)"
        ):
            tx(params, data={"dense": {"kernel": small}})
        with pytest.raises(ValueError, match=re.escape(tx.name) + ".*NaN or Inf"):
            bad = _gram_stats(np.full((M, M), np.nan))
            tx(params, data={"dense": {"kernel": bad}})


def test_bad_options_and_unsupported_layouts_raise():
    params = {"w": jnp.asarray(W)}
    with pytest.raises(ValueError, match="importance must be one of"):
        jc.prune(0.5, importance="taylor")
    with pytest.raises(ValueError, match="comparison='output'.*importance='wanda'"):
        jc.prune(0.5, comparison="output")
    with pytest.raises(ValueError, match="scope='global' is not supported"):
        jc.prune(0.5, scope="global", importance="sparsegpt")
    with pytest.raises(ValueError, match="damp must be"):
        jc.prune(0.5, importance="sparsegpt", damp=-1.0)
    with pytest.raises(ValueError, match="block_size must be"):
        jc.quantize(4, method="gptq", block_size=0)
    with pytest.raises(ValueError, match="method must be one of"):
        jc.quantize(4, method="hqq")
    with pytest.raises(ValueError, match="act_order=True only applies"):
        jc.quantize(4, act_order=True)
    with pytest.raises(ValueError, match="scope='global' needs concrete"):
        jax.jit(jc.prune(0.5, scope="global", importance="wanda"))(params, data=DATA)
    # Scales along the input axis do not line up with GPTQ's rows.
    with pytest.raises(ValueError, match="method='gptq' quantizes the rows"):
        jc.quantize(4, axis=0, method="gptq", where="w")(params, data=DATA)
    with pytest.raises(ValueError, match="method='gptq' quantizes the rows"):
        jc.quantize(4, axis=None, group_size=16, method="gptq", where="w")(params, data=DATA)
    sparse = {"w": magnitude_sparse(jnp.asarray(W), 100)}
    with pytest.raises(TypeError, match="leaf 'w' is Sparse"):
        jc.quantize(4, method="gptq", where="w")(sparse, data=DATA)
    # A singular Gram with no damping cannot be factorized.
    ones = {"w": _gram_stats(np.ones((M, M)))}
    with pytest.raises(ValueError, match="not positive definite.*raise damp="):
        jc.quantize(4, method="gptq", damp=0.0, where="w")(params, data=ones)
    with pytest.raises(ValueError, match="not positive definite.*raise damp="):
        jc.prune(0.5, importance="sparsegpt", damp=0.0, where="w")(params, data=ones)
