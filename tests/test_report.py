"""Tests for jc.summarize / jc.Report and jc.nbytes against hand-computed numbers."""

from __future__ import annotations

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxcompress as jc
from jaxcompress.examples.models import LeNet300100NNX

ROW_KEYS = {
    "path",
    "shape",
    "kind",
    "original_bytes",
    "compressed_bytes",
    "ratio",
    "density",
    "relative_error",
}


def _params():
    return {
        "big": jnp.arange(1.0, 31.0, dtype=jnp.float32).reshape(3, 10),
        "cube": jnp.arange(1.0, 55.0, dtype=jnp.float32).reshape(2, 3, 9),
        "layer": {
            "bias": jnp.array([0.0, 2.0, 3.0], jnp.float32),
            "kernel": jnp.array([[1.0, -4.0, 2.0, 0.5], [3.0, -0.1, 5.0, 6.0]], jnp.float32),
        },
    }


def _compressed(params):
    # big: floor(0.7 * 30) = 21 pruned; cube: floor(0.5 * 54) = 27; kernel: 4 of 8.
    tx = jc.chain(
        jc.masked(jc.prune(0.7), "^big$"),
        jc.masked(jc.prune(0.5), ("^cube$", "kernel")),
    )
    return tx(params)[0]


def _sum_squares(values):
    return sum(float(v) ** 2 for v in values)


# Hand-computed per-row numbers, in pytree (sorted key) order.
#   big (3, 10) f32: keeps 22..30 -> 9 values * 4 B + 3 rows * ceil(10 / 8) = 2 B of mask.
#   cube (2, 3, 9) f32: keeps 28..54 -> 27 * 4 B + 6 rows * ceil(9 / 8) = 2 B of mask.
#   layer/bias (3,) f32: untouched, 12 B; one zero entry, so density 2/3.
#   layer/kernel (2, 4) f32: keeps -4, 3, 5, 6 -> 4 * 4 B + 2 rows * 1 B of mask.
EXPECTED_ROWS = [
    {
        "path": "big",
        "shape": (3, 10),
        "kind": "sparse",
        "original_bytes": 120,
        "compressed_bytes": 9 * 4 + 3 * 2,
        "density": 9 / 30,
        "relative_error": math.sqrt(_sum_squares(range(1, 22)) / _sum_squares(range(1, 31))),
    },
    {
        "path": "cube",
        "shape": (2, 3, 9),
        "kind": "sparse",
        "original_bytes": 216,
        "compressed_bytes": 27 * 4 + 6 * 2,
        "density": 0.5,
        "relative_error": math.sqrt(_sum_squares(range(1, 28)) / _sum_squares(range(1, 55))),
    },
    {
        "path": "layer/bias",
        "shape": (3,),
        "kind": "dense",
        "original_bytes": 12,
        "compressed_bytes": 12,
        "density": 2 / 3,
        "relative_error": 0.0,
    },
    {
        "path": "layer/kernel",
        "shape": (2, 4),
        "kind": "sparse",
        "original_bytes": 32,
        "compressed_bytes": 18,
        "density": 0.5,
        "relative_error": math.sqrt(
            _sum_squares([1.0, 2.0, 0.5, 0.1])
            / _sum_squares([1.0, 4.0, 2.0, 0.5, 3.0, 0.1, 5.0, 6.0])
        ),
    },
]
TOTAL_ORIGINAL = 120 + 216 + 12 + 32  # 380
TOTAL_COMPRESSED = 42 + 120 + 12 + 18  # 192


def _sparse_bytes(shape, nnz, itemsize):
    return nnz * itemsize + math.prod(shape[:-1]) * math.ceil(shape[-1] / 8)


def test_sparse_bytes_formula_matches_hand_numbers():
    assert _sparse_bytes((3, 10), 9, 4) == 42
    assert _sparse_bytes((2, 3, 9), 27, 4) == 120
    assert _sparse_bytes((2, 4), 4, 4) == 18
    compressed = _compressed(_params())
    for name, shape, nnz in (("big", (3, 10), 9), ("cube", (2, 3, 9), 27)):
        leaf = compressed[name]
        assert leaf.nnz == nnz
        assert leaf.mask.shape == (*shape[:-1], math.ceil(shape[-1] / 8))
        assert leaf.nbytes == _sparse_bytes(shape, nnz, 4)


def test_summarize_rows_match_hand_computation():
    params = _params()
    report = jc.summarize(params, _compressed(params))
    assert isinstance(report, jc.Report)
    assert len(report.rows) == len(EXPECTED_ROWS)
    for row, expected in zip(report.rows, EXPECTED_ROWS, strict=True):
        assert isinstance(row, jc.LeafReport)
        assert row.path == expected["path"]
        assert row.shape == expected["shape"]
        assert row.kind == expected["kind"]
        assert row.original_bytes == expected["original_bytes"]
        assert row.compressed_bytes == expected["compressed_bytes"]
        assert row.ratio == pytest.approx(
            expected["original_bytes"] / expected["compressed_bytes"], rel=1e-12
        )
        assert row.density == pytest.approx(expected["density"], rel=1e-12)
        assert row.relative_error == pytest.approx(expected["relative_error"], rel=1e-5)


def test_summarize_totals():
    params = _params()
    report = jc.summarize(params, _compressed(params))
    assert report.original_bytes == TOTAL_ORIGINAL == 380
    assert report.compressed_bytes == TOTAL_COMPRESSED == 192
    assert report.ratio == pytest.approx(380 / 192, rel=1e-12)
    assert repr(report) == "Report(4 leaves, 380 B -> 192 B, 1.98x)"


def test_summarize_identity_is_exact():
    params = _params()
    report = jc.summarize(params, params)
    assert [row.kind for row in report.rows] == ["dense"] * 4
    assert [row.relative_error for row in report.rows] == [0.0] * 4
    assert [row.ratio for row in report.rows] == [1.0] * 4
    assert report.original_bytes == report.compressed_bytes == 380
    assert report.ratio == 1.0


def test_summarize_dense_replacement_and_zero_leaves():
    original = {"v": jnp.array([3.0, 4.0], jnp.float32), "z": jnp.zeros(2, jnp.float32)}
    rows = jc.summarize(original, {"v": jnp.array([0.0, 4.0], jnp.float32), "z": original["z"]})
    v, z = rows.rows
    assert v.kind == "dense"
    assert v.density == 0.5
    assert v.relative_error == pytest.approx(3.0 / 5.0, rel=1e-6)
    assert (v.original_bytes, v.compressed_bytes, v.ratio) == (8, 8, 1.0)
    # An all-zero original copied exactly: no error, no nonzeros.
    assert (z.relative_error, z.density) == (0.0, 0.0)
    # An all-zero original approximated by nonzeros: infinite relative error.
    rows = jc.summarize({"z": jnp.zeros(2)}, {"z": jnp.ones(2)})
    assert rows.rows[0].relative_error == math.inf


def test_to_dict_is_json_serialisable():
    params = _params()
    report = jc.summarize(params, _compressed(params))
    as_dict = report.to_dict()
    assert set(as_dict) == {"original_bytes", "compressed_bytes", "ratio", "leaves"}
    decoded = json.loads(json.dumps(as_dict))
    assert decoded == as_dict
    assert decoded["original_bytes"] == 380
    assert decoded["compressed_bytes"] == 192
    assert decoded["ratio"] == pytest.approx(380 / 192, rel=1e-12)
    assert len(decoded["leaves"]) == 4
    for leaf, expected in zip(decoded["leaves"], EXPECTED_ROWS, strict=True):
        assert set(leaf) == ROW_KEYS
        assert leaf["path"] == expected["path"]
        assert leaf["shape"] == list(expected["shape"])
        assert leaf["kind"] == expected["kind"]
        assert leaf["original_bytes"] == expected["original_bytes"]
        assert leaf["compressed_bytes"] == expected["compressed_bytes"]
        assert leaf["density"] == pytest.approx(expected["density"], rel=1e-12)
        assert leaf["relative_error"] == pytest.approx(expected["relative_error"], rel=1e-5)


def test_str_lists_every_leaf_and_total():
    params = _params()
    text = str(jc.summarize(params, _compressed(params)))
    for row in EXPECTED_ROWS:
        assert row["path"] in text
    assert "total" in text
    assert "sparse" in text and "dense" in text
    assert "380 B" in text and "192 B" in text


@pytest.mark.parametrize(
    ("original", "compressed"),
    [
        ({"w": jnp.ones((2, 2))}, {"v": jnp.ones((2, 2))}),
        ({"w": jnp.ones((2, 2))}, {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}),
        ({"w": jnp.ones((2, 2)), "b": jnp.ones(2)}, {"w": jnp.ones((2, 2))}),
        ({"w": jnp.ones((2, 2))}, [jnp.ones((2, 2))]),
        ({"a": {"w": jnp.ones((2, 2))}}, {"a": jnp.ones((2, 2))}),
    ],
)
def test_mismatched_structures_raise(original, compressed):
    with pytest.raises(ValueError, match="different pytree structures"):
        jc.summarize(original, compressed)


def test_shape_mismatch_raises_naming_the_leaf():
    original = {"layer": {"w": jnp.ones((2, 4))}}
    with pytest.raises(ValueError, match=r"'layer/w'.*\(2, 4\).*\(4, 2\)"):
        jc.summarize(original, {"layer": {"w": jnp.ones((4, 2))}})
    other_sparse = jc.prune(0.5)({"w": jnp.ones((4, 2))})[0]["w"]
    with pytest.raises(ValueError, match="'layer/w'"):
        jc.summarize(original, {"layer": {"w": other_sparse}})


# --------------------------------------------------------------------------- bfloat16


def _hand_sparse_bf16():
    """A (2, 10) bfloat16 Sparse built by hand: 7.0 at (0, 1), -2.0 at (0, 9), 0.5 at (1, 4)."""
    keep = np.zeros((2, 10), bool)
    keep[0, 1] = keep[0, 9] = keep[1, 4] = True
    mask = jnp.packbits(jnp.asarray(keep), axis=-1, bitorder="little")
    values = jnp.array([7.0, -2.0, 0.5], jnp.bfloat16)
    return jc.Sparse(values, mask, (2, 10), np.dtype(jnp.bfloat16))


def test_bfloat16_leaves_count_two_bytes_per_entry():
    dense = np.zeros((2, 10), np.float32)
    dense[0, 1], dense[0, 9], dense[1, 4] = 7.0, -2.0, 0.5
    dense[0, 0], dense[1, 1] = 1.0, -1.0  # dropped by the hand-built sparse leaf
    original = {
        "bias": jnp.array([1.0, 2.0, 3.0, 4.0, 5.0], jnp.bfloat16),
        "kernel": jnp.asarray(dense).astype(jnp.bfloat16),
    }
    sparse = _hand_sparse_bf16()
    assert sparse.mask.shape == (2, 2)
    # 3 bf16 values * 2 B + 2 rows * ceil(10 / 8) B of mask.
    assert sparse.nbytes == 3 * 2 + 2 * 2 == 10
    report = jc.summarize(original, {"bias": original["bias"], "kernel": sparse})
    bias, kernel = report.rows
    assert (bias.original_bytes, bias.compressed_bytes, bias.kind) == (10, 10, "dense")
    assert (kernel.original_bytes, kernel.compressed_bytes, kernel.kind) == (40, 10, "sparse")
    assert kernel.ratio == 4.0
    assert kernel.density == pytest.approx(3 / 20, rel=1e-12)
    assert kernel.relative_error == pytest.approx(
        math.sqrt(2.0 / (49.0 + 4.0 + 0.25 + 1.0 + 1.0)), rel=1e-6
    )
    assert (report.original_bytes, report.compressed_bytes) == (50, 20)
    assert report.ratio == 2.5
    assert jc.nbytes(original) == 50
    assert jc.nbytes({"bias": original["bias"], "kernel": sparse}) == 20


def test_pruned_bfloat16_kernel_counts_two_bytes_per_value():
    params = {"w": jnp.arange(1.0, 9.0, dtype=jnp.float32).reshape(2, 4).astype(jnp.bfloat16)}
    compressed, _ = jc.prune(0.5)(params)
    assert jc.is_compressed(compressed["w"])
    # 4 kept bf16 values * 2 B + 2 rows * ceil(4 / 8) = 1 B of mask.
    assert compressed["w"].nbytes == 4 * 2 + 2 * 1 == 10
    row = jc.summarize(params, compressed).rows[0]
    assert (row.original_bytes, row.compressed_bytes) == (16, 10)
    assert row.density == 0.5


# --------------------------------------------------------------------------- nbytes


def test_nbytes_plain_tree():
    tree = {
        "w": jnp.ones((8, 8), jnp.float32),  # 256
        "b": jnp.ones(8, jnp.bfloat16),  # 16
        "i": jnp.zeros(3, jnp.int32),  # 12
        "h": np.zeros((2, 3), np.float16),  # 12
        "s": np.float32(1.0),  # 4
        "nested": [jnp.zeros((5,), jnp.uint8), {"d": np.zeros(2, np.float64)}],  # 5 + 16
    }
    assert jc.nbytes(tree) == 256 + 16 + 12 + 12 + 4 + 5 + 16
    assert jc.nbytes({}) == 0


def test_nbytes_compressed_tree():
    params = _params()
    compressed = _compressed(params)
    # Per leaf: nnz * 4 B + prod(shape[:-1]) * ceil(shape[-1] / 8) B; the bias stays dense.
    assert jc.nbytes(compressed["big"]) == 42
    assert jc.nbytes(compressed["cube"]) == 120
    assert jc.nbytes(compressed["layer"]) == 12 + 18
    assert jc.nbytes(compressed) == 192
    assert jc.nbytes(params) == 380
    report = jc.summarize(params, compressed)
    assert report.compressed_bytes == jc.nbytes(compressed)
    assert report.original_bytes == jc.nbytes(params)


def test_nbytes_and_summarize_on_nnx_state():
    _, params, _ = nnx.split(LeNet300100NNX(rngs=nnx.Rngs(0)), nnx.Param, ...)
    dense_bytes = 4 * (64 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10)
    assert jc.nbytes(params) == dense_bytes
    compressed, _ = jc.prune(0.5, where="^dense1/kernel$")(params)
    # 9600 kept floats + 64 rows * ceil(300 / 8) = 38 B of mask, instead of 76800 B.
    sparse_bytes = 9600 * 4 + 64 * 38
    assert jc.nbytes(compressed) == dense_bytes - 64 * 300 * 4 + sparse_bytes
    report = jc.summarize(params, compressed)
    assert [row.path for row in report.rows] == [
        f"dense{i}/{name}" for i in (1, 2, 3) for name in ("bias", "kernel")
    ]
    assert report.rows[1].compressed_bytes == sparse_bytes
    assert report.rows[1].kind == "sparse"
    assert report.original_bytes == dense_bytes
