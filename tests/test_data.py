"""Tests for the embedded digits data set."""

import numpy as np
import pytest

from jaxcompress.examples.data import load_digits


@pytest.mark.parametrize(("split", "n"), [("train", 1437), ("test", 360)])
def test_shapes_dtypes_and_ranges(split, n):
    x, y = load_digits(split=split)
    assert x.shape == (n, 64) and x.dtype == np.float32
    assert y.shape == (n,) and y.dtype == np.int32
    assert x.min() == 0.0 and x.max() == 1.0
    # Pixels are integer counts 0..16 scaled by 1/16.
    np.testing.assert_array_equal(x * 16, np.round(x * 16))
    assert set(np.unique(y)) == set(range(10))


def test_unflattened_is_nhwc_view_of_flat():
    x_flat, y_flat = load_digits(split="test")
    x, y = load_digits(split="test", flatten=False)
    assert x.shape == (360, 8, 8, 1)
    np.testing.assert_array_equal(x.reshape(360, 64), x_flat)
    np.testing.assert_array_equal(y, y_flat)


def test_split_is_stratified_and_disjoint():
    x_tr, y_tr = load_digits(split="train")
    x_te, y_te = load_digits(split="test")
    assert len(y_tr) + len(y_te) == 1797
    # Every image in the source set is unique, so an index-disjoint split shares no rows.
    train_rows = {row.tobytes() for row in x_tr}
    assert not any(row.tobytes() in train_rows for row in x_te)
    # Stratified: each class makes up about the same fraction of both splits.
    frac_tr = np.bincount(y_tr, minlength=10) / len(y_tr)
    frac_te = np.bincount(y_te, minlength=10) / len(y_te)
    np.testing.assert_allclose(frac_tr, frac_te, atol=0.01)


def test_returns_fresh_arrays():
    x, _ = load_digits()
    x[:] = -1.0
    assert load_digits()[0].min() == 0.0


@pytest.mark.parametrize("split", ["val", "TRAIN", ""])
def test_bad_split_raises(split):
    with pytest.raises(ValueError, match="split"):
        load_digits(split=split)
