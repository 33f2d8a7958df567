"""Centroid fine-tuning: per-cluster gradient sums, frozen indices, real training."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxcompress as jc
from jaxcompress.examples.classifier import fit_classifier
from jaxcompress.examples.data import load_digits
from jaxcompress.examples.models import LeNet300100, LeNet300100NNX


def _xent(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@functools.cache
def _trained_lenet():
    """LeNet-300-100 trained briefly on digits (cached across tests)."""
    images, labels = load_digits()
    model = LeNet300100()
    params = model.init(jax.random.key(0), jnp.zeros((1, 64)))["params"]
    params = fit_classifier(model, params, images, labels, epochs=2, learning_rate=1e-3, seed=0)
    return model, params, images[:256], labels[:256]


@pytest.mark.parametrize("per_channel", [False, True])
def test_centroid_gradient_is_segment_sum_of_weight_gradients(per_channel):
    w = jax.random.normal(jax.random.key(1), (12, 5))
    target = jax.random.normal(jax.random.key(2), (12, 5))
    c = jc.cluster(k=4, per_channel=per_channel, where="w")({"w": w})[0]["w"]

    def loss_dense(dense):
        return jnp.sum(jnp.sin(dense) * target)

    grads = jax.grad(lambda leaf: loss_dense(leaf.materialize()), allow_int=True)(c)
    weight_grad = jax.grad(loss_dense)(c.materialize())
    codes = c.codes().astype(jnp.int32)
    if per_channel:
        expected = jax.vmap(
            lambda g, i: jax.ops.segment_sum(g, i, num_segments=c.k), in_axes=(1, 1)
        )(weight_grad, codes)
    else:
        expected = jax.ops.segment_sum(weight_grad.ravel(), codes.ravel(), num_segments=c.k)
    assert grads.codebook.shape == c.codebook.shape
    np.testing.assert_allclose(grads.codebook, expected, rtol=1e-5, atol=1e-6)
    assert grads.indices.dtype == jax.dtypes.float0


def test_indices_fixed_and_loss_decreases_on_lenet():
    model, params, images, labels = _trained_lenet()
    clustered_params = jc.cluster(bits=4)(params)[0]
    assert isinstance(clustered_params["dense1"]["kernel"], jc.Clustered)
    tx = jc.training.clustered(optax.sgd(1e-3))
    state = tx.init(clustered_params)

    def loss(p):
        return _xent(model.apply({"params": jc.materialize(p)}, images), labels)

    @jax.jit
    def step(p, s):
        value, grads = jax.value_and_grad(loss, allow_int=True)(p)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, value

    p, losses = clustered_params, []
    for _ in range(6):
        p, state, value = step(p, state)
        losses.append(float(value))
    assert losses == sorted(losses, reverse=True), losses
    assert float(loss(p)) < losses[0] - 1e-3
    for name in ("dense1", "dense2", "dense3"):
        before, after = clustered_params[name]["kernel"], p[name]["kernel"]
        assert isinstance(after, jc.Clustered)
        np.testing.assert_array_equal(after.indices, before.indices)
        assert after.indices.dtype == jnp.uint8
        assert not np.array_equal(after.codebook, before.codebook)
        # Still one of k values per entry: the compression is preserved.
        assert len(np.unique(np.asarray(after.materialize()))) <= after.k


def test_prune_then_cluster_fine_tunes_and_zeros_stay_zero():
    model, params, images, labels = _trained_lenet()
    compressed = jc.chain(jc.prune(0.8), jc.cluster(bits=4))(params)[0]
    kernel = compressed["dense1"]["kernel"]
    assert isinstance(kernel, jc.Sparse) and isinstance(kernel.values, jc.Clustered)
    zeros_before = np.asarray(kernel.materialize()) == 0
    tx = jc.training.clustered(optax.sgd(1e-3))
    state = tx.init(compressed)

    def loss(p):
        return _xent(model.apply({"params": jc.materialize(p)}, images), labels)

    @jax.jit
    def step(p, s):
        grads = jax.grad(loss, allow_int=True)(p)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s

    p = compressed
    for _ in range(5):
        p, state = step(p, state)
    assert float(loss(p)) < float(loss(compressed))
    after = p["dense1"]["kernel"]
    np.testing.assert_array_equal(after.mask, kernel.mask)
    np.testing.assert_array_equal(after.values.indices, kernel.values.indices)
    dense = np.asarray(after.materialize())
    assert np.all(dense[zeros_before] == 0)
    assert not np.array_equal(after.values.codebook, kernel.values.codebook)


def test_update_without_params_and_with_adam():
    params = jc.cluster(k=2)({"w": jnp.array([[0.0, 1.0], [1.0, 0.0]]), "b": jnp.ones(2)})[0]
    grads = jax.grad(lambda p: jnp.sum(jc.materialize(p)["w"]) + jnp.sum(p["b"]), allow_int=True)(
        params
    )
    with jax.numpy_dtype_promotion("standard"):
        tx = jc.training.clustered(optax.adam(0.1))
        state = tx.init(params)
        updates, state = tx.update(grads, state)
        new = optax.apply_updates(params, updates)
    assert updates["w"].indices.dtype == jnp.uint8
    assert not np.any(updates["w"].indices)
    np.testing.assert_array_equal(new["w"].indices, params["w"].indices)
    assert np.all(np.asarray(new["w"].codebook) < np.asarray(params["w"].codebook))
    assert np.all(np.asarray(new["b"]) < 1.0)


def test_linen_train_state():
    model, params, images, labels = _trained_lenet()
    compressed = jc.cluster(bits=3)(params)[0]
    state = train_state.TrainState.create(
        apply_fn=model.apply, params=compressed, tx=jc.training.clustered(optax.sgd(1e-3))
    )

    @jax.jit
    def step(state):
        def loss(p):
            return _xent(state.apply_fn({"params": jc.materialize(p)}, images), labels)

        value, grads = jax.value_and_grad(loss, allow_int=True)(state.params)
        return state.apply_gradients(grads=grads), value

    state, first = step(state)
    for _ in range(4):
        state, last = step(state)
    assert float(last) < float(first)
    np.testing.assert_array_equal(
        state.params["dense2"]["kernel"].indices, compressed["dense2"]["kernel"].indices
    )


def test_nnx_model_with_clustered_params():
    model = LeNet300100NNX(rngs=nnx.Rngs(0))
    images, labels = load_digits()
    images, labels = images[:256], labels[:256]
    graphdef, params = nnx.split(model, nnx.Param)
    compressed = jc.cluster(bits=4)(params)[0]
    tx = jc.training.clustered(optax.sgd(1e-3))
    opt_state = tx.init(compressed)

    def loss(p):
        return _xent(nnx.merge(graphdef, jc.materialize(p))(images), labels)

    @jax.jit
    def step(p, s):
        value, grads = jax.value_and_grad(loss, allow_int=True)(p)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, value

    p, opt_state, first = step(compressed, opt_state)
    for _ in range(4):
        p, opt_state, last = step(p, opt_state)
    assert float(last) < float(first)
    np.testing.assert_array_equal(
        p["dense1"]["kernel"].get_value().indices,
        compressed["dense1"]["kernel"].get_value().indices,
    )


def test_data_parallel_matches_unsharded(mesh8):
    model, params, images, labels = _trained_lenet()
    compressed = jc.cluster(bits=4)(params)[0]
    tx = jc.training.clustered(optax.sgd(1e-3))

    def loss(p, x, y):
        return _xent(model.apply({"params": jc.materialize(p)}, x), y)

    @jax.jit
    def step(p, s, x, y):
        grads = jax.grad(loss, allow_int=True)(p, x, y)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s

    def run(p, x, y):
        s = tx.init(p)
        for _ in range(3):
            p, s = step(p, s, x, y)
        return p

    expected = run(compressed, images, labels)
    replicated = NamedSharding(mesh8, P())
    batch = NamedSharding(mesh8, P("data"))
    with jax.set_mesh(mesh8):
        sharded = run(
            jax.device_put(compressed, replicated),
            jax.device_put(images, batch),
            jax.device_put(labels, batch),
        )
    for name in ("dense1", "dense2", "dense3"):
        got, want = sharded[name]["kernel"], expected[name]["kernel"]
        np.testing.assert_array_equal(got.indices, want.indices)
        np.testing.assert_allclose(got.codebook, want.codebook, rtol=1e-5, atol=1e-6)


def test_orbax_checkpoint_resume_is_bit_identical(tmp_path):
    import orbax.checkpoint as ocp

    model, params, images, labels = _trained_lenet()
    clustered_params = jc.cluster(bits=4)(params)[0]
    tx = jc.training.clustered(optax.sgd(1e-3, momentum=0.9))

    @jax.jit
    def step(p, s):
        def loss(p):
            return _xent(model.apply({"params": jc.materialize(p)}, images), labels)

        updates, s = tx.update(jax.grad(loss, allow_int=True)(p), s, p)
        return optax.apply_updates(p, updates), s

    def run(p, s, steps):
        for _ in range(steps):
            p, s = step(p, s)
        return p, s

    uninterrupted, _ = run(clustered_params, tx.init(clustered_params), 6)
    half = run(clustered_params, tx.init(clustered_params), 3)
    checkpointer = ocp.StandardCheckpointer()
    target = {"params": half[0], "opt_state": half[1]}
    checkpointer.save(tmp_path / "step3", target)
    checkpointer.wait_until_finished()
    restored = checkpointer.restore(tmp_path / "step3", target)
    # Clustered leaves (uint8 indices, codebooks) and the momentum come back as saved.
    assert isinstance(restored["params"]["dense1"]["kernel"], jc.Clustered)
    resumed, _ = run(restored["params"], restored["opt_state"], 3)
    for got, want in zip(jax.tree.leaves(resumed), jax.tree.leaves(uninterrupted), strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


def test_pmap_step_equals_single_device_step():
    # pmap over the 8 fake devices: each device takes 1/8 of the batch and the codebook
    # gradients are averaged with pmean; the indices' float0 cotangents are not reduced.
    model, params, images, labels = _trained_lenet()
    compressed = jc.cluster(bits=4)(params)[0]
    tx = jc.training.clustered(optax.sgd(1e-3))

    def grads_of(p, x, y):
        def loss(p):
            return _xent(model.apply({"params": jc.materialize(p)}, x), y)

        return jax.value_and_grad(loss, allow_int=True)(p)[1]

    def apply(p, s, grads):
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s

    def pmean_floats(grads):
        return jax.tree.map(
            lambda g: jax.lax.pmean(g, "devices") if jnp.issubdtype(g.dtype, jnp.inexact) else g,
            grads,
        )

    single = jax.jit(lambda p, s, x, y: apply(p, s, grads_of(p, x, y)))
    parallel = jax.pmap(
        lambda p, s, x, y: apply(p, s, pmean_floats(grads_of(p, x, y))), axis_name="devices"
    )
    devices = jax.local_device_count()
    reference = (compressed, tx.init(compressed))
    replicated = jax.tree.map(lambda a: jnp.stack([a] * devices), reference)
    x = images.reshape(devices, -1, images.shape[-1])
    y = labels.reshape(devices, -1)
    for _ in range(3):
        reference = single(*reference, images, labels)
        replicated = parallel(*replicated, x, y)
    for name in ("dense1", "dense2", "dense3"):
        got, want = replicated[0][name]["kernel"], reference[0][name]["kernel"]
        assert isinstance(got, jc.Clustered)
        assert got.indices.dtype == want.indices.dtype == jnp.uint8
        for device in range(devices):
            np.testing.assert_array_equal(got.indices[device], want.indices)
            np.testing.assert_array_equal(got.indices[device], compressed[name]["kernel"].indices)
            np.testing.assert_allclose(got.codebook[device], want.codebook, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(
                replicated[0][name]["bias"][device],
                reference[0][name]["bias"],
                rtol=1e-5,
                atol=1e-6,
            )
        assert not np.array_equal(want.codebook, compressed[name]["kernel"].codebook)


def test_quantized_leaves_train_their_scales_and_keep_their_codes():
    """A symmetric Quantized leaf has a None zero point: structure, not a frozen leaf."""
    w = jax.random.normal(jax.random.key(3), (8, 6))
    params = {"q": jc.quantize(4, where="q")({"q": w})[0]["q"], "b": jnp.zeros(6)}
    assert params["q"].zero_point is None
    target = jax.random.normal(jax.random.key(4), (8, 6))

    def loss(p):
        dense = jc.materialize(p)
        return jnp.sum(jnp.square(dense["q"] + dense["b"][None, :] - target))

    tx = jc.training.clustered(optax.sgd(1e-4))  # a scale's gradient sums code * grad
    state = tx.init(params)
    grads = jax.grad(loss, allow_int=True)(params)
    updates, state = tx.update(grads, state, params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(new["q"].codes, params["q"].codes)
    assert not np.array_equal(new["q"].scale, params["q"].scale)
    assert float(loss(new)) < float(loss(params))
