"""equinox modules through the public functions: non-array leaves pass through untouched."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxcompress as jc
from jaxcompress.calibration.calibrate import stats_by_path

eqx = pytest.importorskip("equinox")


class CNN(eqx.Module):
    conv: eqx.nn.Conv2d
    head: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.conv = eqx.nn.Conv2d(1, 8, 3, key=k1)
        self.head = eqx.nn.Linear(8 * 6 * 6, 10, key=k2)

    def __call__(self, x):
        return self.head(jax.nn.relu(self.conv(x)).reshape(-1))


class Attention(eqx.Module):
    attention: eqx.nn.MultiheadAttention
    out: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.attention = eqx.nn.MultiheadAttention(2, 16, key=k1)
        self.out = eqx.nn.Linear(16, 4, key=k2)

    def __call__(self, x):
        return jax.vmap(self.out)(self.attention(x, x, x))


def _mlp():
    return eqx.nn.MLP(8, 4, 32, 2, key=jax.random.key(0)), jnp.ones((5, 8))


def _cnn():
    return CNN(jax.random.key(1)), jax.random.normal(jax.random.key(2), (3, 1, 8, 8))


def _attention():
    return Attention(jax.random.key(3)), jax.random.normal(jax.random.key(4), (2, 6, 16))


MODELS = {"mlp": _mlp, "cnn": _cnn, "attention": _attention}


def _apply(model, x):
    return jax.vmap(model)(x)


def _non_arrays(tree):
    return [leaf for leaf in jax.tree.leaves(tree) if not eqx.is_array(leaf)]


@pytest.fixture(params=sorted(MODELS))
def model_and_input(request):
    return MODELS[request.param]()


def test_filters_see_equinox_paths():
    mlp, _ = _mlp()
    _, stats = jc.prune(0.5)(mlp)
    assert sorted(stats) == ["layers/0/weight", "layers/1/weight", "layers/2/weight"]


@pytest.mark.parametrize(
    "transform",
    [jc.prune(0.5), jc.quantize(bits=8), jc.cluster(bits=4)],
    ids=["prune", "quantize", "cluster"],
)
def test_transforms_summarize_materialize(model_and_input, transform):
    model, x = model_and_input
    compressed, _ = transform(model)
    assert _non_arrays(compressed) == _non_arrays(model)
    report = jc.summarize(model, compressed)
    assert report.compressed_bytes < report.original_bytes
    assert jc.nbytes(compressed) < jc.nbytes(model)
    dense = jc.materialize(compressed)
    assert type(dense) is type(model)
    assert _apply(dense, x).shape == _apply(model, x).shape


def test_calibrate_sees_every_weight(model_and_input):
    model, x = model_and_input
    data = jc.calibrate(_apply, model, [x, x])
    assert all(leaf is None for leaf in _non_arrays(data))
    stats = stats_by_path(data)
    # Every weight the default filter selects (not eqx's (out, 1, 1) conv bias).
    assert sorted(stats) == sorted(jc.prune(0.5)(model)[1])
    # (out, in) weights are contracted over their trailing axes: in (x h x w) features.
    for path, leaf in jax.tree_util.tree_flatten_with_path(model)[0]:
        if jc.filters.path_to_str(path) in stats:
            s = stats[jc.filters.path_to_str(path)]
            assert s.trailing and s.gram.shape == (leaf[0].size,) * 2


def test_calibrate_statistics_of_an_mlp_match_numpy(mlp_and_input):
    model, _ = mlp_and_input
    x = np.asarray(jax.random.normal(jax.random.key(6), (7, 8)))
    stats = stats_by_path(jc.calibrate(_apply, model, [x[:4], x[4:]]))
    inputs = x
    for index, layer in enumerate(model.layers):
        s = stats[f"layers/{index}/weight"]
        np.testing.assert_allclose(s.mean, inputs.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(s.gram, inputs.T @ inputs / len(x), rtol=1e-5, atol=1e-6)
        inputs = np.maximum(inputs @ np.asarray(layer.weight).T + np.asarray(layer.bias), 0)


def test_accelerate_matches_the_materialized_module(model_and_input):
    # Per output channel (axis 0 of (out, in)), eqx Linear's x @ W.T takes the blocked
    # kernel (float, exact to rounding); the OIHW conv is materialized.
    model, x = model_and_input
    compressed, _ = jc.quantize(bits=8, axis=0)(model)
    fast = jc.accelerate(_apply, int8_activations=False)
    served = fast.prepare(compressed)
    np.testing.assert_allclose(
        fast(served, x), _apply(jc.materialize(compressed), x), rtol=1e-5, atol=1e-5
    )
    routes = fast.explain(served, x).routes()
    assert set(routes) == set(jc.prune(0.5)(model)[1])
    expected = {path: "materialize" if path == "conv/weight" else "blocked" for path in routes}
    assert routes == expected


def test_accelerate_int8_and_factored_routes_on_equinox_linears(mlp_twins):
    (model, data), _, x = mlp_twins
    reference = _apply(model, x)
    quantized, _ = jc.quantize(bits=8, axis=0)(model)
    fast = jc.accelerate(_apply)
    served = fast.prepare(quantized)
    assert set(fast.explain(served, x).routes().values()) == {"int8"}
    # The int8 route's stated accuracy: within 3 % of the output's scale.
    error = jnp.max(jnp.abs(fast(served, x) - _apply(jc.materialize(quantized), x)))
    assert float(error) <= 0.03 * float(jnp.max(jnp.abs(reference)))
    # Whitened factors of an (out, in) weight: x @ W.T = (x @ vᵀ) @ uᵀ.
    factored, _ = jc.low_rank(rank=2, whiten=True)(model, data=data)
    routes = fast.explain(factored, x).routes()
    assert set(routes.values()) == {"factored"}, routes
    np.testing.assert_allclose(
        fast(factored, x), _apply(jc.materialize(factored), x), rtol=1e-5, atol=1e-5
    )


def test_clustered_fine_tuning_under_filter_jit():
    mlp, _ = _mlp()
    x = jax.random.normal(jax.random.key(5), (64, 8))
    y = jnp.sin(x[:, :4])
    params, _ = jc.cluster(bits=4)(mlp)

    def loss(model, x, y):
        return jnp.mean(jnp.square(_apply(jc.materialize(model), x) - y))

    tx = jc.training.clustered(optax.sgd(0.05))
    state = tx.init(params)

    @eqx.filter_jit
    def step(model, state):
        grads = jc.training.grad(loss)(model, x, y)
        updates, state = tx.update(grads, state, model)
        return eqx.apply_updates(model, updates), state

    trained = params
    for _ in range(30):
        trained, state = step(trained, state)
    assert float(loss(trained, x, y)) < float(loss(params, x, y))
    np.testing.assert_array_equal(trained.layers[0].weight.indices, params.layers[0].weight.indices)
    assert trained.activation is mlp.activation


@pytest.fixture(scope="module")
def mlp_and_input():
    return _mlp()


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_prune_units_rebuilds_a_smaller_module(name):
    model, x = MODELS[name]()
    thinned, stats = jc.prune_units(0.5, apply_fn=_apply, example_input=x)(model)
    assert type(thinned) is type(model)
    assert stats.module is thinned
    assert _non_arrays(thinned) == _non_arrays(model)
    assert jc.nbytes(thinned) < jc.nbytes(model)
    # Removed units are zeroed units: the rebuilt module computes the masked dense model.
    np.testing.assert_allclose(
        _apply(thinned, x), _apply(stats.masked(model), x), rtol=1e-5, atol=1e-5
    )
    if name == "mlp":
        first, second, last = thinned.layers
        assert first.weight.shape == (16, 8) and second.weight.shape == (16, 16)
        assert (first.out_features, second.in_features, last.in_features) == (16, 16, 16)
        assert thinned.width_size == 16 and last.weight.shape == (4, 16)
    else:
        assert thinned.conv.weight.shape == (4, 1, 3, 3) and thinned.conv.out_channels == 4
        assert thinned.head.weight.shape == (10, 4 * 6 * 6)
        assert thinned.head.in_features == 4 * 6 * 6


def test_prune_units_on_attention_heads():
    model, x = _attention()
    groups = jc.coupled_groups(_apply, model, x)
    heads = [g for g in groups if g.prunable and g.size == 2]
    assert heads, [(g.name, g.size, g.reason) for g in groups]
    tx = jc.prune_units({heads[0].name: 0.5}, apply_fn=_apply, example_input=x)
    thinned, stats = tx(model)
    assert thinned.attention.num_heads == 1
    assert stats.module is thinned, stats.module_note
    np.testing.assert_allclose(
        _apply(thinned, x), _apply(stats.masked(model), x), rtol=1e-5, atol=1e-5
    )


def test_sensitivity_of_units(mlp_and_input):
    model, x = mlp_and_input

    def loss(m):
        return float(jnp.mean(jnp.square(_apply(m, x) - _apply(model, x))))

    report = jc.sensitivity(
        _apply,
        model,
        loss,
        method="units",
        example_input=x,
        levels=(0.5,),
        higher_is_better=False,
        progress=False,
    )
    assert report.layers == ("layers/0/weight", "layers/1/weight")
    assert report.baseline == 0.0 and all(report.drops(layer)[0] > 0 for layer in report.layers)


@pytest.mark.parametrize("compress", [False, True], ids=["dense", "pruned+quantized"])
def test_save_and_load_with_a_template(tmp_path, mlp_and_input, compress):
    model, x = mlp_and_input
    tree = jc.chain(jc.prune(0.5), jc.quantize(bits=8))(model)[0] if compress else model
    path = tmp_path / "mlp.jxc"
    report = jc.save(path, tree)
    assert [leaf.path for leaf in report.leaves][:2] == ["layers/0/weight", "layers/0/bias"]
    with pytest.raises(ValueError, match="like="):
        jc.load(path)
    # The template gives the structure and the non-array leaves; shapes are enough.
    template = eqx.filter_eval_shape(eqx.nn.MLP, 8, 4, 32, 2, key=jax.random.key(9))
    loaded = jc.load(path, like=template)
    assert type(loaded) is type(model) and loaded.activation is model.activation
    assert jax.tree.structure(loaded, is_leaf=jc.is_compressed) == jax.tree.structure(
        tree, is_leaf=jc.is_compressed
    )
    np.testing.assert_array_equal(
        _apply(jc.materialize(loaded), x), _apply(jc.materialize(tree), x)
    )


def test_load_refuses_a_template_of_other_shapes(tmp_path, mlp_and_input):
    model, _ = mlp_and_input
    path = tmp_path / "mlp.jxc"
    jc.save(path, model)
    wider = eqx.nn.MLP(8, 4, 16, 2, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"layers/0/weight.*\(32, 8\).*\(16, 8\)"):
        jc.load(path, like=wider)
    with pytest.raises(ValueError, match="layers/3/weight"):
        jc.load(path, like=eqx.nn.MLP(8, 4, 32, 3, key=jax.random.key(0)))


def _regression(model):
    x = jax.random.normal(jax.random.key(5), (64, 8))
    y = jnp.sin(x[:, :4])

    def loss(model):
        return jnp.mean(jnp.square(_apply(model, x) - y))

    return loss


def test_pruned_training_under_filter_jit(mlp_and_input):
    model, _ = mlp_and_input
    loss = _regression(model)
    tx = jc.training.pruned(optax.sgd(0.05), 0.5, every=1)
    state = tx.init(eqx.filter(model, eqx.is_array))

    @eqx.filter_jit
    def step(model, state):
        grads = jc.training.grad(loss)(model)
        updates, state = tx.update(
            eqx.filter(grads, eqx.is_array), state, eqx.filter(model, eqx.is_array)
        )
        return eqx.apply_updates(model, updates), state

    trained = model
    for _ in range(5):
        trained, state = step(trained, state)
    weights = [layer.weight for layer in trained.layers]
    assert all(int(jnp.sum(w == 0)) == w.size // 2 for w in weights)
    assert float(loss(trained)) < float(loss(jc.materialize(jc.prune(0.5)(model)[0])))
    assert trained.activation is model.activation


@pytest.mark.bitwise
def test_fake_quant_training_under_filter_jit(mlp_and_input):
    model, _ = mlp_and_input
    loss = _regression(model)
    fake = jc.training.fake_quant(4)
    tx = optax.sgd(0.05)
    state = tx.init(eqx.filter(model, eqx.is_array))

    @eqx.filter_jit
    def step(model, state):
        grads = jc.training.grad(lambda m: loss(fake(m)))(model)
        updates, state = tx.update(eqx.filter(grads, eqx.is_array), state)
        return eqx.apply_updates(model, updates), state

    trained = model
    for _ in range(10):
        trained, state = step(trained, state)
    assert float(loss(fake(trained))) < float(loss(fake(model)))
    # What was trained is what quantize stores.
    stored = jc.materialize(jc.quantize(4)(trained)[0])
    np.testing.assert_array_equal(stored.layers[0].weight, fake(trained).layers[0].weight)


@pytest.fixture(scope="module")
def mlp_twins():
    """An eqx MLP and its layers as (in, out) kernels W.T, with the same calibration
    statistics, read as trailing for the first and leading for the second."""
    model, _ = _mlp()
    x = jax.random.normal(jax.random.key(7), (48, 8))
    data = jc.calibrate(_apply, model, [x])
    kernels = [{"kernel": layer.weight.T, "bias": layer.bias} for layer in model.layers]
    twin_data = [
        {"kernel": dataclasses.replace(layer.weight, trailing=False), "bias": None}
        for layer in data.layers
    ]
    return (model, data), (kernels, twin_data), x


DATA_AWARE = {
    "gptq": lambda where: jc.quantize(4, method="gptq", where=where),
    "gptq-groups": lambda where: jc.quantize(4, group_size=4, method="gptq", where=where),
    "awq": lambda where: jc.quantize(4, method="awq", awq_grid=4, where=where),
    "wanda": lambda where: jc.prune(0.5, importance="wanda", where=where),
    "sparsegpt": lambda where: jc.prune(0.5, importance="sparsegpt", where=where),
    "sparsegpt-2:4": lambda where: jc.prune_nm("2:4", importance="sparsegpt", where=where),
    "hessian-kmeans": lambda where: jc.cluster(bits=3, weights="hessian", where=where),
    "codebook-gptq": lambda where: jc.cluster(bits=3, method="gptq", where=where),
    "whitened-low-rank": lambda where: jc.low_rank(rank=2, whiten=True, where=where),
}


@pytest.fixture(scope="module")
def first_layer_compressed(mlp_twins):
    """``method -> (compressed eqx MLP, stats)``, its first (non-square) layer only."""
    (model, data), _, _ = mlp_twins
    return functools.cache(lambda method: DATA_AWARE[method]("layers/0/weight")(model, data=data))


@pytest.mark.parametrize("method", sorted(DATA_AWARE))
def test_data_aware_methods_match_the_inputs_first_twin(mlp_twins, first_layer_compressed, method):
    # An (out, in) weight with trailing statistics is compressed exactly as its W.T
    # with leading ones: the same codes, masks and factors, back in (out, in).
    (model, _), (kernels, twin_data), _ = mlp_twins
    compressed, stats = first_layer_compressed(method)
    twin, _ = DATA_AWARE[method]("0/kernel")(kernels, data=twin_data)
    leaf, twin_leaf = compressed.layers[0].weight, twin[0]["kernel"]
    assert type(leaf) is type(twin_leaf) and leaf.shape == model.layers[0].weight.shape
    np.testing.assert_allclose(
        jc.materialize(leaf), jc.materialize(twin_leaf).T, rtol=1e-6, atol=1e-6
    )
    assert list(stats) == ["layers/0/weight"]


def test_gptq_scales_an_equinox_weight_per_output_channel(mlp_twins, first_layer_compressed):
    (model, data), _, x = mlp_twins
    first = "layers/0/weight"
    gptq, _ = first_layer_compressed("gptq")
    # axis=-1 names the output channel, as on a linen kernel: axis 0 of (out, in).
    leaf = gptq.layers[0].weight
    assert (leaf.axis, leaf.scale.shape) == (0, (1, 32))
    explicit, _ = jc.quantize(4, axis=0, method="gptq", where=first)(model, data=data)
    np.testing.assert_array_equal(explicit.layers[0].weight.codes, leaf.codes)
    rtn, _ = jc.quantize(4, axis=0, where=first)(model)
    reference = _apply(model, x)

    def error(tree):
        return float(jnp.linalg.norm(_apply(jc.materialize(tree), x) - reference))

    assert error(gptq) < error(rtn)
    with pytest.raises(ValueError, match=r"layers/0/weight.*\(out, in\).*axis=1"):
        jc.quantize(4, axis=1, method="gptq", where=first)(model, data=data)


def test_awq_input_scales_survive_save_and_load(tmp_path, mlp_twins, first_layer_compressed):
    (model, _), _, x = mlp_twins
    awq, _ = first_layer_compressed("awq")
    assert awq.layers[0].weight.input_scale.shape == (1, 8)
    jc.save(tmp_path / "awq.jxc", awq)
    loaded = jc.load(tmp_path / "awq.jxc", like=model)
    np.testing.assert_array_equal(_apply(jc.materialize(loaded), x), _apply(jc.materialize(awq), x))


def test_pca_refuses_trailing_statistics(mlp_and_input):
    model, x = mlp_and_input
    data = jc.calibrate(_apply, model, [x])
    with pytest.raises(ValueError, match=r"layers/0/weight.*\(out, in\)"):
        jc.pca(2)(model, data=data)
