"""quantize(method="awq"): RTN at alpha = 0, never worse than RTN, the stored input scales
(materialize, nbytes, files, sharding, accelerate), jit, linen/nnx, and bad inputs."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from calibration_stats import stats_of as _stats_of  # tests/ is on sys.path
from flax import linen as nn
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxcompress as jc
from jaxcompress.calibration.calibrate import InputStats
from jaxcompress.io import treecodec
from jaxcompress.io.errors import FileFormatError
from jaxcompress.numerics.awq import input_magnitudes, inverse_scales
from jaxcompress.runtime.sharding import place, shardings_like

M, N = 64, 32


def _outlier_inputs(rows=512, features=M, seed=0):
    """Inputs where a few channels are 30x larger than the rest, as in LLM activations."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, features))
    x[:, rng.choice(features, 4, replace=False)] *= 30.0
    return x.astype(np.float32)


X = _outlier_inputs()
W = np.random.default_rng(1).normal(size=(M, N)).astype(np.float32)
DATA = {"w": _stats_of(X)}
CONV = np.random.default_rng(2).normal(size=(3, 3, 4, 8)).astype(np.float32)
CONV_DATA = {"w": _stats_of(_outlier_inputs(features=36, seed=3))}


def _output_error(dense, w=W, x=X):
    return float(np.linalg.norm(x @ w - x @ np.asarray(dense, np.float32)))


def _relative_output_error(dense, w, gram):
    e = np.asarray(dense, np.float64).reshape(w.shape[0], -1) - w
    g = np.asarray(gram, np.float64)
    return np.sqrt(np.sum(e * (g @ e)) / np.sum(w * (g @ w)))


LAYOUTS = [
    dict(group_size=16),
    dict(axis=-1, symmetric=False),
    dict(axis=None, calibration="percentile"),
    dict(group_size=8, calibration="mse", scale_dtype=jnp.bfloat16),
]


@pytest.mark.bitwise
@pytest.mark.parametrize("options", LAYOUTS)
def test_a_grid_of_only_alpha_zero_is_round_to_nearest_exactly(options):
    rtn, _ = jc.quantize(4, **options)({"w": jnp.asarray(W)})
    awq, stats = jc.quantize(4, method="awq", awq_grid=1, awq_clip_grid=1, **options)(
        {"w": jnp.asarray(W)}, data=DATA
    )
    a, b = awq["w"], rtn["w"]
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.scale, b.scale)
    if b.zero_point is not None:
        np.testing.assert_array_equal(a.zero_point, b.zero_point)
    np.testing.assert_array_equal(a.input_scale, np.ones(M))
    np.testing.assert_array_equal(a.materialize(), b.materialize())
    s = stats["w"]
    assert float(s["alpha"]) == 0.0
    assert float(s["relative_output_error"]) == float(s["rtn_relative_output_error"])


@pytest.mark.parametrize("options", LAYOUTS)
def test_never_above_rtn_and_strictly_below_with_outlier_inputs(options):
    awq, stats = jc.quantize(4, method="awq", **options)({"w": jnp.asarray(W)}, data=DATA)
    rtn, _ = jc.quantize(4, **options)({"w": jnp.asarray(W)})
    s = stats["w"]
    assert 0.0 < float(s["alpha"]) <= 1.0
    assert float(s["relative_output_error"]) < float(s["rtn_relative_output_error"])
    # The stats are the errors of what is stored, measured independently.
    gram = DATA["w"].gram
    want_rtn = _relative_output_error(rtn["w"].materialize(), W, gram)
    want_awq = _relative_output_error(awq["w"].materialize(), W, gram)
    assert float(s["rtn_relative_output_error"]) == pytest.approx(want_rtn, rel=1e-4)
    assert float(s["relative_output_error"]) == pytest.approx(want_awq, rel=1e-4)
    # On the calibration activations themselves, not only through the Gram.
    assert _output_error(awq["w"].materialize()) < _output_error(rtn["w"].materialize())


def test_every_grid_point_is_no_better_than_the_chosen_alpha_without_clipping():
    # Without clipping, the full objective of the chosen alpha of a 5-point grid beats
    # (or ties) each alpha of that grid (a 64-input Gram is one block of the search).
    _, stats = jc.quantize(4, group_size=16, method="awq", awq_grid=5, awq_clip_grid=1)(
        {"w": jnp.asarray(W)}, data=DATA
    )
    best = float(stats["w"]["relative_output_error"])
    alpha = float(stats["w"]["alpha"])
    assert alpha in (0.0, 0.25, 0.5, 0.75, 1.0)
    assert float(stats["w"]["clip_ratio"]) == 1.0
    a = input_magnitudes(DATA["w"].gram)
    for candidate in (0.0, 0.25, 0.5, 0.75, 1.0):
        r = np.asarray(inverse_scales(a, candidate, jnp.float32))[:, None]
        q, _ = jc.quantize(4, group_size=16)({"w": jnp.asarray(W) / jnp.asarray(r)})
        restored = np.asarray(q["w"].materialize()) * r
        assert best <= _relative_output_error(restored, W, DATA["w"].gram) * (1 + 1e-5)


def test_clipping_lowers_the_output_error_and_is_reported():
    options = dict(group_size=16)
    plain, plain_stats = jc.quantize(4, method="awq", awq_clip_grid=1, **options)(
        {"w": jnp.asarray(W)}, data=DATA
    )
    clipped, stats = jc.quantize(4, method="awq", **options)({"w": jnp.asarray(W)}, data=DATA)
    s = stats["w"]
    assert 0.5 <= float(s["clip_ratio"]) < 1.0
    gram = DATA["w"].gram
    got = _relative_output_error(clipped["w"].materialize(), W, gram)
    assert float(s["relative_output_error"]) == pytest.approx(got, rel=1e-4)
    assert got < _relative_output_error(plain["w"].materialize(), W, gram)
    assert got <= float(s["rtn_relative_output_error"])


@pytest.mark.parametrize(
    ("weight", "data", "options"),
    [
        (W, DATA, dict(group_size=16)),
        (W, DATA, dict(axis=None, symmetric=False)),
        (CONV, CONV_DATA, dict(axis=-1, group_size=12, scale_dtype=jnp.float16)),
    ],
)
def test_materializes_to_the_unscaled_quantization_of_the_scaled_weight(weight, data, options):
    # Without clipping, so that what was quantized is diag(r)⁻¹ W itself.
    tx = jc.quantize(4, method="awq", awq_clip_grid=1, **options)
    awq, _ = tx({"w": jnp.asarray(weight)}, data=data)
    leaf = awq["w"]
    fan_in = weight.ndim - 1
    assert leaf.input_scale.shape == weight.shape[:fan_in]
    assert leaf.input_scale.dtype == np.dtype(options.get("scale_dtype", jnp.float32))
    r = np.asarray(leaf.input_scale, np.float32).reshape(weight.shape[:fan_in] + (1,))
    assert (r > 0).all() and not np.all(r == 1.0)
    # The stored form: the codes decoded as round-to-nearest would, times r. A float32
    # multiplication is correctly rounded everywhere, so numpy gives the same bits.
    plain = dataclasses.replace(leaf, input_scale=None)
    want = np.asarray(plain.materialize(), np.float32) * r
    np.testing.assert_array_equal(np.asarray(jc.materialize(awq)["w"]), want)
    # What was quantized: diag(r)⁻¹ W (r = 1/s), by round-to-nearest with the same
    # options; XLA's float32 division may differ by an ulp inside the search's program,
    # which can move a scale by an ulp (and, in principle, a code at a rounding tie).
    scaled, _ = jc.quantize(4, **options)({"w": jnp.asarray(weight) / jnp.asarray(r)})
    assert np.mean(np.asarray(leaf.unpacked_codes() != scaled["w"].unpacked_codes())) < 0.01
    np.testing.assert_allclose(
        np.asarray(leaf.scale, np.float32), np.asarray(scaled["w"].scale, np.float32), rtol=1e-6
    )
    close = np.asarray(scaled["w"].materialize(), np.float32) * r
    np.testing.assert_allclose(want, close, rtol=1e-5, atol=1e-6)
    assert "input_scale=" in repr(leaf)


def test_a_nearly_silent_input_gets_a_bounded_scale_in_float16():
    x = X.copy()
    x[:, 3] *= 1e-12  # seen, but almost zero
    data = {"w": _stats_of(x)}
    tx = jc.quantize(3, symmetric=False, scale_dtype=jnp.float16, method="awq", awq_grid=3)
    awq, stats = tx({"w": jnp.asarray(W)}, data=data)
    alpha = float(stats["w"]["alpha"])
    assert alpha > 0.0  # the outlier inputs still want scaling
    r = np.asarray(awq["w"].input_scale, np.float32)
    # Magnitudes are floored at 1e-4 of the largest: r spans at most (1e4) ** alpha
    # (without the floor, the silent input alone would make it 1e13 ** alpha).
    assert np.isfinite(r).all() and r.max() / r.min() <= 1e4**alpha * 1.01
    dense = np.asarray(awq["w"].materialize())
    assert np.isfinite(dense).all() and np.abs(dense).max() < 10 * np.abs(W).max()


def test_nbytes_counts_the_input_scales():
    w = {"w": jnp.asarray(W)}
    for scale_dtype, itemsize in ((jnp.float32, 4), (jnp.float16, 2)):
        rtn, _ = jc.quantize(4, group_size=16, scale_dtype=scale_dtype)(w)
        awq, _ = jc.quantize(4, group_size=16, scale_dtype=scale_dtype, method="awq")(w, data=DATA)
        assert awq["w"].nbytes == rtn["w"].nbytes + M * itemsize
        assert jc.nbytes(awq) == awq["w"].nbytes


def _awq_tree():
    dense, _ = jc.quantize(4, group_size=16, method="awq")({"w": jnp.asarray(W)}, data=DATA)
    conv, _ = jc.quantize(3, symmetric=False, scale_dtype=jnp.float16, method="awq")(
        {"w": jnp.asarray(CONV)}, data=CONV_DATA
    )
    return {"dense": dense["w"], "conv": conv["w"], "plain": jc.quantize(4)({"w": W})[0]["w"]}


@pytest.mark.parametrize("entropy", [True, False])
def test_save_load_round_trip_and_file_sizes(tmp_path, entropy):
    tree = _awq_tree()
    report = jc.save(tmp_path / "awq.jxc", tree, entropy=entropy)
    restored = jc.load(tmp_path / "awq.jxc")
    for name, leaf in tree.items():
        got = restored[name]
        assert repr(got) == repr(leaf)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(leaf), strict=True):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_array_equal(got.materialize(), leaf.materialize())
    assert restored["plain"].input_scale is None
    stored = sum(x.stored_bytes for x in report.leaves)
    assert report.file_bytes - report.header_bytes == stored
    if not entropy:
        assert stored == jc.nbytes(tree)
    inspected = jc.inspect_file(tmp_path / "awq.jxc")
    assert sum(x.stored_bytes for x in inspected.leaves) == stored


def test_crafted_input_scales_are_refused():
    leaf = _awq_tree()["dense"]

    def encoded():
        buffers = []

        def add(data):
            raw = memoryview(np.ascontiguousarray(data)).cast("B")
            buffers.append(np.frombuffer(raw, np.uint8).copy())
            return len(buffers) - 1

        return treecodec.encode_node({"w": leaf}, add, entropy=False), buffers

    def decode(node, buffers):
        get = lambda i, path: memoryview(buffers[i])  # noqa: E731
        return treecodec.decode_node(node, get, lambda a, p, n: jnp.asarray(np.array(a)))

    node, buffers = encoded()
    assert isinstance(decode(node, buffers)["w"], jc.Quantized)
    index = node["items"][0][1]["input_scale"]["buffer"]
    buffers[index][4:8] = np.frombuffer(np.float32(-1.0).tobytes(), np.uint8)
    with pytest.raises(FileFormatError, match="w: input_scale must be finite and positive"):
        decode(node, buffers)
    node, buffers = encoded()
    node["items"][0][1]["input_scale"]["shape"] = [8, 8]
    with pytest.raises(FileFormatError, match="input_scale has shape"):
        decode(node, buffers)


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(32, name="dense1")(x))
        return nn.Dense(16, name="head")(x)


class _NNXMLP(nnx.Module):
    def __init__(self, rngs):
        self.dense1 = nnx.Linear(M, 32, rngs=rngs)
        self.head = nnx.Linear(32, 16, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.dense1(x)))


LINEN = _MLP()
LINEN_PARAMS = LINEN.init(jax.random.key(0), jnp.asarray(X[:2]))["params"]


def _apply_linen(params, x):
    return LINEN.apply({"params": params}, x)


def _check_model(params, apply):
    x = jnp.asarray(X[:256])
    data = jc.calibrate(apply, params, [x[:128], x[128:]])
    tx = jc.quantize(4, group_size=16, method="awq", where="kernel")
    eager, stats = tx(params, data=data)
    jitted, jit_stats = jax.jit(tx)(params, data=data)
    for path in ("dense1/kernel", "head/kernel"):
        s = stats[path]
        assert float(s["relative_output_error"]) <= float(s["rtn_relative_output_error"])
        assert float(jit_stats[path]["alpha"]) == float(s["alpha"])
    for a, b in zip(jax.tree.leaves(jitted), jax.tree.leaves(eager), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The first layer's outlier inputs make AWQ strictly better there.
    first = stats["dense1/kernel"]
    assert float(first["relative_output_error"]) < float(first["rtn_relative_output_error"])
    dense_out = apply(params, x)
    out = apply(jc.materialize(eager), x)
    rtn, _ = jc.quantize(4, group_size=16, where="kernel")(params)
    rtn_out = apply(jc.materialize(rtn), x)
    assert np.linalg.norm(out - dense_out) < np.linalg.norm(rtn_out - dense_out)
    return eager


@pytest.mark.bitwise
def test_linen_model_eagerly_and_under_jit():
    compressed = _check_model(LINEN_PARAMS, _apply_linen)
    assert compressed["dense1"]["kernel"].input_scale.shape == (M,)


@pytest.mark.bitwise
def test_nnx_model_eagerly_and_under_jit():
    graphdef, state = nnx.split(_NNXMLP(nnx.Rngs(0)))

    def apply(s, x):
        return nnx.merge(graphdef, s)(x)

    compressed = _check_model(state, apply)
    kernel = compressed["dense1"]["kernel"].get_value()
    assert isinstance(kernel, jc.Quantized) and kernel.input_scale.shape == (M,)


def test_accelerate_serves_awq_leaves_dense_and_equals_materialize():
    x = jnp.asarray(X[:128])
    data = jc.calibrate(_apply_linen, LINEN_PARAMS, [x])
    compressed, _ = jc.chain(
        jc.quantize(4, group_size=16, method="awq", where="dense1/kernel"),
        jc.quantize(8, where="head/kernel"),
    )(LINEN_PARAMS, data=data)
    reference = _apply_linen(jc.materialize(compressed), x)
    for route in ("auto", "blocked"):
        fast = jc.accelerate(_apply_linen, route=route, int8_activations=False)
        prepared = fast.prepare(compressed)
        assert isinstance(prepared["dense1"]["kernel"], jc.Quantized)
        assert isinstance(prepared["head"]["kernel"], jc.QuantizedMatrix)
        out = fast(prepared, x)
        np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-5)
        routes = fast.last_plan.routes()
        assert routes == {"dense1/kernel": "materialize", "head/kernel": "blocked"}
        note = [d.note for d in fast.last_plan.decisions if d.path == "dense1/kernel"][0]
        assert "AWQ" in note


@pytest.mark.bitwise
def test_sharded_weight_gives_the_unsharded_result_and_places_input_scales(mesh8):
    params = {"w": jnp.asarray(W)}
    tx = jc.quantize(4, group_size=16, method="awq")
    want, _ = tx(params, data=DATA)
    sharded = jax.device_put(params, NamedSharding(mesh8, P("data", "model")))
    got, _ = tx(sharded, data=DATA)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The input scales follow the weight's rows.
    assert got["w"].input_scale.sharding.spec == P("data")
    np.testing.assert_array_equal(jc.materialize(got)["w"], jc.materialize(want)["w"])
    np.testing.assert_array_equal(jax.jit(jc.materialize)(got)["w"], jc.materialize(want)["w"])
    specs = shardings_like(want, {"w": P("data", "model")}, mesh=mesh8)
    assert specs["w"].input_scale.spec == P("data")
    placed = place(want, mesh8, {"w": P("data", "model")})
    np.testing.assert_array_equal(jax.jit(jc.materialize)(placed)["w"], jc.materialize(want)["w"])


def test_loaded_onto_a_mesh_materializes(tmp_path, mesh8):
    tree = {"w": _awq_tree()["dense"]}
    jc.save(tmp_path / "m.jxc", tree)
    restored = jc.load(tmp_path / "m.jxc", sharding={"w": NamedSharding(mesh8, P("data", "model"))})
    np.testing.assert_array_equal(jc.materialize(restored)["w"], tree["w"].materialize())


def test_bad_inputs_raise_naming_the_option_and_leaf():
    params = {"dense": {"kernel": jnp.asarray(W), "bias": jnp.zeros(N)}}
    tx = jc.quantize(4, method="awq")
    with pytest.raises(ValueError, match="method='awq' needs data="):
        tx(params)
    with pytest.raises(ValueError, match="no InputStats for leaf 'dense/kernel'"):
        tx(params, data={"other": {"kernel": DATA["w"]}})
    with pytest.raises(ValueError, match=r"leaf 'dense/kernel' have a gram of shape \(10, 10\)"):
        tx(params, data={"dense": {"kernel": _stats_of(X[:, :10])}})
    nan = InputStats(jnp.float32(1), jnp.zeros(M), jnp.full((M, M), jnp.nan), None, None)
    with pytest.raises(ValueError, match="method=awq.*NaN or Inf"):
        tx(params, data={"dense": {"kernel": nan}})
    for grid in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="awq_grid must be a positive integer"):
            jc.quantize(4, method="awq", awq_grid=grid)
    with pytest.raises(ValueError, match="awq_grid=5 only applies to method='awq'"):
        jc.quantize(4, awq_grid=5)
    for grid in (0, 1.5, True):
        with pytest.raises(ValueError, match="awq_clip_grid must be a positive integer"):
            jc.quantize(4, method="awq", awq_clip_grid=grid)
    with pytest.raises(ValueError, match="awq_clip_grid=5 only applies to method='awq'"):
        jc.quantize(4, awq_clip_grid=5)
    with pytest.raises(ValueError, match="act_order=True only applies to method='gptq'"):
        jc.quantize(4, method="awq", act_order=True)
    sparse, _ = jc.prune(0.5)({"w": jnp.asarray(W)})
    with pytest.raises(TypeError, match="'w' is Sparse; AWQ needs the dense matrix"):
        tx(sparse, data=DATA)
