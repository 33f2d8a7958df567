"""jc.distill(features=): intermediate activations found by tracing, on linen, nnx, functions."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import jaxcompress as jc
from jaxcompress.calibration.features import feature_loss, traced_features

KEYS = jax.random.split(jax.random.key(2), 8)
BATCHES = jax.random.normal(KEYS[0], (4, 32, 16))  # 4 batches of 32 rows
HELD_OUT = [jax.random.normal(KEYS[1], (32, 16))]
TX = jc.prune(0.5)


def _plain_params():
    shapes = {"a": (16, 24), "b": (24, 24), "c": (24, 8)}
    keys = dict(zip(shapes, jax.random.split(KEYS[2], 3), strict=True))
    return {
        name: {"w": jax.random.normal(keys[name], shape) / np.sqrt(shape[0])}
        for name, shape in shapes.items()
    }


def _plain_apply(p, x):
    hidden = jnp.tanh(x @ p["a"]["w"])
    hidden = jnp.tanh(hidden @ p["b"]["w"])
    return hidden @ p["c"]["w"]


class _Linen(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Dense(24)(x))
        x = nn.tanh(nn.Dense(24)(x))
        return nn.Dense(8)(x)


class _NNX(nnx.Module):
    def __init__(self, rngs):
        self.first = nnx.Linear(16, 24, rngs=rngs)
        self.second = nnx.Linear(24, 8, rngs=rngs)

    def __call__(self, x):
        return self.second(jnp.tanh(self.first(x)))


def _linen():
    model = _Linen()
    params = model.init(KEYS[3], BATCHES[0])["params"]
    return (lambda p, x: model.apply({"params": p}, x)), params


def _nnx():
    return _NNX(nnx.Rngs(0)), None


MODELS = {
    "plain": (lambda: (_plain_apply, _plain_params()), ("a/w", "b/w", "c/w")),
    "linen": (_linen, ("Dense_0/kernel", "Dense_1/kernel", "Dense_2/kernel")),
    "nnx": (_nnx, ("first/kernel", "second/kernel")),
}


def _distill(apply, params, **options):
    options = {
        "optimizer": optax.adam(1e-2),
        "steps": 30,
        "loss": "mse",
        "eval_batches": HELD_OUT,
        "progress": False,
        **options,
    }
    return jc.distill(apply, params, TX, BATCHES, **options)


def _held_out_feature_loss(apply, teacher, student):
    """feature_loss of a returned student to the teacher, by traced_features directly."""
    _, want = traced_features(apply, teacher, HELD_OUT[0])
    _, got = traced_features(apply, jc.materialize(student), HELD_OUT[0])
    return float(feature_loss(got, want))


@pytest.mark.parametrize("kind", list(MODELS))
def test_features_are_found_by_tracing_and_matching_lowers_their_loss(kind):
    build, names = MODELS[kind]
    apply, params = build()
    matched, report = _distill(apply, params, features=True, feature_weight=3.0)
    assert report.features == names  # every kernel (tree order); no names given
    assert report.features_after < 0.7 * report.features_before, report
    assert report.after < report.before
    if kind == "nnx":  # the module itself: its state and a function over it
        graphdef, params = nnx.split(apply)
        apply = lambda s, x: nnx.merge(graphdef, s)(x)  # noqa: E731
    # The report's numbers are feature_loss on the held-out batch, before and after.
    start, _ = TX(params)
    before = _held_out_feature_loss(apply, params, start)
    np.testing.assert_allclose(report.features_before, before, rtol=1e-5)
    after = _held_out_feature_loss(apply, params, matched)
    np.testing.assert_allclose(report.features_after, after, rtol=1e-5)
    # Training on the output alone leaves the inner features further off.
    output_only, plain_report = _distill(apply, params)
    assert plain_report.features == () and plain_report.features_after is None
    assert after < _held_out_feature_loss(apply, params, output_only)


def test_the_loss_is_output_plus_weighted_features():
    params, x = _plain_params(), HELD_OUT[0]
    _, report = jc.distill(
        _plain_apply, params, TX, [x], optimizer=optax.sgd(0.0), steps=1, loss="mse",
        features=True, feature_weight=0.5, progress=False,
    )  # fmt: skip
    start = jc.materialize(TX(params)[0])
    out, got = traced_features(_plain_apply, start, x)
    want_out, want = traced_features(_plain_apply, params, x)
    output = float(jnp.mean(jnp.square(out - want_out)))
    features = float(feature_loss(got, want))
    np.testing.assert_allclose(report.before, output, rtol=1e-5)
    np.testing.assert_allclose(report.features_before, features, rtol=1e-5)
    np.testing.assert_allclose(report.loss[0], output + 0.5 * features, rtol=1e-5)
    assert "feature loss (3 features) on batches, before" in report.table()


def test_a_filter_chooses_the_features():
    _, report = _distill(_plain_apply, _plain_params(), features=r"^b/", steps=2)
    assert report.features == ("b/w",)
    _, report = _distill(_plain_apply, _plain_params(), features=("a/w", "c/w"), steps=2)
    assert report.features == ("a/w", "c/w")


def test_feature_matching_is_refused_for_a_thinned_student():
    params = _plain_params()
    tx = jc.prune_units(0.5, apply_fn=_plain_apply, example_input=BATCHES[0])
    with pytest.raises(ValueError, match="prune_units"):
        jc.distill(_plain_apply, params, tx, BATCHES, features=True, steps=1, progress=False)


def test_a_filter_selecting_nothing_is_named():
    with pytest.raises(ValueError, match="no_such_layer"):
        _distill(_plain_apply, _plain_params(), features="no_such_layer", steps=1)
