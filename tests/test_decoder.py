"""The Llama-style decoder example: linen and nnx agree, scan and unrolled agree, greedy
decoding, causality, synthetic checkpoints, and compression of the model."""

import json
import tracemalloc
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxcompress as jc
from jaxcompress.calibration.calibrate import stats_by_path
from jaxcompress.examples.decoder import (
    Decoder,
    DecoderConfig,
    DecoderNNX,
    from_hf,
    generate,
    hf_shapes,
    param_count,
    params_of,
    stack_layers,
    to_nnx,
    unstack_layers,
    write_checkpoint,
)
from jaxcompress.io.interop import read_safetensors

# Grouped-query attention (4 query heads over 2 kv heads), 3 layers so a scan has a body.
CONFIG = DecoderConfig(vocab=61, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, ffn=96, max_len=16)


def _apply(config, scan_layers=False):
    model = Decoder(config, scan_layers=scan_layers)
    return lambda params, ids: model.apply({"params": params}, ids)


@pytest.fixture(scope="module")
def ids():
    return jax.random.randint(jax.random.key(1), (3, 9), 0, CONFIG.vocab)


@pytest.fixture(scope="module")
def params(ids):
    return Decoder(CONFIG).init(jax.random.key(0), ids)["params"]


@pytest.fixture(scope="module")
def logits(params, ids):
    return _apply(CONFIG)(params, ids)


def test_linen_and_nnx_give_the_same_logits(params, ids, logits):
    model = to_nnx(params, CONFIG)
    np.testing.assert_allclose(model(ids), logits, rtol=1e-6, atol=1e-6)
    # Scanned too, and back: nnx's own init read out as linen params runs in linen.
    scanned = stack_layers(params, CONFIG)
    np.testing.assert_allclose(to_nnx(scanned, CONFIG)(ids), logits, rtol=1e-5, atol=1e-5)
    fresh = DecoderNNX(CONFIG, rngs=nnx.Rngs(3))
    np.testing.assert_allclose(
        _apply(CONFIG)(params_of(fresh), ids), fresh(ids), rtol=1e-6, atol=1e-6
    )


def test_linen_and_nnx_agree_in_bfloat16(ids):
    config = DecoderConfig(**{**CONFIG.__dict__, "dtype": jnp.bfloat16})
    params = Decoder(config).init(jax.random.key(0), ids)["params"]
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    linen = _apply(config)(params, ids)
    assert linen.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(linen)))
    np.testing.assert_array_equal(to_nnx(params, config)(ids), linen)


def test_scan_and_unrolled_give_the_same_logits(params, ids, logits):
    scanned = stack_layers(params, CONFIG)
    assert scanned["layers"]["self_attn"]["k_proj"]["kernel"].shape == (3, 64, 32)
    np.testing.assert_allclose(
        _apply(CONFIG, scan_layers=True)(scanned, ids), logits, rtol=1e-5, atol=1e-5
    )
    back = unstack_layers(scanned, CONFIG)
    assert jax.tree.all(jax.tree.map(np.array_equal, back, params))


def _calibrated(params, ids, scan_layers):
    tree = stack_layers(params, CONFIG) if scan_layers else params
    return stats_by_path(jc.calibrate(_apply(CONFIG, scan_layers), tree, [ids, ids[:2]]))


def test_scan_and_unrolled_give_the_same_head_statistics(params, ids):
    unrolled, scanned = _calibrated(params, ids, False), _calibrated(params, ids, True)
    assert len(unrolled) == 7 * CONFIG.n_layers + 1  # every projection and the head
    head_u, head_s = unrolled["lm_head/kernel"], scanned["lm_head/kernel"]
    assert float(head_u.count) == float(head_s.count) == 5 * 9
    np.testing.assert_allclose(head_s.mean, head_u.mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(head_s.gram, head_u.gram, rtol=1e-5, atol=1e-6)


def test_scan_and_unrolled_give_the_same_layer_statistics(params, ids):
    unrolled, scanned = _calibrated(params, ids, False), _calibrated(params, ids, True)
    assert len(scanned) == 7 + 1  # every stacked projection and the head
    for path, stacked in scanned.items():
        if path == "lm_head/kernel":
            continue
        assert stacked.stacked == 0 and stacked.gram.shape[0] == CONFIG.n_layers
        assert float(stacked.count) == 5 * 9  # rows of one slice: every token once
        for i in range(CONFIG.n_layers):
            one = unrolled[path.replace("layers/", f"layers_{i}/")]
            np.testing.assert_allclose(stacked.mean[i], one.mean, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(stacked.gram[i], one.gram, rtol=1e-5, atol=1e-6)


def test_generate_is_greedy_and_deterministic(params, ids):
    apply = jax.jit(_apply(CONFIG))
    prompt = ids[:2, :4]
    out = generate(apply, params, prompt, 4)
    assert out.shape == (2, 8)
    np.testing.assert_array_equal(out[:, :4], prompt)
    np.testing.assert_array_equal(generate(apply, params, prompt, 4), out)
    # Step by step on the growing sequence (no padded buffer): the same tokens.
    grown = prompt
    for _ in range(4):
        nxt = jnp.argmax(apply(params, grown)[:, -1], axis=-1).astype(grown.dtype)
        grown = jnp.concatenate([grown, nxt[:, None]], axis=1)
    np.testing.assert_array_equal(out, grown)
    np.testing.assert_array_equal(generate(apply, params, prompt, 0), prompt)
    with pytest.raises(ValueError, match="steps"):
        generate(apply, params, prompt, -1)
    with pytest.raises(ValueError, match="integer"):
        generate(apply, params, prompt.astype(jnp.float32), 1)


def test_future_tokens_do_not_change_past_logits(params, ids, logits):
    changed = ids.at[:, 5:].set((ids[:, 5:] + 7) % CONFIG.vocab)
    other = _apply(CONFIG)(params, changed)
    np.testing.assert_allclose(other[:, :5], logits[:, :5], rtol=1e-6, atol=1e-6)
    assert not np.allclose(other[:, 5:], logits[:, 5:], atol=1e-3)


def test_bad_configs_and_inputs_are_refused(params):
    with pytest.raises(ValueError, match="n_kv_heads"):
        DecoderConfig(dim=64, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="dtype"):
        DecoderConfig(dtype=jnp.int32)
    with pytest.raises(ValueError, match="max_len"):
        _apply(CONFIG)(params, jnp.zeros((1, CONFIG.max_len + 1), jnp.int32))
    with pytest.raises(ValueError, match="paths, shapes"):
        to_nnx(params, DecoderConfig(**{**CONFIG.__dict__, "ffn": 48}))


# A checkpoint of many small tensors: its data is far larger than any one shard.
MANY = DecoderConfig(vocab=96, dim=64, n_layers=48, n_heads=4, n_kv_heads=2, ffn=128)


def test_checkpoint_has_llama_names_count_and_bounded_memory(tmp_path):
    shard = 1 << 16
    tracemalloc.start()
    try:
        files = write_checkpoint(tmp_path / "a", MANY, seed=5, max_shard_bytes=shard)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    total = 2 * param_count(MANY)
    assert total > 40 * shard
    # One shard and one tensor's float32 draw at a time, never the model.
    assert peak < 8 * shard < total / 6

    index = json.loads((tmp_path / "a" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == total
    assert sorted(index["weight_map"]) == sorted(hf_shapes(MANY))
    assert sorted({f.name for f in files}) == sorted(set(index["weight_map"].values()))
    tensors = {}
    for file in files:
        tensors |= read_safetensors(file, nested=False)
    assert {k: v.shape for k, v in tensors.items()} == hf_shapes(MANY)
    assert {v.dtype for v in tensors.values()} == {np.dtype(jnp.bfloat16)}
    assert sum(v.size for v in tensors.values()) == param_count(MANY)
    q = tensors["model.layers.3.self_attn.q_proj.weight"].astype(np.float32)
    assert 0.015 < q.std() < 0.025 and q.std() > 0  # drawn, not constant
    np.testing.assert_array_equal(tensors["model.norm.weight"].astype(np.float32), 1.0)
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["num_key_value_heads"] == 2 and config["num_hidden_layers"] == 48

    # The values depend on the seed only, not on the sharding.
    (single,) = write_checkpoint(tmp_path / "b", MANY, seed=5, max_shard_bytes=total)
    assert single.name == "model.safetensors"
    again = read_safetensors(single, nested=False)
    assert all(np.array_equal(again[k], tensors[k]) for k in tensors)


def test_checkpoint_loads_into_the_model(tmp_path, ids):
    config = DecoderConfig(**{**CONFIG.__dict__, "dtype": jnp.bfloat16})
    (file,) = write_checkpoint(tmp_path, config, seed=1)
    tensors = read_safetensors(file, nested=False)
    params = from_hf(tensors, config)
    q = params["layers_2"]["self_attn"]["q_proj"]["kernel"]
    np.testing.assert_array_equal(q, tensors["model.layers.2.self_attn.q_proj.weight"].T)
    shapes = jax.eval_shape(Decoder(config).init, jax.random.key(0), ids)["params"]
    assert jax.tree.map(lambda s: s.shape, shapes) == jax.tree.map(jnp.shape, params)
    scanned = from_hf(tensors, config, scan_layers=True)
    np.testing.assert_allclose(
        _apply(config, scan_layers=True)(scanned, ids),
        _apply(config)(params, ids),
        rtol=2e-2,
        atol=2e-2,
    )
    del tensors["lm_head.weight"]
    with pytest.raises(ValueError, match="lm_head.weight"):
        from_hf(tensors, config)


def test_int4_groups_and_accelerate_run_the_decoder(params, ids, logits):
    compressed, _ = jc.quantize(4, group_size=32, where=r"_proj|lm_head")(params)
    leaves = jax.tree.leaves(compressed, is_leaf=jc.is_compressed)
    quantized = [leaf for leaf in leaves if isinstance(leaf, jc.Quantized)]
    assert len(quantized) == 7 * CONFIG.n_layers + 1  # the projections and the head
    fast = jc.accelerate(_apply(CONFIG))
    served = fast.prepare(compressed)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = fast(served, ids)
    reference = _apply(CONFIG)(jc.materialize(compressed), ids)
    np.testing.assert_allclose(out, reference, rtol=0.05, atol=0.05)
    assert set(fast.last_plan.routes().values()) - {"materialize"}
    # int4 moves the logits, but not beyond the scale of the logits themselves.
    assert 0 < float(jnp.abs(reference - logits).max()) < float(jnp.abs(logits).max())
    tokens = generate(lambda p, x: fast(p, x), served, ids[:1, :3], 2)
    assert tokens.shape == (1, 5)
