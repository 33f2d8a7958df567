"""The bounded-memory paths equal the simple ones: chain leaf by leaf, chunked pruning."""

import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcompress as jc
from jaxcompress.numerics import kmeans1d
from jaxcompress.transforms.base import LeafPass, Transform, _leaf_passes

# The modules themselves: the package exports factories of the same names.
prune_module = sys.modules["jaxcompress.methods.prune"]


def _tree(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "embed": jnp.asarray(rng.standard_t(3, size=(1200, 64)), jnp.float32),
        "layer": {
            "kernel": jnp.asarray(rng.normal(size=(64, 300)), jnp.bfloat16),
            "bias": jnp.zeros(300),
        },
        "ties": jnp.asarray(rng.integers(-4, 5, size=(50, 40)), jnp.float32),
        "step": jnp.int32(3),
    }


def _assert_identical(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.atleast_1d(np.asarray(x)), np.atleast_1d(np.asarray(y))
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.array_equal(x.view(np.uint8), y.view(np.uint8))


@pytest.mark.parametrize(
    "stages",
    [
        lambda: (jc.prune(0.5, scope="global"), jc.cluster(bits=4)),
        lambda: (jc.prune(0.7), jc.cluster(bits=3, init="density")),
        lambda: (jc.prune(0.5, where="embed"), jc.prune(0.25, where="kernel"), jc.cluster(bits=2)),
    ],
)
def test_chain_leaf_by_leaf_equals_stage_by_stage(stages):
    params = _tree()
    transforms = stages()
    assert _leaf_passes(transforms, params, key=None, data=None) is not None
    fused, fused_stats = jc.chain(*transforms)(params)
    expected, expected_stats = params, []
    for tx in transforms:
        expected, stats = tx(expected)
        expected_stats.append(stats)
    _assert_identical(fused, expected)
    _assert_identical(fused_stats, tuple(expected_stats))
    assert [list(s) for s in fused_stats] == [list(s) for s in expected_stats]


def _spied(tx, log, stage):
    """``tx`` with its leaf passes recording ``(leaf path, stage)`` as each step runs."""

    def leafwise(params, data):
        leaf_pass = tx.leafwise(params, data)
        if leaf_pass is None:
            return None

        def step(entry):
            log.append((entry.path, stage))
            return leaf_pass.step(entry)

        return LeafPass(leaf_pass.select, step)

    return Transform(tx.apply, tx.name, leafwise)


def _wanda_data(params):
    """Hand-built input statistics for the ``(64, 300)`` kernel of :func:`_tree`."""
    x = jnp.asarray(np.random.default_rng(3).normal(size=(32, 64)), jnp.float32)
    stats = jc.InputStats(jnp.float32(32), x.mean(0), x.T @ x / 32, None, None)
    return {"layer": {"kernel": stats}}


# Each factory of the per-leaf engine, as the first and as a later stage of a chain.
_PAIRS = {
    "prune_quantize": lambda: (jc.prune(0.5, scope="global"), jc.quantize(4)),
    "wanda_quantize": lambda: (
        jc.prune(0.5, importance="wanda", where="kernel"),
        jc.quantize(8, axis=None),
    ),
    "nm_cluster": lambda: (jc.prune_nm("2:4", where=("embed", "kernel")), jc.cluster(bits=3)),
    "blocks_quantize": lambda: (jc.prune_blocks(0.5, block=(2, 2)), jc.quantize(4, axis=None)),
    "global_blocks_prune": lambda: (
        jc.prune_blocks(0.5, block=(2, 2), scope="global", where=("embed", "ties")),
        jc.prune_nm("2:4", where="kernel"),
    ),
    "quantize_low_rank": lambda: (jc.quantize(4, where="ties"), jc.low_rank(8, where="embed")),
    "low_rank_cluster": lambda: (jc.low_rank(8, where="embed"), jc.cluster(bits=2, where="ties")),
    "cluster_nm": lambda: (jc.cluster(bits=4, where="ties"), jc.prune_nm("1:2", where="kernel")),
}


@pytest.mark.parametrize("pair", sorted(_PAIRS))
def test_every_factory_chains_leaf_by_leaf(pair):
    params = _tree()
    data = _wanda_data(params) if pair.startswith("wanda") else None
    log = []
    transforms = tuple(_spied(tx, log, i) for i, tx in enumerate(_PAIRS[pair]()))
    fused, fused_stats = jc.chain(*transforms)(params, data=data)
    expected, expected_stats = params, []
    for tx in transforms:
        expected, stats = tx(expected, data=data)
        expected_stats.append(stats)
    _assert_identical(fused, expected)
    _assert_identical(fused_stats, tuple(expected_stats))
    assert [list(s) for s in fused_stats] == [list(s) for s in expected_stats]
    # Leaf by leaf: every stage's steps on one leaf come before the next leaf's.
    paths = [path for path, _ in log]
    assert log and all(stages for stages in fused_stats)
    assert paths == sorted(paths, key=paths.index)
    assert all(
        [stage for path, stage in log if path == leaf]
        == sorted(stage for path, stage in log if path == leaf)
        for leaf in set(paths)
    )
    # Both stages touched some leaf while the tree was walked once.
    assert {stage for _, stage in log} == {0, 1}


def test_chain_falls_back_where_a_stage_needs_the_whole_tree():
    params = _tree()
    later_global = (jc.prune(0.5), jc.prune(0.5, scope="global"))
    assert _leaf_passes(later_global, params, key=None, data=None) is None
    keyed = (jc.prune(0.5), jc.cluster(bits=2, init="kmeans++"))
    assert _leaf_passes(keyed, params, key=jax.random.key(0), data=None) is None
    out, _ = jc.chain(*keyed)(params, key=jax.random.key(0))
    assert isinstance(out["embed"].values, jc.Clustered)


@pytest.mark.bitwise
def test_chain_leaf_by_leaf_under_jit_is_not_used():
    params = {"w": jnp.arange(1.0, 65.0).reshape(8, 8)}
    tx = jc.chain(jc.prune(0.5), jc.cluster(bits=2))

    @jax.jit
    def run(p):
        assert _leaf_passes((jc.prune(0.5), jc.cluster(bits=2)), p, key=None, data=None) is None
        return jc.materialize(tx(p)[0])

    _assert_identical(run(params), jc.materialize(tx(params)[0]))


def test_chain_leaf_by_leaf_raises_what_the_stages_raise():
    params = {"a": jnp.ones((4, 4)), "b": jnp.array([[1.0, jnp.nan], [2.0, 3.0]])}
    with pytest.raises(ValueError, match="'b' contains NaN"):
        jc.chain(jc.prune(0.5, scope="global"), jc.cluster(bits=2))(params)


def _mask_then_values(weight, num_pruned):
    keep = prune_module.magnitude_keep_mask(weight, num_pruned)
    return prune_module.sparse_from_mask(weight, keep, math.prod(weight.shape) - num_pruned)


@pytest.mark.parametrize("shape", [(7,), (3, 5), (300, 700), (1, 70000), (513, 257)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_chunked_magnitude_sparse_equals_mask_then_gather(shape, dtype):
    rng = np.random.default_rng(1)
    size = math.prod(shape)
    for weight in (
        jnp.asarray(rng.normal(size=shape), dtype),
        # Many ties, and exact zeros, at every threshold.
        jnp.asarray(rng.integers(-3, 4, size=shape), dtype),
    ):
        for num_pruned in sorted({0, 1, size // 3, size // 2, size - 1, size}):
            got = prune_module.magnitude_sparse(weight, num_pruned)
            want = _mask_then_values(weight, num_pruned)
            _assert_identical(got, want)


def test_assign_fallback_equals_searchsorted():
    rng = np.random.default_rng(2)
    centroids = jnp.sort(jnp.asarray(rng.normal(size=16), jnp.float32))
    # One far value makes the lookup table too coarse, so the search branch runs.
    values = jnp.asarray(np.concatenate([rng.normal(size=5000), [1e4]]), jnp.float32)
    boundaries = (centroids[:-1] + centroids[1:]) * 0.5
    want = jnp.searchsorted(boundaries, values, side="right")
    got = kmeans1d.assign_fast(values, centroids, jnp.min(values), jnp.max(values))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
