"""Factored LoRA (``lora_model``): the same outputs and adapter gradients as ``lora_apply``."""

import equinox as eqx
import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import jaxcompress as jc
from jaxcompress.training.lora import Adapter

KINDS = ["quantized", "clustered", "sparse+q", "sparse+c"]


def _compress(kind, tree, where):
    if kind == "quantized":
        return jc.quantize(4, group_size=8, where=where)(tree)[0]
    if kind == "clustered":
        return jc.cluster(k=8, per_channel=True, where=where)(tree)[0]
    pruned = jc.prune(0.5, where=where)(tree)[0]
    inner = jc.quantize(4, axis=None) if kind == "sparse+q" else jc.cluster(k=4)
    return inner(pruned)[0]


def _trained(adapters, seed=5):
    """Adapters with a nonzero ``B``, as after some training."""
    out = {}
    for i, (path, ad) in enumerate(sorted(adapters.items())):
        b = jax.random.normal(jax.random.key(seed + i), ad.b.shape) * 0.3
        out[path] = Adapter(ad.a, b, ad.scale, ad.shape, ad.fan_in_axes)
    return out


def _close(a, b):
    """Equal to float32 rounding of sums in another order: 1e-5 of each array's scale."""
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        scale = float(np.abs(np.asarray(y)).max())
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-5 * scale + 1e-7)


def _assert_matches_lora_apply(apply_fn, params, adapters, *args):
    """Output and adapter gradients under jit equal lora_apply's; the base is untouched."""
    before = jax.tree.map(np.array, params)
    f = jc.training.lora_model(apply_fn)

    def factored(ad, p):
        return jnp.sum(jnp.sin(f(p, ad, *args)))

    def dense(ad, p):
        return jnp.sum(jnp.sin(apply_fn(jc.materialize(jc.training.lora_apply(p, ad)), *args)))

    # filter_jit: an equinox module's activation functions are static; else it is jax.jit.
    _close(
        eqx.filter_jit(f)(params, adapters, *args),
        apply_fn(jc.training.lora_apply(params, adapters), *args),
    )
    _close(
        eqx.filter_jit(jax.grad(factored))(adapters, params),
        eqx.filter_jit(jax.grad(dense))(adapters, params),
    )
    for old, new in zip(jax.tree.leaves(before), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(old, new)
    # Through lora_model the adapted (compressed) bases get no gradient either.
    base_grads = jc.training.grad(lambda p: factored(adapters, p))(params)
    for node in jax.tree.leaves(base_grads, is_leaf=jc.is_compressed):
        for leaf in jax.tree.leaves(node) if jc.is_compressed(node) else ():
            if leaf.dtype != jax.dtypes.float0:
                assert not np.asarray(leaf).any()
    return f


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(6)(nn.relu(nn.Dense(24)(x)))


@pytest.mark.parametrize("kind", KINDS)
def test_linen_matches_lora_apply_on_every_base(kind):
    x = jax.random.normal(jax.random.key(0), (5, 16))
    model = _MLP()
    params = _compress(kind, model.init(jax.random.key(1), x)["params"], "kernel")
    adapters = _trained(jc.training.lora_init(params, 3, key=jax.random.key(2), alpha=6.0))
    apply_fn = lambda p, x: model.apply({"params": jc.materialize(p)}, x)  # noqa: E731
    f = _assert_matches_lora_apply(apply_fn, params, adapters, x)
    # A masked (Sparse) update has no factored form: it takes lora_apply's dense weight.
    route = "dense (dot_general)" if kind.startswith("sparse") else "factored"
    assert f.last_routes == {"Dense_0/kernel": [route], "Dense_1/kernel": [route]}


def test_nnx_and_equinox_output_first_weights_run_factored():
    graphdef, state = nnx.split(nnx.Linear(12, 5, rngs=nnx.Rngs(0)))
    params = jc.quantize(4, group_size=4, where="kernel")(state)[0]
    adapters = _trained(jc.training.lora_init(params, 2, key=jax.random.key(0)))
    x = jax.random.normal(jax.random.key(1), (3, 12))
    apply_fn = lambda s, x: nnx.merge(graphdef, jc.materialize(s))(x)  # noqa: E731
    f = _assert_matches_lora_apply(apply_fn, params, adapters, x)
    assert f.last_routes == {"kernel": ["factored"]}

    # equinox stores (out, in) and computes W @ x: the adapter's side is the output.
    mlp = eqx.nn.MLP(8, 3, 16, 1, key=jax.random.key(0))
    compressed = jc.cluster(k=8, where="weight")(mlp)[0]
    adapters = _trained(jc.training.lora_init(compressed, 2, key=jax.random.key(1), where="weight"))
    xs = jax.random.normal(jax.random.key(2), (4, 8))
    apply_fn = lambda m, x: jax.vmap(jc.materialize(m))(x)  # noqa: E731
    f = _assert_matches_lora_apply(apply_fn, compressed, adapters, xs)
    assert f.last_routes == {"layers/0/weight": ["factored"], "layers/1/weight": ["factored"]}


def test_multi_axis_fan_in_transposed_uses_and_other_ops():
    w3 = jax.random.normal(jax.random.key(0), (2, 4, 6))  # (heads, head_dim, features)
    w = jax.random.normal(jax.random.key(1), (6, 10))
    params = jc.quantize(8, where="^w$")({"w3": w3, "w": w})[0]
    params = jc.quantize(8, axis=-1, where="w3")(params)[0]
    adapters = jc.training.lora_init(params, 2, key=jax.random.key(2), where="w3", fan_in_axes=2)
    adapters |= jc.training.lora_init(params, 3, key=jax.random.key(3), where="^w$")
    adapters = _trained(adapters)

    def apply_fn(p, x):
        p = jc.materialize(p)
        h = jnp.einsum("bhd,hdf->bf", x, p["w3"])  # contracts the two input axes
        y = h @ p["w"]  # (6, 10): input side
        back = y @ p["w"].T  # output side: x @ (A @ B).T
        return back + jnp.sum(p["w"] ** 2)  # an elementwise use: the dense weight

    x = jax.random.normal(jax.random.key(4), (3, 2, 4))
    f = _assert_matches_lora_apply(apply_fn, params, adapters, x)
    assert f.last_routes["w3"] == ["factored"]
    assert f.last_routes["w"] == ["factored", "factored", "dense (integer_pow)"]


def _dot_output_shapes(fn, *args):
    shapes = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                shapes.append(tuple(eqn.outvars[0].aval.shape))
            for value in eqn.params.values():
                if isinstance(value, jex.ClosedJaxpr):
                    walk(value.jaxpr)
                elif isinstance(value, jex.Jaxpr):
                    walk(value)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return shapes


def test_adapter_gradients_never_form_a_dense_weight_sized_product():
    w = jax.random.normal(jax.random.key(0), (48, 40))
    params = jc.quantize(4, group_size=16, where="w")({"w": w})[0]
    adapters = _trained(jc.training.lora_init(params, 4, key=jax.random.key(1), where="w"))
    x = jax.random.normal(jax.random.key(2), (7, 48))
    apply_fn = lambda p, x: jnp.tanh(x @ jc.materialize(p)["w"])  # noqa: E731
    f = jc.training.lora_model(apply_fn)
    factored = lambda ad: jnp.sum(f(params, ad, x))  # noqa: E731
    dense = lambda ad: jnp.sum(apply_fn(jc.training.lora_apply(params, ad), x))  # noqa: E731
    weight_sized = {(48, 40), (40, 48)}
    assert weight_sized & set(_dot_output_shapes(jax.grad(dense), adapters))  # the check can fail
    assert not weight_sized & set(_dot_output_shapes(jax.grad(factored), adapters))


def test_bad_adapters_are_refused_with_the_path():
    params = jc.quantize(4, where="w")({"w": jnp.ones((8, 4))})[0]
    adapters = jc.training.lora_init(params, 2, key=jax.random.key(0), where="w")
    f = jc.training.lora_model(lambda p, x: x @ jc.materialize(p)["w"])
    with pytest.raises(KeyError, match="no leaf at the adapter paths \\['w'\\]"):
        f({"v": params["w"]}, adapters, jnp.ones((1, 8)))
    with pytest.raises(ValueError, match="adapter 'w' is for shape"):
        f({"w": jnp.ones((4, 8))}, adapters, jnp.ones((1, 4)))
