"""prune: exact counts, global threshold, ties, jit, linen/nnx, bad input, properties."""

import math
from fractions import Fraction

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxcompress as jc
from jaxcompress.examples.models import LeNet5, LeNet300100NNX


def _random_params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "enc": {
            "kernel": jnp.asarray(rng.normal(size=(37, 19)), jnp.float32),
            "bias": jnp.ones(19),
        },
        "dec": {"kernel": jnp.asarray(rng.normal(size=(19, 5)), jnp.float32), "bias": jnp.ones(5)},
    }


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.29, 0.5, 0.9, 0.999])
def test_layer_scope_prunes_exactly_floor_of_each_leaf(sparsity):
    params = _random_params()
    pruned, stats = jc.prune(sparsity)(params)
    for name in ("enc", "dec"):
        kernel = params[name]["kernel"]
        expected = math.floor(Fraction(str(sparsity)) * kernel.size)
        sparse = pruned[name]["kernel"]
        assert isinstance(sparse, jc.Sparse)
        assert sparse.nnz == kernel.size - expected
        assert int(jnp.sum(~sparse.keep_mask())) == expected
        assert stats[f"{name}/kernel"] == {"pruned": expected, "size": kernel.size}
        # Biases are not selected by the default filter.
        assert pruned[name]["bias"] is params[name]["bias"]


def test_layer_scope_keeps_the_largest_magnitudes():
    weight = jnp.asarray(np.random.default_rng(1).normal(size=(16, 8)), jnp.float32)
    dense = jc.materialize(jc.prune(0.75)({"w": weight})[0])["w"]
    kept = np.abs(np.asarray(weight))[np.asarray(dense) != 0]
    dropped = np.abs(np.asarray(weight))[np.asarray(dense) == 0]
    assert kept.size == 32 and kept.min() >= dropped.max()
    np.testing.assert_array_equal(
        np.asarray(dense)[np.asarray(dense) != 0], np.asarray(weight)[np.asarray(dense) != 0]
    )


def test_ties_are_broken_by_row_major_index():
    weight = jnp.array([[1.0, -1.0, 1.0], [2.0, 1.0, -1.0]])
    dense = jc.materialize(jc.prune(0.5)({"w": weight})[0])["w"]
    # Three of the five |w| == 1 entries go, lowest flat index first.
    np.testing.assert_array_equal(dense, [[0.0, 0.0, 0.0], [2.0, 1.0, -1.0]])


def test_global_scope_uses_one_threshold_and_exact_total():
    params = _random_params(2)
    pruned, stats = jc.prune(0.7, scope="global")(params)
    kernels = [params["enc"]["kernel"], params["dec"]["kernel"]]
    sparse = [pruned["enc"]["kernel"], pruned["dec"]["kernel"]]
    total = sum(k.size for k in kernels)
    assert sum(k.size - s.nnz for k, s in zip(kernels, sparse, strict=True)) == math.floor(
        0.7 * total
    )
    kept = np.concatenate(
        [
            np.abs(np.asarray(k))[np.asarray(s.keep_mask())]
            for k, s in zip(kernels, sparse, strict=True)
        ]
    )
    dropped = np.concatenate(
        [
            np.abs(np.asarray(k))[~np.asarray(s.keep_mask())]
            for k, s in zip(kernels, sparse, strict=True)
        ]
    )
    assert kept.min() >= dropped.max()
    # A global threshold prunes the leaves unevenly when their magnitudes differ.
    scaled = {
        "a": jnp.arange(1.0, 11.0).reshape(2, 5),
        "b": 100 * jnp.arange(1.0, 11.0).reshape(2, 5),
    }
    pruned, stats = jc.prune(0.5, scope="global")(scaled)
    # "a" would lose all 10 weights; each of its 5 output units keeps its largest.
    assert stats["a"]["pruned"] == 5 and stats["b"]["pruned"] == 0
    assert pruned["a"].keep_mask().tolist() == [[False] * 5, [True] * 5]


def test_global_scope_ties_across_leaves_follow_leaf_order():
    params = {"a": jnp.ones((2, 2)), "b": jnp.ones((2, 2))}
    _, stats = jc.prune(0.25, scope="global")(params)
    assert stats["a"]["pruned"] == 2 and stats["b"]["pruned"] == 0
    _, stats = jc.prune(0.75, scope="global")(params)
    # Ties would take all of "a" first; each of its 2 output units keeps one weight.
    assert stats["a"]["pruned"] == 2 and stats["b"]["pruned"] == 2


def test_layer_scope_under_jit_matches_eager():
    params = _random_params(3)
    tx = jc.prune(0.6)
    eager, _ = tx(params)
    jitted, stats = jax.jit(tx)(params)
    for got, want in zip(jax.tree.leaves(jitted), jax.tree.leaves(eager), strict=True):
        np.testing.assert_array_equal(got, want)
    assert int(stats["enc/kernel"]["pruned"]) == math.floor(0.6 * 37 * 19)
    materialized = jax.jit(jc.materialize)(jitted)
    np.testing.assert_array_equal(
        materialized["enc"]["kernel"], jc.materialize(eager)["enc"]["kernel"]
    )


def test_global_scope_under_jit_says_why_it_cannot():
    with pytest.raises(ValueError, match="scope='global' needs concrete arrays"):
        jax.jit(jc.prune(0.5, scope="global"))(_random_params())


def test_linen_cnn_under_jit_keeps_output_close_at_low_sparsity():
    model = LeNet5()
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(4, 8, 8, 1)), jnp.float32)
    params = model.init(jax.random.key(0), x)["params"]
    pruned, _ = jax.jit(jc.prune(0.3))(params)
    # conv kernels (3, 3, in, out) and dense kernels are pruned; biases are not.
    assert isinstance(pruned["conv1"]["kernel"], jc.Sparse)
    assert pruned["conv1"]["kernel"].nnz == 54 - math.floor(0.3 * 54)
    assert not jc.is_compressed(pruned["conv1"]["bias"])
    dense_out = model.apply({"params": params}, x)
    pruned_out = jax.jit(lambda p: model.apply({"params": jc.materialize(p)}, x))(pruned)
    assert pruned_out.shape == dense_out.shape
    relative = float(jnp.linalg.norm(pruned_out - dense_out) / jnp.linalg.norm(dense_out))
    assert relative < 0.5


def test_nnx_state_round_trip_under_jit():
    model = LeNet300100NNX(rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    pruned, stats = jax.jit(jc.prune(0.8))(params)
    assert set(stats) == {"dense1/kernel", "dense2/kernel", "dense3/kernel"}
    assert pruned["dense1"]["kernel"].get_value().nnz == 64 * 300 - math.floor(0.8 * 64 * 300)
    restored = nnx.merge(graphdef, jc.materialize(pruned), rest)
    x = jnp.ones((2, 64))
    kernel = np.asarray(restored.dense1.kernel.get_value())
    assert (kernel == 0).sum() == math.floor(0.8 * 64 * 300)
    assert restored(x).shape == (2, 10)


def test_empty_tree_is_not_an_error():
    assert jc.prune(0.5)({}) == ({}, {})
    assert jc.prune(0.5, scope="global")({"bias": jnp.ones(3)})[1] == {}


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, float("nan")])
def test_sparsity_out_of_range(sparsity):
    with pytest.raises(ValueError, match="sparsity"):
        jc.prune(sparsity)


@pytest.mark.parametrize("sparsity", [True, "0.5", None])
def test_sparsity_of_wrong_type(sparsity):
    with pytest.raises(TypeError, match="sparsity"):
        jc.prune(sparsity)


def test_unknown_scope():
    with pytest.raises(ValueError, match="scope"):
        jc.prune(0.5, scope="model")


@pytest.mark.parametrize(
    ("leaf", "error", "message"),
    [
        (jnp.ones((3, 3), jnp.int32), TypeError, "int32"),
        (jnp.ones((3, 3), jnp.bool_), TypeError, "bool"),
        (jnp.array([[1.0, jnp.nan], [1.0, 2.0]]), ValueError, "NaN or Inf"),
        (jnp.array([[1.0, jnp.inf], [1.0, 2.0]]), ValueError, "NaN or Inf"),
        (jnp.array(1.0), ValueError, "scalar"),
        (jnp.ones((0, 3)), ValueError, "zero-size"),
    ],
)
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_bad_leaves_name_the_path_and_nothing_is_half_done(leaf, error, message, scope):
    params = {"good": {"kernel": jnp.ones((4, 4))}, "bad": {"weight": leaf}}
    with pytest.raises(error, match=f"'bad/weight'.*{message}|{message}.*'bad/weight'"):
        jc.prune(0.5, scope=scope, where=r"kernel|weight")(params)


def test_where_names_the_argument_for_integer_leaves():
    with pytest.raises(TypeError, match="where="):
        jc.prune(0.5, where="step")({"step": jnp.ones((2, 2), jnp.int32)})


def test_already_compressed_leaf_is_refused():
    pruned, _ = jc.prune(0.5)({"w": jnp.ones((4, 4))})
    with pytest.raises(TypeError, match="already compressed"):
        jc.prune(0.5)(pruned)


@st.composite
def _weights(draw):
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=9))
    elements = st.floats(
        -1e3, 1e3, allow_nan=False, allow_infinity=False, width=32, allow_subnormal=False
    )
    return draw(hnp.arrays(np.float32, shape, elements=elements))


@pytest.mark.slow
@settings(max_examples=60, deadline=None)
@given(
    weight=_weights(), sparsity=st.floats(0.0, 0.999), scope=st.sampled_from(["layer", "global"])
)
def test_property_exact_count_and_materialize_consistency(weight, sparsity, scope):
    pruned, _ = jc.prune(sparsity, scope=scope, where=jc.filters.floating)(
        {"w": jnp.asarray(weight)}
    )
    sparse = pruned["w"]
    keep = np.asarray(sparse.keep_mask())
    count = math.floor(Fraction(repr(sparsity)) * weight.size)
    # The global threshold never empties an output unit (a column of the last axis):
    # where a stable sort's plain prune would, each unit's largest |w| is kept and at
    # most size - units entries are pruned.
    units = weight.shape[-1] if weight.ndim >= 2 else 1
    plain_keep = np.ones(weight.size, bool)
    plain_keep[np.argsort(np.abs(weight).ravel(), kind="stable")[:count]] = False
    unit_rule = scope == "global" and not plain_keep.reshape(-1, units).any(axis=0).all()
    assert int((~keep).sum()) == (min(count, weight.size - units) if unit_rule else count)
    dense = np.asarray(jc.materialize(pruned)["w"])
    # Kept entries are the originals, pruned ones are exactly zero, and (without the
    # unit rule) no kept magnitude is below a pruned one.
    np.testing.assert_array_equal(dense[keep], weight[keep])
    assert not dense[~keep].any()
    if not unit_rule and keep.any() and (~keep).any():
        assert np.abs(weight[keep]).min() >= np.abs(weight[~keep]).max()
    assert sparse.nbytes == int(keep.sum()) * 4 + math.prod(weight.shape[:-1]) * math.ceil(
        weight.shape[-1] / 8
    )
