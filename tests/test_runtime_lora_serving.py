"""Serving adapters beside a prepared compressed tree (``accelerate_lora``): no dense weight."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import jaxcompress as jc
from jaxcompress.training.lora import Adapter


def _trained(adapters, seed=5):
    out = {}
    for i, (path, ad) in enumerate(sorted(adapters.items())):
        b = jax.random.normal(jax.random.key(seed + i), ad.b.shape) * 0.3
        out[path] = Adapter(ad.a, b, ad.scale, ad.shape, ad.fan_in_axes)
    return out


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(32)(x))
        return nn.Dense(6)(nn.relu(nn.Dense(16)(h)))


def _compress(kind, tree):
    if kind == "quantized":
        return jc.quantize(4, group_size=8, where="kernel")(tree)[0]
    if kind == "clustered":
        return jc.cluster(k=6, where="kernel")(tree)[0]  # uneven codebook: exact indices
    if kind == "low_rank":
        return jc.low_rank(rank=4, where="kernel")(tree)[0]
    return jc.quantize(4, axis=None)(jc.prune(0.5, where="kernel")(tree)[0])[0]


ROUTES = {
    "quantized": "blocked",
    "clustered": "blocked",
    "low_rank": "factored",
    "sparse": "dense (dot_general)",
}


@pytest.mark.parametrize("kind", list(ROUTES))
def test_served_output_equals_lora_apply_and_uses_the_kernels(kind):
    x = jax.random.normal(jax.random.key(0), (5, 16))
    model = _MLP()
    params = _compress(kind, model.init(jax.random.key(1), x)["params"])
    # Adapters on two of the three kernels; the third is served by its kernel alone.
    adapters = jc.training.lora_init(
        params, 2, key=jax.random.key(2), alpha=4.0, where="Dense_[01]/kernel"
    )
    adapters = _trained(adapters)
    apply_fn = lambda p, x: model.apply({"params": jc.materialize(p)}, x)  # noqa: E731
    serve = jc.accelerate_lora(apply_fn)
    prepared = serve.prepare(params)
    y = jax.jit(serve)(prepared, adapters, x)
    expected = apply_fn(jc.training.lora_apply(params, adapters), x)
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-5 * float(jnp.abs(expected).max()))
    route = ROUTES[kind]
    adapted = route if route.startswith("dense") else f"factored+{route}"
    # Dense_2 has no adapter: its kernel alone (a Sparse leaf: its dense weight).
    expected_routes = {"Dense_0/kernel": [adapted], "Dense_1/kernel": [adapted]}
    assert serve.last_routes == {**expected_routes, "Dense_2/kernel": [route]}


def test_equinox_output_first_weights_take_the_blocked_route():
    mlp = eqx.nn.MLP(8, 3, 16, 1, key=jax.random.key(0))
    compressed = jc.quantize(4, axis=0, group_size=4, where="weight")(mlp)[0]
    adapters = _trained(jc.training.lora_init(compressed, 2, key=jax.random.key(1), where="weight"))
    xs = jax.random.normal(jax.random.key(2), (4, 8))
    apply_fn = lambda m, x: jax.vmap(jc.materialize(m))(x)  # noqa: E731
    serve = jc.accelerate_lora(apply_fn)
    y = eqx.filter_jit(serve)(serve.prepare(compressed), adapters, xs)
    expected = apply_fn(jc.training.lora_apply(compressed, adapters), xs)
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-5 * float(jnp.abs(expected).max()))
    assert serve.last_routes == {
        "layers/0/weight": ["factored+blocked"],
        "layers/1/weight": ["factored+blocked"],
    }
