"""prune and materialize on arrays sharded over a Mesh of 8 fake CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxcompress as jc


def _params():
    rng = np.random.default_rng(0)
    return {
        "a": {"kernel": jnp.asarray(rng.normal(size=(64, 128)), jnp.float32)},
        "b": {"kernel": jnp.asarray(rng.normal(size=(32, 16)), jnp.float32)},
    }


@pytest.mark.parametrize("spec", [P("data", "model"), P("data", None), P(None, ("data", "model"))])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_sharded_prune_equals_unsharded_and_keeps_sharding(mesh8, spec, scope):
    params = _params()
    sharding = NamedSharding(mesh8, spec)
    sharded = jax.device_put(params, sharding)
    tx = jc.prune(0.8, scope=scope)
    want, want_stats = tx(params)
    got, got_stats = tx(sharded)
    assert got_stats == want_stats
    for path in ("a", "b"):
        sparse = got[path]["kernel"]
        np.testing.assert_array_equal(sparse.values, want[path]["kernel"].values)
        np.testing.assert_array_equal(sparse.mask, want[path]["kernel"].mask)
        # The packed mask is laid out like the weight: it keeps the weight's row sharding.
        assert sparse.mask.sharding.spec[0] == spec[0]
        dense = jc.materialize(got)[path]["kernel"]
        np.testing.assert_array_equal(dense, jc.materialize(want)[path]["kernel"])
        # Every axis keeps its sharding, except a sharded last axis whose packed mask
        # length (ceil(n / 8)) does not divide over its devices: that one comes back whole.
        columns = params[path]["kernel"].shape[-1]
        devices = int(np.prod([mesh8.shape[name] for name in np.atleast_1d(spec[1] or ())]))
        expected = P(spec[0], spec[1] if -(-columns // 8) % devices == 0 else None)
        assert dense.sharding.is_equivalent_to(NamedSharding(mesh8, expected), dense.ndim)


def test_materialize_under_jit_with_sharded_compressed_tree(mesh8):
    sharded = jax.device_put(_params(), NamedSharding(mesh8, P("data", "model")))
    pruned, _ = jc.prune(0.5)(sharded)
    dense = jax.jit(jc.materialize)(pruned)
    np.testing.assert_array_equal(
        dense["a"]["kernel"], jc.materialize(jc.prune(0.5)(_params())[0])["a"]["kernel"]
    )


def test_sharded_layer_prune_under_jit_matches(mesh8):
    sharded = jax.device_put(_params(), NamedSharding(mesh8, P("data", None)))
    jitted, _ = jax.jit(jc.prune(0.75))(sharded)
    eager, _ = jc.prune(0.75)(_params())
    np.testing.assert_array_equal(
        jc.materialize(jitted)["b"]["kernel"], jc.materialize(eager)["b"]["kernel"]
    )
