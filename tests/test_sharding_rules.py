"""shardings_like / place, tensor- and data-parallel specs, and pmap_apply on 8 CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxcompress as jc
from jaxcompress.examples.models import LeNet300100, LeNet300100NNX
from jaxcompress.runtime.parallel import data_parallel, pmap_apply, tensor_parallel_specs
from jaxcompress.runtime.sharding import place, shardings_like

COMPRESSORS = {
    "sparse": jc.prune(0.5),
    "quantized": jc.quantize(8, axis=-1),
    "quantized_grouped": jc.quantize(4, axis=-1, group_size=8, symmetric=False),
    "clustered": jc.cluster(k=16),
    "sparse_quantized": jc.chain(jc.prune(0.5), jc.quantize(8)),
    "sparse_clustered": jc.chain(jc.prune(0.5), jc.cluster(k=8)),
    "lowrank": jc.low_rank(rank=4),
}
# One leaf type per layer of LeNet-300-100 (and its nnx twin).
LENET_COMPRESSION = jc.chain(
    jc.quantize(8, where="dense1/kernel"),
    jc.prune(0.5, where="dense2/kernel"),
    jc.low_rank(rank=4, where="dense3/kernel"),
)
# Every leaf type, one layer each, all split the same way.
DENSE_SPECS = {kind: {"kernel": P("data", "model"), "bias": P("model")} for kind in COMPRESSORS}


def _layers():
    rng = np.random.default_rng(0)
    return {
        kind: {
            "kernel": jnp.asarray(rng.normal(size=(32, 64)), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=64), jnp.float32),
        }
        for kind in COMPRESSORS
    }


def _forward(params, x):
    dense = jc.materialize(params)
    return {kind: x @ layer["kernel"] + layer["bias"][None, :] for kind, layer in dense.items()}


def _specs(tree):
    return jax.tree.map(lambda s: s.spec, tree, is_leaf=lambda s: isinstance(s, NamedSharding))


@pytest.fixture(scope="module")
def compressed():
    # One compiled call for every layer instead of many eager dispatches.
    @jax.jit
    def compress(layers):
        return {kind: COMPRESSORS[kind](layer)[0] for kind, layer in layers.items()}

    return compress(_layers())


@pytest.mark.bitwise
def test_placed_equals_unsharded(mesh8, compressed):
    placed = place(compressed, mesh8, DENSE_SPECS)
    # Every child sits where shardings_like said.
    expected = shardings_like(compressed, DENSE_SPECS, mesh=mesh8)
    for got, want in zip(jax.tree.leaves(placed), jax.tree.leaves(expected), strict=True):
        assert got.sharding.is_equivalent_to(want, got.ndim)
    want_dense = jax.tree.leaves(jc.materialize(compressed))
    for got, want in zip(jax.tree.leaves(jc.materialize(placed)), want_dense, strict=True):
        np.testing.assert_array_equal(got, want)
    x = np.random.default_rng(1).normal(size=(16, 32)).astype(np.float32)
    want = jax.jit(_forward)(compressed, x)
    got = jax.jit(_forward)(placed, jax.device_put(x, data_parallel(mesh8)))
    for kind in COMPRESSORS:
        np.testing.assert_allclose(got[kind], want[kind], rtol=1e-5, atol=1e-5, err_msg=kind)


def test_child_specs(mesh8, compressed):
    out = _specs(shardings_like(compressed, DENSE_SPECS, mesh=mesh8))
    everything = ("data", "model")
    sparse = out["sparse"]
    assert sparse["bias"] == P("model")
    # Mask (32, 8 bytes) laid out like the weight; 1024 kept values split over all 8.
    assert (sparse["kernel"].mask, sparse["kernel"].values) == (P("data", "model"), P(everything))
    q = out["quantized"]["kernel"]
    assert (q.codes, q.scale) == (P("data", "model"), P(None, "model"))
    # Groups of 8 rows: 4 groups over 4 "data" devices; codes and zero point alike.
    g = out["quantized_grouped"]["kernel"]
    assert (g.codes, g.scale, g.zero_point) == (P("data", "model"),) * 3
    c = out["clustered"]["kernel"]
    assert (c.indices, c.codebook) == (P("data", "model"), P())
    # Nested values: codes split like plain kept values, the per-tensor scale replicated.
    sq = out["sparse_quantized"]["kernel"]
    assert (sq.mask, sq.values.codes, sq.values.scale) == (
        P("data", "model"),
        P(everything),
        P(None, None),
    )
    sc = out["sparse_clustered"]["kernel"]
    assert (sc.values.indices, sc.values.codebook) == (P(everything), P())
    lr = out["lowrank"]["kernel"]
    assert (lr.u, lr.v) == (P("data", None), P(None, "model"))
    # A row split: u follows the rows, v is whole.
    row = {"kernel": P("model", None), "bias": P()}
    lr = _specs(shardings_like(compressed["lowrank"], row, mesh=mesh8))["kernel"]
    assert (lr.u, lr.v) == (P("model", None), P(None, None))


def _shapes(tx, params):
    """The compressed tree's shapes only: shardings are planned without compressing."""
    return jax.eval_shape(tx, params)[0]


def test_packed_child_that_no_longer_divides_is_replicated_on_that_axis(mesh8):
    # 4-bit codes of 8 columns pack to 4 bytes, which do not split over 8 devices.
    q = _shapes(jc.quantize(4), {"w": jnp.ones((8, 8))})
    spec = P(None, ("data", "model"))
    assert shardings_like(q, {"w": spec}, mesh=mesh8)["w"].codes.spec == P(None, None)


def test_conv_scale_follows_channel_axis(mesh8):
    q = _shapes(jc.quantize(8, axis=-1), {"w": jnp.ones((3, 3, 8, 16))})
    out = shardings_like(q, NamedSharding(mesh8, P(None, None, "data", "model")))["w"]
    assert (out.codes.spec, out.scale.spec) == (P(None, None, "data", "model"), P(None, "model"))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            P("data", None),
            "dense2/kernel: axis 0 of size 6 does not divide evenly over mesh axis "
            "'data' of size 4",
        ),
        (
            P(None, ("data", "model")),
            r"dense2/kernel: axis 1 of size 12 .* \('data', 'model'\) "
            "of size 8",
        ),
        (P(None, None, None), "dense2/kernel: spec .* has 3 entries but the leaf has rank 2"),
        (P("heads", None), "dense2/kernel: spec .* names mesh axis 'heads'"),
        (P("model", "model"), "dense2/kernel: spec .* uses mesh axis 'model' twice"),
    ],
)
def test_bad_specs_name_the_leaf(mesh8, spec, message):
    pruned = _shapes(jc.prune(0.5), {"dense2": {"kernel": jnp.ones((6, 12))}})
    with pytest.raises(ValueError, match=message):
        shardings_like(pruned, {"dense2": {"kernel": spec}}, mesh=mesh8)


def test_spec_tree_none_is_replicated_and_errors(mesh8, compressed):
    out = shardings_like(compressed["sparse"], {"kernel": None, "bias": P("model")}, mesh=mesh8)
    assert out["kernel"].mask.is_fully_replicated and out["kernel"].values.is_fully_replicated
    with pytest.raises(ValueError, match="needs mesh="):
        shardings_like(compressed["sparse"], P())
    with pytest.raises(ValueError, match="not laid out like the params"):
        shardings_like(compressed["sparse"], {"kernel": P()}, mesh=mesh8)


def test_tensor_parallel_specs_choose_only_valid_axes(mesh8):
    params = {
        "a": {"kernel": jnp.ones((8, 6)), "bias": jnp.ones(6)},
        "b": {"kernel": jnp.ones((6, 5)), "bias": jnp.ones(5)},
        "c": {"kernel": jnp.ones((5, 4)), "bias": jnp.ones(4)},
        "conv": {"kernel": jnp.ones((3, 3, 4, 8)), "bias": jnp.ones(8)},
        "norm": {"scale": jnp.ones(4)},
    }
    column = tensor_parallel_specs(params, mesh8, style="column")
    assert (column["a"]["kernel"], column["a"]["bias"]) == (P(None, "model"), P("model"))
    # 5 outputs do not split over 2 devices: kernel and bias stay whole.
    assert (column["b"]["kernel"], column["b"]["bias"]) == (P(None, None), P())
    assert column["conv"]["kernel"] == P(None, None, None, "model")
    assert column["norm"]["scale"] == P()
    row = tensor_parallel_specs(params, mesh8, style="row")
    assert (row["a"]["kernel"], row["a"]["bias"], row["c"]["kernel"]) == (
        P("model", None),
        P(),
        P(None, None),
    )
    assert row["conv"]["kernel"] == P(None, None, "model", None)
    # Megatron: column, row, column, row in sorted-key order; a row layer's bias is whole.
    alternate = tensor_parallel_specs(params, mesh8, style="alternate")
    kernels = [alternate[k]["kernel"] for k in ("a", "b", "c", "conv")]
    assert kernels == [
        P(None, "model"),
        P("model", None),
        P(None, "model"),
        P(None, None, "model", None),
    ]
    assert [alternate[k]["bias"] for k in "abc"] == [P("model"), P(), P("model")]
    with pytest.raises(ValueError, match="style"):
        tensor_parallel_specs(params, mesh8, style="diagonal")
    with pytest.raises(ValueError, match="'tensor'"):
        tensor_parallel_specs(params, mesh8, axis="tensor")


@pytest.fixture(scope="module")
def lenet():
    model = LeNet300100()
    params = model.init(jax.random.key(0), jnp.zeros((1, 64)))["params"]
    return model, jax.jit(LENET_COMPRESSION)(params)[0]


@pytest.mark.parametrize("style", ["column", "row", "alternate"])
def test_tensor_parallel_linen_model_equals_unsharded(mesh8, lenet, style):
    model, compressed = lenet
    x = np.random.default_rng(3).normal(size=(16, 64)).astype(np.float32)
    placed = place(compressed, mesh8, tensor_parallel_specs(compressed, mesh8, style=style))

    @jax.jit
    def forward(params, x):
        return model.apply({"params": jc.materialize(params)}, x)

    want = forward(compressed, x)
    got = forward(placed, jax.device_put(x, data_parallel(mesh8)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_tensor_parallel_nnx_state_equals_unsharded(mesh8):
    graphdef, state = nnx.split(LeNet300100NNX(rngs=nnx.Rngs(0)))
    compressed, _ = jax.jit(LENET_COMPRESSION)(state)
    specs = tensor_parallel_specs(compressed, mesh8, style="alternate")
    placed = place(compressed, mesh8, specs)
    assert placed["dense1"]["kernel"].get_value().codes.sharding.spec == P(None, "model")

    @jax.jit
    def forward(state, x):
        return nnx.merge(graphdef, jc.materialize(state))(x)

    x = np.random.default_rng(4).normal(size=(8, 64)).astype(np.float32)
    want = forward(compressed, x)
    got = forward(placed, jax.device_put(x, data_parallel(mesh8)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", [13, 3])
def test_pmap_apply_equals_jit(compressed, batch):
    # Batches that do not fill the 8 devices: padded, then the padding dropped.
    x = np.random.default_rng(5).normal(size=(batch, 32)).astype(np.float32)
    params = {kind: compressed[kind] for kind in ("sparse_quantized", "lowrank")}
    got = pmap_apply(_forward)(params, x)
    want = jax.jit(_forward)(params, x)
    for kind in params:
        assert got[kind].shape == (batch, 64)
        # Per-device batches use other matmul kernels: equal up to float rounding.
        np.testing.assert_allclose(got[kind], want[kind], rtol=1e-5, atol=1e-5)


def test_pmap_apply_linen_model_with_extra_args_and_pytree_input(lenet):
    model, compressed = lenet
    x = np.random.default_rng(6).normal(size=(10, 64)).astype(np.float32)

    def apply_fn(params, inputs, scale):
        logits = model.apply({"params": jc.materialize(params)}, inputs["image"])
        return {"logits": logits * scale}

    f = pmap_apply(apply_fn, devices=jax.devices()[:4])
    got = f(compressed, {"image": x}, jnp.float32(2.0))
    want = jax.jit(apply_fn)(compressed, {"image": x}, jnp.float32(2.0))
    np.testing.assert_allclose(got["logits"], want["logits"], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="one batch size"):
        f(compressed, {"image": x, "other": x[:3]}, jnp.float32(1.0))
