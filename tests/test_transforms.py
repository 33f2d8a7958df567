"""Tests for the transform combinators chain, masked and partition (public API only)."""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxcompress as jc
from jaxcompress.core.paths import path_to_str
from jaxcompress.examples.models import LeNet300100, LeNet300100NNX

# --------------------------------------------------------------------------- helpers


def _paths(tree):
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=jc.is_compressed)[0]
    return [path_to_str(path) for path, _ in flat]


def _recorder(name, log, fn=None, stats=None):
    """A transform that logs (name, paths seen, key, data) and optionally maps its leaves."""

    def apply(params, *, key=None, data=None):
        log.append({"name": name, "paths": _paths(params), "key": key, "data": data})
        out = params if fn is None else jax.tree.map(fn, params)
        return out, name if stats is None else stats

    return jc.Transform(apply, name)


def _key_data(key):
    return np.asarray(jax.random.key_data(key))


def _hand_keep_mask(weight, num_pruned):
    """Keep-mask pruning the num_pruned smallest |w|, ties to the lower row-major index."""
    flat = np.abs(np.asarray(weight, np.float32)).reshape(-1)
    order = np.argsort(flat, kind="stable")
    keep = np.ones(flat.size, bool)
    keep[order[:num_pruned]] = False
    return keep.reshape(np.shape(weight))


def _small_params():
    return {
        "a": jnp.array([[0.5, 4.0], [1.0, 8.0]], jnp.float32),
        "b": jnp.array([[2.0, 3.0, 0.25], [6.0, 7.0, 5.0]], jnp.float32),
        "c": jnp.array([[0.1, 0.2], [0.3, 0.4]], jnp.float32),
        "bias": jnp.array([1.0, -1.0], jnp.float32),
    }


# --------------------------------------------------------------------------- chain


def test_chain_applies_in_order():
    log = []
    double = _recorder("double", log, lambda x: x * 2.0)
    plus_one = _recorder("plus_one", log, lambda x: x + 1.0)
    params = {"w": jnp.array([1.0, 2.0, 3.0], jnp.float32)}
    out, _ = jc.chain(double, plus_one)(params)
    assert out["w"].tolist() == [3.0, 5.0, 7.0]  # (x * 2) + 1
    out, _ = jc.chain(plus_one, double)(params)
    assert out["w"].tolist() == [4.0, 6.0, 8.0]  # (x + 1) * 2
    assert [entry["name"] for entry in log] == ["double", "plus_one", "plus_one", "double"]


def test_chain_stats_is_tuple_of_per_transform_stats():
    params = _small_params()
    tx = jc.chain(jc.prune(0.5, where="^a$"), jc.prune(0.5, where="^b$"))
    out, stats = tx(params)
    assert isinstance(stats, tuple)
    assert stats == ({"a": {"pruned": 2, "size": 4}}, {"b": {"pruned": 3, "size": 6}})
    assert out["a"].nnz == 2 and out["b"].nnz == 3
    assert out["a"].materialize().tolist() == [[0.0, 4.0], [0.0, 8.0]]
    assert out["b"].materialize().tolist() == [[0.0, 0.0, 0.0], [6.0, 7.0, 5.0]]
    assert tx.name == "chain(prune(0.5, scope=layer), prune(0.5, scope=layer))"

    log = []
    _, stats = jc.chain(_recorder("x", log, stats={"s": 1}), _recorder("y", log, stats=[2]))(params)
    assert stats == ({"s": 1}, [2])


def test_empty_chain_is_identity():
    params = _small_params()
    out, stats = jc.chain()(params)
    assert out is params
    assert stats == ()
    out, stats = jc.chain()(params, key=jax.random.key(0), data="ignored")
    assert out is params and stats == ()


def test_chain_splits_key_into_distinct_subkeys():
    log = []
    tx = jc.chain(*(_recorder(f"t{i}", log) for i in range(3)))
    key = jax.random.key(42)
    tx({"w": jnp.ones(2)}, key=key, data={"batch": 7})
    got = [_key_data(entry["key"]) for entry in log]
    expected = [_key_data(k) for k in jax.random.split(key, 3)]
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_array_equal(g, e)
    # Pairwise distinct, and none equal to the parent key.
    parent = _key_data(key)
    for i in range(3):
        assert not np.array_equal(got[i], parent)
        for j in range(i + 1, 3):
            assert not np.array_equal(got[i], got[j])
    # data is passed unchanged to every transform.
    assert [entry["data"] for entry in log] == [{"batch": 7}] * 3


def test_chain_without_key_passes_none():
    log = []
    jc.chain(_recorder("t0", log), _recorder("t1", log))({"w": jnp.ones(2)})
    assert [entry["key"] for entry in log] == [None, None]


def test_chain_rejects_non_transform():
    with pytest.raises(TypeError, match="argument 1"):
        jc.chain(jc.prune(0.5), 3)


# --------------------------------------------------------------------------- masked


def test_masked_compresses_only_selected_leaves():
    params = _small_params()
    out, stats = jc.masked(jc.prune(0.5), "^(a|c)$")(params)
    assert jc.is_compressed(out["a"]) and jc.is_compressed(out["c"])
    assert not jc.is_compressed(out["b"])
    assert out["b"] is params["b"]
    assert out["bias"] is params["bias"]
    assert stats == {"a": {"pruned": 2, "size": 4}, "c": {"pruned": 2, "size": 4}}
    np.testing.assert_array_equal(
        np.asarray(out["c"].materialize()), np.array([[0.0, 0.0], [0.3, 0.4]], np.float32)
    )


def test_masked_inner_transform_sees_only_selected_leaves():
    log = []
    params = {"enc": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}, "dec": jnp.ones(3)}
    out, stats = jc.masked(_recorder("inner", log, lambda x: x * 0.0), "kernel")(params)
    assert log[0]["paths"] == ["enc/kernel"]
    assert stats == "inner"
    assert out["enc"]["kernel"].tolist() == [[0.0, 0.0], [0.0, 0.0]]
    assert out["enc"]["bias"] is params["enc"]["bias"]
    assert out["dec"] is params["dec"]


def test_masked_global_prune_counts_over_selected_leaves_only():
    params = _small_params()
    # Selected: a (4 entries) and b (6 entries). floor(0.5 * 10) = 5 entries go, the
    # five smallest magnitudes over a and b: 0.25 (b), 0.5 (a), 1.0 (a), 2.0 (b), 3.0 (b).
    # So a loses 2 and b loses 3. (Had c been visible, the 7 smallest over 14 entries
    # would be c's four, 0.25, 0.5 and 1.0: a 2, b 1, c 4.)
    tx = jc.masked(jc.prune(0.5, scope="global"), ("^a$", "^b$"))
    out, stats = tx(params)
    assert stats == {"a": {"pruned": 2, "size": 4}, "b": {"pruned": 3, "size": 6}}
    assert out["a"].nnz == 2 and out["b"].nnz == 3
    # Those two would empty a's first output unit, so it keeps its largest entry (1.0)
    # and the next smallest, 4.0, goes instead (jc.prune's global rule).
    assert out["a"].materialize().tolist() == [[0.0, 0.0], [1.0, 8.0]]
    assert out["b"].materialize().tolist() == [[0.0, 0.0, 0.0], [6.0, 7.0, 5.0]]
    assert out["c"] is params["c"]

    # Contrast: the same global prune over a, b and c.
    out, stats = jc.prune(0.5, scope="global")(params)
    assert stats == {
        "a": {"pruned": 2, "size": 4},
        "b": {"pruned": 1, "size": 6},
        "c": {"pruned": 2, "size": 4},  # all 4 would go: each output unit keeps one
    }
    assert out["b"].materialize().tolist() == [[2.0, 3.0, 0.0], [6.0, 7.0, 5.0]]


def test_masked_selecting_nothing_is_identity():
    params = _small_params()
    out, stats = jc.masked(jc.prune(0.5), "no_such_leaf")(params)
    assert stats == {}
    for name in params:
        assert out[name] is params[name]


def test_masked_passes_key_and_data_through():
    log = []
    key = jax.random.key(3)
    jc.masked(_recorder("inner", log), "w")({"w": jnp.ones(2)}, key=key, data=5)
    np.testing.assert_array_equal(_key_data(log[0]["key"]), _key_data(key))
    assert log[0]["data"] == 5


# Combinators nest: an inner combinator leaves the outer one's placeholders hidden.


def test_masked_inside_masked():
    params = _small_params()
    out, stats = jc.masked(jc.masked(jc.prune(0.5), "^a$"), "^(a|b)$")(params)
    assert stats == {"a": {"pruned": 2, "size": 4}}
    assert jc.is_compressed(out["a"])
    assert out["b"] is params["b"] and out["c"] is params["c"]


def test_masked_chain_of_masked():
    params = _small_params()
    inner = jc.chain(jc.masked(jc.prune(0.5), "^a$"), jc.masked(jc.prune(0.5), "^b$"))
    out, _ = jc.masked(inner, "^(a|b)$")(params)
    assert out["a"].nnz == 2 and out["b"].nnz == 3


def test_masked_inside_partition():
    params = _small_params()
    tx = jc.partition(
        {"x": jc.masked(jc.prune(0.5), "^a$"), "keep": jc.chain()},
        {"a": "x", "b": "x", "c": "keep", "bias": "keep"},
    )
    out, _ = tx(params)
    assert out["a"].nnz == 2
    assert out["b"] is params["b"]


# --------------------------------------------------------------------------- partition


def test_partition_with_label_pytree():
    params = _small_params()
    tx = jc.partition(
        {"heavy": jc.prune(0.75), "light": jc.prune(0.25), "keep": jc.chain()},
        {"a": "heavy", "b": "light", "c": "keep", "bias": "keep"},
    )
    out, stats = tx(params)
    assert set(stats) == {"heavy", "light", "keep"}
    assert stats["heavy"] == {"a": {"pruned": 3, "size": 4}}
    assert stats["light"] == {"b": {"pruned": 1, "size": 6}}
    assert stats["keep"] == ()
    assert out["a"].materialize().tolist() == [[0.0, 0.0], [0.0, 8.0]]
    assert out["b"].materialize().tolist() == [[2.0, 3.0, 0.0], [6.0, 7.0, 5.0]]
    assert out["c"] is params["c"] and out["bias"] is params["bias"]


def test_partition_with_label_callable():
    params = _small_params()
    seen = []

    def labels(tree):
        seen.append(tree)
        return jax.tree_util.tree_map_with_path(
            lambda path, leaf: "bias" if leaf.ndim == 1 else f"w_{path_to_str(path)}", tree
        )

    tx = jc.partition(
        {
            "w_a": jc.prune(0.5),
            "w_b": jc.prune(0.5, scope="global"),
            "w_c": jc.chain(),
            "bias": jc.chain(),
        },
        labels,
    )
    out, stats = tx(params)
    assert seen == [params]
    assert stats == {
        "w_a": {"a": {"pruned": 2, "size": 4}},
        "w_b": {"b": {"pruned": 3, "size": 6}},
        "w_c": (),
        "bias": (),
    }
    assert out["a"].nnz == 2 and out["b"].nnz == 3
    assert out["c"] is params["c"]


def test_partition_unused_label_gets_empty_view():
    log = []
    params = {"w": jnp.ones((2, 2))}
    _, stats = jc.partition({"used": jc.chain(), "unused": _recorder("u", log)}, {"w": "used"})(
        params
    )
    assert log[0]["paths"] == []
    assert stats == {"used": (), "unused": "u"}


def test_partition_unknown_label_names_leaf_path():
    params = {"enc": {"w": jnp.ones((2, 2))}, "dec": {"w": jnp.ones((2, 2))}}
    tx = jc.partition({"prune": jc.prune(0.5)}, {"enc": {"w": "prune"}, "dec": {"w": "typo_label"}})
    with pytest.raises(ValueError, match=r"'dec/w'.*'typo_label'"):
        tx(params)
    tx = jc.partition({"prune": jc.prune(0.5)}, lambda p: jax.tree.map(lambda _: "nope", p))
    with pytest.raises(ValueError, match="'dec/w'"):
        tx(params)


def test_partition_splits_key_per_label():
    log = []
    tx = jc.partition(
        {"first": _recorder("first", log), "second": _recorder("second", log)},
        {"x": "first", "y": "second"},
    )
    key = jax.random.key(7)
    tx({"x": jnp.ones(2), "y": jnp.ones(2)}, key=key, data="d")
    assert [entry["paths"] for entry in log] == [["x"], ["y"]]
    expected = [_key_data(k) for k in jax.random.split(key, 2)]
    np.testing.assert_array_equal(_key_data(log[0]["key"]), expected[0])
    np.testing.assert_array_equal(_key_data(log[1]["key"]), expected[1])
    assert not np.array_equal(expected[0], expected[1])
    assert [entry["data"] for entry in log] == ["d", "d"]


# --------------------------------------------------------------------------- empty trees


@pytest.mark.parametrize(
    "tx",
    [
        jc.prune(0.5),
        jc.prune(0.5, scope="global"),
        jc.chain(),
        jc.chain(jc.prune(0.5), jc.prune(0.9)),
        jc.masked(jc.prune(0.5), "kernel"),
        jc.partition({"a": jc.prune(0.5)}, {}),
    ],
    ids=["prune", "prune_global", "chain_empty", "chain", "masked", "partition"],
)
def test_empty_pytree(tx):
    out, _ = tx({})
    assert out == {}


# --------------------------------------------------------------------------- LeNet composition


def _composite(where_first="^dense1/kernel$"):
    """dense1/kernel at 50% (masked), then dense2/kernel at 90% (partition), rest untouched."""

    def labels(tree):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "heavy" if path_to_str(path) == "dense2/kernel" else "keep",
            tree,
            is_leaf=jc.is_compressed,
        )

    return jc.chain(
        jc.masked(jc.prune(0.5), where_first),
        jc.partition({"heavy": jc.prune(0.9), "keep": jc.chain()}, labels),
    )


EXPECTED_STATS = (
    {"dense1/kernel": {"pruned": 9600, "size": 19200}},
    {"heavy": {"dense2/kernel": {"pruned": 27000, "size": 30000}}, "keep": ()},
)


def _hand_forward(dense, x):
    """The MLP by hand in float64 from a {layer: {kernel, bias}} dict of numpy arrays."""
    h = np.asarray(x, np.float64)
    for i in (1, 2, 3):
        h = h @ dense[f"dense{i}"]["kernel"] + dense[f"dense{i}"]["bias"]
        if i < 3:
            h = np.maximum(h, 0.0)
    return h


def _hand_masked_weights(original):
    """Original weights as float64 numpy with the expected pruning applied by hand."""
    dense = {
        layer: {name: np.asarray(original[layer][name], np.float64) for name in ("kernel", "bias")}
        for layer in ("dense1", "dense2", "dense3")
    }
    dense["dense1"]["kernel"] *= _hand_keep_mask(original["dense1"]["kernel"], 9600)
    dense["dense2"]["kernel"] *= _hand_keep_mask(original["dense2"]["kernel"], 27000)
    return dense


def _check_composite_output(original, out, stats):
    assert stats == EXPECTED_STATS
    assert out["dense1"]["kernel"].nnz == 9600
    assert out["dense2"]["kernel"].nnz == 3000
    assert not jc.is_compressed(out["dense3"]["kernel"])
    for layer in ("dense1", "dense2", "dense3"):
        assert not jc.is_compressed(out[layer]["bias"])
    materialized = jc.materialize(out)
    expected = _hand_masked_weights(original)
    for layer in ("dense1", "dense2", "dense3"):
        for name in ("kernel", "bias"):
            np.testing.assert_array_equal(
                np.asarray(materialized[layer][name], np.float64), expected[layer][name]
            )
    return materialized, expected


def test_composition_on_linen_params():
    x = jax.random.normal(jax.random.key(1), (3, 64), jnp.float32)
    model = LeNet300100()
    params = model.init(jax.random.key(0), jnp.zeros((1, 64), jnp.float32))["params"]
    out, stats = _composite()(params)
    materialized, expected = _check_composite_output(params, out, stats)
    y = model.apply({"params": materialized}, x)
    np.testing.assert_allclose(np.asarray(y), _hand_forward(expected, x), rtol=1e-4, atol=1e-5)


def _state_leaves(state):
    """An nnx.State (possibly holding compressed leaves) as a nested dict of its leaves."""
    return {
        layer: {name: state[layer][name].get_value() for name in ("kernel", "bias")}
        for layer in ("dense1", "dense2", "dense3")
    }


def test_composition_on_nnx_state():
    x = jax.random.normal(jax.random.key(1), (3, 64), jnp.float32)
    model = LeNet300100NNX(rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    original = nnx.to_pure_dict(params)
    out, stats = _composite()(params)
    assert isinstance(out, nnx.State)
    _, expected = _check_composite_output(original, _state_leaves(out), stats)
    materialized = jc.materialize(out)
    assert isinstance(materialized, nnx.State)
    merged = nnx.merge(graphdef, materialized, rest)
    y = merged(x)
    np.testing.assert_allclose(np.asarray(y), _hand_forward(expected, x), rtol=1e-4, atol=1e-5)
    # The compressed model really differs from the dense one...
    assert not np.allclose(np.asarray(y), np.asarray(model(x)), atol=1e-3)
    # ...and the original model and state were left dense.
    assert not jc.is_compressed(model.dense1.kernel[...])
    assert not jc.is_compressed(params["dense1"]["kernel"][...])


def test_linen_and_nnx_give_the_same_compressed_structure():
    x = jnp.zeros((1, 64), jnp.float32)
    linen_out, linen_stats = _composite()(LeNet300100().init(jax.random.key(0), x)["params"])
    _, nnx_params, _ = nnx.split(LeNet300100NNX(rngs=nnx.Rngs(0)), nnx.Param, ...)
    nnx_out, nnx_stats = _composite()(nnx_params)
    assert linen_stats == nnx_stats == EXPECTED_STATS
    assert _paths(linen_out) == _paths(nnx_out)
    kinds = [type(leaf).__name__ for leaf in jax.tree.leaves(linen_out, is_leaf=jc.is_compressed)]
    assert kinds == [
        type(leaf).__name__ for leaf in jax.tree.leaves(nnx_out, is_leaf=jc.is_compressed)
    ]


# --------------------------------------------------------------------------- jit


def test_jit_chain_of_layer_prunes_equals_eager():
    params = _small_params()
    tx = jc.chain(
        jc.prune(0.5, where="^a$"),
        jc.masked(jc.prune(0.5), "^b$"),
        jc.prune(0.5, where="^(c|bias)$"),  # a 2-D and a 1-D leaf
    )
    eager, eager_stats = tx(params)
    jitted, jit_stats = jax.jit(tx)(params)
    assert jax.tree.structure(eager) == jax.tree.structure(jitted)
    for e, j in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
        np.testing.assert_array_equal(np.asarray(e), np.asarray(j))
    assert jax.tree.map(int, jit_stats) == eager_stats
    assert eager_stats == (
        {"a": {"pruned": 2, "size": 4}},
        {"b": {"pruned": 3, "size": 6}},
        {"bias": {"pruned": 1, "size": 2}, "c": {"pruned": 2, "size": 4}},
    )
    expected = {
        "a": [[0.0, 4.0], [0.0, 8.0]],
        "b": [[0.0, 0.0, 0.0], [6.0, 7.0, 5.0]],
        "bias": [0.0, -1.0],  # |1| == |-1|: the lower index goes first
        "c": np.array([[0.0, 0.0], [0.3, 0.4]], np.float32),
    }
    for name, dense in jc.materialize(jitted).items():
        np.testing.assert_array_equal(np.asarray(dense), np.asarray(expected[name], np.float32))
        np.testing.assert_array_equal(np.asarray(dense), np.asarray(eager[name].materialize()))


# --------------------------------------------------------------------------- no mutation


def test_transforms_never_mutate_their_input():
    params = {
        "np": {"kernel": np.array([[2.0, -3.0, 0.25], [6.0, -7.0, 5.0]], np.float32)},
        "jax": {
            "kernel": jnp.array([[0.5, -4.0], [1.0, 8.0]], jnp.float32),
            "bias": jnp.array([1.0, 2.0], jnp.float32),
        },
    }
    snapshot = copy.deepcopy(jax.tree.map(np.asarray, params))
    leaves_before = jax.tree.leaves(params)
    structure_before = jax.tree.structure(params)

    transforms = [
        jc.prune(0.5),
        jc.prune(0.5, scope="global"),
        jc.chain(jc.prune(0.5, where="^np/"), jc.prune(0.25, where="^jax/kernel")),
        jc.masked(jc.prune(0.75, scope="global"), "kernel"),
        jc.partition(
            {"p": jc.prune(0.5), "k": jc.chain()},
            {"np": {"kernel": "p"}, "jax": {"kernel": "k", "bias": "k"}},
        ),
    ]
    for tx in transforms:
        out, _ = tx(params)
        assert jc.is_compressed(jax.tree.leaves(out, is_leaf=jc.is_compressed)[-1])
        # Same dict objects' contents, same leaf objects, same values.
        assert jax.tree.structure(params) == structure_before
        for before, now in zip(leaves_before, jax.tree.leaves(params), strict=True):
            assert before is now
        for expected, now in zip(jax.tree.leaves(snapshot), jax.tree.leaves(params), strict=True):
            np.testing.assert_array_equal(np.asarray(now), expected)
        # materialize builds a new container; editing it leaves the input alone.
        dense = jc.materialize(out)
        dense["np"]["kernel"] = None
        assert params["np"]["kernel"] is leaves_before[2]


def test_transforms_never_mutate_nnx_state():
    model = LeNet300100NNX(rngs=nnx.Rngs(0))
    _, params, _ = nnx.split(model, nnx.Param, ...)
    before = {
        path: np.asarray(leaf)
        for path, leaf in zip(_paths(params), jax.tree.leaves(params), strict=True)
    }
    out, _ = _composite()(params)
    assert jc.is_compressed(out["dense1"]["kernel"].get_value())
    for path, leaf in zip(_paths(params), jax.tree.leaves(params), strict=True):
        assert not jc.is_compressed(leaf)
        np.testing.assert_array_equal(np.asarray(leaf), before[path])
    np.testing.assert_array_equal(np.asarray(model.dense1.kernel[...]), before["dense1/kernel"])
