"""progress=True on the per-leaf transforms: same results, a bar only outside jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcompress as jc
from jaxcompress.core.progress import leaf_bytes, over_leaves

PARAMS = {"a": jax.random.normal(jax.random.key(0), (64, 32)), "b": jnp.ones((32, 16))}


@pytest.mark.parametrize(
    "make",
    [
        lambda progress: jc.prune(0.5, progress=progress),
        lambda progress: jc.quantize(4, progress=progress),
        lambda progress: jc.cluster(bits=3, progress=progress),
        lambda progress: jc.prune_nm("2:4", progress=progress),
    ],
    ids=["prune", "quantize", "cluster", "prune_nm"],
)
def test_progress_changes_nothing_but_the_display(make):
    quiet, _ = make(False)(PARAMS)
    shown, _ = make(True)(PARAMS)
    for a, b in zip(jax.tree.leaves(quiet), jax.tree.leaves(shown), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_the_bar_advances_by_leaf_bytes_and_yields_every_item():
    sizes = [leaf_bytes(leaf) for leaf in PARAMS.values()]
    assert sizes == [64 * 32 * 4, 32 * 16 * 4]
    items = list(over_leaves(["a", "b"], sizes=sizes, description="test", enabled=True))
    assert items == ["a", "b"]
    with pytest.raises(ValueError):  # one size per item
        list(over_leaves(["a", "b"], sizes=[1], description="test", enabled=True))
