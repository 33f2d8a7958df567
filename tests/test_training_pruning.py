"""training.pruned: exact zeros, schedule counts, masks like prune, finalize, flax, mesh."""

import math
from fractions import Fraction

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
from jaxcompress.examples.data import load_digits
from jaxcompress.examples.models import LeNet300100, LeNet300100NNX


def _params(seed=0, ties=False):
    rng = np.random.default_rng(seed)

    def draw(shape):
        # Small integers give many equal magnitudes, to exercise tie-breaking.
        values = rng.integers(-3, 4, size=shape) if ties else rng.normal(size=shape)
        return jnp.asarray(values, jnp.float32)

    return {
        "enc": {"kernel": draw((37, 19)), "bias": jnp.ones(19)},
        "dec": {"kernel": draw((19, 5)), "bias": jnp.ones(5)},
    }


def _grads(params, seed):
    keys = jax.random.split(jax.random.key(seed), len(jax.tree.leaves(params)))
    leaves, treedef = jax.tree.flatten(params)
    return treedef.unflatten(
        [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
    )


def _expected_count(sparsity, size):
    # floor(s * n) with s read as the decimal its float32 value prints as.
    return math.floor(Fraction(str(np.float32(sparsity))) * size)


def _kernels(params):
    return {"enc/kernel": params["enc"]["kernel"], "dec/kernel": params["dec"]["kernel"]}


def test_cubic_schedule_boundaries_and_midpoint_by_hand():
    schedule = jc.training.cubic_sparsity(0.8, begin=2, end=10, initial=0.1)
    assert float(schedule(0)) == pytest.approx(0.1, abs=1e-7)
    assert float(schedule(2)) == np.float32(0.1)
    # Halfway: 0.8 + (0.1 - 0.8) * 0.5 ** 3 = 0.7125.
    assert float(schedule(6)) == pytest.approx(0.7125, abs=1e-6)
    assert float(schedule(10)) == np.float32(0.8)
    assert float(schedule(1000)) == np.float32(0.8)
    jitted = jax.jit(schedule)(jnp.int32(6))
    assert jitted.dtype == jnp.float32
    assert float(jitted) == pytest.approx(0.7125, abs=1e-6)
    values = [float(schedule(t)) for t in range(12)]
    assert values == sorted(values)


def test_exact_zeros_after_every_step_across_mask_updates():
    params = _params()
    schedule = jc.training.cubic_sparsity(0.9, begin=0, end=9)
    tx = jc.training.pruned(optax.sgd(0.1), schedule, every=3)
    state = tx.init(params)

    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for t in range(12):
        params, state = step(params, state, _grads(params, t))
        assert int(state.step) == t + 1
        for path, kernel in _kernels(params).items():
            mask = state.masks[path]
            assert mask.shape == kernel.shape and mask.dtype == jnp.bool_
            assert np.all(np.asarray(kernel)[~np.asarray(mask)] == 0.0)
            if t % 3 == 0:
                expected = _expected_count(schedule(t), kernel.size)
                assert int(jnp.sum(~mask)) == expected
                assert int(jnp.sum(kernel == 0.0)) == expected
        # Biases are not selected: they get no mask and keep training.
        assert set(state.masks) == {"enc/kernel", "dec/kernel"}
        assert not np.allclose(params["enc"]["bias"], 1.0)
    assert int(jnp.sum(~state.masks["enc/kernel"])) == math.floor(Fraction("0.9") * 37 * 19)


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.29])
def test_masks_equal_prune_masks_with_ties(scope, sparsity):
    params = _params(seed=1, ties=True)
    tx = jc.training.pruned(optax.sgd(0.1), sparsity, scope=scope)
    _, state = jax.jit(tx.update)(_grads(params, 0), tx.init(params), params)
    compressed, _ = jc.prune(sparsity, scope=scope)(params)
    for path, mask in state.masks.items():
        layer, name = path.split("/")
        np.testing.assert_array_equal(mask, compressed[layer][name].keep_mask())


def test_schedule_count_matches_prune_on_a_decimal():
    params = _params(seed=2)
    tx = jc.training.pruned(optax.sgd(0.1), lambda t: jnp.float32(0.29), scope="layer")
    _, state = jax.jit(tx.update)(_grads(params, 0), tx.init(params), params)
    compressed, _ = jc.prune(0.29)(params)
    for path, mask in state.masks.items():
        layer, name = path.split("/")
        np.testing.assert_array_equal(mask, compressed[layer][name].keep_mask())


def test_global_scope_schedule_under_jit():
    params = _params(seed=3, ties=True)
    schedule = jc.training.cubic_sparsity(0.6, begin=0, end=4)
    tx = jc.training.pruned(optax.sgd(0.05, momentum=0.9), schedule, scope="global", every=2)
    state = tx.init(params)
    step = jax.jit(lambda p, s, g: tx.update(g, s, p))
    total = sum(k.size for k in _kernels(params).values())
    for t in range(6):
        updates, state = step(params, state, _grads(params, t))
        params = optax.apply_updates(params, updates)
        pruned_total = sum(int(jnp.sum(~m)) for m in state.masks.values())
        zeros_total = sum(int(jnp.sum(k == 0.0)) for k in _kernels(params).values())
        if t % 2 == 0:
            assert pruned_total == _expected_count(schedule(t), total)
        assert zeros_total >= pruned_total
        for path, kernel in _kernels(params).items():
            assert np.all(np.asarray(kernel)[~np.asarray(state.masks[path])] == 0.0)


def test_finalize_gives_sparse_leaves_equal_to_params():
    params = _params(seed=4)
    tx = optax.chain(optax.clip(10.0), jc.training.pruned(optax.sgd(0.1), 0.75, every=2))
    state = tx.init(params)
    for t in range(3):
        updates, state = tx.update(_grads(params, t), state, params)
        params = optax.apply_updates(params, updates)
    final = jc.training.finalize(params, state)
    for layer in ("enc", "dec"):
        sparse = final[layer]["kernel"]
        assert isinstance(sparse, jc.Sparse)
        assert sparse.nnz == params[layer]["kernel"].size - math.floor(
            Fraction("0.75") * params[layer]["kernel"].size
        )
        np.testing.assert_array_equal(sparse.materialize(), params[layer]["kernel"])
        assert not isinstance(final[layer]["bias"], jc.Sparse)
        np.testing.assert_array_equal(final[layer]["bias"], params[layer]["bias"])


def _digits(count=64):
    images, labels = load_digits()
    return jnp.asarray(images[:count], jnp.float32), jnp.asarray(labels[:count], jnp.int32)


def test_linen_train_state():
    model = LeNet300100()
    images, labels = _digits()
    params = model.init(jax.random.key(0), images[:1])["params"]
    schedule = jc.training.cubic_sparsity(0.8, begin=0, end=4)
    state = train_state.TrainState.create(
        apply_fn=model.apply,
        params=params,
        tx=jc.training.pruned(optax.sgd(0.1), schedule, every=2),
    )

    @jax.jit
    def train_step(state, x, y):
        def loss_fn(p):
            logits = state.apply_fn({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        return state.apply_gradients(grads=jax.grad(loss_fn)(state.params))

    for _ in range(5):
        state = train_step(state, images, labels)
    final = jc.training.finalize(state.params, state.opt_state)
    for name in ("dense1", "dense2", "dense3"):
        kernel = state.params[name]["kernel"]
        sparse = final[name]["kernel"]
        assert isinstance(sparse, jc.Sparse)
        assert kernel.size - sparse.nnz == math.floor(Fraction("0.8") * kernel.size)
        np.testing.assert_array_equal(sparse.materialize(), kernel)


def test_nnx_optimizer():
    model = LeNet300100NNX(rngs=nnx.Rngs(0))
    images, labels = _digits()
    optimizer = nnx.Optimizer(model, jc.training.pruned(optax.sgd(0.1), 0.5), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x, y):
        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

        optimizer.update(model, nnx.grad(loss_fn)(model))

    for _ in range(3):
        train_step(model, optimizer, images, labels)
    params = nnx.state(model, nnx.Param)
    final = jc.training.finalize(params, optimizer.opt_state)
    for layer in (model.dense1, model.dense2, model.dense3):
        kernel = layer.kernel[...]
        assert int(jnp.sum(kernel == 0.0)) >= math.floor(Fraction("0.5") * kernel.size)
    dense1 = final["dense1"]["kernel"].get_value()  # finalize keeps the Param wrapper
    assert isinstance(dense1, jc.Sparse)
    np.testing.assert_array_equal(dense1.materialize(), model.dense1.kernel[...])


@pytest.mark.bitwise
def test_data_parallel_step_equals_unsharded(mesh8):
    model = LeNet300100()
    images, labels = _digits()
    params = model.init(jax.random.key(0), images[:1])["params"]
    tx = jc.training.pruned(
        optax.sgd(0.1), jc.training.cubic_sparsity(0.5, begin=0, end=2), every=1
    )

    def train_step(params, opt_state, x, y):
        def loss_fn(p):
            logits = model.apply({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        updates, opt_state = tx.update(jax.grad(loss_fn)(params), opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    step = jax.jit(train_step)
    reference = (params, tx.init(params))
    for _ in range(2):
        reference = step(*reference, images, labels)

    replicated = NamedSharding(mesh8, P())
    batch = NamedSharding(mesh8, P("data"))
    with jax.set_mesh(mesh8):
        sharded_params = jax.device_put(params, replicated)
        sharded = (sharded_params, jax.device_put(tx.init(params), replicated))
        x, y = jax.device_put(images, batch), jax.device_put(labels, batch)
        for _ in range(2):
            sharded = step(*sharded, x, y)
    for got, want in zip(jax.tree.leaves(sharded[0]), jax.tree.leaves(reference[0]), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    for path, mask in reference[1].masks.items():
        np.testing.assert_array_equal(sharded[1].masks[path], mask)
        layer = path.split("/")[0]
        got = np.asarray(sharded[0][layer]["kernel"])
        assert np.all(got[~np.asarray(mask)] == 0.0)


@pytest.mark.bitwise
def test_pmap_step_equals_single_device_step():
    # pmap over the 8 fake devices: each device takes 1/8 of the batch, gradients are
    # averaged with pmean, and the wrapper recomputes identical masks on every device.
    model = LeNet300100()
    images, labels = _digits()
    images, labels = images[:64], labels[:64]
    params = model.init(jax.random.key(0), images[:1])["params"]
    tx = jc.training.pruned(
        optax.sgd(0.1), jc.training.cubic_sparsity(0.5, begin=0, end=2), every=1
    )

    def grads_of(params, x, y):
        def loss_fn(p):
            logits = model.apply({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        return jax.grad(loss_fn)(params)

    def apply(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    single = jax.jit(lambda p, s, x, y: apply(p, s, grads_of(p, x, y)))
    parallel = jax.pmap(
        lambda p, s, x, y: apply(p, s, jax.lax.pmean(grads_of(p, x, y), "devices")),
        axis_name="devices",
    )
    devices = jax.local_device_count()

    def replicate(tree):
        return jax.tree.map(lambda a: jnp.stack([a] * devices), tree)

    reference = (params, tx.init(params))
    replicated = (replicate(params), replicate(tx.init(params)))
    x = images.reshape(devices, -1, images.shape[-1])
    y = labels.reshape(devices, -1)
    for _ in range(3):
        reference = single(*reference, images, labels)
        replicated = parallel(*replicated, x, y)
    for got, want in zip(
        jax.tree.leaves(replicated[0]), jax.tree.leaves(reference[0]), strict=True
    ):
        for device in range(devices):
            np.testing.assert_allclose(got[device], want, rtol=1e-5, atol=1e-6)
    for path, mask in reference[1].masks.items():
        for device in range(devices):
            np.testing.assert_array_equal(replicated[1].masks[path][device], mask)


def test_bad_input():
    params = _params()
    grads = _grads(params, 0)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        jc.training.pruned(optax.sgd(0.1), 1.0)
    with pytest.raises(ValueError, match="schedule returned 1.5 at step 0"):
        jc.training.pruned(optax.sgd(0.1), lambda t: jnp.float32(1.5)).init(params)
    late = jc.training.pruned(optax.sgd(0.1), lambda t: jnp.where(t >= 1, 2.0, 0.5), every=1)
    state = late.init(params)
    _, state = late.update(grads, state, params)
    with pytest.raises(ValueError, match="at step 1"):
        late.update(grads, state, params)
    tx = jc.training.pruned(optax.sgd(0.1), 0.5)
    with pytest.raises(ValueError, match=r"tx.update\(grads, state, params\)"):
        tx.update(grads, tx.init(params))
    with pytest.raises(TypeError, match="no PrunedState"):
        jc.training.finalize(params, optax.sgd(0.1).init(params))
    with pytest.raises(ValueError, match="scope"):
        jc.training.pruned(optax.sgd(0.1), 0.5, scope="row")
    with pytest.raises(ValueError, match="every"):
        jc.training.pruned(optax.sgd(0.1), 0.5, every=0)
    with pytest.raises(ValueError, match="initial"):
        jc.training.cubic_sparsity(0.5, begin=0, end=10, initial=0.6)
    with pytest.raises(ValueError, match="end"):
        jc.training.cubic_sparsity(0.5, begin=10, end=10)
    with pytest.raises(ValueError, match="final"):
        jc.training.cubic_sparsity(1.0, begin=0, end=10)


def test_out_of_range_schedule_under_jit_keeps_one_entry():
    params = {"w": jnp.arange(1.0, 7.0).reshape(2, 3)}
    tx = jc.training.pruned(
        optax.sgd(0.1), lambda t: jnp.float32(0.5) + t.astype(jnp.float32), every=1
    )
    state = tx.init(params)
    _, state = tx.update(params, state, params)
    _, state = jax.jit(tx.update)(params, state, params)  # step 1: sparsity 1.5, traced
    assert int(jnp.sum(state.masks["w"])) == 1


def test_orbax_checkpoint_resume_is_bit_identical(tmp_path):
    import orbax.checkpoint as ocp

    from jaxcompress.examples.data import load_digits
    from jaxcompress.examples.models import LeNet300100

    images, labels = load_digits(split="train")
    model = LeNet300100()
    params = model.init(jax.random.key(0), images[:1])["params"]
    schedule = jc.training.cubic_sparsity(0.8, begin=0, end=12)
    tx = jc.training.pruned(optax.sgd(0.1, momentum=0.9), schedule, every=4)

    @jax.jit
    def step(params, state, i):
        batch = jax.lax.dynamic_slice_in_dim(images, i * 32, 32)
        target = jax.lax.dynamic_slice_in_dim(labels, i * 32, 32)

        def loss(p):
            logits = model.apply({"params": p}, batch)
            return optax.softmax_cross_entropy_with_integer_labels(logits, target).mean()

        updates, state = tx.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    def run(params, state, start, stop):
        for i in range(start, stop):
            params, state = step(params, state, i)
        return params, state

    uninterrupted, _ = run(params, tx.init(params), 0, 16)
    half_params, half_state = run(params, tx.init(params), 0, 9)
    checkpointer = ocp.StandardCheckpointer()
    target = {"params": half_params, "opt_state": half_state}
    checkpointer.save(tmp_path / "step9", target)
    checkpointer.wait_until_finished()
    restored = checkpointer.restore(tmp_path / "step9", target)
    assert isinstance(restored["opt_state"], type(half_state))
    resumed, _ = run(restored["params"], restored["opt_state"], 9, 16)
    for got, want in zip(jax.tree.leaves(resumed), jax.tree.leaves(uninterrupted), strict=True):
        np.testing.assert_array_equal(got, want)
    # The resumed run kept pruning: exactly floor(0.8 * n) zeros in each kernel at the end.
    assert int((resumed["dense2"]["kernel"] == 0).sum()) == 24000


@pytest.mark.parametrize("size", [7, 100, 1000, 19200, 30000, 120 * 84, 784 * 300])
@pytest.mark.parametrize("value", [0.0, 0.1, 0.29, 0.5, 0.8, 0.9, 0.95, 0.999])
def test_schedule_counts_match_prune_on_the_decimal(size, value):
    # A schedule value float32(s) prunes floor(s * n) of the decimal s, like jc.prune(s);
    # float32(0.9) * 19200 is 17279.9995 in float32 and must still count 17280.
    schedule_count = jc.training.pruning._schedule_count
    expected = min(math.floor(Fraction(str(value)) * size), size - 1)
    assert int(schedule_count(jnp.float32(value), size)) == expected
    assert int(jax.jit(schedule_count, static_argnums=1)(jnp.float32(value), size)) == expected
