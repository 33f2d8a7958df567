"""jc.training.grad / value_and_grad: gradients of compressed trees, floating children only."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxcompress as jc


def _clustered_problem():
    w = jax.random.normal(jax.random.key(0), (16, 8))
    params, _ = jc.cluster(bits=4)({"w": w, "b": jnp.zeros(8)})
    x = jax.random.normal(jax.random.key(1), (32, 16))
    y = x @ (w * 1.1) + 0.3 * jnp.ones((1, 8))

    def loss(p, x, y):
        dense = jc.materialize(p)
        return jnp.mean(jnp.square(x @ dense["w"] + dense["b"][None, :] - y))

    return params, x, y, loss


def test_plain_jax_grad_refuses_the_clustered_tree():
    params, x, y, loss = _clustered_problem()
    with pytest.raises(TypeError, match="uint8"):
        jax.grad(loss)(params, x, y)


def test_training_loop_over_a_clustered_tree():
    params, x, y, loss = _clustered_problem()
    tx = jc.training.clustered(optax.sgd(0.05))
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        value, grads = jc.training.value_and_grad(loss)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    first = float(loss(params, x, y))
    trained = params
    for _ in range(50):
        trained, state, _ = step(trained, state)
    assert float(loss(trained, x, y)) < 0.5 * first
    np.testing.assert_array_equal(trained["w"].indices, params["w"].indices)
    assert not np.array_equal(trained["w"].codebook, params["w"].codebook)


def test_grad_matches_allow_int_and_marks_integer_children_float0():
    params, x, y, loss = _clustered_problem()
    ours = jc.training.grad(loss)(params, x, y)
    reference = jax.grad(loss, allow_int=True)(params, x, y)
    assert ours["w"].indices.dtype == jax.dtypes.float0
    np.testing.assert_allclose(ours["w"].codebook, reference["w"].codebook, rtol=1e-6)
    np.testing.assert_allclose(ours["b"], reference["b"], rtol=1e-6)


def test_argnums_and_has_aux_follow_jax():
    params, x, y, loss = _clustered_problem()

    def with_aux(p, x, y):
        return loss(p, x, y), {"n": x.shape[0]}

    (value, aux), (g_params, g_x) = jc.training.value_and_grad(
        with_aux, argnums=(0, 1), has_aux=True
    )(params, x, y)
    assert aux == {"n": 32}
    np.testing.assert_allclose(value, loss(params, x, y), rtol=1e-6)
    np.testing.assert_allclose(g_x, jax.grad(loss, argnums=1)(params, x, y), rtol=1e-5)
    grads, aux = jc.training.grad(with_aux, has_aux=True)(params, x, y)
    np.testing.assert_allclose(grads["b"], g_params["b"], rtol=1e-6)


def test_non_array_leaves_get_none():
    params = {"w": jnp.ones(3), "act": jnp.tanh, "n": 3}
    grads = jc.training.grad(lambda p: jnp.sum(p["act"](p["w"] * p["n"])))(params)
    assert grads["act"] is None and grads["n"] is None
    np.testing.assert_allclose(grads["w"], 3 * (1 - jnp.tanh(3.0) ** 2), rtol=1e-5)
