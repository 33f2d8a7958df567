"""prune_units and coupled_groups: coupled axes found by tracing, thinned == masked dense."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxcompress as jc
from jaxcompress.examples.models import LeNet5, LeNet5NNX, LeNet300100, LeNet300100NNX


class WideMLP(nn.Module):
    width: int = 96

    @nn.compact
    def __call__(self, x):
        for i in range(4):
            x = nn.relu(nn.Dense(self.width, name=f"hidden{i}")(x))
        return nn.Dense(10, name="out")(x)


class Block(nn.Module):
    """A pre-LayerNorm transformer block: attention and an MLP, each with a residual."""

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm(name="ln1")(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=32, name="attn")(h, h)
        h = nn.gelu(nn.Dense(64, name="up")(nn.LayerNorm(name="ln2")(x)))
        return x + nn.Dense(x.shape[-1], name="down")(h)


class BlockNNX(nnx.Module):
    def __init__(self, *, rngs):
        self.ln1 = nnx.LayerNorm(16, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            num_heads=4, in_features=16, qkv_features=32, decode=False, rngs=rngs
        )
        self.ln2 = nnx.LayerNorm(16, rngs=rngs)
        self.up = nnx.Linear(16, 64, rngs=rngs)
        self.down = nnx.Linear(64, 16, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.down(nnx.gelu(self.up(self.ln2(x))))


class Residual(nn.Module):
    """conv-BN-relu-conv-BN plus the skip, then a third conv; BN in inference mode."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(8, (3, 3), name="stem")(x)
        y = nn.relu(nn.BatchNorm(use_running_average=True, name="bn1")(x))
        y = nn.BatchNorm(use_running_average=True, name="bn2")(nn.Conv(8, (3, 3), name="conv")(y))
        z = nn.relu(x + y)
        z = nn.relu(nn.BatchNorm(use_running_average=True, name="bn3")(nn.Conv(12, (3, 3))(z)))
        return nn.Dense(3, name="head")(z.mean(axis=(1, 2)))


def _jitter(tree, seed=3):
    """Moves every leaf off its init value (zero biases, unit norms) so slices differ."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef,
        [
            leaf + 0.3 * jax.random.uniform(k, leaf.shape)
            for leaf, k in zip(leaves, keys, strict=True)
        ],
    )


def _linen(model, x, *, whole=False):
    variables = _jitter(model.init(jax.random.key(0), x))
    if whole:
        return (lambda v, x: model.apply(v, x)), variables
    return (lambda p, x: model.apply({"params": p}, x)), variables["params"]


X_DIGITS = jax.random.normal(jax.random.key(1), (5, 64))
X_IMAGE = jax.random.normal(jax.random.key(1), (3, 8, 8, 1))
X_SEQ = jax.random.normal(jax.random.key(1), (2, 5, 16))

LINEN_CASES = {
    "digits_mlp": (LeNet300100(), X_DIGITS, False),
    "lenet5": (LeNet5(), X_IMAGE, False),
    "wide_mlp": (WideMLP(), jax.random.normal(jax.random.key(1), (4, 96)), False),
    "transformer_block": (Block(), X_SEQ, False),
    "residual_bn": (Residual(), jax.random.normal(jax.random.key(1), (2, 6, 6, 3)), True),
}


def _close(a, b):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


# Every model at 50 %; the two with reshapes (flatten, heads) at 25 % and 75 % too.
FRACTION_CASES = [(case, 0.5) for case in sorted(LINEN_CASES)] + [
    (case, fraction) for case in ("lenet5", "transformer_block") for fraction in (0.25, 0.75)
]


@pytest.mark.parametrize(("case", "fraction"), FRACTION_CASES)
def test_linen_thinned_outputs_equal_the_masked_dense_model(case, fraction):
    model, x, whole = LINEN_CASES[case]
    apply, params = _linen(model, x, whole=whole)
    thinned, stats = jc.prune_units(fraction, apply_fn=apply, example_input=x)(params)
    _close(jax.jit(stats.apply_fn)(thinned, x), apply(stats.masked(params), x))
    assert stats.groups, "something must be pruned"
    for group in stats.groups:
        assert group.removed == int(np.floor(fraction * group.size + 1e-9))
        assert len(group.kept) == group.size - group.removed
    assert stats.flops[1] < stats.flops[0]
    thinned_size = sum(leaf.size for leaf in jax.tree_util.tree_leaves(thinned))
    assert thinned_size < sum(leaf.size for leaf in jax.tree_util.tree_leaves(params))


@pytest.mark.parametrize(
    ("make", "x"),
    [
        (lambda: LeNet300100NNX(rngs=nnx.Rngs(0)), X_DIGITS),
        (lambda: LeNet5NNX(rngs=nnx.Rngs(0)), X_IMAGE),
        (lambda: BlockNNX(rngs=nnx.Rngs(0)), X_SEQ),
    ],
    ids=["digits_mlp", "lenet5", "transformer_block"],
)
def test_nnx_thinned_program_and_module_equal_the_masked_dense_model(make, x):
    model = make()
    graphdef, state = nnx.split(model)
    state = _jitter(state)
    thinned, stats = jc.prune_units(0.5, apply_fn=model, example_input=x)(state)
    masked = nnx.merge(graphdef, stats.masked(state))(x)
    _close(jax.jit(stats.apply_fn)(thinned, x), masked)
    if isinstance(model, BlockNNX):
        # Removing q/k head dimensions changes nnx's 1/sqrt(head_dim) in a rebuilt module.
        assert stats.module is None and "1/sqrt(head_dim)" in stats.module_note
        heads = "attn/query/kernel[axis 1]"
        thinned, stats = jc.prune_units(
            {heads: 0.5, "up/kernel": 0.5}, apply_fn=model, example_input=x
        )(state)
        assert stats.module.attn.num_heads == 2
        masked = nnx.merge(graphdef, stats.masked(state))(x)
    _close(stats.module(x), masked)
    for _, node in nnx.iter_graph(stats.module):
        if isinstance(node, nnx.Linear):
            assert (node.in_features, node.out_features) == node.kernel[...].shape


def test_groups_of_an_mlp_name_their_producers_and_the_output_is_left_whole():
    apply, params = _linen(LeNet300100(), X_DIGITS)
    groups = jc.coupled_groups(apply, params, X_DIGITS)
    assert [(g.name, g.size, g.prunable) for g in groups] == [
        ("dense1/kernel", 300, True),
        ("dense2/kernel", 100, True),
        ("dense3/kernel", 10, False),
    ]
    assert set(groups[0].members) == {
        ("dense1/kernel", 1),
        ("dense1/bias", 0),
        ("dense2/kernel", 0),
    }
    assert groups[2].reason == "a model output"


def test_residual_block_ties_both_branches_and_batchnorm_statistics():
    apply, variables = _linen(*LINEN_CASES["residual_bn"][:2], whole=True)
    groups = {g.name: g for g in jc.coupled_groups(apply, variables, LINEN_CASES["residual_bn"][1])}
    stem = groups["params/stem/kernel"]
    assert stem.prunable and stem.size == 8
    assert set(stem.members) == {
        ("params/stem/kernel", 3),
        ("params/stem/bias", 0),
        ("params/conv/kernel", 2),  # the branch's input channels
        ("params/conv/kernel", 3),  # and its output channels, tied by the addition
        ("params/conv/bias", 0),
        ("params/Conv_0/kernel", 2),
        *((f"params/{bn}/{p}", 0) for bn in ("bn1", "bn2") for p in ("scale", "bias")),
        *((f"batch_stats/{bn}/{s}", 0) for bn in ("bn1", "bn2") for s in ("mean", "var")),
    }
    assert set(stem.producers) == {"params/stem/kernel", "params/conv/kernel"}
    assert "params/conv/kernel" not in groups  # one group, not two


def test_attention_groups_are_heads_query_key_dims_and_value_dims():
    apply, params = _linen(Block(), X_SEQ)
    groups = {g.name: g for g in jc.coupled_groups(apply, params, X_SEQ)}
    attn = "attn/{}/kernel"
    heads = groups[attn.format("query") + "[axis 1]"]
    assert heads.size == 4 and heads.prunable
    assert {m for m in heads.members if m[0].endswith("kernel")} == {
        (attn.format("query"), 1),
        (attn.format("key"), 1),
        (attn.format("value"), 1),
        (attn.format("out"), 0),
    }
    qk = groups[attn.format("query") + "[axis 2]"]
    assert {m for m in qk.members if m[0].endswith("kernel")} == {
        (attn.format("query"), 2),
        (attn.format("key"), 2),
    }
    v = groups[attn.format("value")]
    assert {m for m in v.members if m[0].endswith("kernel")} == {
        (attn.format("value"), 2),
        (attn.format("out"), 1),
    }
    # The residual stream goes through LayerNorm's mean: removing a feature would change
    # every other feature, so it is left whole, and the reason names the op.
    stream = [g for g in groups.values() if ("ln1/scale", 0) in g.members]
    assert len(stream) == 1 and "reduce_sum" in stream[0].reason
    assert groups["up/kernel"].prunable


def test_flatten_before_dense_cuts_strided_rows():
    apply, params = _linen(LeNet5(), X_IMAGE)
    thinned, stats = jc.prune_units({"conv2/kernel": 0.5}, apply_fn=apply, example_input=X_IMAGE)(
        params
    )
    kept = stats["conv2/kernel"].kept
    assert thinned["conv2"]["kernel"].shape == (3, 3, 6, 8)
    # dense1 reads the flattened (2, 2, 16) map: row = position * 16 + channel.
    rows = np.asarray(params["dense1"]["kernel"]).reshape(4, 16, -1)[:, kept].reshape(32, -1)
    np.testing.assert_array_equal(np.asarray(thinned["dense1"]["kernel"]), rows)
    assert [g.name for g in stats.groups] == ["conv2/kernel"]


def test_l1_and_l2_scores_sum_over_every_coupled_slice():
    apply, params = _linen(LeNet300100(), X_DIGITS)
    w1, b1 = np.asarray(params["dense1"]["kernel"]), np.asarray(params["dense1"]["bias"])
    w2 = np.asarray(params["dense2"]["kernel"])
    l2 = np.sqrt((w1**2).sum(0) + b1**2 + (w2**2).sum(1))
    l1 = np.abs(w1).sum(0) + np.abs(b1) + np.abs(w2).sum(1)
    for importance, expected in (("l2", l2), ("l1", l1)):
        _, stats = jc.prune_units(
            {"dense1/kernel": 0.3}, importance=importance, apply_fn=apply, example_input=X_DIGITS
        )(params)
        group = stats["dense1/kernel"]
        np.testing.assert_allclose(group.scores, expected, rtol=1e-5)
        removed = np.setdiff1d(np.arange(300), group.kept)
        assert group.scores[removed].max() <= group.scores[group.kept].min()
        assert len(removed) == 90


def test_activation_scores_are_mean_absolute_inputs_of_the_next_layer():
    apply, params = _linen(LeNet300100(), X_DIGITS)
    batches = [X_DIGITS, 2.0 * X_DIGITS]
    _, stats = jc.prune_units(
        0.5, importance="activation", apply_fn=apply, example_input=X_DIGITS, data=batches
    )(params)
    w1, b1 = np.asarray(params["dense1"]["kernel"]), np.asarray(params["dense1"]["bias"])
    expected = np.mean(
        [np.abs(np.maximum(np.asarray(x) @ w1 + b1, 0)).mean(0) for x in batches], axis=0
    )
    np.testing.assert_allclose(stats["dense1/kernel"].scores, expected, rtol=1e-5, atol=1e-6)


def test_taylor_scores_are_activation_times_gradient():
    apply, params = _linen(LeNet300100(), X_DIGITS)
    y = jnp.arange(5) % 10
    _, stats = jc.prune_units(
        {"dense2/kernel": 0.5},
        importance="taylor",
        apply_fn=apply,
        example_input=X_DIGITS,
        data=[(X_DIGITS, y)],
    )(params)

    def loss_from_hidden(h):  # h: the input of dense3
        logits = h @ params["dense3"]["kernel"] + params["dense3"]["bias"][None]
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))

    h1 = jnp.maximum(X_DIGITS @ params["dense1"]["kernel"] + params["dense1"]["bias"][None], 0)
    act = jnp.maximum(h1 @ params["dense2"]["kernel"] + params["dense2"]["bias"][None], 0)
    # The activation consumed by dense3 is relu(h2): its gradient is the loss's wrt it.
    grad = jax.grad(loss_from_hidden)(act)
    expected = np.abs(np.mean(np.asarray(act * grad), axis=0))
    np.testing.assert_allclose(stats["dense2/kernel"].scores, expected, rtol=1e-4, atol=1e-8)


def test_other_batch_sizes_and_sharded_params_under_jit(mesh8):
    apply, params = _linen(WideMLP(width=64), jnp.ones((8, 96)))
    thinned, stats = jc.prune_units(0.5, apply_fn=apply, example_input=jnp.ones((8, 96)))(params)
    x = jax.random.normal(jax.random.key(2), (16, 96))
    sharded = jax.tree.map(
        lambda leaf: jax.device_put(
            leaf, NamedSharding(mesh8, P(None, "model") if leaf.ndim == 2 else P())
        ),
        thinned,
    )
    xs = jax.device_put(x, NamedSharding(mesh8, P("data", None)))
    with jax.set_mesh(mesh8):
        out = jax.jit(stats.apply_fn)(sharded, xs)
    _close(out, apply(stats.masked(params), x))
    assert thinned["hidden0"]["kernel"].shape == (96, 32)


def test_an_op_the_discovery_does_not_know_leaves_its_tensors_whole_and_says_which():
    def apply(p, x):
        h = jnp.maximum(x @ p["a"], 0)
        h = jnp.cumsum(h, axis=-1)  # mixes units: unit i depends on units < i
        g = jnp.maximum(h @ p["b"], 0)
        return g @ p["c"]

    params = {
        "a": jnp.ones((4, 6)),
        "b": jax.random.normal(jax.random.key(0), (6, 5)),
        "c": jnp.ones((5, 2)),
    }
    x = jnp.ones((3, 4))
    groups = {g.name: g for g in jc.coupled_groups(apply, params, x)}
    assert "cumsum" in groups["a"].reason
    thinned, stats = jc.prune_units(0.4, apply_fn=apply, example_input=x)(params)
    assert thinned["a"].shape == (4, 6) and thinned["b"].shape == (6, 3)
    assert "cumsum" in stats.skipped["a"]
    _close(stats.apply_fn(thinned, x), apply(stats.masked(params), x))


def test_control_flow_is_not_pruned_across():
    def apply(p, x):
        h = x @ p["a"]
        h, _ = jax.lax.scan(lambda c, _: (jnp.tanh(c), None), h, None, length=2)
        return h @ p["b"]

    params = {"a": jnp.ones((4, 6)), "b": jnp.ones((6, 2))}
    groups = jc.coupled_groups(apply, params, jnp.ones((3, 4)))
    assert "scan" in groups[0].reason


def test_bad_input_is_refused_clearly():
    apply, params = _linen(LeNet300100(), X_DIGITS)
    with pytest.raises(ValueError, match="remove all 100 units of 'dense2/kernel'"):
        jc.prune_units({"dense2/kernel": 1.0}, apply_fn=apply, example_input=X_DIGITS)(params)
    with pytest.raises(ValueError, match="cannot trace"):
        jc.prune_units(0.5, apply_fn=apply, example_input=jnp.ones((2, 7)))(params)
    with pytest.raises(ValueError, match="no group named 'dense9/kernel'"):
        jc.prune_units({"dense9/kernel": 0.5}, apply_fn=apply, example_input=X_DIGITS)(params)
    with pytest.raises(ValueError, match="cannot be pruned: it reaches a model output"):
        jc.prune_units({"dense3/kernel": 0.5}, apply_fn=apply, example_input=X_DIGITS)(params)
    with pytest.raises(ValueError, match="must be in"):
        jc.prune_units(1.5, apply_fn=apply, example_input=X_DIGITS)(params)
    with pytest.raises(ValueError, match="importance"):
        jc.prune_units(0.5, importance="random", apply_fn=apply, example_input=X_DIGITS)
    with pytest.raises(ValueError, match="needs data="):
        jc.prune_units(0.5, importance="activation", apply_fn=apply, example_input=X_DIGITS)(params)
    with pytest.raises(ValueError, match="example_input"):
        jc.prune_units(0.5, apply_fn=apply, example_input=None)


def test_where_selecting_a_leaf_with_no_structural_axis_is_an_error():
    def apply(p, ids):
        h = jnp.take(p["embed"], ids, axis=0)
        return jnp.maximum(h @ p["a"], 0) @ p["b"]

    params = {"embed": jnp.ones((10, 4)), "a": jnp.ones((4, 6)), "b": jnp.ones((6, 2))}
    ids = jnp.array([1, 2, 3])
    with pytest.raises(ValueError, match="no structural axis.*embed"):
        jc.prune_units(0.5, apply_fn=apply, example_input=ids, where="embed")(params)
    thinned, _ = jc.prune_units(0.5, apply_fn=apply, example_input=ids, where="^a$")(params)
    assert thinned["a"].shape == (4, 3) and thinned["embed"].shape == (10, 4)


def test_models_of_several_inputs_take_tuples_of_inputs_as_data():
    def apply(p, x, scale):
        return jnp.maximum(x @ p["a"], 0) * scale[:, None] @ p["b"]

    params = {"a": jax.random.normal(jax.random.key(0), (4, 6)), "b": jnp.ones((6, 2))}
    x, scale = jax.random.normal(jax.random.key(1), (3, 4)), jnp.array([1.0, 2.0, 3.0])
    batches = [(x, scale), (2 * x, scale)]
    _, stats = jc.prune_units(
        0.5, importance="activation", apply_fn=apply, example_input=(x, scale), data=batches
    )(params)
    a = np.asarray(params["a"])
    expected = np.mean(
        [
            np.abs(np.maximum(np.asarray(b[0]) @ a, 0) * np.asarray(scale)[:, None]).mean(0)
            for b in batches
        ],
        axis=0,
    )
    np.testing.assert_allclose(stats["a"].scores, expected, rtol=1e-5)


def test_sparsity_is_the_leading_argument_and_fraction_its_old_name():
    x = jax.random.normal(jax.random.key(0), (4, 16))
    params = {"a": jax.random.normal(jax.random.key(1), (16, 8)), "b": jnp.ones((8, 4))}

    def apply(p, x):
        return jnp.tanh(x @ p["a"]) @ p["b"]

    outputs = [
        jc.prune_units(**spelling, apply_fn=apply, example_input=x)(params)[0]
        for spelling in ({"sparsity": 0.5}, {"fraction": 0.5})
    ]
    positional, _ = jc.prune_units(0.5, apply_fn=apply, example_input=x)(params)
    for thinned in outputs:
        assert thinned["a"].shape == (16, 4)
        for got, want in zip(jax.tree.leaves(thinned), jax.tree.leaves(positional), strict=True):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    for spelling in ({}, {"sparsity": 0.5, "fraction": 0.5}):
        with pytest.raises(TypeError, match="prune_units: give the fraction of units"):
            jc.prune_units(**spelling, apply_fn=apply, example_input=x)
