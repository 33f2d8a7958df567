"""jc.sequential: block-wise calibration on the compressed blocks before each block."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcompress as jc
from jaxcompress.calibration.calibrate import stats_by_path
from jaxcompress.calibration.sequential import blocks_of
from jaxcompress.examples.decoder import Decoder, DecoderConfig, stack_layers
from jaxcompress.transforms.base import Transform

CONFIG = DecoderConfig(vocab=32, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn=48, max_len=8)
GPTQ = jc.quantize(bits=4, method="gptq", where="proj")


def _apply(scan_layers):
    model = Decoder(CONFIG, scan_layers=scan_layers)
    return lambda params, ids: model.apply({"params": params}, ids)


def _recording(tx=None):
    """``tx`` (or nothing) whose stats are the data= it was given."""

    def apply(params, *, key=None, data=None):
        out = params if tx is None else tx(params, key=key, data=data)[0]
        return out, stats_by_path(data)

    return Transform(apply, "recording")


@pytest.fixture(scope="module")
def batches():
    ids = jax.random.randint(jax.random.key(1), (4, 8), 0, CONFIG.vocab)
    return [ids[:3], ids[3:]]


@pytest.fixture(scope="module")
def params(batches):
    return Decoder(CONFIG).init(jax.random.key(0), batches[0])["params"]


@pytest.fixture(scope="module")
def one_pass(params, batches):
    return stats_by_path(jc.calibrate(_apply(False), params, batches))


def _close(a, b):
    np.testing.assert_allclose(a.gram, b.gram, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.mean, b.mean, rtol=1e-5, atol=1e-6)
    assert float(a.count) == float(b.count)


def test_blocks_are_the_layers_in_program_order(params, batches):
    blocks = blocks_of(_apply(False), params, batches[0])
    assert [b.name for b in blocks] == ["layers_0", "layers_1", "lm_head/kernel"]
    assert len(blocks[0].paths) == 7 and blocks[0].iteration is None
    scanned = blocks_of(_apply(True), stack_layers(params, CONFIG), batches[0])
    assert [(b.name, b.iteration) for b in scanned] == [
        ("layers[0]", 0),
        ("layers[1]", 1),
        ("lm_head/kernel", None),
    ]
    assert scanned[0].axis == dict.fromkeys(scanned[0].paths, 0)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_with_nothing_compressed_every_block_sees_the_one_pass_statistics(
    params, batches, one_pass, scan_layers
):
    tree = stack_layers(params, CONFIG) if scan_layers else params
    tx = jc.sequential(_recording(), _apply(scan_layers), batches, progress=False)
    out, stats = tx(tree)
    assert jax.tree.all(jax.tree.map(np.array_equal, out, tree))
    names = ["layers[0]", "layers[1]"] if scan_layers else ["layers_0", "layers_1"]
    assert list(stats) == [*names, "lm_head/kernel", "rest"]
    assert stats["rest"] == {}  # embedding and norms: no statistics
    for i, name in enumerate(names):
        assert len(stats[name]) == 7
        for path, got in stats[name].items():
            assert got.stacked is None and got.gram.ndim == 2
            _close(got, one_pass[path.replace("layers/", f"layers_{i}/")])
    _close(stats["lm_head/kernel"]["lm_head/kernel"], one_pass["lm_head/kernel"])


@pytest.fixture(scope="module")
def gptq_sequential(params, batches):
    tx = jc.sequential(_recording(GPTQ), _apply(False), batches, progress=False)
    return tx(params)


def test_gptq_block_zero_sees_the_one_pass_statistics_and_later_blocks_do_not(
    gptq_sequential, one_pass
):
    out, stats = gptq_sequential
    assert isinstance(out["layers_1"]["mlp"]["up_proj"]["kernel"], jc.Quantized)
    assert not jc.is_compressed(out["embed_tokens"]["embedding"])
    for path, got in stats["layers_0"].items():
        _close(got, one_pass[path])
    # Layer 1's inputs come from the quantized layer 0.
    q = "layers_1/self_attn/q_proj/kernel"
    got = stats["layers_1"][q]
    assert float(jnp.max(jnp.abs(got.gram - one_pass[q].gram))) > 1e-4


def test_gptq_sequential_output_error_is_within_5_percent_of_one_pass(
    params, batches, one_pass, gptq_sequential
):
    apply = _apply(False)
    data = jc.calibrate(apply, params, batches)
    once, _ = GPTQ(params, data=data)
    ids = jnp.concatenate(batches)
    ref = apply(params, ids)
    err_seq = float(jnp.linalg.norm(apply(jc.materialize(gptq_sequential[0]), ids) - ref))
    err_once = float(jnp.linalg.norm(apply(jc.materialize(once), ids) - ref))
    # On this tiny random model the two are within 1 % (sequential 0.0342 vs 0.0340 relative).
    assert err_seq <= 1.05 * err_once, (err_seq, err_once)


def test_scan_and_unrolled_give_the_same_result(params, batches, gptq_sequential):
    scanned = stack_layers(params, CONFIG)
    tx = jc.sequential(GPTQ, _apply(True), batches, progress=False)
    with pytest.warns(UserWarning, match="stacked layers"):
        out, stats = tx(scanned)
    unrolled = gptq_sequential[0]
    for name in ("q_proj", "o_proj"):
        stacked = out["layers"]["self_attn"][name]["kernel"]
        assert not jc.is_compressed(stacked) and stacked.shape[0] == CONFIG.n_layers
        for i in range(CONFIG.n_layers):
            dense = jc.materialize(unrolled[f"layers_{i}"]["self_attn"][name]["kernel"])
            # The same statistics up to float rounding: at most a stray code differs.
            assert float(jnp.mean(stacked[i] != dense)) < 0.01
    assert set(stats["layers[1]"]) == {
        f"layers/{m}/kernel"
        for m in (
            "mlp/down_proj",
            "mlp/gate_proj",
            "mlp/up_proj",
            "self_attn/k_proj",
            "self_attn/o_proj",
            "self_attn/q_proj",
            "self_attn/v_proj",
        )
    }
    assert isinstance(out["lm_head"]["kernel"], jnp.ndarray)  # "proj" does not select it


def _mlp(p, x):
    for i in range(3):
        x = jnp.tanh(x @ p[f"layers_{i}"]["kernel"] + p[f"layers_{i}"]["bias"][None, :])
    return x


def test_unrolled_mlp_blocks_and_bias_left_to_rest():
    keys = jax.random.split(jax.random.key(0), 4)
    params = {
        f"layers_{i}": {
            "kernel": jax.random.normal(keys[i], (16, 16)) / 4,
            "bias": jnp.zeros(16),
        }
        for i in range(3)
    }
    x = jax.random.normal(keys[3], (64, 16))
    tx = jc.sequential(_recording(jc.quantize(bits=3, method="gptq")), _mlp, [x], progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "nothing selected" per block
        out, stats = tx(params)
    assert list(stats) == ["layers_0", "layers_1", "layers_2", "rest"]
    assert all(jc.is_compressed(out[f"layers_{i}"]["kernel"]) for i in range(3))
    # Block 2 sees layer 1's output computed with quantized layers 0 and 1.
    h = x
    for i in range(2):
        layer = out[f"layers_{i}"]
        h = jnp.tanh(h @ jc.materialize(layer["kernel"]) + layer["bias"][None, :])
    np.testing.assert_allclose(
        stats["layers_2"]["layers_2/kernel"].gram, h.T @ h / 64, rtol=1e-4, atol=1e-5
    )


def test_bad_calls_name_the_problem(params, batches):
    with pytest.raises(ValueError, match="batches is empty"):
        jc.sequential(GPTQ, _apply(False), [])
    with pytest.raises(TypeError, match="tx must be a Transform"):
        jc.sequential(lambda p: p, _apply(False), batches)
    tx = jc.sequential(GPTQ, _apply(False), batches, progress=False)
    with pytest.raises(ValueError, match="data= must be None"):
        tx(params, data={})


def test_one_pass_gptq_refuses_stacked_statistics_and_points_to_sequential(params, batches):
    scanned = stack_layers(params, CONFIG)
    data = jc.calibrate(_apply(True), scanned, batches)
    assert data["layers"]["mlp"]["up_proj"]["kernel"].stacked == 0
    with pytest.raises(ValueError, match="stacked.*jc.sequential"):
        GPTQ(scanned, data=data)
