"""The symmetric grid spends all 2**b levels: a numpy reference, the error against the
old 2**b - 1-level grid, full code coverage, exact zeros, and files of the old grid."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcompress as jc
from jaxcompress.core.bitpack import unpack

FIXTURES = Path(__file__).parent / "fixtures"


def _groups(w, group_size):
    m, n = w.shape
    size = m if group_size is None else group_size
    return w.reshape(m // size, size, n)


def _new_grid(w, bits, group_size):
    """Reference: the smallest step of either orientation of [-2**(b-1), 2**(b-1)-1] that
    holds the range to within half a step (the short side to 2**(b-1) - 1/2 steps),
    or per group the old grid's step where that rounds better."""
    v = _groups(w, group_size)
    half = 2 ** (bits - 1)
    low = np.minimum(v.min(axis=1, keepdims=True), 0)
    high = np.maximum(v.max(axis=1, keepdims=True), 0)
    long_side, short_side = np.float32(1 / half), np.float32(1 / (half - 0.5))
    negative_long = np.maximum(-low * long_side, high * short_side)
    positive_long = np.maximum(high * long_side, -low * short_side)
    scale = np.where(negative_long <= positive_long, negative_long, -positive_long)
    new = np.clip(np.round(v / scale), -half, half - 1) * scale
    old = _old_grid(w, bits, group_size).reshape(v.shape)
    better = np.sum(np.square(old - v), axis=1, keepdims=True) < np.sum(
        np.square(new - v), axis=1, keepdims=True
    )
    return np.where(better, old, new).reshape(w.shape)


def _old_grid(w, bits, group_size):
    """Reference: the 2**b - 1-level grid of earlier versions, scale max|w| / (2**(b-1) - 1)."""
    v = _groups(w, group_size)
    qmax = 2 ** (bits - 1) - 1
    scale = np.abs(v).max(axis=1, keepdims=True) * np.float32(1 / qmax)
    return (np.clip(np.round(v / scale), -qmax, qmax) * scale).reshape(w.shape)


def test_the_old_grid_reference_is_what_earlier_versions_stored():
    want = np.load(FIXTURES / "quantized_15_levels.npz")
    w = np.random.default_rng(23).normal(size=(16, 6)).astype(np.float32)
    np.testing.assert_allclose(_old_grid(w, 4, None), want["int4_channel"], rtol=1e-6)


def _layers():
    rng = np.random.default_rng(0)
    plain = rng.normal(size=(256, 48)).astype(np.float32)
    outlier = plain.copy()
    outlier[rng.choice(256, 4, replace=False)] *= 10.0  # a few large input channels
    return {"plain": plain, "outlier": outlier}


LAYERS = _layers()
X = np.random.default_rng(1).normal(size=(64, 256)).astype(np.float32)


def _output_error(dense, w):
    return np.linalg.norm(X @ (np.asarray(dense, np.float32) - w)) / np.linalg.norm(X @ w)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group_size", [None, 128])
def test_matches_the_reference_and_is_never_worse_than_the_old_grid(bits, group_size):
    tx = jax.jit(jc.quantize(bits, group_size=group_size))
    quantized, _ = tx({name: jnp.asarray(w) for name, w in LAYERS.items()})
    for name, w in LAYERS.items():
        dense = np.asarray(quantized[name].materialize())
        np.testing.assert_allclose(dense, _new_grid(w, bits, group_size), rtol=1e-6, atol=1e-7)
        old = _old_grid(w, bits, group_size)
        errors = [np.sum(np.square(_groups(d - w, group_size)), axis=1) for d in (dense, old)]
        assert np.all(errors[0] <= errors[1]) and errors[0].sum() < errors[1].sum(), name
        assert _output_error(dense, w) < _output_error(old, w), name


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("mirror", [1.0, -1.0])
def test_codes_cover_all_levels_and_the_largest_magnitude_is_exact(bits, mirror):
    half = 2 ** (bits - 1)
    # -half .. half - 1 steps of 0.25; mirrored, the largest magnitude is positive.
    w = mirror * 0.25 * np.arange(-half, half, dtype=np.float32)
    q, _ = jc.quantize(bits, axis=None, where="w")({"w": jnp.asarray(w.reshape(-1, 2))})
    codes = np.asarray(unpack(q["w"].codes, bits, 2))
    assert sorted(codes.ravel().tolist()) == list(range(2**bits))
    assert float(q["w"].scale[0, 0]) == 0.25 * mirror  # the sign picks the long side
    np.testing.assert_array_equal(np.asarray(q["w"].materialize()).ravel(), w)


def test_zero_stays_exact():
    w = np.random.default_rng(2).normal(size=(32, 8)).astype(np.float32)
    w[::3] = 0.0
    pruned, _ = jc.chain(jc.prune(0.5, where="w"), jc.quantize(4, where="w"))({"w": jnp.asarray(w)})
    dense, _ = jc.quantize(4, group_size=8, where="w")({"w": jnp.asarray(w)})
    for leaf in (pruned["w"], dense["w"]):
        assert np.all(np.asarray(leaf.materialize())[w == 0] == 0.0)
    assert np.all(np.asarray(pruned["w"].materialize())[np.abs(w) < np.median(np.abs(w))] == 0.0)


def test_files_of_the_old_grid_decode_unchanged():
    # Written by jaxcompress before this grid (codes 1 .. 2**b - 1, positive scales).
    tree = jc.load(FIXTURES / "quantized_15_levels.jcz")
    want = np.load(FIXTURES / "quantized_15_levels.npz")
    assert sorted(tree) == sorted(want.files)
    for name, leaf in tree.items():
        np.testing.assert_array_equal(np.asarray(leaf.materialize()), want[name], err_msg=name)
    old = tree["int4_channel"]
    assert np.asarray(unpack(old.codes, 4, 6)).min() >= 1 and np.all(np.asarray(old.scale) > 0)
