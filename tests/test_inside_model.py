"""calibrate and accelerate on an apply with shard_map, a custom_vjp and a Pallas call.

Each either sees through the construct (shard_map and custom_vjp bodies) or names
the weights it left alone (a Pallas kernel's body is not read): never a silent
wrong answer.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.experimental import pallas as pl
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import jaxcompress as jc
from jaxcompress.calibration.calibrate import stats_by_path

MESH = jax.make_mesh((8,), ("d",), axis_types=(AxisType.Auto,), devices=jax.devices())
DENSE = nn.Dense(32)


@jax.custom_vjp
def _vjp_matmul(w, x):
    return x @ w


def _vjp_fwd(w, x):
    return x @ w, (w, x)


def _vjp_bwd(residual, g):
    w, x = residual
    return x.T @ g, g @ w.T


_vjp_matmul.defvjp(_vjp_fwd, _vjp_bwd)


def _pallas_matmul(w, x):
    def kernel(x_ref, w_ref, o_ref):
        o_ref[...] = x_ref[...] @ w_ref[...]

    out = jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), x.dtype)
    return pl.pallas_call(kernel, out_shape=out, interpret=True)(x, w)


def _sharded_dense(params, x, *, check_vma=True):
    def body(p, x):
        return jnp.tanh(DENSE.apply({"params": p}, x))

    return jax.shard_map(
        body, mesh=MESH, in_specs=(P(), P("d")), out_specs=P("d"), check_vma=check_vma
    )(params, x)


def apply(params, x):
    """shard_map over the batch (a Dense inside), a custom_vjp matmul, a Pallas matmul."""
    h = _sharded_dense(params["sm"], x)
    h = jnp.tanh(_vjp_matmul(params["vjp"]["kernel"], h))
    return _pallas_matmul(params["pallas"]["kernel"], h)


KEYS = jax.random.split(jax.random.key(0), 4)
PARAMS = {
    "sm": DENSE.init(KEYS[0], jnp.zeros((1, 24)))["params"],
    "vjp": {"kernel": jax.random.normal(KEYS[1], (32, 32)) / 6},
    "pallas": {"kernel": jax.random.normal(KEYS[2], (32, 16)) / 6},
}
X = jax.random.normal(KEYS[3], (16, 24))


def _moments(a):
    a = np.asarray(a, np.float64)
    return a.mean(0), a.T @ a / len(a)


def _check_stats(stats, activation):
    mean, gram = _moments(activation)
    assert float(stats.count) == activation.shape[0]
    np.testing.assert_allclose(stats.mean, mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats.gram, gram, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_calibrate_sees_into_shard_map_and_custom_vjp_and_names_the_pallas_weight(jit):
    fn = jax.jit(apply) if jit else apply
    batches = [X[:8], X[8:]]
    with pytest.warns(UserWarning, match=r"not calibrating pallas/kernel: .*pallas_call"):
        data = jc.calibrate(fn, PARAMS, batches)
    stats = stats_by_path(data)
    assert set(stats) == {"sm/kernel", "vjp/kernel"}
    _check_stats(stats["sm/kernel"], X)  # gathered from the 8 shards, each row once
    hidden = jnp.tanh(DENSE.apply({"params": PARAMS["sm"]}, X))
    _check_stats(stats["vjp/kernel"], hidden)
    assert data["pallas"]["kernel"] is None


def test_calibrate_declines_a_weight_that_shard_map_splits():
    def split(params, x):  # column-parallel: each device holds 4 of the 32 outputs
        body = lambda w, x: x @ w  # noqa: E731
        sm = jax.shard_map(body, mesh=MESH, in_specs=(P(None, "d"), P()), out_specs=P(None, "d"))
        return sm(params["kernel"], x)

    with pytest.warns(UserWarning, match=r"not calibrating kernel: .*shard_map"):
        data = jc.calibrate(split, PARAMS["sm"], [X])
    assert data["kernel"] is None


def test_calibrate_declines_shard_map_without_vma_checks():
    def unchecked(params, x):
        return _sharded_dense(params, x, check_vma=False)

    with pytest.warns(UserWarning, match=r"not calibrating kernel: .*check_vma"):
        data = jc.calibrate(unchecked, PARAMS["sm"], [X])
    assert data["kernel"] is None


def test_calibrate_with_labels_declines_weights_inside_shard_map():
    labels = [np.arange(16) % 3]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = jc.calibrate(apply, PARAMS, [X], labels=labels)
    messages = " ".join(str(w.message) for w in caught)
    assert "not calibrating sm/kernel" in messages and "labels" in messages
    assert data["sm"]["kernel"] is None
    assert data["vjp"]["kernel"].class_mean.shape == (3, 32)


COMPRESSIONS = {
    "int8": jc.quantize(bits=8, axis=-1),
    "prune": jc.prune(0.5),
}


def _relative(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("name", list(COMPRESSIONS))
def test_accelerate_matches_the_materialized_model_and_names_dense_weights(name, jit):
    compressed, _ = COMPRESSIONS[name](PARAMS)
    fn = jax.jit(apply) if jit else apply
    reference = apply(jc.materialize(compressed), X)
    fast = jc.accelerate(fn, int8_activations=False)
    served = fast.prepare(compressed)
    with pytest.warns(UserWarning, match=r"pallas/kernel \(in pallas_call\)") as caught:
        out = fast(served, X)
    np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-5)
    routes = fast.last_plan.routes()
    dense = fast.last_plan.dense()
    assert "pallas/kernel" in dense and "pallas_call" in dense["pallas/kernel"]
    # shard_map and custom_vjp bodies are run with the compressed weight inside
    assert not any("sm/kernel" in str(w.message) for w in caught)
    if name == "int8":
        assert routes["sm/kernel"] == routes["vjp/kernel"] == "blocked"
        assert set(dense) == {"pallas/kernel"}
    else:
        assert "no kernel for Sparse" in dense["sm/kernel"]
    # the int8 activation route: within the tolerance accelerate's docstring states
    fast8 = jc.accelerate(fn)
    with pytest.warns(UserWarning):
        out8 = fast8(fast8.prepare(compressed), X)
    assert _relative(out8, reference) < 0.03
    if name == "int8":
        assert fast8.last_plan.routes()["sm/kernel"] == "int8"


def test_accelerate_materializes_a_weight_that_shard_map_splits_and_says_so():
    def split(params, x):  # column-parallel: each device holds 4 of the 32 outputs
        body = lambda w, x: jnp.tanh(x @ w)  # noqa: E731
        sm = jax.shard_map(body, mesh=MESH, in_specs=(P(None, "d"), P()), out_specs=P(None, "d"))
        return sm(params["kernel"], x)

    compressed, _ = jc.quantize(bits=8, axis=-1)(PARAMS["sm"])
    fast = jc.accelerate(split)
    with pytest.warns(UserWarning, match=r"kernel \(in shard_map\)"):
        out = fast(fast.prepare(compressed), X)
    np.testing.assert_allclose(out, split(jc.materialize(compressed), X), rtol=1e-6, atol=1e-6)
    assert fast.last_plan.routes() == {"kernel": "materialize"}


def test_accelerate_without_opaque_kernels_does_not_warn():
    compressed, _ = jc.quantize(bits=8, axis=-1)(PARAMS["vjp"])

    def plain(p, x):
        return _vjp_matmul(p["kernel"], x)

    fast = jc.accelerate(plain)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fast(fast.prepare(compressed), jnp.ones((4, 32)))
    assert fast.last_plan.dense() == {}


def test_uses_inside_shard_map_carry_the_gathered_activation_shape():
    from jaxcompress.jaxpr import graph

    uses = graph.trace_uses(apply, PARAMS, X)
    (sm,) = uses["sm/kernel"]
    assert sm.gathered == ("d",) and sm.gather_dim == 0
    assert sm.activation_shape == X.shape  # 8 shards of 2 rows, gathered
    (vjp,) = uses["vjp/kernel"]
    assert vjp.gathered is None and vjp.contracting_axes == (0,)
    assert uses["pallas/kernel"] == []
    closed, paths = graph.trace_jaxpr(apply, PARAMS, X)
    hidden = graph.opaque_uses(closed, paths)
    assert hidden["pallas/kernel"] == ["pallas_call"] and hidden["sm/kernel"] == []


def test_a_weight_used_both_outside_and_inside_a_scan_is_declined_but_a_bias_is_not_named():
    def looped(p, x):
        x = x @ p["w"] + p["b"][None, :]  # seen
        return jax.lax.scan(
            lambda c, _: (jnp.tanh(c @ p["w"]) + p["b"][None, :], None), x, None, 2
        )[0]

    params = {"w": jnp.eye(8), "b": jnp.zeros(8)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = jc.calibrate(looped, params, [jnp.ones((4, 8))])
    messages = [str(w.message) for w in caught]
    assert any("not calibrating w: it enters scan" in m for m in messages), messages
    assert not any("not calibrating b" in m for m in messages)
    assert data["w"] is None  # its rows inside the scan are unseen: no partial statistics
