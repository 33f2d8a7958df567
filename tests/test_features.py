"""traced_features: the pre-activations found by tracing, and feature_loss between two sets."""

import warnings

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxcompress as jc
from jaxcompress.calibration.features import feature_loss, traced_features
from jaxcompress.transforms.filters import exact

_TOL = {"rtol": 1e-5, "atol": 1e-5}


def _normal(seed, shape):
    return jax.random.normal(jax.random.key(seed), shape)


def _plain_params(seed=0):
    return {
        "l1": {"kernel": _normal(seed, (4, 5)), "bias": _normal(seed + 1, (5,))},
        "l2": {"kernel": _normal(seed + 2, (5, 3)), "bias": _normal(seed + 3, (3,))},
    }


def _plain_apply(p, x):
    h = jnp.tanh(x @ p["l1"]["kernel"] + p["l1"]["bias"][None])
    return h @ p["l2"]["kernel"] + p["l2"]["bias"][None]


def _plain_reference(p, x):
    """The pre-activations by hand: x @ W1 and tanh(x @ W1 + b1) @ W2."""
    z1 = x @ p["l1"]["kernel"]
    z2 = jnp.tanh(z1 + p["l1"]["bias"][None]) @ p["l2"]["kernel"]
    return {"l1/kernel": z1, "l2/kernel": z2}


def _assert_features(got, want):
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], **_TOL, err_msg=name)


def test_plain_function_features_are_the_pre_activations():
    params, x = _plain_params(), _normal(9, (6, 4))
    out, feats = traced_features(_plain_apply, params, x)
    np.testing.assert_allclose(out, _plain_apply(params, x), **_TOL)
    _assert_features(feats, _plain_reference(params, x))


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(5)(x))
        return nn.Dense(3)(x)


def test_linen_mlp():
    model, x = _MLP(), _normal(1, (4, 6))
    params = model.init(jax.random.key(0), x)["params"]
    out, feats = traced_features(lambda p, x: model.apply({"params": p}, x), params, x)
    k0, k1 = params["Dense_0"]["kernel"], params["Dense_1"]["kernel"]
    z0 = x @ k0
    want = {
        "Dense_0/kernel": z0,
        "Dense_1/kernel": jax.nn.relu(z0 + params["Dense_0"]["bias"][None]) @ k1,
    }
    _assert_features(feats, want)
    np.testing.assert_allclose(out, model.apply({"params": params}, x), **_TOL)


class _NNXMLP(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(6, 5, rngs=rngs)
        self.l2 = nnx.Linear(5, 3, rngs=rngs)

    def __call__(self, x):
        return self.l2(jax.nn.gelu(self.l1(x)))


def test_nnx_state():
    graphdef, state = nnx.split(_NNXMLP(nnx.Rngs(0)))
    x = _normal(2, (4, 6))
    out, feats = traced_features(lambda s, x: nnx.merge(graphdef, s)(x), state, x)
    k1, b1, k2 = state["l1"]["kernel"][...], state["l1"]["bias"][...], state["l2"]["kernel"][...]
    z1 = x @ k1
    _assert_features(feats, {"l1/kernel": z1, "l2/kernel": jax.nn.gelu(z1 + b1[None]) @ k2})
    np.testing.assert_allclose(out, nnx.merge(graphdef, state)(x), **_TOL)


class _ConvNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), padding="SAME")(x))
        return nn.Dense(2)(x.reshape(x.shape[0], -1))


def test_linen_conv_net():
    model, x = _ConvNet(), _normal(3, (2, 5, 5, 1))
    params = model.init(jax.random.key(0), x)["params"]
    _, feats = traced_features(lambda p, x: model.apply({"params": p}, x), params, x)
    kernel = params["Conv_0"]["kernel"]
    conv = jax.lax.conv_general_dilated(
        x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    hidden = jax.nn.relu(conv + params["Conv_0"]["bias"][None, None, None]).reshape(2, -1)
    want = {"Conv_0/kernel": conv, "Dense_0/kernel": hidden @ params["Dense_0"]["kernel"]}
    _assert_features(feats, want)


def test_equinox_module_as_params():
    mlp = eqx.nn.MLP(4, 2, 3, depth=1, key=jax.random.key(0))
    x = _normal(4, (5, 4))
    out, feats = traced_features(lambda m, x: jax.vmap(m)(x), mlp, x)
    w0, w1 = mlp.layers[0].weight, mlp.layers[1].weight  # (out, in)
    z0 = x @ w0.T
    z1 = jax.nn.relu(z0 + mlp.layers[0].bias[None]) @ w1.T
    # vmap of weight @ x is one dot_general whose output is (out, batch): the op's layout.
    _assert_features(feats, {"layers/0/weight": z0.T, "layers/1/weight": z1.T})
    np.testing.assert_allclose(out, jax.vmap(mlp)(x), **_TOL)


def _reference_loss(student, teacher):
    terms = [
        jnp.mean((student[k] - teacher[k]) ** 2) / (jnp.mean(teacher[k] ** 2) + 1e-6)
        for k in teacher
    ]
    return sum(terms) / len(terms)


def test_grad_of_feature_loss_equals_the_hand_written_reference():
    teacher, student, x = _plain_params(0), _plain_params(10), _normal(9, (6, 4))
    _, targets = traced_features(_plain_apply, teacher, x)

    def loss(p):
        return feature_loss(traced_features(_plain_apply, p, x)[1], targets)

    def reference(p):
        return _reference_loss(_plain_reference(p, x), _plain_reference(teacher, x))

    np.testing.assert_allclose(loss(student), reference(student), rtol=1e-5)
    got, want = jax.grad(loss)(student), jax.grad(reference)(student)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6), got, want)
    # The bias of the last layer changes no feature: its gradient is exactly zero.
    assert not np.any(np.asarray(got["l2"]["bias"]))
    jitted = jax.jit(jax.grad(loss))(student)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6), jitted, want)


def test_under_jit_equals_eager_and_traces_once_per_signature():
    calls = []

    def apply(p, x):
        calls.append(x.shape)
        return _plain_apply(p, x)

    params, x = _plain_params(), _normal(9, (6, 4))
    eager = traced_features(apply, params, x)
    jitted = jax.jit(lambda p, x: traced_features(apply, p, x))(params, x)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **_TOL), eager, jitted)
    traced_features(apply, params, 2 * x)
    assert calls == [(6, 4)]  # the jitted call and the second call reused the trace
    traced_features(apply, params, x[:3])
    assert calls == [(6, 4), (3, 4)]  # a new batch size is traced once more


def test_a_weight_used_twice_gives_one_feature_per_use():
    w, x = _normal(0, (3, 3)), _normal(1, (2, 3))
    _, feats = traced_features(lambda p, x: jnp.sin(x @ p["w"]) @ p["w"], {"w": w}, x)
    assert sorted(feats) == ["w", "w@1"]
    np.testing.assert_allclose(feats["w@1"], jnp.sin(x @ w) @ w, **_TOL)


def _scanned(p, x):
    def cell(h, _):
        return jnp.tanh(h @ p["cell"]), None

    h, _ = jax.lax.scan(cell, x @ p["inp"], None, length=2)
    return h @ p["out"]


def test_weights_inside_a_scan_body_are_named_in_one_warning():
    params = {k: _normal(i, (3, 3)) for i, k in enumerate(["inp", "cell", "out"])}
    x = _normal(5, (2, 3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, feats = traced_features(_scanned, params, x)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "cell (it enters scan" in message and "inp" not in message
    assert sorted(feats) == ["inp", "out"]
    np.testing.assert_allclose(out, _scanned(params, x), **_TOL)
    with pytest.raises(ValueError, match=r"cell: it enters scan"):
        traced_features(_scanned, params, x, where=exact("cell"))


def test_where_chooses_features_and_unconsumed_leaves_are_reported():
    params = {"emb": _normal(0, (5, 3)), "dense": {"kernel": _normal(1, (3, 2))}}
    tokens = jnp.array([[0, 4], [1, 2]])

    def apply(p, t):
        return jnp.take(p["emb"], t, axis=0) @ p["dense"]["kernel"]

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default filter skips the embedding silently
        _, feats = traced_features(apply, params, tokens)
    assert list(feats) == ["dense/kernel"]
    with pytest.warns(UserWarning, match=r"emb \(no dot_general or convolution consumes it\)"):
        _, feats = traced_features(apply, params, tokens, where=("emb", "dense"))
    assert list(feats) == ["dense/kernel"]
    with pytest.raises(ValueError, match="no dot_general or convolution output"):
        traced_features(apply, params, tokens, where="emb")


def test_bad_inputs_raise_clear_errors():
    params, x = _plain_params(), _normal(9, (6, 4))
    with pytest.raises(ValueError, match=r"selects none of the 4 leaves.*did you mean 'l1/kernel'"):
        traced_features(_plain_apply, params, x, where="^L1/kernel$")
    pruned, _ = jc.prune(0.5)(params)
    with pytest.raises(TypeError, match=r"'l1/kernel' is compressed \(Sparse\)"):
        traced_features(_plain_apply, pruned, x)


def test_feature_loss_value_scale_freedom_and_no_teacher_gradient():
    t = {"a": jnp.array([[1.0, -1.0]]), "b": jnp.array([[10.0, 10.0]])}
    s = {"a": jnp.array([[1.0, -1.0]]), "b": jnp.array([[9.0, 11.0]])}
    assert float(feature_loss(s, t)) == pytest.approx(0.005, rel=1e-5)
    scaled = feature_loss({k: 7 * v for k, v in s.items()}, {k: 7 * v for k, v in t.items()})
    assert float(scaled) == pytest.approx(0.005, rel=1e-5)
    assert float(feature_loss({k: 0 * v for k, v in t.items()}, t)) == pytest.approx(1.0, 1e-5)
    bf16 = feature_loss({k: v.astype(jnp.bfloat16) for k, v in s.items()}, t)
    assert bf16.dtype == jnp.float32
    grads = jax.grad(feature_loss, argnums=1)(s, t)
    assert not any(np.any(np.asarray(g)) for g in grads.values())


def test_feature_loss_errors():
    t = {"a": jnp.ones((2, 3)), "b": jnp.ones((2, 4))}
    with pytest.raises(ValueError, match=r"missing from student \['b'\], not in teacher \['c'\]"):
        feature_loss({"a": t["a"], "c": t["b"]}, t)
    with pytest.raises(ValueError, match=r"feature 'b' has shape \(2, 3\) in the student"):
        feature_loss({"a": t["a"], "b": jnp.ones((2, 3))}, t)
    with pytest.raises(ValueError, match="teacher has no features"):
        feature_loss({}, {})
    with pytest.raises(ValueError, match="eps must be positive"):
        feature_loss(t, t, eps=0.0)
    with pytest.raises(TypeError, match="student must be a mapping"):
        feature_loss([t["a"]], t)


def test_ops_inside_jit_and_remat_calls_are_captured_and_differentiable():
    @jax.jit
    def layer(w, h):
        return jnp.tanh(h @ w)

    def apply(p, x):
        return jax.checkpoint(lambda w, h: layer(w, h) @ p["l2"])(p["l1"], x)

    params, x = {"l1": _normal(0, (4, 3)), "l2": _normal(1, (3, 2))}, _normal(2, (5, 4))
    _, feats = traced_features(apply, params, x)
    z1 = x @ params["l1"]
    _assert_features(feats, {"l1": z1, "l2": jnp.tanh(z1) @ params["l2"]})

    def total(p):
        return sum(jnp.sum(jnp.sin(f)) for f in traced_features(apply, p, x)[1].values())

    def reference(p):
        z1 = x @ p["l1"]
        return jnp.sum(jnp.sin(z1)) + jnp.sum(jnp.sin(jnp.tanh(z1) @ p["l2"]))

    got, want = jax.grad(total)(params), jax.grad(reference)(params)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6), got, want)
