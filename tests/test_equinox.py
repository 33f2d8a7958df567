"""equinox modules through the public functions: non-array leaves pass through untouched."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxcompress as jc
from jaxcompress.calibration.calibrate import stats_by_path

eqx = pytest.importorskip("equinox")


class CNN(eqx.Module):
    conv: eqx.nn.Conv2d
    head: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.conv = eqx.nn.Conv2d(1, 8, 3, key=k1)
        self.head = eqx.nn.Linear(8 * 6 * 6, 10, key=k2)

    def __call__(self, x):
        return self.head(jax.nn.relu(self.conv(x)).reshape(-1))


class Attention(eqx.Module):
    attention: eqx.nn.MultiheadAttention
    out: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.attention = eqx.nn.MultiheadAttention(2, 16, key=k1)
        self.out = eqx.nn.Linear(16, 4, key=k2)

    def __call__(self, x):
        return jax.vmap(self.out)(self.attention(x, x, x))


def _mlp():
    return eqx.nn.MLP(8, 4, 32, 2, key=jax.random.key(0)), jnp.ones((5, 8))


def _cnn():
    return CNN(jax.random.key(1)), jax.random.normal(jax.random.key(2), (3, 1, 8, 8))


def _attention():
    return Attention(jax.random.key(3)), jax.random.normal(jax.random.key(4), (2, 6, 16))


MODELS = {"mlp": _mlp, "cnn": _cnn, "attention": _attention}


def _apply(model, x):
    return jax.vmap(model)(x)


def _non_arrays(tree):
    return [leaf for leaf in jax.tree.leaves(tree) if not eqx.is_array(leaf)]


@pytest.fixture(params=sorted(MODELS))
def model_and_input(request):
    return MODELS[request.param]()


def test_filters_see_equinox_paths():
    mlp, _ = _mlp()
    _, stats = jc.prune(0.5)(mlp)
    assert sorted(stats) == ["layers/0/weight", "layers/1/weight", "layers/2/weight"]


@pytest.mark.parametrize(
    "transform",
    [jc.prune(0.5), jc.quantize(bits=8), jc.cluster(bits=4)],
    ids=["prune", "quantize", "cluster"],
)
def test_transforms_summarize_materialize(model_and_input, transform):
    model, x = model_and_input
    compressed, _ = transform(model)
    assert _non_arrays(compressed) == _non_arrays(model)
    report = jc.summarize(model, compressed)
    assert report.compressed_bytes < report.original_bytes
    assert jc.nbytes(compressed) < jc.nbytes(model)
    dense = jc.materialize(compressed)
    assert type(dense) is type(model)
    assert _apply(dense, x).shape == _apply(model, x).shape


def test_calibrate_runs_and_leaves_non_arrays_none(model_and_input):
    model, x = model_and_input
    with pytest.warns(UserWarning):  # equinox's (out, in) weights are contracted last
        data = jc.calibrate(_apply, model, [x, x])
    assert all(leaf is None for leaf in _non_arrays(data))
    assert stats_by_path(data) == {} or all(s.count > 0 for s in stats_by_path(data).values())


def test_accelerate_matches_the_materialized_module(model_and_input):
    model, x = model_and_input
    compressed, _ = jc.quantize(bits=8)(model)
    fast = jc.accelerate(_apply)
    served = fast.prepare(compressed)
    np.testing.assert_allclose(
        fast(served, x), _apply(jc.materialize(compressed), x), rtol=1e-5, atol=1e-5
    )
    assert set(fast.explain(served, x).routes()) <= set(jc.prune(0.5)(model)[1])


def test_clustered_fine_tuning_under_filter_jit():
    mlp, _ = _mlp()
    x = jax.random.normal(jax.random.key(5), (64, 8))
    y = jnp.sin(x[:, :4])
    params, _ = jc.cluster(bits=4)(mlp)

    def loss(model, x, y):
        return jnp.mean(jnp.square(_apply(jc.materialize(model), x) - y))

    tx = jc.training.clustered(optax.sgd(0.05))
    state = tx.init(params)

    @eqx.filter_jit
    def step(model, state):
        grads = jc.training.grad(loss)(model, x, y)
        updates, state = tx.update(grads, state, model)
        return eqx.apply_updates(model, updates), state

    trained = params
    for _ in range(30):
        trained, state = step(trained, state)
    assert float(loss(trained, x, y)) < float(loss(params, x, y))
    np.testing.assert_array_equal(trained.layers[0].weight.indices, params.layers[0].weight.indices)
    assert trained.activation is mlp.activation
