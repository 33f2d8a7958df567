"""jc.distill: the student keeps its compression exactly and gets closer to the teacher."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import jaxcompress as jc
from jaxcompress.arrays.quantized import requantize
from jaxcompress.numerics.uniform import encode

KEYS = jax.random.split(jax.random.key(0), 6)
PARAMS = {
    "l1": {"kernel": jax.random.normal(KEYS[0], (16, 32)) / 4, "bias": jnp.zeros(32)},
    "l2": {"kernel": jax.random.normal(KEYS[1], (32, 8)) / 5.6, "bias": jnp.zeros(8)},
}
BATCHES = jax.random.normal(KEYS[2], (6, 32, 16))  # 6 batches of 32 rows
HELD_OUT = [jax.random.normal(k, (32, 16)) for k in jax.random.split(KEYS[3], 2)]


def _apply(p, x):
    hidden = jnp.tanh(x @ p["l1"]["kernel"] + p["l1"]["bias"][None, :])
    return hidden @ p["l2"]["kernel"] + p["l2"]["bias"][None, :]


def _distill(tx, *, lr=1e-2, steps=40, params=PARAMS, apply=_apply, **options):
    options = {"loss": "mse", "progress": False, **options}
    return jc.distill(
        apply,
        params,
        tx,
        BATCHES,
        optimizer=optax.adam(lr),
        steps=steps,
        eval_batches=HELD_OUT,
        **options,
    )


def _same_quantized(new, old):
    assert isinstance(new, jc.Quantized)
    assert (new.shape, new.dtype, new.bits, new.axis, new.group_size) == (
        old.shape,
        old.dtype,
        old.bits,
        old.axis,
        old.group_size,
    )
    assert new.codes.shape == old.codes.shape and new.codes.dtype == old.codes.dtype
    assert new.scale.shape == old.scale.shape and new.scale.dtype == old.scale.dtype
    assert (new.zero_point is None) == (old.zero_point is None)
    if old.zero_point is not None:
        np.testing.assert_array_equal(new.zero_point, old.zero_point)
    # Trained scales keep their sign (the side of the extra level).
    assert np.all(np.sign(new.scale) == np.sign(old.scale))
    assert int(new.unpacked_codes().max()) <= 2**new.bits - 1


def _check_quantized(new, old):
    _same_quantized(new, old)


def _check_clustered(new, old):
    assert isinstance(new, jc.Clustered)
    np.testing.assert_array_equal(new.indices, old.indices)
    assert new.codebook.shape == old.codebook.shape and new.bits == old.bits
    assert not np.array_equal(new.codebook, old.codebook)  # it trained


def _check_sparse(new, old):
    assert isinstance(new, jc.Sparse)
    np.testing.assert_array_equal(new.mask, old.mask)
    assert new.nnz == old.nnz and new.shape == old.shape
    dense = np.asarray(new.materialize())
    assert not dense[~np.asarray(old.keep_mask())].any()


def _check_two_four(new, old):
    _check_sparse(new, old)
    kept = np.asarray(new.keep_mask()).reshape(-1, 4, new.shape[-1]).sum(axis=1)
    assert (kept == 2).all()  # still 2 of every 4 along the contracted axis


def _check_lowrank(new, old):
    assert isinstance(new, jc.LowRank)
    assert new.u.shape == old.u.shape and new.v.shape == old.v.shape


def _check_sparse_quantized(new, old):
    _check_sparse(new, old)
    _same_quantized(new.values, old.values)


CASES = {
    "quantize int4 g8": (jc.quantize(4, group_size=8), 3e-3, _check_quantized),
    "quantize int3 asym": (jc.quantize(3, symmetric=False), 3e-3, _check_quantized),
    "cluster 4-bit": (jc.cluster(bits=4), 1e-2, _check_clustered),
    "prune 50%": (jc.prune(0.5), 1e-2, _check_sparse),
    "prune_nm 2:4": (jc.prune_nm("2:4"), 1e-2, _check_two_four),
    "low_rank": (jc.low_rank(4), 1e-2, _check_lowrank),
    "prune + quantize": (jc.chain(jc.prune(0.5), jc.quantize(4)), 3e-3, _check_sparse_quantized),
}


@pytest.mark.parametrize("name", list(CASES))
def test_student_keeps_its_compression_and_gets_closer(name):
    tx, lr, check = CASES[name]
    start, _ = tx(PARAMS)
    student, report = _distill(tx, lr=lr)
    assert jax.tree.structure(student, is_leaf=jc.is_compressed) == jax.tree.structure(
        start, is_leaf=jc.is_compressed
    )
    for layer in ("l1", "l2"):
        check(student[layer]["kernel"], start[layer]["kernel"])
        assert not np.array_equal(student[layer]["bias"], start[layer]["bias"])
    assert report.after < report.before, report
    assert report.steps == 40 and report.loss.shape == (40,) and np.isfinite(report.loss).all()
    assert report.eval_on == "eval_batches"
    # The report's "after" is the returned tree's own loss.
    outputs = [(_apply(jc.materialize(student), x), _apply(PARAMS, x)) for x in HELD_OUT]
    expected = np.mean([float(jnp.mean(jnp.square(s - t))) for s, t in outputs])
    np.testing.assert_allclose(report.after, expected, rtol=1e-5)


def test_thinned_student_runs_through_the_units_program():
    tx = jc.prune_units(0.5, apply_fn=_apply, example_input=BATCHES[0])
    thinned, stats = tx(PARAMS)
    student, report = _distill(tx)
    assert jax.tree.map(jnp.shape, student) == jax.tree.map(jnp.shape, thinned)
    assert student["l1"]["kernel"].shape == (16, 16)
    assert report.after < report.before
    out = jax.jit(stats.apply_fn)(student, HELD_OUT[0])
    assert out.shape == (32, 8)


def test_train_scale_trains_the_scales_only_when_asked():
    tx = jc.quantize(4, group_size=8)
    start, _ = tx(PARAMS)
    fixed, _ = _distill(tx, lr=3e-3, steps=10, train_scale=False)
    moved, _ = _distill(tx, lr=3e-3, steps=10)
    np.testing.assert_array_equal(fixed["l1"]["kernel"].scale, start["l1"]["kernel"].scale)
    assert not np.array_equal(moved["l1"]["kernel"].scale, start["l1"]["kernel"].scale)


def test_train_dense_false_keeps_dense_leaves():
    student, _ = _distill(jc.cluster(bits=4), steps=5, train_dense=False)
    np.testing.assert_array_equal(student["l1"]["bias"], PARAMS["l1"]["bias"])


def test_awq_student_keeps_its_input_scales_and_data_reaches_tx():
    data = jc.calibrate(_apply, PARAMS, list(BATCHES))
    tx = jc.quantize(4, method="awq", where=r"l1/kernel")
    start, _ = tx(PARAMS, data=data)
    student, report = _distill(tx, lr=3e-3, data=data)
    new, old = student["l1"]["kernel"], start["l1"]["kernel"]
    _same_quantized(new, old)
    np.testing.assert_array_equal(new.input_scale, old.input_scale)
    assert report.after < report.before


class _Linen(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(8)(nn.tanh(nn.Dense(32)(x)))


class _NNX(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(16, 32, rngs=rngs)
        self.l2 = nnx.Linear(32, 8, rngs=rngs)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x)))


def test_linen_model():
    model = _Linen()
    params = model.init(KEYS[4], BATCHES[0])["params"]
    apply = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    student, report = _distill(jc.prune(0.5), params=params, apply=apply)
    assert isinstance(student["Dense_0"]["kernel"], jc.Sparse)
    assert report.after < report.before


def test_nnx_module_and_its_functional_apply_agree():
    model = _NNX(nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    apply = lambda s, x: nnx.merge(graphdef, s)(x)  # noqa: E731
    tx = jc.quantize(4)
    by_module, report = _distill(tx, lr=3e-3, steps=20, params=None, apply=model)
    by_function, report2 = _distill(tx, lr=3e-3, steps=20, params=state, apply=apply)
    assert isinstance(by_module, nnx.State)
    assert isinstance(by_module["l1"]["kernel"].get_value(), jc.Quantized)
    np.testing.assert_array_equal(report.loss, report2.loss)
    assert report.after < report.before
    # The student runs through the module again, compressed.
    out = nnx.merge(graphdef, jc.materialize(by_module))(HELD_OUT[0])
    assert out.shape == (32, 8)


def test_result_runs_under_jit_through_accelerate_and_materialize():
    student, _ = _distill(jc.chain(jc.prune(0.5), jc.quantize(4)), lr=3e-3, steps=5)
    fast = jax.jit(jc.accelerate(_apply))(student, HELD_OUT[0])
    dense = jax.jit(_apply)(jc.materialize(student), HELD_OUT[0])
    np.testing.assert_allclose(fast, dense, rtol=2e-2, atol=2e-2)


def _by_hand(loss, s, t, temperature=2.0):
    s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
    if loss == "mse":
        return np.mean((s - t) ** 2)
    if loss == "cosine":
        cos = (s * t).sum(-1) / (np.linalg.norm(s, axis=-1) * np.linalg.norm(t, axis=-1))
        return np.mean(1 - cos)

    def log_softmax(z):
        z = z / temperature
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    log_t, log_s = log_softmax(t), log_softmax(s)
    return np.mean((np.exp(log_t) * (log_t - log_s)).sum(-1)) * temperature**2


@pytest.mark.parametrize("loss", ["mse", "cosine", "kl"])
def test_losses_are_the_documented_formulas(loss):
    tx = jc.prune(0.5)
    start, _ = tx(PARAMS)
    x = HELD_OUT[0]
    _, report = jc.distill(
        _apply, PARAMS, tx, [x], optimizer=optax.sgd(0.0), steps=1, loss=loss,
        temperature=2.0, progress=False,
    )  # fmt: skip
    expected = _by_hand(loss, _apply(jc.materialize(start), x), _apply(PARAMS, x))
    np.testing.assert_allclose(report.before, expected, rtol=1e-4)
    np.testing.assert_allclose(report.loss[0], expected, rtol=1e-4)
    assert report.eval_on == "batches"


def test_callable_loss_and_report_table():
    def l1(s, t):
        return jnp.mean(jnp.abs(s - t))

    _, report = _distill(jc.prune(0.5), steps=3, loss=l1)
    assert report.loss_name == "l1"
    table = report.table()
    assert "| steps | 3 |" in table and "loss on eval_batches, after" in table
    assert str(report) == table == report._repr_markdown_()
    assert repr(report).startswith("DistillReport(steps=3, loss='l1'")


def test_requantize_rounds_after_a_fractional_zero_point():
    w = jax.random.normal(KEYS[5], (12, 6))
    q = jc.quantize(3, symmetric=False, where="w")({"w": w})[0]["w"]
    target = w + 0.1
    codes = requantize(q, target).unpacked_codes()
    expected, _ = encode(target, q.scale, q.zero_point, 3)
    np.testing.assert_array_equal(codes, expected.astype(np.uint8))


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(loss="huber"), ValueError, "loss must be one of"),
        (dict(steps=0), ValueError, "steps must be a positive integer"),
        (dict(steps=True), ValueError, "steps must be a positive integer"),
        (dict(batches=[]), ValueError, "batches is empty"),
        (dict(batches=BATCHES[0, 0]), ValueError, "at least 2 dimensions"),
        (dict(batches=iter([BATCHES[0]])), TypeError, "list or tuple"),
        (dict(batches=[BATCHES[0], BATCHES[0][:, :8]]), ValueError, r"batches\[1\]"),
        (dict(eval_batches=[BATCHES[0][:, :8]]), ValueError, "laid out like batches"),
        (dict(tx=lambda p, **_: (p, {})), TypeError, "must be a jaxcompress Transform"),
        (dict(features=["l1"]), TypeError, "features must be None, True or a filter"),
        (dict(feature_weight=-1.0), ValueError, "feature_weight"),
        (dict(mesh="data"), TypeError, "mesh must be"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(apply_fn=3), TypeError, "apply_fn must be"),
    ],
)
def test_bad_inputs_give_clear_errors(change, error, match):
    arguments = dict(apply_fn=_apply, teacher_params=PARAMS, tx=jc.prune(0.5), batches=BATCHES)
    options = {k: change.pop(k) for k in list(change) if k not in arguments}
    arguments.update(change)
    with pytest.raises(error, match=match):
        jc.distill(*arguments.values(), steps=options.pop("steps", 1), progress=False, **options)


def test_serving_layouts_are_refused():
    prepared = jc.accelerate(_apply).prepare(jc.quantize(8)(PARAMS)[0])
    tx = jc.Transform(lambda p, **_: (prepared, {}), "prepared")
    with pytest.raises(TypeError, match="l1/kernel"):
        jc.distill(_apply, PARAMS, tx, BATCHES, steps=1, progress=False)


def test_equinox_module_with_non_array_leaves():
    import equinox as eqx

    model = eqx.nn.MLP(16, 8, 32, 1, activation=jnp.tanh, key=KEYS[4])
    apply = lambda m, x: jax.vmap(m)(x)  # noqa: E731
    student, report = _distill(jc.prune(0.5), params=model, apply=apply, steps=20)
    assert isinstance(student.layers[0].weight, jc.Sparse)
    assert student.activation is jnp.tanh
    assert report.after < report.before
