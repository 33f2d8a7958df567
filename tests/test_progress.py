"""progress=True on the per-leaf transforms: same results, a bar only outside jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcompress as jc
from jaxcompress.core.progress import leaf_bytes, over_leaves

PARAMS = {"a": jax.random.normal(jax.random.key(0), (64, 32)), "b": jnp.ones((32, 16))}
X = jax.random.normal(jax.random.key(1), (128, 64))
LABELS = jnp.arange(128) % 2


def _apply(params, x):
    return jnp.tanh(x @ params["a"]) @ params["b"]


def _input_stats(x):
    """Statistics of inputs ``x`` with the two classes of ``LABELS``, as calibrate gives."""
    counts = jnp.bincount(LABELS, length=2).astype(jnp.float32)
    class_mean = jnp.stack([x[c == LABELS].mean(0) for c in range(2)])
    return jc.InputStats(jnp.float32(len(x)), x.mean(0), x.T @ x / len(x), counts, class_mean)


# The transforms read what they need: projections the stats, the others nothing.
DATA = {"a": _input_stats(X), "b": _input_stats(jnp.tanh(X @ PARAMS["a"]))}


@pytest.mark.parametrize(
    "make",
    [
        lambda progress: jc.prune(0.5, progress=progress),
        lambda progress: jc.quantize(4, progress=progress),
        lambda progress: jc.cluster(bits=3, progress=progress),
        lambda progress: jc.prune_nm("2:4", progress=progress),
        lambda progress: jc.prune_blocks(0.5, progress=progress),
        lambda progress: jc.low_rank(4, progress=progress),
        lambda progress: jc.pca(4, progress=progress),
        lambda progress: jc.lda(1, progress=progress),
        lambda progress: jc.prune_units(
            0.5, apply_fn=_apply, example_input=X[:4], where="a", progress=progress
        ),
    ],
    ids=["prune", "quantize", "cluster", "prune_nm", "prune_blocks", "low_rank", "pca", "lda"]
    + ["prune_units"],
)
def test_progress_changes_nothing_but_the_display(make):
    quiet, _ = make(False)(PARAMS, data=DATA)
    shown, _ = make(True)(PARAMS, data=DATA)
    for a, b in zip(jax.tree.leaves(quiet), jax.tree.leaves(shown), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_the_bar_advances_by_leaf_bytes_and_yields_every_item():
    sizes = [leaf_bytes(leaf) for leaf in PARAMS.values()]
    assert sizes == [64 * 32 * 4, 32 * 16 * 4]
    items = list(over_leaves(["a", "b"], sizes=sizes, description="test", enabled=True))
    assert items == ["a", "b"]
    with pytest.raises(ValueError):  # one size per item
        list(over_leaves(["a", "b"], sizes=[1], description="test", enabled=True))
