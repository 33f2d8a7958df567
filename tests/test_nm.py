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
        jc.prune_nm("2:4")({"w": jnp.ones((6, 3))})
