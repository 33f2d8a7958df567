"""prune_blocks: whole tiles kept or zeroed, exact counts, numpy reference, jit, sharding."""

import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxcompress as jc


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(8, name="out")(nn.relu(nn.Dense(16, name="hidden")(x)))


def _keep(sparse: jc.Sparse) -> np.ndarray:
    """The stored keep-mask of ``sparse`` as a ``(K, N)`` boolean matrix."""
    columns = sparse.shape[-1]
    bits = np.unpackbits(np.asarray(sparse.mask), axis=-1, bitorder="little")[..., :columns]
    return bits.astype(bool).reshape(-1, columns)


def _tiles(matrix: np.ndarray, block) -> np.ndarray:
    """``(K / bk, N / bn, bk, bn)`` tiles of a ``(K, N)`` matrix."""
    bk, bn = block
    rows, columns = matrix.shape
    return matrix.reshape(rows // bk, bk, columns // bn, bn).transpose(0, 2, 1, 3)


def _reference_scores(weight, block, importance) -> np.ndarray:
    tiles = np.abs(_tiles(np.asarray(weight, np.float64).reshape(-1, weight.shape[-1]), block))
    if importance == "l2":
        return np.sqrt((tiles**2).sum(axis=(2, 3)))
    if importance == "l1":
        return tiles.sum(axis=(2, 3))
    return tiles.max(axis=(2, 3))


def _reference_tile_keep(weight, block, importance, count) -> np.ndarray:
    scores = _reference_scores(weight, block, importance)
    keep = np.ones(scores.size, bool)
    keep[np.argsort(scores.reshape(-1), kind="stable")[:count]] = False
    return keep.reshape(scores.shape)


def _tile_keep_of(sparse: jc.Sparse, block) -> np.ndarray:
    """Each tile's keep flag; asserts every tile is kept or zeroed whole."""
    tiles = _tiles(_keep(sparse), block)
    whole = tiles.all(axis=(2, 3))
    assert np.array_equal(whole, tiles.any(axis=(2, 3))), "a tile is partly kept"
    return whole


@pytest.mark.parametrize("importance", ["l2", "l1", "max"])
@pytest.mark.parametrize(
    ("shape", "block", "sparsity"),
    [((16, 12), (4, 4), 0.5), ((16, 12), (2, 3), 0.29), ((3, 3, 4, 8), (4, 2), 0.7)],
)
def test_lowest_scoring_tiles_are_zeroed_whole_and_counted_exactly(
    importance, shape, block, sparsity
):
    w = jax.random.normal(jax.random.key(2), shape)
    sparse, stats = jc.prune_blocks(sparsity, block=block, importance=importance)({"w": w})
    sparse = sparse["w"]
    assert isinstance(sparse, jc.Sparse)
    tiles = math.prod(shape) // math.prod(block)
    count = math.floor(Fraction(str(sparsity)) * tiles)
    tile_keep = _tile_keep_of(sparse, block)
    assert (~tile_keep).sum() == count
    np.testing.assert_array_equal(tile_keep, _reference_tile_keep(w, block, importance, count))
    assert stats["w"] == {
        "pruned": count * math.prod(block),
        "size": math.prod(shape),
        "blocks_pruned": count,
        "blocks": tiles,
        "block": block,
    }
    assert sparse.nnz == math.prod(shape) - count * math.prod(block)
    dense = np.asarray(jc.materialize(sparse))
    assert dense.shape == shape
    keep = _keep(sparse).reshape(shape)
    np.testing.assert_array_equal(dense, np.where(keep, np.asarray(w), 0.0))


def test_each_importance_keeps_a_different_tile():
    # Tile A: one large entry (best by max); B: four medium ones (best by l1);
    # C: two large-ish ones (best by l2: sqrt(2) * 2.3 > 3.2, while 4.6 < 4.8 in l1).
    w = jnp.array([[3.2, 0.0, 1.2, 1.2, 2.3, 2.3], [0.0, 0.0, 1.2, 1.2, 0.0, 0.0]])
    kept = {
        importance: _tile_keep_of(
            jc.prune_blocks(0.67, block=(2, 2), importance=importance)({"w": w})[0]["w"], (2, 2)
        ).tolist()
        for importance in ("l2", "l1", "max")
    }
    assert kept == {
        "max": [[True, False, False]],
        "l1": [[False, True, False]],
        "l2": [[False, False, True]],
    }


def test_ties_go_by_row_major_tile_index():
    sparse, stats = jc.prune_blocks(0.5, block=(2, 2))({"w": jnp.ones((4, 4))})
    assert _tile_keep_of(sparse["w"], (2, 2)).tolist() == [[False, False], [True, True]]
    assert stats["w"]["blocks_pruned"] == 2


def test_layer_scope_under_jit_matches_eager():
    params = {"a": jax.random.normal(jax.random.key(3), (3, 3, 4, 8)), "b": jnp.ones(8)}
    tx = jc.prune_blocks(0.6, block=(4, 4), importance="l1")
    eager, eager_stats = tx(params)
    jitted, jitted_stats = jax.jit(tx)(params)
    assert jitted_stats == eager_stats
    assert jitted_stats["a"]["blocks_pruned"] == math.floor(0.6 * 18)
    np.testing.assert_array_equal(jitted["a"].mask, eager["a"].mask)
    np.testing.assert_array_equal(jitted["a"].values, eager["a"].values)
    np.testing.assert_array_equal(jitted["b"], params["b"])
    np.testing.assert_array_equal(jax.jit(jc.materialize)(jitted)["a"], jc.materialize(eager)["a"])


def test_linen_model_still_computes():
    x = jax.random.normal(jax.random.key(1), (5, 12))
    model = _MLP()
    params = model.init(jax.random.key(0), x)["params"]
    dense_out = model.apply({"params": params}, x)
    none, _ = jc.prune_blocks(0.0)(params)
    np.testing.assert_array_equal(model.apply({"params": jc.materialize(none)}, x), dense_out)
    pruned, stats = jc.prune_blocks(0.5)(params)
    assert set(stats) == {"hidden/kernel", "out/kernel"}
    assert stats["hidden/kernel"]["blocks_pruned"] == 6  # (12, 16) in 4x4 tiles: 12
    assert stats["out/kernel"]["blocks_pruned"] == 4  # (16, 8): 8
    assert not jc.is_compressed(pruned["hidden"]["bias"])
    out = jax.jit(lambda p: model.apply({"params": jc.materialize(p)}, x))(pruned)
    assert out.shape == dense_out.shape
    assert not np.allclose(out, dense_out)


def test_nnx_model_under_jit():
    model = nnx.Linear(16, 8, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    tx = jc.prune_blocks(0.75, block=(8, 4), where=r"kernel")
    eager, _ = tx(state)
    jitted, stats = jax.jit(tx)(state)
    assert stats["kernel"]["blocks_pruned"] == 3
    restored = jc.materialize(jitted)
    np.testing.assert_array_equal(
        restored["kernel"].get_value(), jc.materialize(eager)["kernel"].get_value()
    )
    kernel = np.asarray(restored["kernel"].get_value())
    assert (kernel == 0).sum() == 3 * 32
    out = nnx.merge(graphdef, restored)(jnp.ones((2, 16)))
    assert out.shape == (2, 8)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_sharded_input_matches_unsharded_and_keeps_sharding(mesh8, scope):
    params = {
        "a": jax.random.normal(jax.random.key(4), (16, 8)),
        "b": jax.random.normal(jax.random.key(5), (32, 16)),
    }
    spec = P("data", "model")
    sharded = jax.device_put(params, NamedSharding(mesh8, spec))
    tx = jc.prune_blocks(0.5, block=(4, 2), scope=scope)
    want, want_stats = tx(params)
    got, got_stats = tx(sharded)
    assert got_stats == want_stats
    for path in ("a", "b"):
        sparse = got[path]
        np.testing.assert_array_equal(sparse.values, want[path].values)
        np.testing.assert_array_equal(sparse.mask, want[path].mask)
        # The packed mask is laid out like the weight: it keeps the weight's row sharding.
        assert sparse.mask.sharding.mesh == mesh8
        assert sparse.mask.sharding.spec[0] == "data"
        # The flat values split over the same mesh axes (nnz divides by the 8 devices).
        assert sparse.nnz % 8 == 0
        assert sparse.values.sharding.is_equivalent_to(
            NamedSharding(mesh8, P(("data", "model"))), 1
        )
        dense = jc.materialize(got)[path]
        np.testing.assert_array_equal(dense, jc.materialize(want)[path])


def test_global_scope_ranks_all_tiles_together_with_an_exact_total():
    small = jax.random.normal(jax.random.key(6), (8, 8)) * 0.1
    large = jax.random.normal(jax.random.key(7), (3, 3, 8, 4))
    params = {"small": small, "large": large, "bias": jnp.ones(4)}
    for importance, sparsity in (("l2", 0.3), ("l1", 0.45)):
        pruned, stats = jc.prune_blocks(
            sparsity, block=(4, 4), importance=importance, scope="global"
        )(params)
        total_tiles = 4 + 18
        count = math.floor(Fraction(str(sparsity)) * total_tiles)
        assert stats["small"]["blocks"] + stats["large"]["blocks"] == total_tiles
        assert stats["small"]["blocks_pruned"] + stats["large"]["blocks_pruned"] == count
        # One numpy ranking over both leaves (tiles are the same size, so per-element
        # normalisation does not change the order), ties in leaf order.
        scores = np.concatenate(
            [_reference_scores(w, (4, 4), importance).reshape(-1) for w in (small, large)]
        )
        keep = np.ones(total_tiles, bool)
        keep[np.argsort(scores, kind="stable")[:count]] = False
        got = np.concatenate(
            [_tile_keep_of(pruned[path], (4, 4)).reshape(-1) for path in ("small", "large")]
        )
        np.testing.assert_array_equal(got, keep)
        # The small leaf's tiles go first: it loses all 4, the large leaf the rest.
        assert stats["small"]["blocks_pruned"] == 4
        assert pruned["small"].nnz == 0
        assert not jc.is_compressed(pruned["bias"])


def test_global_ties_follow_leaf_order_and_layer_scope_would_differ():
    params = {"a": jnp.ones((4, 4)), "b": jnp.ones((4, 4))}
    _, stats = jc.prune_blocks(0.75, block=(2, 2), scope="global")(params)
    assert stats["a"]["blocks_pruned"] == 4 and stats["b"]["blocks_pruned"] == 2
    _, stats = jc.prune_blocks(0.75, block=(2, 2))(params)
    assert stats["a"]["blocks_pruned"] == 3 and stats["b"]["blocks_pruned"] == 3


def test_global_scope_under_jit_says_why_it_cannot():
    with pytest.raises(ValueError, match=r"prune_blocks\(.*scope='global' needs concrete arrays"):
        jax.jit(jc.prune_blocks(0.5, scope="global"))({"w": jnp.ones((4, 4))})


def test_empty_selection_is_not_an_error():
    assert jc.prune_blocks(0.5)({}) == ({}, {})
    assert jc.prune_blocks(0.5, scope="global")({"bias": jnp.ones(4)})[1] == {}


def test_indivisible_leaf_is_named_with_shape_and_block():
    params = {"good": {"kernel": jnp.ones((8, 8))}, "bad": {"kernel": jnp.ones((6, 8))}}
    for scope in ("layer", "global"):
        with pytest.raises(
            ValueError, match=r"prune_blocks\(.*'bad/kernel' of shape \(6, 8\).*block \(4, 4\)"
        ):
            jc.prune_blocks(0.5, scope=scope, where="kernel")(params)
    # A conv kernel's rows are h * w * in: (3, 3, 2, 8) has 18, not a multiple of 4.
    with pytest.raises(ValueError, match=r"'conv' of shape \(3, 3, 2, 8\).*\(18, 8\)"):
        jc.prune_blocks(0.5, where="conv")({"conv": jnp.ones((3, 3, 2, 8))})
    with pytest.raises(ValueError, match=r"'w' of shape \(8, 6\)"):
        jc.prune_blocks(0.5, where="w")({"w": jnp.ones((8, 6))})


@pytest.mark.parametrize("block", [(0, 4), (4,), (4, 4, 4), "4x4", (4.0, 4), (True, 4), (-2, 2), 4])
def test_bad_block(block):
    with pytest.raises(ValueError, match=r"prune_blocks: block must be a tuple of two positive"):
        jc.prune_blocks(0.5, block=block)


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="prune_blocks: importance"):
        jc.prune_blocks(0.5, importance="magnitude")
    with pytest.raises(ValueError, match="prune_blocks: scope"):
        jc.prune_blocks(0.5, scope="model")
    for sparsity in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"prune_blocks: sparsity must be in \[0, 1\)"):
            jc.prune_blocks(sparsity)
    with pytest.raises(TypeError, match="prune_blocks: sparsity"):
        jc.prune_blocks("0.5")


@pytest.mark.parametrize(
    ("leaf", "error", "message"),
    [
        (jnp.ones((4, 4), jnp.int32), TypeError, "int32"),
        (jnp.array([[1.0, jnp.nan], [1.0, 2.0]]), ValueError, "NaN or Inf"),
        (jnp.array(1.0), ValueError, "scalar"),
    ],
)
def test_bad_leaves_name_the_path(leaf, error, message):
    params = {"good": jnp.ones((4, 4)), "bad": leaf}
    with pytest.raises(error, match=f"prune_blocks.*'bad'.*{message}|{message}.*'bad'"):
        jc.prune_blocks(0.5, block=(2, 2), where=r"good|bad")(params)


def test_already_compressed_leaf_is_refused():
    pruned, _ = jc.prune_blocks(0.5)({"w": jnp.ones((4, 4))})
    with pytest.raises(TypeError, match="already compressed"):
        jc.prune_blocks(0.5)(pruned)
