"""Fuzzing: random pytrees through every transform, materialize, save and load.

Every case must end in a valid result (same structure, same shapes and dtypes, and a
file that loads back to the same values) or in a clear ``ValueError`` / ``TypeError``:
never another exception type or a wrong shape.
"""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import jaxcompress as jc

pytestmark = pytest.mark.slow


SHAPES = [(1,), (3, 0), (7, 13, 5), (4,), (2, 3), (8, 4), (16, 8), (3, 3, 2, 4), (1, 1)]
DTYPES = [jnp.float32, jnp.float16, jnp.bfloat16]


@st.composite
def leaves(draw):
    shape = draw(st.sampled_from(SHAPES))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**16))
    values = np.random.default_rng(seed).normal(0, 1, shape).astype(np.float32)
    if values.size and draw(st.integers(0, 4)) == 0:  # NaN or Inf sprinkled in, sometimes
        flat = values.reshape(-1)
        flat[draw(st.integers(0, flat.size - 1))] = draw(st.sampled_from([np.nan, np.inf]))
    return jnp.asarray(values, dtype=dtype)


def trees():
    return st.recursive(
        leaves(),
        lambda children: st.one_of(
            st.dictionaries(st.sampled_from(["a", "b", "kernel", "bias"]), children, max_size=3),
            st.lists(children, max_size=3),
            st.lists(children, max_size=2).map(tuple),
        ),
        max_leaves=4,
    )


TRANSFORMS = {
    "prune": lambda: jc.prune(0.5),
    "prune_global": lambda: jc.prune(0.3, scope="global"),
    "prune_nm": lambda: jc.prune_nm("2:4"),
    "prune_blocks": lambda: jc.prune_blocks(0.5, block=(2, 2)),
    "quantize8": lambda: jc.quantize(bits=8),
    "quantize4_channel": lambda: jc.quantize(bits=4, axis=-1),
    "cluster3": lambda: jc.cluster(bits=3),
    "low_rank": lambda: jc.low_rank(1),
    "prune_then_cluster": lambda: jc.chain(jc.prune(0.5), jc.cluster(bits=2)),
    # Every floating leaf, vectors and (1,) included, not only kernels.
    "prune_all": lambda: jc.prune(0.5, where=jc.filters.floating),
    "quantize8_all": lambda: jc.quantize(bits=8, where=jc.filters.floating),
    "cluster2_all": lambda: jc.cluster(bits=2, where=jc.filters.floating),
}


def _shapes_and_dtypes(tree):
    import jax

    return jax.tree.map(lambda x: (tuple(x.shape), jnp.dtype(x.dtype)), tree)


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
@settings(
    max_examples=10,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(tree=trees())
def test_every_transform_ends_in_a_valid_tree_or_a_clear_error(tree, name, tmp_path):
    import jax

    try:
        compressed, _ = TRANSFORMS[name]()(tree)
    except (ValueError, TypeError) as error:
        event(f"{name}: {type(error).__name__}")
        assert str(error), "an error must say what is wrong"
        return
    event(f"{name}: compressed")
    assert jax.tree.structure(jc.materialize(compressed)) == jax.tree.structure(tree)
    dense = jc.materialize(compressed)
    assert _shapes_and_dtypes(dense) == _shapes_and_dtypes(tree)
    path = tmp_path / f"{name}.jcz"
    try:
        jc.save(path, compressed)
    except (ValueError, TypeError) as error:
        assert str(error)
        return
    loaded = jc.load(path)
    for a, b in zip(jax.tree.leaves(jc.materialize(loaded)), jax.tree.leaves(dense), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(
            np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
        )


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=trees())
def test_dense_trees_round_trip_through_files_bit_for_bit(tree, tmp_path_factory):
    import jax

    path = tmp_path_factory.mktemp("fuzz") / "dense.jcz"
    jc.save(path, tree)
    loaded = jc.load(path)
    assert jax.tree.structure(loaded) == jax.tree.structure(tree)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(tree), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        same = np.asarray(a, np.float32).view(np.uint32) == np.asarray(b, np.float32).view(
            np.uint32
        )
        assert same.all() or math.prod(a.shape) == 0


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_non_finite_weights_are_refused_by_name(name):
    tree = {"layer": {"kernel": jnp.ones((8, 4)).at[1, 2].set(jnp.nan)}}
    with pytest.raises(ValueError, match="layer/kernel"):
        TRANSFORMS[name]()(tree)


SHARDED_SHAPES = [(8, 16), (16, 8), (4, 8, 16), (32, 64), (64,)]
SHARDED_TRANSFORMS = ["prune", "prune_global", "quantize8", "cluster3", "prune_then_cluster"]


@st.composite
def specs(draw, shape):
    """A PartitionSpec over the 4 x 2 ("data", "model") mesh that divides ``shape``."""
    from jax.sharding import PartitionSpec

    entries, free = [], ["data", "model"]
    for dim in shape:
        options = [None] + [axis for axis in free if dim % {"data": 4, "model": 2}[axis] == 0]
        entry = draw(st.sampled_from(options))
        if entry is not None:
            free.remove(entry)
        entries.append(entry)
    return PartitionSpec(*entries)


@pytest.mark.bitwise
@settings(
    max_examples=12,  # 6 per mesh type, as when both mesh types ran
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_sharded_trees_compress_save_and_load_like_unsharded(data, tmp_path):
    # Split trees go the block-by-block ways (prune, files); they must give the same
    # bits as the unsharded tree, and load back onto the mesh as they were.
    import jax
    from jax.sharding import AxisType, NamedSharding

    axis_type = data.draw(st.sampled_from([AxisType.Explicit, AxisType.Auto]))
    mesh8 = jax.make_mesh((4, 2), ("data", "model"), axis_types=(axis_type,) * 2)

    shape = data.draw(st.sampled_from(SHARDED_SHAPES))
    spec = data.draw(specs(shape))
    name = data.draw(st.sampled_from(SHARDED_TRANSFORMS))
    seed = data.draw(st.integers(0, 2**16))
    dtype = data.draw(st.sampled_from(DTYPES))
    weight = np.round(np.random.default_rng(seed).normal(size=shape), 1)
    tree = {"w": jnp.asarray(weight, dtype=dtype)}
    sharding = {"w": NamedSharding(mesh8, spec)}
    tx = TRANSFORMS[name]()
    want, _ = tx(tree)
    got, _ = tx(jax.device_put(tree, sharding))
    want_arrays = [np.asarray(x) for x in jax.tree.leaves(want)]
    for a, b in zip(jax.tree.leaves(got), want_arrays, strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
    path = tmp_path / f"{name}.jxc"
    jc.save(path, got)
    for loaded in (jc.load(path), jc.load(path, sharding=sharding)):
        for a, b in zip(jax.tree.leaves(loaded), want_arrays, strict=True):
            np.testing.assert_array_equal(np.asarray(a), b)
