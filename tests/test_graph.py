"""jaxcompress.graph: which dot/conv consumes each weight, along which axes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxcompress.examples.models import LeNet5, LeNet300100, LeNet300100NNX
from jaxcompress.jaxpr import graph


def _linen(model, x):
    """Abstract params (nothing is computed: tracing needs only shapes) and an apply fn."""
    params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    return params, lambda p, x: model.apply({"params": p}, x)


def _summary(uses):
    """``{path: [(primitive, operand, contracting, free, fan_in), ...]}``."""
    return {
        path: [
            (u.primitive, u.operand, u.contracting_axes, u.free_axes, graph.fan_in_axes(u))
            for u in path_uses
        ]
        for path, path_uses in uses.items()
    }


DENSE = [("dot_general", 1, (0,), (1,), 1)]
CONV = [("conv_general_dilated", 1, (0, 1, 2), (3,), 3)]
MLP = {
    f"dense{i}/{leaf}": DENSE if leaf == "kernel" else []
    for i in (1, 2, 3)
    for leaf in ("bias", "kernel")
}


class Residual(nn.Module):
    """Dense -> relu -> Dense, added to the input, then LayerNorm."""

    features: int = 16

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(4 * self.features, name="up")(x))
        h = nn.Dense(self.features, name="down")(h)
        return nn.LayerNorm(name="norm")(x + h)


def test_linen_mlp():
    params, apply = _linen(LeNet300100(), jnp.zeros((2, 64)))
    uses = graph.trace_uses(apply, params, jnp.zeros((2, 64)))
    assert _summary(uses) == MLP
    assert uses["dense2/kernel"][0].activation_shape == (2, 300)
    assert graph.fan_in_by_path(uses) == {f"dense{i}/kernel": 1 for i in (1, 2, 3)}


def test_linen_cnn():
    x = jnp.zeros((2, 8, 8, 1))
    params, apply = _linen(LeNet5(), x)
    uses = graph.trace_uses(apply, params, x)
    summary = _summary(uses)
    assert summary["conv1/kernel"] == CONV and summary["conv2/kernel"] == CONV
    assert summary["dense1/kernel"] == DENSE and summary["conv2/bias"] == []
    conv2 = uses["conv2/kernel"][0]
    assert conv2.activation_shape == (2, 4, 4, 6)
    assert conv2.conv.dimension_numbers.rhs_spec == (3, 2, 0, 1)
    assert conv2.conv.padding == ((1, 1), (1, 1))
    assert conv2.conv.window_strides == (1, 1) and conv2.conv.feature_group_count == 1


def test_nnx_mlp_matches_linen_paths():
    graphdef, state = nnx.split(nnx.eval_shape(lambda: LeNet300100NNX(rngs=nnx.Rngs(0))))
    uses = graph.trace_uses(lambda s, x: nnx.merge(graphdef, s)(x), state, jnp.zeros((2, 64)))
    assert _summary(uses) == MLP


def test_residual_block():
    x = jnp.zeros((2, 5, 16))
    params, apply = _linen(Residual(), x)
    summary = _summary(graph.trace_uses(apply, params, x))
    assert summary["up/kernel"] == DENSE and summary["down/kernel"] == DENSE
    assert summary["norm/scale"] == [] and summary["norm/bias"] == []
    assert summary["up/bias"] == []


def _check_attention(uses):
    summary = _summary(uses)
    for name in ("query", "key", "value"):
        assert summary[f"{name}/kernel"] == [("dot_general", 1, (0,), (1, 2), 1)], name
        assert summary[f"{name}/bias"] == []
    assert summary["out/kernel"] == [("dot_general", 1, (0, 1), (2,), 2)]
    assert uses["out/kernel"][0].activation_shape == (2, 5, 2, 4)


def test_linen_attention():
    x = jnp.zeros((2, 5, 8))
    params, apply = _linen(nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8), x)
    assert params["out"]["kernel"].shape == (2, 4, 8)
    _check_attention(graph.trace_uses(apply, params, x))


def test_nnx_attention():
    model = nnx.eval_shape(
        lambda: nnx.MultiHeadAttention(
            num_heads=2, in_features=8, qkv_features=8, decode=False, rngs=nnx.Rngs(0)
        )
    )
    graphdef, state = nnx.split(model)
    uses = graph.trace_uses(lambda s, x: nnx.merge(graphdef, s)(x), state, jnp.zeros((2, 5, 8)))
    _check_attention(uses)


def test_jitted_apply_looks_inside_jit():
    x = jnp.zeros((2, 8, 8, 1))
    params, apply = _linen(LeNet5(), x)
    uses = graph.trace_uses(jax.jit(apply), params, x)
    plain = graph.trace_uses(apply, params, x)
    assert _summary(uses) == _summary(plain)
    assert len(uses["conv1/kernel"][0].site) == 2  # (the jit eqn, the conv inside it)


def test_sharded_params(mesh8):
    params, apply = _linen(LeNet300100(), jnp.zeros((8, 64)))

    def place(a):
        spec = P(None, "model") if a.ndim == 2 else P()
        return jax.device_put(np.ones(a.shape, np.float32), NamedSharding(mesh8, spec))

    sharded = jax.tree.map(place, params)
    x = jax.device_put(jnp.zeros((8, 64)), NamedSharding(mesh8, P("data")))
    assert _summary(graph.trace_uses(apply, sharded, x)) == MLP
    assert _summary(graph.trace_uses(jax.jit(apply), sharded, x)) == MLP


def _uses_of(f, w, *args):
    return graph.trace_uses(f, w, *args)[""]


def test_transposed_weight_is_not_leading():
    (use,) = _uses_of(lambda w, x: x @ w.T, jnp.ones((3, 4)), jnp.ones((2, 4)))
    assert use.contracting_axes == (1,) and use.free_axes == (0,)
    assert graph.fan_in_axes(use) is None


def test_reshape_merge_maps_back_and_split_is_unmappable():
    w = jnp.ones((2, 4, 8))
    (merged,) = _uses_of(
        lambda w, x: x.reshape(3, 8) @ w.reshape(8, 8).astype(jnp.bfloat16).astype(jnp.float32),
        w,
        jnp.ones((3, 2, 4)),
    )
    assert merged.contracting_axes == (0, 1) and graph.fan_in_axes(merged) == 2
    (split,) = _uses_of(
        lambda w, x: jnp.einsum("bij,ijo->bo", x, w.reshape(8, 8, 10)),
        jnp.ones((64, 10)),
        jnp.ones((3, 8, 8)),
    )
    assert split.contracting_axes is None and not split.mappable
    assert "splits an original axis" in split.note
    assert graph.fan_in_axes(split) is None


def test_follows_call_primitives_and_finds_tied_uses():
    @jax.custom_jvp
    def cj(w, x):
        return x @ w

    cj.defjvp(lambda primals, tangents: (cj(*primals), cj(*tangents)))

    @jax.custom_vjp
    def cv(w, x):
        return x @ w

    cv.defvjp(lambda w, x: (cv(w, x), None), lambda _, g: (None, None))

    def f(w, x):
        y = cj(w, x) + cv(w, x)
        y = jax.checkpoint(lambda w, y: y @ w)(w, y)
        return jax.jit(lambda w, y: y @ jnp.transpose(w.T))(w, y)

    uses = _uses_of(f, jnp.ones((4, 4)), jnp.ones((2, 4)))
    assert [u.contracting_axes for u in uses] == [(0,)] * 4
    assert [len(u.site) for u in uses] == [2, 2, 2, 2]


def test_value_changing_ops_stop_the_trace():
    uses = _uses_of(lambda w, x: x @ (w * 2.0), jnp.ones((4, 3)), jnp.ones((2, 4)))
    assert uses == []


def test_conv_layouts_and_params():
    # An OIHW kernel used as HWIO via a transpose: contracted (1, 2, 3), not leading.
    def f(w, x):
        k = jnp.transpose(w, (2, 3, 1, 0))
        return lax.conv_general_dilated(
            x,
            k,
            (2, 1),
            ((1, 0), (0, 2)),
            rhs_dilation=(1, 2),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )

    (use,) = _uses_of(f, jnp.ones((5, 3, 3, 2)), jnp.ones((1, 9, 9, 3)))
    assert use.contracting_axes == (1, 2, 3) and use.free_axes == (0,)
    assert graph.fan_in_axes(use) is None
    assert use.conv.window_strides == (2, 1) and use.conv.rhs_dilation == (1, 2)
    assert use.conv.padding == ((1, 0), (0, 2))


@pytest.mark.parametrize(
    ("layout", "kernel_shape", "x_shape"),
    [
        (("NHWC", "HWIO", "NHWC"), (3, 2, 3, 5), (2, 9, 7, 3)),
        (("NCHW", "OIHW", "NCHW"), (5, 3, 3, 2), (2, 3, 9, 7)),
    ],
)
def test_patches_times_kernel_is_the_conv(layout, kernel_shape, x_shape):
    rng = np.random.default_rng(0)
    k = rng.normal(size=kernel_shape).astype(np.float32)
    x = rng.normal(size=x_shape).astype(np.float32)

    def f(w, x):
        return lax.conv_general_dilated(
            x,
            w,
            (2, 1),
            ((1, 1), (0, 1)),
            rhs_dilation=(1, 2),
            dimension_numbers=layout,
            precision=lax.Precision.HIGHEST,
        )

    jaxpr = jax.make_jaxpr(f)(k, x)
    (use,) = graph.uses_in_jaxpr(jaxpr, ["w"])["w"]
    # the features follow the kernel's contracted axes in ascending order
    order = (*use.contracting_axes, *use.free_axes)
    m = int(np.prod([kernel_shape[a] for a in use.contracting_axes]))

    @jax.jit
    def both(k, x):
        act = graph.capture(jaxpr, [(use.site, 0)], k, x)[(use.site, 0)]
        feats, rows = graph.input_features(use, act)
        y = f(k, x)
        out = jnp.moveaxis(y, 1, -1) if layout[2] == "NCHW" else y
        return feats @ k.transpose(order).reshape(m, -1), out

    got, want = both(k, x)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_input_features_of_an_einsum_reorder_to_the_kernel():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(2, 3, 4)).astype(np.float32)  # (heads, head_dim, out)

    def f(w, x):  # x is (batch, head_dim, heads): contracted dims in swapped order
        return jnp.einsum("bdh,hdo->bo", x, w)

    x = rng.normal(size=(5, 3, 2)).astype(np.float32)
    jaxpr = jax.make_jaxpr(f)(w, x)
    (use,) = graph.uses_in_jaxpr(jaxpr, ["w"])["w"]
    assert graph.fan_in_axes(use) == 2
    site = (use.site, 1 - use.operand)

    @jax.jit
    def both(w, x):
        feats, rows = graph.input_features(use, graph.capture(jaxpr, [site], w, x)[site])
        assert rows == [0]
        return feats @ w.reshape(6, 4), f(w, x)

    got, want = both(w, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_capture_rejects_unknown_sites():
    jaxpr = jax.make_jaxpr(lambda w, x: jnp.tanh(x @ w))(jnp.ones((2, 2)), jnp.ones((1, 2)))
    with pytest.raises(ValueError, match="not dot/conv"):
        graph.capture(jaxpr, [((1,), 0)], jnp.ones((2, 2)), jnp.ones((1, 2)))
