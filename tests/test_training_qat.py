"""Fake quantization: forward equals the quantize round trip, STE backward, no drift."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxcompress as jc
from jaxcompress.examples.data import load_digits
from jaxcompress.examples.models import LeNet300100

LAYOUTS = [
    dict(axis=None),
    dict(axis=-1),
    dict(axis=0),
    dict(axis=-1, group_size=8),
    dict(axis=None, group_size=16),
    dict(axis=-1, symmetric=False),
    dict(axis=-1, calibration="percentile", percentile=90.0),
    dict(axis=-1, calibration="mse", scale_dtype=jnp.bfloat16),
]


@pytest.mark.bitwise
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("options", LAYOUTS)
def test_forward_equals_quantize_round_trip(bits, options):
    params = {
        "kernel": jax.random.normal(jax.random.key(bits), (32, 6)),
        "bias": jnp.ones(6),
    }
    fake = jc.training.fake_quant(bits, **options)(params)
    restored = jc.materialize(jc.quantize(bits, **options)(params)[0])
    np.testing.assert_array_equal(fake["kernel"], restored["kernel"])
    assert fake["kernel"].dtype == params["kernel"].dtype
    assert fake["bias"] is params["bias"]
    # Under jit, XLA turns the division by the level count into a multiplication, so
    # jitted scales can differ from eager ones by an ulp: compare jit with jit.
    jitted = jax.jit(jc.training.fake_quant(bits, **options))(params)
    converted = jax.jit(lambda p: jc.materialize(jc.quantize(bits, **options)(p)[0]))(params)
    np.testing.assert_array_equal(jitted["kernel"], converted["kernel"])


def test_ste_identity_inside_range_zero_when_clipped():
    w = jnp.concatenate([jnp.linspace(-1.0, 1.0, 30), jnp.array([5.0, -6.0])]).reshape(4, 8)
    fq = jc.training.fake_quant(4, axis=None, calibration="percentile", percentile=90.0)
    cotangent = jax.random.normal(jax.random.key(0), w.shape)
    grad = jax.grad(lambda p: jnp.sum(fq(p)["kernel"] * cotangent))({"kernel": w})["kernel"]
    q = jc.quantize(4, axis=None, calibration="percentile", percentile=90.0)
    scale = float(q({"kernel": w})[0]["kernel"].scale[0, 0])
    # Beyond the rounding cells of the last levels, -8 and 7 steps (a signed scale
    # mirrors them).
    steps = np.asarray(w) / scale
    clipped = (steps > 7.5) | (steps < -8.5)
    assert clipped.sum() >= 2  # the outliers are clipped
    np.testing.assert_array_equal(np.asarray(grad)[~clipped], np.asarray(cotangent)[~clipped])
    assert np.all(np.asarray(grad)[clipped] == 0)


def test_absmax_keeps_every_gradient():
    w = jax.random.normal(jax.random.key(3), (16, 4))
    grad = jax.grad(lambda p: jnp.sum(jc.training.fake_quant(3)(p)["kernel"]))({"kernel": w})
    np.testing.assert_array_equal(grad["kernel"], jnp.ones_like(w))


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("scale_dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_absmax_passes_the_gradient_of_the_short_side_end(bits, scale_dtype):
    # Columns symmetric about 0: the short side's end sits 2**(b-1) - 1/2 steps out,
    # half a step past its extreme level (give or take the stored scale's rounding),
    # and rounds to it. That is rounding, not clipping: its gradient passes.
    w = np.random.default_rng(bits).normal(size=(32, 16)).astype(np.float32)
    w[0] = np.abs(w).max(axis=0)
    w[1] = -w[0]
    params = {"kernel": jnp.asarray(w)}
    fq = jc.training.fake_quant(bits, scale_dtype=scale_dtype)
    for grad_of in (jax.grad, lambda f: jax.jit(jax.grad(f))):
        grad = grad_of(lambda p, fq=fq: jnp.sum(fq(p)["kernel"]))(params)["kernel"]
        np.testing.assert_array_equal(grad, np.ones_like(w))
    scale = np.asarray(jc.quantize(bits, scale_dtype=scale_dtype)(params)[0]["kernel"].scale)
    steps = np.abs(w[0] / scale.astype(np.float32)[0])
    half = 2 ** (bits - 1)
    assert np.any(steps > half - 0.75)  # some columns use the new grid's short side


@pytest.mark.bitwise
def test_sparse_leaf_keeps_zeros_and_matches_quantize():
    w = jax.random.normal(jax.random.key(4), (8, 8))
    pruned = jc.prune(0.5)({"kernel": w})[0]
    fake = jc.training.fake_quant(4)(pruned)["kernel"]
    assert isinstance(fake, jc.Sparse)
    restored = jc.materialize(jc.quantize(4)(pruned)[0])["kernel"]
    np.testing.assert_array_equal(fake.materialize(), restored)


def test_bad_options_raise():
    with pytest.raises(ValueError, match="fake_quant: bits"):
        jc.training.fake_quant(9)
    with pytest.raises(ValueError, match="group_size"):
        jc.training.fake_quant(4, group_size=0)


@pytest.mark.bitwise
def test_group_size_that_does_not_divide_matches_quantize():
    # 10 rows in groups of 4: the last group has 2, and fake_quant rounds as quantize does.
    w = jax.random.normal(jax.random.key(5), (10, 3))
    fake = jc.training.fake_quant(4, group_size=4)({"kernel": w})["kernel"]
    restored = jc.materialize(jc.quantize(4, group_size=4)({"kernel": w})[0])["kernel"]
    np.testing.assert_array_equal(fake, restored)


def _qat(model, params, images, labels, fq, steps, state=None):
    state = state or train_state.TrainState.create(
        apply_fn=model.apply, params=params, tx=optax.sgd(0.1, momentum=0.9)
    )

    @jax.jit
    def step(state, x, y):
        def loss(p):
            logits = state.apply_fn({"params": fq(p)}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        value, grads = jax.value_and_grad(loss)(state.params)
        return state.apply_gradients(grads=grads), value

    losses = []
    for _ in range(steps):
        state, value = step(state, images, labels)
        losses.append(float(value))
    return state, losses


@pytest.mark.bitwise
def test_qat_then_convert_has_no_drift():
    images, labels = load_digits()
    images, labels = images[:256], labels[:256]
    model = LeNet300100()
    params = model.init(jax.random.key(0), jnp.zeros((1, 64)))["params"]
    options = dict(axis=-1, group_size=4)
    fq = jc.training.fake_quant(4, **options)
    state, losses = _qat(model, params, images, labels, fq, steps=15)
    assert losses[-1] < losses[0] - 0.1
    fake_logits = jax.jit(lambda p, x: model.apply({"params": fq(p)}, x))(state.params, images)
    converted = jax.jit(jc.quantize(4, **options))(state.params)[0]
    assert isinstance(converted["dense1"]["kernel"], jc.Quantized)
    logits = jax.jit(lambda p, x: model.apply({"params": jc.materialize(p)}, x))(converted, images)
    np.testing.assert_array_equal(logits, fake_logits)


def test_data_parallel_matches_unsharded(mesh8):
    images, labels = load_digits()
    images, labels = images[:64], labels[:64]
    model = LeNet300100()
    params = model.init(jax.random.key(1), jnp.zeros((1, 64)))["params"]
    # Groups, as in the pmap test below: with one scale per column some pre-activations
    # are exactly 0 and float summation order picks their side of the ReLU kink.
    fq = jc.training.fake_quant(8, group_size=4)
    expected, _ = _qat(model, params, images, labels, fq, steps=3)
    with jax.set_mesh(mesh8):
        replicated = jax.device_put(params, NamedSharding(mesh8, P()))
        batch = NamedSharding(mesh8, P("data"))
        got, _ = _qat(
            model,
            replicated,
            jax.device_put(images, batch),
            jax.device_put(labels, batch),
            fq,
            steps=3,
        )
    for path, want in jax.tree_util.tree_leaves_with_path(expected.params):
        have = got.params
        for key in path:
            have = have[key.key]
        np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-6)


def test_pmap_step_equals_single_device_step():
    # pmap over the 8 fake devices: each device takes 1/8 of the batch and the
    # straight-through gradients are averaged with pmean.
    images, labels = load_digits()
    images, labels = images[:64], labels[:64]
    model = LeNet300100()
    params = model.init(jax.random.key(2), jnp.zeros((1, 64)))["params"]
    # Groups, not one scale per channel: the digits are multiples of 1/16, so with one
    # scale per column some first-layer pre-activations are exactly 0 in exact arithmetic
    # and the batch split decides which side of the ReLU kink float rounding puts them.
    options = dict(axis=-1, group_size=4)
    fq = jc.training.fake_quant(4, **options)
    tx = optax.sgd(0.1, momentum=0.9)

    def grads_of(p, x, y):
        def loss(p):
            logits = model.apply({"params": fq(p)}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        return jax.grad(loss)(p)

    def apply(p, s, grads):
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s

    single = jax.jit(lambda p, s, x, y: apply(p, s, grads_of(p, x, y)))
    parallel = jax.pmap(
        lambda p, s, x, y: apply(p, s, jax.lax.pmean(grads_of(p, x, y), "devices")),
        axis_name="devices",
    )
    devices = jax.local_device_count()
    reference = (params, tx.init(params))
    replicated = jax.tree.map(lambda a: jnp.stack([a] * devices), reference)
    x = images.reshape(devices, -1, images.shape[-1])
    y = labels.reshape(devices, -1)
    for _ in range(3):
        reference = single(*reference, images, labels)
        replicated = parallel(*replicated, x, y)
    for got, want, before in zip(
        jax.tree.leaves(replicated[0]),
        jax.tree.leaves(reference[0]),
        jax.tree.leaves(params),
        strict=True,
    ):
        assert not np.array_equal(want, before)
        for device in range(devices):
            np.testing.assert_allclose(got[device], want, rtol=1e-5, atol=1e-6)
    # Converting after training: the two runs' weights differ only by float reduction order
    # (about 3e-8, some 3e-5 of the finest grid step), so almost every weight decodes to
    # the same value. A group whose largest positive and negative weights tie in magnitude
    # may pick the other orientation of the signed grid by rounding, and its weights then
    # move by less than one step.
    convert = jax.jit(lambda p: jc.quantize(4, **options)(p)[0])
    want = convert(reference[0])
    for device in range(devices):
        got = convert(jax.tree.map(lambda a, d=device: a[d], replicated[0]))
        for name in ("dense1", "dense2", "dense3"):
            have, expected = got[name]["kernel"], want[name]["kernel"]
            assert isinstance(have, jc.Quantized)
            ours, theirs = np.asarray(have.materialize()), np.asarray(expected.materialize())
            step = float(np.abs(np.asarray(expected.scale)).max())
            np.testing.assert_allclose(ours, theirs, rtol=0, atol=step)
            assert np.mean(np.isclose(ours, theirs, rtol=1e-5, atol=1e-7)) > 0.999
