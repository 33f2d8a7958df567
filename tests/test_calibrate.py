"""jaxcompress.calibrate.calibrate: per-weight input statistics against numpy."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxcompress.calibration.calibrate import InputStats, calibrate, stats_by_path
from jaxcompress.examples.models import LeNet5, LeNet300100, LeNet300100NNX

RTOL, ATOL = 2e-5, 2e-5


def _params(model, x, seed=0):
    """Random params from numpy (no jax init to compile), shaped like ``model.init``."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    return jax.tree.map(lambda s: (0.3 * rng.normal(size=s.shape)).astype(np.float32), shapes)


def _data(shape, seed=1):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _expected(rows, labels=None, num_classes=None):
    """Reference statistics of an ``(n, m)`` float64 matrix of feature rows."""
    rows = np.asarray(rows, np.float64)
    out = {"count": len(rows), "mean": rows.mean(0), "gram": rows.T @ rows / len(rows)}
    if labels is not None:
        out["class_count"] = np.bincount(labels, minlength=num_classes)
        out["class_mean"] = np.stack([rows[labels == c].mean(0) for c in range(num_classes)])
    return out


def _assert_stats(stats: InputStats, want: dict):
    assert float(stats.count) == want["count"]
    np.testing.assert_allclose(stats.mean, want["mean"], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(stats.gram, want["gram"], rtol=RTOL, atol=ATOL)
    if "class_count" in want:
        np.testing.assert_array_equal(stats.class_count, want["class_count"])
        np.testing.assert_allclose(stats.class_mean, want["class_mean"], rtol=RTOL, atol=ATOL)
    else:
        assert stats.class_count is None and stats.class_mean is None


def _im2col_same3x3(x):
    """numpy im2col of NHWC ``x`` for a 3x3 SAME conv, features ordered (h, w, c)."""
    n, h, w, c = x.shape
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.empty((n, h, w, 9 * c))
    for i in range(h):
        for j in range(w):
            out[:, i, j] = padded[:, i : i + 3, j : j + 3, :].reshape(n, -1)
    return out


def _relu(x):
    return np.maximum(x, 0.0)


def _pool(x):
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


@pytest.fixture(scope="module")
def mlp():
    model = LeNet300100()
    x = _data((20, 64))
    params = _params(model, x[:2])
    return params, (lambda p, x: model.apply({"params": p}, x)), x


@pytest.fixture(scope="module")
def cnn():
    model = LeNet5()
    x = _data((16, 8, 8, 1))
    params = _params(model, x[:2])
    labels = np.arange(16) % 3
    return params, (lambda p, x: model.apply({"params": p}, x)), x, labels


@pytest.fixture(scope="module")
def cnn_stats(cnn):
    params, apply, x, labels = cnn
    return calibrate(apply, params, [x[:8], x[8:]], labels=[labels[:8], labels[8:]])


def _mlp_inputs(params, x):
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    h1 = _relu(x @ p["dense1"]["kernel"] + p["dense1"]["bias"])
    h2 = _relu(h1 @ p["dense2"]["kernel"] + p["dense2"]["bias"])
    return {"dense1/kernel": np.asarray(x, np.float64), "dense2/kernel": h1, "dense3/kernel": h2}


def test_mlp_matches_numpy_with_labels_and_ragged_batches(mlp):
    params, apply, x = mlp
    labels = np.arange(20) % 4
    # Two batch sizes: the second is traced and compiled on its own.
    data = calibrate(
        apply, params, [x[:12], x[12:]], labels=[labels[:12], labels[12:]], progress=True
    )
    stats = stats_by_path(data)
    assert sorted(stats) == ["dense1/kernel", "dense2/kernel", "dense3/kernel"]
    assert data["dense1"]["bias"] is None
    for path, rows in _mlp_inputs(params, x).items():
        _assert_stats(stats[path], _expected(rows, labels, 4))


def test_cnn_patches_match_numpy_loops(cnn, cnn_stats):
    params, _, x, labels = cnn
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    patches1 = _im2col_same3x3(np.asarray(x, np.float64))
    conv1 = patches1 @ p["conv1"]["kernel"].reshape(9, 6) + p["conv1"]["bias"]
    patches2 = _im2col_same3x3(_pool(_relu(conv1)))
    stats = stats_by_path(cnn_stats)
    for path, patches in (("conv1/kernel", patches1), ("conv2/kernel", patches2)):
        m = patches.shape[-1]
        per_pixel = np.repeat(labels, patches.shape[1] * patches.shape[2])
        _assert_stats(stats[path], _expected(patches.reshape(-1, m), per_pixel, 3))
    assert stats["conv2/kernel"].gram.shape == (54, 54)
    assert float(stats["conv2/kernel"].count) == 16 * 4 * 4


def test_many_batches_equal_one_big_batch(cnn, cnn_stats):
    params, apply, x, labels = cnn
    # (jitted apply: the replay inlines the jit's sub-jaxpr to reach the convs)
    whole = stats_by_path(calibrate(jax.jit(apply), params, [x], labels=[labels]))
    split = stats_by_path(cnn_stats)
    assert whole.keys() == split.keys()
    for path in whole:
        for a, b in zip(jax.tree.leaves(whole[path]), jax.tree.leaves(split[path]), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_mesh_data_parallel_equals_unsharded(mesh8, cnn, cnn_stats, mlp):
    params, apply, x, labels = cnn
    sharded = stats_by_path(
        calibrate(apply, params, [x[:8], x[8:]], labels=[labels[:8], labels[8:]], mesh=mesh8)
    )
    plain = stats_by_path(cnn_stats)
    for path in plain:
        for a, b in zip(jax.tree.leaves(sharded[path]), jax.tree.leaves(plain[path]), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        assert sharded[path].gram.sharding.is_fully_replicated

    # MLP kernels sharded over "model" as well.
    mparams, mapply, mx = mlp

    def place(a):
        spec = P(None, "model") if a.ndim == 2 and a.shape[1] % 2 == 0 else P()
        return jax.device_put(a, NamedSharding(mesh8, spec))

    got = stats_by_path(calibrate(mapply, jax.tree.map(place, mparams), [mx[:16]], mesh=mesh8))
    for path, rows in _mlp_inputs(mparams, mx[:16]).items():
        _assert_stats(got[path], _expected(rows))
    with pytest.raises(ValueError, match="of size 4 does not divide"):
        calibrate(mapply, mparams, [mx[:6]], mesh=mesh8)


def test_nnx_state_keeps_its_structure():
    model = nnx.eval_shape(lambda: LeNet300100NNX(in_features=16, rngs=nnx.Rngs(0)))
    graphdef, abstract = nnx.split(model)
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda s: (0.3 * rng.normal(size=s.shape)).astype(np.float32), abstract)
    x = _data((10, 16))
    data = calibrate(lambda s, x: nnx.merge(graphdef, s)(x), state, [x[:6], x[6:]])
    assert isinstance(data, nnx.State)
    stats = stats_by_path(data)
    assert sorted(stats) == ["dense1/kernel", "dense2/kernel", "dense3/kernel"]
    params = {
        name: {"kernel": state[name]["kernel"][...], "bias": state[name]["bias"][...]}
        for name in ("dense1", "dense2")
    }
    for path, rows in _mlp_inputs(params, x).items():
        _assert_stats(stats[path], _expected(rows))


def test_attention_counts_every_token_and_attributes_labels():
    model = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)
    x = _data((6, 5, 8))
    params = _params(model, x[:1])
    labels = np.array([0, 1, 1, 2, 0, 1])
    data = calibrate(lambda p, x: model.apply({"params": p}, x), params, [x], labels=[labels])
    stats = stats_by_path(data)
    tokens = np.repeat(labels, 5)
    for name in ("query", "key", "value"):
        _assert_stats(stats[f"{name}/kernel"], _expected(x.reshape(-1, 8), tokens, 3))
    out = stats["out/kernel"]
    assert out.gram.shape == (8, 8) and float(out.count) == 30
    np.testing.assert_array_equal(out.class_count, np.bincount(tokens))


def test_examples_merged_with_tokens_keep_their_labels():
    w = _data((4, 3))

    def apply(p, x):  # (batch, tokens, 4) -> (batch * tokens, 4) @ w
        return x.reshape(-1, 4) @ p["w"]

    x = _data((6, 5, 4))
    labels = np.array([1, 0, 1, 1, 0, 0])
    stats = stats_by_path(
        calibrate(apply, {"w": w}, [x[:2], x[2:]], labels=[labels[:2], labels[2:]])
    )
    _assert_stats(stats["w"], _expected(x.reshape(-1, 4), np.repeat(labels, 5), 2))


def test_tied_weight_pools_both_uses():
    w = _data((4, 3))
    x = _data((8, 4))
    stats = stats_by_path(calibrate(lambda p, x: x @ p["w"] + (2.0 * x) @ p["w"], {"w": w}, [x]))
    _assert_stats(stats["w"], _expected(np.concatenate([x, 2.0 * x])))


def test_key_is_folded_per_batch():
    w = _data((4, 3))
    x = _data((8, 4))

    def noisy(p, x, key):
        return (x + jax.random.normal(key, x.shape)) @ p["w"]

    one = calibrate(noisy, {"w": w}, [x[:4], x[4:]], key=jax.random.key(0))
    two = calibrate(noisy, {"w": w}, [x[:4], x[4:]], key=jax.random.key(0))
    np.testing.assert_array_equal(one["w"].gram, two["w"].gram)
    assert not np.allclose(one["w"].mean, x.mean(0), atol=1e-3)


def test_weights_that_cannot_be_calibrated_are_left_out_with_a_warning():
    w = _data((3, 4, 2))  # contracted over its middle axis: neither leading nor trailing
    with pytest.warns(UserWarning, match=r"not calibrating w: contracted axes \(1,\)"):
        data = calibrate(
            lambda p, x: jnp.einsum("bj,ijk->bik", x, p["w"]) + p["b"][None, :, None],
            {"w": w, "b": w[:, 0, 0]},
            [_data((2, 4))],
        )
    assert data == {"w": None, "b": None}


def test_an_out_in_weight_is_calibrated_over_its_trailing_axis():
    w, x = _data((3, 4)), _data((5, 4))  # (out, in) used as x @ w.T
    data = calibrate(lambda p, x: x @ p["w"].T, {"w": w}, [x])
    assert data["w"].trailing
    np.testing.assert_allclose(data["w"].gram, x.T @ x / 5, rtol=1e-5, atol=1e-6)


def test_errors(mlp):
    params, apply, x = mlp
    with pytest.raises(ValueError, match="empty"):
        calibrate(apply, params, [])
    # Feature shapes may differ (length-grouped batches), but the model must run on them.
    with pytest.raises(ValueError, match=r"batch 1 of shape \(4, 32\) cannot be calibrated"):
        calibrate(apply, params, [x[:4], x[:4, :32]])
    with pytest.raises(ValueError, match=r"batch 1 has dtype int32, the first batch float32"):
        calibrate(apply, params, [x[:4], np.zeros((4, 64), np.int32)])
    with pytest.raises(ValueError, match=r"must lie in \[0, 3\)"):
        calibrate(apply, params, [x[:4]], labels=[np.array([0, 1, 2, 3])], num_classes=3)
    with pytest.raises(ValueError, match="ran out"):
        calibrate(apply, params, [x[:4], x[4:8]], labels=[np.arange(4)], num_classes=4)
    with pytest.raises(ValueError, match=r"expected \(4,\)"):
        calibrate(apply, params, [x[:4]], labels=[np.arange(3)])
    with pytest.raises(TypeError, match="labels go in labels="):
        calibrate(apply, params, [(x[:4], np.arange(4))])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the MLP's kernels all calibrate: no warning
        calibrate(apply, params, [x[:4]])
