"""prune and materialize on arrays sharded over a Mesh of 8 fake CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxcompress as jc
from jaxcompress.core.mesh import spec_for
from jaxcompress.methods import prune_sharded
from jaxcompress.methods.prune_sharded import below_and_tied, magnitude_histogram, split_layout


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


def _tied_weight(shape):
    # Rounded values: many ties at any threshold, which go in row-major order.
    rng = np.random.default_rng(3)
    return np.round(np.clip(rng.normal(size=shape), -1.0, 1.0), 1).astype(np.float32)


@pytest.mark.parametrize(
    ("shape", "spec"),
    [
        ((64, 128), P("data", "model")),
        ((64, 128), P(None, ("data", "model"))),
        ((3, 8, 16), P(None, "data", "model")),
        ((128,), P("data")),
    ],
)
@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.5, 0.999])
def test_sharded_prune_block_by_block_equals_one_device(mesh8, shape, spec, fraction):
    weight = _tied_weight(shape)
    sharded = jax.device_put({"w": weight}, NamedSharding(mesh8, spec))
    tx = jc.prune(fraction, where="^w$")  # 1-D leaves too
    got, got_stats = tx(sharded)
    want, want_stats = tx({"w": weight})
    assert got_stats == want_stats
    sparse, expected = got["w"], want["w"]
    np.testing.assert_array_equal(sparse.values, expected.values)
    np.testing.assert_array_equal(sparse.mask, expected.mask)
    # Children sharded like the weight: the packed mask keeps its spec, the values are
    # split over the same mesh axes where their count divides (else replicated).
    assert sparse.mask.sharding.is_equivalent_to(NamedSharding(mesh8, spec), len(shape))
    values_spec = spec_for(sparse.values.shape, NamedSharding(mesh8, spec))
    assert sparse.values.sharding.is_equivalent_to(NamedSharding(mesh8, values_spec), 1)


def _full_size_gathers(compiled: str, shape: tuple[int, ...]) -> list[str]:
    sizes = {f"[{','.join(map(str, shape))}]", f"[{int(np.prod(shape))}]"}
    return [
        line
        for line in compiled.splitlines()
        if "all-gather(" in line and any(size in line for size in sizes)
    ]


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_prune_of_a_sharded_weight_never_gathers_it(mesh8, scope):
    # Eager prune runs small jitted programs; the block-by-block one is inspected
    # here, the histogram passes of the global threshold below.
    weight = jax.device_put(
        jax.random.normal(jax.random.key(0), (512, 1024)), NamedSharding(mesh8, P("data", "model"))
    )
    mesh, spec = split_layout(weight)
    compiled = (
        prune_sharded._sharded_sparse.lower(
            weight, jnp.int32(1000), nnz=weight.size - 1000, mesh=mesh, spec=spec
        )
        .compile()
        .as_text()
    )
    assert not _full_size_gathers(compiled, (512, 1024))
    if scope == "global":
        for program, operands in (
            (magnitude_histogram, (jnp.uint32(0), jnp.bool_(False))),
            (below_and_tied, (jnp.uint32(7),)),
        ):
            compiled = program.lower(weight, *operands, mesh=mesh, spec=spec).compile().as_text()
            assert not _full_size_gathers(compiled, (512, 1024))
    got, _ = jc.prune(0.5, scope=scope)({"w": weight})
    want, _ = jc.prune(0.5, scope=scope)({"w": np.asarray(weight)})
    np.testing.assert_array_equal(got["w"].values, want["w"].values)


def test_jitted_prune_on_an_explicit_mesh_never_gathers_the_weight():
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    weight = jax.random.normal(jax.random.key(1), (512, 1024))
    sharded = jax.device_put({"w": weight}, NamedSharding(mesh, P("data", "model")))
    tx = jc.prune(0.5)
    compiled = jax.jit(tx).lower(sharded).compile().as_text()
    assert not _full_size_gathers(compiled, (512, 1024))
    got, _ = jax.jit(tx)(sharded)
    want, _ = tx({"w": weight})
    np.testing.assert_array_equal(got["w"].values, want["w"].values)
    np.testing.assert_array_equal(got["w"].mask, want["w"].mask)
    assert got["w"].mask.sharding.spec == P("data", "model")
