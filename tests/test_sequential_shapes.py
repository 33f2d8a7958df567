"""jc.sequential and jc.calibrate over batches of different shapes (length-grouped)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcompress as jc
from jaxcompress.calibration.calibrate import stats_by_path
from jaxcompress.transforms.base import Transform

WIDTH = 16


def _tokens(p, x):
    """Three layers over ``(batch, tokens, WIDTH)``; the token mean mixes the tokens."""
    for i in range(3):
        h = jnp.tanh(x @ p[f"layers_{i}"]["kernel"])
        x = h + h.mean(axis=1, keepdims=True)
    return x


def _recording(tx=None):
    """``tx`` (or nothing) whose stats are the data= it was given."""

    def apply(params, *, key=None, data=None):
        out = params if tx is None else tx(params, key=key, data=data)[0]
        return out, stats_by_path(data)

    return Transform(apply, "recording")


def _close(got, gram, mean, count):
    np.testing.assert_allclose(got.gram, gram, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.mean, mean, rtol=1e-5, atol=1e-6)
    assert float(got.count) == count


def _close_stats(a, b):
    _close(a, b.gram, b.mean, float(b.count))


@pytest.fixture(scope="module")
def params():
    keys = jax.random.split(jax.random.key(0), 3)
    return {
        f"layers_{i}": {"kernel": jax.random.normal(keys[i], (WIDTH, WIDTH)) / 4} for i in range(3)
    }


@pytest.fixture(scope="module")
def batches():
    # Two lengths, as sentences grouped by length would come: no padding rows.
    a, b = jax.random.split(jax.random.key(1))
    return [jax.random.normal(a, (2, 3, WIDTH)), jax.random.normal(b, (1, 5, WIDTH))]


@pytest.fixture(scope="module")
def one_pass(params, batches):
    return stats_by_path(jc.calibrate(_tokens, params, batches))


def _rows_stats(inputs):
    """Gram, mean and count of all the rows of a list of ``(batch, tokens, m)`` inputs."""
    rows = jnp.concatenate([h.reshape(-1, h.shape[-1]) for h in inputs])
    return rows.T @ rows / rows.shape[0], rows.mean(0), float(rows.shape[0])


def test_calibrate_pools_the_rows_of_batches_of_different_shapes(params, batches, one_pass):
    # Every row counts once, whatever the batch it came in: 2 * 3 + 1 * 5 = 11 rows.
    _close(one_pass["layers_0/kernel"], *_rows_stats(batches))
    hidden = []
    for x in batches:
        h = jnp.tanh(x @ params["layers_0"]["kernel"])
        hidden.append(h + h.mean(axis=1, keepdims=True))
    _close(one_pass["layers_1/kernel"], *_rows_stats(hidden))


def test_nothing_compressed_every_block_sees_the_one_pass_statistics(params, batches, one_pass):
    out, stats = jc.sequential(_recording(), _tokens, batches, progress=False)(params)
    assert jax.tree.all(jax.tree.map(np.array_equal, out, params))
    assert list(stats) == ["layers_0", "layers_1", "layers_2"]
    for i in range(3):
        path = f"layers_{i}/kernel"
        _close_stats(stats[f"layers_{i}"][path], one_pass[path])


def test_gptq_each_block_pools_all_shapes_on_the_compressed_blocks_before(
    params, batches, one_pass
):
    tx = jc.sequential(
        _recording(jc.quantize(bits=3, method="gptq")), _tokens, batches, progress=False
    )
    out, stats = tx(params)
    assert all(jc.is_compressed(out[f"layers_{i}"]["kernel"]) for i in range(3))
    _close_stats(stats["layers_0"]["layers_0/kernel"], one_pass["layers_0/kernel"])
    # The reference by hand: run each batch through the quantized layers 0 and 1, pool
    # the rows of both shapes.
    hidden = []
    for x in batches:
        for i in range(2):
            h = jnp.tanh(x @ jc.materialize(out[f"layers_{i}"]["kernel"]))
            x = h + h.mean(axis=1, keepdims=True)
        hidden.append(x)
    gram, mean, count = _rows_stats(hidden)
    got = stats["layers_2"]["layers_2/kernel"]
    np.testing.assert_allclose(got.gram, gram, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got.mean, mean, rtol=1e-4, atol=1e-5)
    assert float(got.count) == count == 11
    # Sequential, so not the one-pass statistics of the dense model.
    assert float(jnp.max(jnp.abs(got.gram - one_pass["layers_2/kernel"].gram))) > 1e-4


def _branchy(p, x):
    """Layer 1 runs only on sequences longer than 3 tokens."""
    x = jnp.tanh(x @ p["layers_0"]["kernel"])
    if x.shape[1] > 3:
        x = jnp.tanh(x @ p["layers_1"]["kernel"])
    return x


def _flipped(p, x):
    """Layer 0 used as ``x @ w`` on 3 tokens, as ``x @ w.T`` otherwise."""
    w = p["layers_0"]["kernel"]
    return jnp.tanh(x @ (w if x.shape[1] == 3 else w.T))


def test_shapes_that_run_other_blocks_or_uses_are_refused(params, batches):
    with pytest.raises(ValueError, match=r"shape \(1, 5, 16\) run the blocks.*same blocks"):
        jc.sequential(jc.quantize(bits=4, method="gptq"), _branchy, batches)(params)
    with pytest.raises(ValueError, match="traces to different calibrated weights"):
        jc.calibrate(_branchy, params, batches)
    with pytest.raises(ValueError, match=r"uses \['layers_0/kernel'\] differently"):
        jc.calibrate(_flipped, params, batches)


def test_bad_batches_name_the_problem(params, batches):
    tx = jc.quantize(bits=4, method="gptq")
    with pytest.raises(ValueError, match=r"batches\[1\] has dtype float16"):
        jc.sequential(tx, _tokens, [batches[0], batches[1].astype(jnp.float16)])
    with pytest.raises(TypeError, match=r"batches\[0\] must be one array"):
        jc.sequential(tx, _tokens, [(batches[0], 1)])
    with pytest.raises(ValueError, match="dtype float16, the first batch float32"):
        jc.calibrate(_tokens, params, [batches[0], batches[1].astype(jnp.float16)])
