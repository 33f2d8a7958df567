"""prune_nm: exact N-of-M counts along the contracted axis, magnitude and Wanda, jit, nnx."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import jaxcompress as jc


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(8, name="out")(nn.relu(nn.Dense(16, name="hidden")(x)))


X = jax.random.normal(jax.random.key(1), (32, 12))
MODEL = _MLP()
PARAMS = MODEL.init(jax.random.key(0), X)["params"]


def _apply(params, x):
    return MODEL.apply({"params": params}, x)


@pytest.mark.parametrize(("pattern", "n", "m"), [("2:4", 2, 4), ("1:4", 1, 4), ("4:8", 4, 8)])
def test_every_run_of_m_inputs_keeps_exactly_n_of_the_largest(pattern, n, m):
    w = jax.random.normal(jax.random.key(2), (3, 3, 8, 5))  # conv kernel: runs along h*w*in
    sparse, stats = jc.prune_nm(pattern)({"w": w})
    dense = np.asarray(jc.materialize(sparse)["w"]).reshape(-1, 5)
    groups = dense.reshape(-1, m, 5)
    assert ((groups != 0).sum(axis=1) == n).all()
    magnitudes = np.abs(np.asarray(w).reshape(-1, m, 5))
    kept = np.where(groups != 0, magnitudes, np.inf).min(axis=1)
    dropped = np.where(groups == 0, magnitudes, -np.inf).max(axis=1)
    assert (kept >= dropped).all()
    np.testing.assert_array_equal(dense[dense != 0], np.asarray(w).reshape(-1, 5)[dense != 0])
    assert sparse["w"].nnz == w.size * n // m == w.size - stats["w"]["pruned"]


def test_wanda_with_unit_norms_equals_magnitude_and_uses_the_data():
    data = jc.calibrate(_apply, PARAMS, [X])
    unit = jax.tree.map(
        lambda s: s if s is None else dataclasses.replace(s, gram=jnp.eye(s.gram.shape[0])),
        data,
        is_leaf=lambda x: isinstance(x, jc.InputStats) or x is None,
    )
    magnitude, _ = jc.prune_nm("2:4")(PARAMS)
    wanda_unit, _ = jc.prune_nm("2:4", importance="wanda")(PARAMS, data=unit)
    for path in ("hidden", "out"):
        np.testing.assert_array_equal(
            magnitude[path]["kernel"].mask, wanda_unit[path]["kernel"].mask
        )
    wanda, _ = jc.prune_nm("2:4", importance="wanda")(PARAMS, data=data)
    assert wanda["hidden"]["kernel"].nnz == magnitude["hidden"]["kernel"].nnz
    # Real activation norms change which inputs survive somewhere.
    assert not np.array_equal(wanda["hidden"]["kernel"].mask, magnitude["hidden"]["kernel"].mask)
    with pytest.raises(ValueError, match="data="):
        jc.prune_nm("2:4", importance="wanda")(PARAMS)


def test_under_jit_and_on_an_nnx_model():
    model = nnx.Linear(16, 4, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    eager, _ = jc.prune_nm("2:4", where=r"kernel")(state)
    jitted, _ = jax.jit(jc.prune_nm("2:4", where=r"kernel"))(state)
    np.testing.assert_array_equal(
        jc.materialize(eager)["kernel"].value, jc.materialize(jitted)["kernel"].value
    )
    out = nnx.merge(graphdef, jc.materialize(jitted))(jnp.ones((2, 16)))
    assert out.shape == (2, 4)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="like '2:4'"):
        jc.prune_nm("2/4")
    with pytest.raises(ValueError, match="0 < N < M"):
        jc.prune_nm("4:4")
    with pytest.raises(ValueError, match="importance"):
        jc.prune_nm("2:4", importance="taylor")
    with pytest.raises(ValueError, match=r"'w' of shape \(6, 3\) contracts 6 inputs"):
        jc.prune_nm("2:4", where="w")({"w": jnp.ones((6, 3))})


# ---------------------------------------------------------------- SparseGPT N:M

K_IN, K_OUT = 64, 32


def _correlated_inputs(rows=512, features=K_IN, seed=0):
    """Strongly correlated inputs with unequal scales: where error feedback helps."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(features, features)) * np.logspace(0, -1.5, features)[None, :]
    return (rng.normal(size=(rows, features)) @ mixing.T + 0.3).astype(np.float32)


def _input_stats(x):
    x = np.asarray(x, np.float32)
    return jc.InputStats(
        count=jnp.float32(x.shape[0]),
        mean=jnp.asarray(x.mean(0)),
        gram=jnp.asarray(x.T @ x / np.float32(x.shape[0])),
        class_count=None,
        class_mean=None,
    )


XC = _correlated_inputs()
WC = np.random.default_rng(1).normal(size=(K_IN, K_OUT)).astype(np.float32)
DATA_C = {"w": _input_stats(XC)}


def _runs_keep_exactly(sparse, n, m):
    keep = np.asarray(sparse.keep_mask()).reshape(-1, sparse.shape[-1])
    return bool(((keep.reshape(-1, m, keep.shape[-1])).sum(axis=1) == n).all())


@pytest.mark.parametrize(("pattern", "n", "m"), [("2:4", 2, 4), ("1:4", 1, 4), ("4:8", 4, 8)])
def test_sparsegpt_keeps_exactly_n_of_every_m_and_beats_magnitude_and_wanda(pattern, n, m):
    params = {"w": jnp.asarray(WC)}
    sparse, stats = jc.prune_nm(pattern, importance="sparsegpt")(params, data=DATA_C)
    leaf = sparse["w"]
    assert _runs_keep_exactly(leaf, n, m)
    assert leaf.nnz == WC.size * n // m == WC.size - stats["w"]["pruned"]
    dense = np.asarray(leaf.materialize())
    assert np.all(dense[~np.asarray(leaf.keep_mask())] == 0.0)

    def output_error(values):
        return float(np.linalg.norm(XC @ WC - XC @ np.asarray(values, np.float32)))

    errors = {
        importance: output_error(
            jc.prune_nm(pattern, importance=importance)(params, data=DATA_C)[0]["w"].materialize()
        )
        for importance in ("magnitude", "wanda")
    }
    ours = output_error(dense)
    assert ours < errors["wanda"] and ours < errors["magnitude"]
    # The reported error is that of the stored values.
    relative = ours / float(np.linalg.norm(XC @ WC))
    assert float(stats["w"]["relative_output_error"]) == pytest.approx(relative, rel=1e-3)
    assert bool(stats["w"]["factorized"]) and stats["w"]["damp"] == 0.01


def test_sparsegpt_runs_are_chosen_on_the_error_updated_weights():
    # Identity Gram, no damping: no error feedback, so the choice is magnitude's.
    eye = {"w": jc.InputStats(jnp.float32(1), jnp.zeros(K_IN), jnp.eye(K_IN), None, None)}
    params = {"w": jnp.asarray(WC)}
    plain, _ = jc.prune_nm("2:4", importance="sparsegpt", damp=0.0)(params, data=eye)
    magnitude, _ = jc.prune_nm("2:4")(params)
    np.testing.assert_array_equal(plain["w"].mask, magnitude["w"].mask)
    np.testing.assert_array_equal(plain["w"].values, magnitude["w"].values)
    # Correlated inputs: the kept weights change, and so does which ones are kept.
    updated, _ = jc.prune_nm("2:4", importance="sparsegpt")(params, data=DATA_C)
    assert not np.array_equal(updated["w"].mask, magnitude["w"].mask)
    assert not np.allclose(updated["w"].values, magnitude["w"].values)


@pytest.mark.bitwise
def test_sparsegpt_block_size_only_changes_float_rounding():
    params = {"w": jnp.asarray(WC)}
    # 6 rows per block: runs of 4 straddle the blocks.
    small, _ = jc.prune_nm("2:4", importance="sparsegpt", block_size=6)(params, data=DATA_C)
    large, _ = jc.prune_nm("2:4", importance="sparsegpt")(params, data=DATA_C)
    np.testing.assert_array_equal(small["w"].mask, large["w"].mask)
    np.testing.assert_allclose(small["w"].values, large["w"].values, rtol=1e-4, atol=1e-5)


def test_sparsegpt_on_a_conv_kernel_and_dead_inputs():
    w = jax.random.normal(jax.random.key(3), (3, 3, 4, 6))  # 36 im2col inputs
    x = _correlated_inputs(rows=256, features=36, seed=4)
    x[:, [0, 1, 5, 6]] = 0.0  # inputs never seen: pruned first in their runs
    sparse, stats = jc.prune_nm("2:4", importance="sparsegpt", damp=0.0)(
        {"w": w}, data={"w": _input_stats(x)}
    )
    leaf = sparse["w"]
    assert _runs_keep_exactly(leaf, 2, 4) and bool(stats["w"]["factorized"])
    keep = np.asarray(leaf.keep_mask()).reshape(36, 6)
    assert not keep[[0, 1, 5, 6]].any() and keep[[2, 3, 4, 7]].all()


@pytest.mark.bitwise
def test_sparsegpt_under_jit_and_on_linen_and_nnx_models():
    x = jnp.asarray(_correlated_inputs(rows=64, features=12, seed=5))
    data = jc.calibrate(_apply, PARAMS, [x])
    tx = jc.prune_nm("2:4", importance="sparsegpt")
    eager, stats = tx(PARAMS, data=data)
    jitted, jit_stats = jax.jit(tx)(PARAMS, data=data)
    for path in ("hidden", "out"):
        np.testing.assert_array_equal(eager[path]["kernel"].mask, jitted[path]["kernel"].mask)
        np.testing.assert_allclose(
            eager[path]["kernel"].values, jitted[path]["kernel"].values, rtol=1e-5, atol=1e-6
        )
        assert _runs_keep_exactly(eager[path]["kernel"], 2, 4)
    dense = _apply(PARAMS, x)
    ours = np.linalg.norm(_apply(jc.materialize(eager), x) - dense)
    magnitude = np.linalg.norm(_apply(jc.materialize(jc.prune_nm("2:4")(PARAMS)[0]), x) - dense)
    assert ours < magnitude

    model = nnx.Linear(16, 4, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    def apply_nnx(s, x):
        return nnx.merge(graphdef, s)(x)

    x16 = jnp.asarray(_correlated_inputs(rows=64, features=16, seed=6))
    nnx_data = jc.calibrate(apply_nnx, state, [x16])
    pruned, _ = jax.jit(jc.prune_nm("2:4", importance="sparsegpt", where=r"kernel"))(
        state, data=nnx_data
    )
    kernel = pruned["kernel"].get_value()
    assert isinstance(kernel, jc.Sparse) and _runs_keep_exactly(kernel, 2, 4)
    assert apply_nnx(jc.materialize(pruned), x16).shape == (64, 4)


def test_sparsegpt_bad_input_is_named():
    params = {"w": jnp.asarray(WC)}
    with pytest.raises(ValueError, match="importance='sparsegpt' needs data="):
        jc.prune_nm("2:4", importance="sparsegpt")(params)
    with pytest.raises(ValueError, match="no InputStats for leaf 'w'"):
        jc.prune_nm("2:4", importance="sparsegpt")(params, data={"v": DATA_C["w"]})
    with pytest.raises(ValueError, match="damp must be"):
        jc.prune_nm("2:4", importance="sparsegpt", damp=-1.0)
    with pytest.raises(ValueError, match="block_size must be"):
        jc.prune_nm("2:4", importance="sparsegpt", block_size=0)
    # Statistics of a (4, 16, 8) weight contracted over its first axis only.
    w3 = {"w": jnp.ones((4, 16, 8))}
    stats4 = {"w": _input_stats(XC[:, :4])}
    with pytest.raises(ValueError, match="N:M runs need every axis but the last"):
        jc.prune_nm("2:4", importance="sparsegpt", where="w")(w3, data=stats4)
    ones = jnp.ones((K_IN, K_IN))  # rank one: singular without damping
    singular = {"w": jc.InputStats(jnp.float32(1), jnp.zeros(K_IN), ones, None, None)}
    with pytest.raises(ValueError, match="not positive definite.*raise damp="):
        jc.prune_nm("2:4", importance="sparsegpt", damp=0.0)(params, data=singular)
