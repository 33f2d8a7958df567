"""Tests for the reference linen and nnx models."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxcompress.examples.data import load_digits
from jaxcompress.examples.models import LeNet5, LeNet5NNX, LeNet300100, LeNet300100NNX

MLP_SHAPES = {
    "dense1": (64, 300),
    "dense2": (300, 100),
    "dense3": (100, 10),
}
CNN_SHAPES = {
    "conv1": (3, 3, 1, 6),
    "conv2": (3, 3, 6, 16),
    "dense1": (64, 120),
    "dense2": (120, 84),
    "dense3": (84, 10),
}
CASES = [
    pytest.param(LeNet300100, LeNet300100NNX, (3, 64), MLP_SHAPES, id="lenet300100"),
    pytest.param(LeNet5, LeNet5NNX, (3, 8, 8, 1), CNN_SHAPES, id="lenet5"),
]


def _kernel_shapes(tree) -> dict[str, tuple[int, ...]]:
    """Maps ``layer/kernel`` paths to kernel shapes in a nested params dict."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        keys = [str(k.key) for k in path]
        if keys[-1] == "kernel":
            out["/".join(keys)] = tuple(leaf.shape)
    return out


@pytest.mark.parametrize(("linen_cls", "nnx_cls", "in_shape", "shapes"), CASES)
def test_linen_forward_and_param_paths(linen_cls, nnx_cls, in_shape, shapes):
    model = linen_cls()
    x = jnp.zeros(in_shape, jnp.float32)
    params = model.init(jax.random.key(0), x)["params"]
    assert _kernel_shapes(params) == {f"{k}/kernel": v for k, v in shapes.items()}
    y = jax.jit(model.apply)({"params": params}, x)
    assert y.shape == (3, 10) and y.dtype == jnp.float32


@pytest.mark.parametrize(("linen_cls", "nnx_cls", "in_shape", "shapes"), CASES)
def test_nnx_forward_matches_linen_layout(linen_cls, nnx_cls, in_shape, shapes):
    model = nnx_cls(rngs=nnx.Rngs(0))
    x = jnp.zeros(in_shape, jnp.float32)
    y = nnx.jit(lambda m, x: m(x))(model, x)
    assert y.shape == (3, 10) and y.dtype == jnp.float32
    linen_params = linen_cls().init(jax.random.key(0), x)["params"]
    nnx_params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    assert _kernel_shapes(nnx_params) == _kernel_shapes(linen_params)


def test_linen_lenet300100_params_dict():
    params = LeNet300100().init(jax.random.key(0), jnp.zeros((1, 64)))["params"]
    assert params["dense1"]["kernel"].shape == (64, 300)
    assert params["dense3"]["bias"].shape == (10,)


def test_constructor_options():
    mlp = LeNet300100NNX(in_features=16, num_classes=4, rngs=nnx.Rngs(0))
    assert mlp(jnp.zeros((2, 16))).shape == (2, 4)
    cnn = LeNet5NNX(3, 5, input_size=16, rngs=nnx.Rngs(0))
    assert cnn(jnp.zeros((2, 16, 16, 3))).shape == (2, 5)
    assert cnn.dense1.kernel.shape == (16 * 4 * 4, 120)
    params = LeNet5(num_classes=5).init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
    assert params["dense3"]["kernel"].shape == (84, 5)
    with pytest.raises(ValueError, match="input_size"):
        LeNet5NNX(input_size=10, rngs=nnx.Rngs(0))


def test_lenet300100_learns_digits():
    x_tr, y_tr = load_digits(split="train")
    x_te, y_te = load_digits(split="test")
    model = LeNet300100()
    params = model.init(jax.random.key(0), x_tr[:1])["params"]
    tx = optax.adam(1e-3)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        def loss_fn(p):
            logits = model.apply({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        grads = jax.grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    rng = np.random.default_rng(0)
    batch = 64
    # optax's Adam bias correction mixes float and int32, which strict promotion rejects.
    with jax.numpy_dtype_promotion("standard"):
        for _ in range(15):
            perm = rng.permutation(len(y_tr))
            # Full batches only, so the jitted step compiles once.
            for i in range(0, len(perm) - batch + 1, batch):
                idx = perm[i : i + batch]
                params, opt_state = step(params, opt_state, x_tr[idx], y_tr[idx])

    logits = model.apply({"params": params}, x_te)
    accuracy = float((jnp.argmax(logits, -1) == y_te).mean())
    assert accuracy > 0.9
