"""Sparse: a pytree with static metadata, exact nbytes, nesting, jit."""

import math

import jax
import jax.numpy as jnp
import numpy as np

import jaxcompress as jc


def _sparse(shape=(5, 11), sparsity=0.6, dtype=jnp.float32):
    weight = jnp.asarray(np.random.default_rng(0).normal(size=shape), dtype)
    return weight, jc.prune(sparsity, where=jc.filters.floating)({"w": weight})[0]["w"]


def test_array_like_metadata():
    weight, sparse = _sparse()
    assert (sparse.shape, sparse.ndim, sparse.size, sparse.dtype) == ((5, 11), 2, 55, np.float32)
    assert sparse.kind == "sparse"
    assert sparse.nnz == 55 - math.floor(0.6 * 55)
    assert math.isclose(sparse.density, sparse.nnz / 55)
    assert sparse.mask.dtype == jnp.uint8 and sparse.mask.shape == (5, 2)
    assert "nnz=22" in repr(sparse)


def test_nbytes_counts_values_and_one_bit_per_entry_padded_per_row():
    _, sparse = _sparse((5, 11))
    assert sparse.nbytes == sparse.nnz * 4 + 5 * 2
    _, half = _sparse((3, 16), dtype=jnp.bfloat16)
    assert half.nbytes == half.nnz * 2 + 3 * 2


def test_flatten_unflatten_keeps_static_metadata_and_children():
    _, sparse = _sparse()
    children, treedef = jax.tree_util.tree_flatten(sparse)
    assert len(children) == 2  # values and mask; shape and dtype are static
    rebuilt = jax.tree_util.tree_unflatten(treedef, children)
    assert rebuilt.shape == sparse.shape and rebuilt.dtype == sparse.dtype
    np.testing.assert_array_equal(rebuilt.materialize(), sparse.materialize())


def test_sparse_passes_through_jit_and_tree_map():
    weight, sparse = _sparse()
    doubled = jax.jit(lambda s: jax.tree.map(lambda x: x * 2 if x.dtype == jnp.float32 else x, s))(
        sparse
    )
    assert isinstance(doubled, jc.Sparse)
    np.testing.assert_allclose(doubled.materialize(), 2 * sparse.materialize())


def test_materialize_keeps_kept_entries_exact_and_zeros_elsewhere():
    weight, sparse = _sparse((7, 3, 4), sparsity=0.5)
    dense = np.asarray(sparse.materialize())
    keep = np.asarray(sparse.keep_mask())
    np.testing.assert_array_equal(dense[keep], np.asarray(weight)[keep])
    assert (dense[~keep] == 0).all() and keep.sum() == sparse.nnz


def test_nested_values_are_materialized_first():
    weight, inner = _sparse((4, 8), sparsity=0.5)
    # A Sparse whose values are themselves a Sparse vector: zeros stay exact.
    values_sparse = jc.prune(0.25, where=jc.filters.floating)({"v": inner.values})[0]["v"]
    outer = jc.Sparse(values_sparse, inner.mask, inner.shape, inner.dtype)
    assert outer.nbytes == values_sparse.nbytes + inner.mask.size
    keep = np.asarray(inner.keep_mask())
    dense = np.asarray(outer.materialize())
    np.testing.assert_array_equal(dense[keep], np.asarray(values_sparse.materialize()))
    assert (dense[~keep] == 0).all()


def test_is_compressed():
    _, sparse = _sparse()
    assert jc.is_compressed(sparse)
    assert not jc.is_compressed(jnp.ones(3))
    assert not jc.is_compressed({"w": sparse})


def test_materialize_and_nbytes_on_mixed_trees():
    weight, sparse = _sparse()
    tree = {"w": sparse, "b": jnp.ones(11), "step": 3}
    dense = jc.materialize(tree)
    assert dense["b"] is tree["b"] and dense["step"] == 3
    np.testing.assert_array_equal(dense["w"], sparse.materialize())
    assert jc.nbytes(tree) == sparse.nbytes + 44 + np.asarray(3).nbytes
    assert jc.nbytes({}) == 0
