"""accelerate: every leaf type against the materialize path, linen/nnx/plain, jit, sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxcompress as jc
from jaxcompress.examples.models import LeNet5


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(64, name="dense1")(x))
        x = nn.relu(nn.Dense(48, name="dense2")(x))
        return nn.Dense(10, name="head")(x)


class _NNXMLP(nnx.Module):
    def __init__(self, *, rngs):
        self.dense1 = nnx.Linear(32, 64, rngs=rngs)
        self.dense2 = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x):
        return self.dense2(nnx.relu(self.dense1(x)))


MODEL = _MLP()
X = jax.random.normal(jax.random.key(1), (12, 32))
PARAMS = MODEL.init(jax.random.key(0), X)["params"]


def apply_mlp(params, x):
    return MODEL.apply({"params": params}, x)


def _relative(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


COMPRESSIONS = {
    "int8 per-channel": jc.quantize(bits=8, axis=-1),
    "int4 per-channel": jc.quantize(bits=4, axis=-1),
    "int4 groups of 16": jc.quantize(bits=4, axis=-1, group_size=16),
    "int8 asymmetric": jc.quantize(bits=8, axis=-1, symmetric=False),
    "int8 per-tensor": jc.quantize(bits=8, axis=None),
    "k-means shared": jc.cluster(bits=4),
    "k-means per-channel": jc.cluster(bits=3, per_channel=True),
    "pruned": jc.prune(0.5),
    "pruned then int8": jc.chain(jc.prune(0.5), jc.quantize(bits=8, axis=-1)),
    "low rank": jc.low_rank(rank=8),
}


@pytest.mark.parametrize("name", list(COMPRESSIONS))
def test_exact_routes_equal_the_materialize_path(name):
    compressed, _ = COMPRESSIONS[name](PARAMS)
    reference = apply_mlp(jc.materialize(compressed), X)
    fast = jc.accelerate(apply_mlp, int8_activations=False)
    out = fast(fast.prepare(compressed), X)
    np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-5)
    routes = set(fast.last_plan.routes().values())
    assert "int8" not in routes


@pytest.mark.parametrize("name", ["int8 per-channel", "int4 per-channel", "k-means shared"])
def test_int8_route_is_within_the_stated_tolerance(name):
    compressed, _ = COMPRESSIONS[name](PARAMS)
    x = jax.random.normal(jax.random.key(5), (64, 32))  # packed 4-bit codes: >= 64 rows
    reference = apply_mlp(jc.materialize(compressed), x)
    fast = jc.accelerate(apply_mlp)
    out = fast(fast.prepare(compressed), x)
    assert set(fast.last_plan.routes().values()) == {"int8"}
    assert _relative(out, reference) < 0.03  # the tolerance accelerate's docstring states


@pytest.mark.parametrize("route", ["int8", "blocked", "dequantize", "materialize"])
@pytest.mark.parametrize("batch", [1, 9])
def test_forced_routes_agree_at_every_batch_size(route, batch):
    compressed, _ = jc.quantize(bits=4, axis=-1)(PARAMS)
    x = jax.random.normal(jax.random.key(6), (batch, 32))
    reference = apply_mlp(jc.materialize(compressed), x)
    fast = jc.accelerate(apply_mlp, route=route)
    out = fast(fast.prepare(compressed), x)
    assert set(fast.last_plan.routes().values()) == {route}
    tolerance = 0.03 if route == "int8" else 1e-5
    assert _relative(out, reference) < tolerance


def test_routes_are_explained_without_running():
    mixed, _ = jc.chain(
        jc.quantize(bits=8, axis=-1, where=r"dense1/kernel"),
        jc.low_rank(rank=4, where=r"(dense2|head)/kernel"),
    )(PARAMS)
    fast = jc.accelerate(apply_mlp)
    unprepared = fast.explain(mixed, X)  # prepared on the way, as a call would
    assert unprepared.routes() == {
        "dense1/kernel": "int8",
        "dense2/kernel": "factored",
        "head/kernel": "factored",
    }
    prepared = fast.explain(fast.prepare(mixed), X)
    assert prepared == unprepared
    text = str(prepared)
    assert "dense1/kernel" in text and "factored" in text and "platform: cpu" in text
    # Traced (an argument of an outer jit), an unprepared leaf is materialized.
    jax.jit(fast)(mixed, X)
    traced = fast.last_plan
    assert traced.routes()["dense1/kernel"] == "materialize"
    assert "prepare" in traced.decisions[0].note


def test_uncompressed_params_run_the_original_function_itself():
    calls = []

    def apply_fn(params, x):
        calls.append(type(x))
        return apply_mlp(params, x)

    fast = jc.accelerate(apply_fn)
    out = fast(PARAMS, X)
    assert calls == [type(X)]  # called once, eagerly, with the real array: no tracing
    np.testing.assert_array_equal(out, apply_mlp(PARAMS, X))


def test_works_inside_an_outer_jit_and_on_an_nnx_model():
    model = _NNXMLP(rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    compressed, _ = jc.quantize(bits=8, axis=-1, where=r"kernel")(state)

    def apply_nnx(s, x):
        return nnx.merge(graphdef, s)(x)

    fast = jc.accelerate(apply_nnx)
    served = fast.prepare(compressed)
    out = jax.jit(fast)(served, X)
    reference = apply_nnx(jc.materialize(compressed), X)
    assert _relative(out, reference) < 0.02
    assert set(fast.last_plan.routes().values()) == {"int8"}


def test_plain_function_weight_as_lhs_transposed_and_reused():
    w = jax.random.normal(jax.random.key(2), (32, 16))
    params = {"w": w}

    def f(p, x):
        lhs = (p["w"].T @ x.T).T  # weight as the left operand, transposed: contracted axis 0
        rhs = x @ p["w"]  # the usual use
        return lhs + rhs + jnp.sum(p["w"] ** 2)  # and an elementwise use

    compressed, _ = jc.low_rank(rank=4)(params)
    fast = jc.accelerate(f)
    out = fast(compressed, X)
    np.testing.assert_allclose(out, f(jc.materialize(compressed), X), rtol=1e-5, atol=1e-4)
    routes = [d.route for d in fast.last_plan.decisions]
    assert routes.count("factored") == 2 and "materialize" in routes


def test_low_rank_convolution_runs_as_two_convolutions():
    model = LeNet5()
    x = jax.random.normal(jax.random.key(3), (4, 8, 8, 1))
    params = model.init(jax.random.key(0), x)["params"]
    compressed, _ = jc.low_rank(rank=4, where=r"conv2/kernel")(params)

    def apply_fn(p, x):
        return model.apply({"params": p}, x)

    fast = jc.accelerate(apply_fn)
    out = fast(compressed, x)
    np.testing.assert_allclose(out, apply_fn(jc.materialize(compressed), x), rtol=1e-4, atol=1e-5)
    assert fast.last_plan.routes() == {"conv2/kernel": "factored"}


def test_sharded_params_give_the_unsharded_result(mesh8):
    compressed, _ = jc.quantize(bits=8, axis=-1)(PARAMS)
    fast = jc.accelerate(apply_mlp)
    served = fast.prepare(compressed)
    single = fast(served, X)
    replicated = NamedSharding(mesh8, P())
    # Output channels of the served codes (their first axis) over the "model" axis.
    by_channel = jax.tree.map(
        lambda a: (
            jax.device_put(a, NamedSharding(mesh8, P("model")))
            if a.ndim == 2 and a.shape[0] % 2 == 0
            else jax.device_put(a, replicated)
        ),
        served,
    )
    x = jax.device_put(X, NamedSharding(mesh8, P("data")))
    np.testing.assert_allclose(fast(by_channel, x), single, rtol=1e-5, atol=1e-6)


def test_a_leaf_of_the_wrong_shape_is_named():
    wrong = dict(PARAMS)
    bad, _ = jc.quantize(bits=8, axis=-1)({"kernel": jnp.ones((31, 64))})
    wrong["dense1"] = {"kernel": bad["kernel"], "bias": PARAMS["dense1"]["bias"]}
    with pytest.raises(ValueError, match=r"dense1/kernel \(dense shape \(31, 64\)\)"):
        jc.accelerate(apply_mlp)(wrong, X)


def test_unknown_route_is_refused():
    with pytest.raises(ValueError, match="route must be one of"):
        jc.accelerate(apply_mlp, route="fastest")


def test_pmap_path_equals_the_jit_path():
    compressed, _ = jc.quantize(bits=8, axis=-1)(PARAMS)
    fast = jc.accelerate(apply_mlp)
    served = fast.prepare(compressed)
    x = jax.random.normal(jax.random.key(4), (13, 32))  # not a multiple of 8 devices
    np.testing.assert_allclose(
        jc.pmap_apply(fast)(served, x), jax.jit(fast)(served, x), rtol=1e-5, atol=1e-5
    )


def test_prepared_leaves_place_by_the_dense_specs(mesh8):
    compressed, _ = jc.quantize(bits=4, axis=-1)(PARAMS)
    fast = jc.accelerate(apply_mlp)
    served = fast.prepare(compressed)
    specs = jc.tensor_parallel_specs(PARAMS, mesh8, style="column")
    placed = jax.device_put(served, jc.shardings_like(served, specs, mesh=mesh8))
    codes = placed["dense1"]["kernel"].codes  # (out, in/2): rows follow the column split
    assert codes.sharding.spec[0] == "model"
    x = jax.device_put(X, jc.data_parallel(mesh8))
    np.testing.assert_allclose(fast(placed, x), fast(served, X), rtol=1e-5, atol=1e-5)


def test_packed_codes_take_the_blocked_route_at_small_batches():
    compressed, _ = jc.quantize(bits=4, axis=-1)(PARAMS)
    fast = jc.accelerate(apply_mlp)
    served = fast.prepare(compressed)
    small = fast.explain(served, X[:2])
    assert set(small.routes().values()) == {"blocked"}
    assert "packed 4-bit" in small.decisions[0].note
    large = fast.explain(served, jnp.zeros((64, 32)))
    assert set(large.routes().values()) == {"int8"}


@pytest.mark.parametrize("name", ["int4 groups of 16", "k-means shared"])
def test_float_products_decode_the_whole_matrix_once_at_many_rows(name):
    compressed, _ = COMPRESSIONS[name](PARAMS)
    fast = jc.accelerate(apply_mlp, int8_activations=False)
    served = fast.prepare(compressed)
    assert set(fast.explain(served, X[:8]).routes().values()) == {"blocked"}
    many = jax.random.normal(jax.random.key(2), (512, 32))
    plan = fast.explain(served, many)
    assert set(plan.routes().values()) == {"dequantize"}
    assert "512 >= 512 rows" in plan.decisions[0].note
    reference = apply_mlp(jc.materialize(compressed), many)
    assert _relative(jax.jit(fast)(served, many), reference) < 1e-5


@pytest.mark.parametrize("int8_activations", [True, False])
def test_an_evenly_spaced_codebook_is_served_as_exact_linear_codes(int8_activations):
    # Weights on a 16-level grid: k-means finds exactly those levels, evenly spaced.
    grid = jnp.round(PARAMS["dense1"]["kernel"] * 20) / 20
    levels = jnp.clip(grid, -0.35, 0.4)
    params = {**PARAMS, "dense1": {**PARAMS["dense1"], "kernel": levels}}
    clustered, _ = jc.cluster(bits=4, where=r"dense1/kernel")(params)
    fast = jc.accelerate(apply_mlp, int8_activations=int8_activations)
    served = fast.prepare(clustered)
    assert isinstance(served["dense1"]["kernel"], jc.QuantizedMatrix)
    np.testing.assert_allclose(
        jc.materialize(served)["dense1"]["kernel"], levels, rtol=1e-6, atol=1e-7
    )
    x = jax.random.normal(jax.random.key(7), (64, 32))
    out = fast(served, x)
    tolerance = 0.03 if int8_activations else 1e-5
    assert _relative(out, apply_mlp(jc.materialize(clustered), x)) < tolerance
