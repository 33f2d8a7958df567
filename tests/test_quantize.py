"""quantize: error bound, codes, exact bytes, constants, calibration, jit, linen/nnx,
sharding, sparse values, bad input, properties."""

import math

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxcompress as jc
from jaxcompress.core.bitpack import unpack
from jaxcompress.examples.models import LeNet5, LeNet300100NNX


def _weight(shape=(64, 32), seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _one(weight, bits, **options):
    compressed, stats = jc.quantize(bits, where="w", **options)({"w": weight})
    return compressed["w"], stats["w"]


def _per_entry(array, shape, axis, group_size):
    """Expands a (G, C) scale or zero point to one value per dense entry, in numpy."""
    array = np.asarray(array.astype(jnp.float32))
    groups, channels = array.shape
    channel_axis = None if axis is None else axis % len(shape)
    moved = (
        shape
        if channel_axis is None
        else tuple(np.delete(shape, channel_axis)) + (shape[channel_axis],)
    )
    contracted = math.prod(shape) // channels
    size = contracted // groups
    full = np.broadcast_to(array[:, None, :], (groups, size, channels)).reshape(moved)
    return full if channel_axis is None else np.moveaxis(full, -1, channel_axis)


LAYOUTS = [
    dict(axis=None),
    dict(axis=-1),
    dict(axis=0),
    dict(axis=-1, group_size=16),
    dict(axis=0, group_size=8),
    dict(axis=None, group_size=64),
]


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_absmax_round_trip_error_is_at_most_half_a_step(bits, symmetric, layout):
    weight = _weight()
    q, stats = _one(weight, bits, symmetric=symmetric, **layout)
    assert isinstance(q, jc.Quantized) and q.bits == bits
    dense = np.asarray(q.materialize())
    assert dense.shape == weight.shape and dense.dtype == np.float32
    step = _per_entry(q.scale, weight.shape, layout["axis"], layout.get("group_size"))
    error = np.abs(dense - np.asarray(weight))
    # A symmetric scale may be negative: its sign picks the side of the extra level.
    assert np.all(error <= np.abs(step) / 2 * (1 + 1e-5) + 1e-6)
    codes = np.asarray(unpack(q.codes, bits, weight.shape[-1]))
    assert codes.shape == weight.shape and codes.max() < 2**bits
    if symmetric:
        assert q.zero_point is None
    # The decode formula, computed independently from the stored children.
    zero = (
        2 ** (bits - 1)
        if symmetric
        else _per_entry(q.zero_point, weight.shape, layout["axis"], layout.get("group_size"))
    )
    np.testing.assert_allclose(
        dense, (codes.astype(np.float32) - zero) * step, rtol=1e-6, atol=1e-6
    )
    relative = np.linalg.norm(dense - np.asarray(weight)) / np.linalg.norm(np.asarray(weight))
    assert stats["bits"] == bits
    np.testing.assert_allclose(float(stats["relative_error"]), relative, rtol=1e-4)
    np.testing.assert_allclose(float(stats["max_abs_error"]), error.max(), rtol=1e-5)


def test_more_bits_give_less_error():
    errors = [float(_one(_weight(), b)[1]["relative_error"]) for b in range(2, 9)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.01


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (dict(bits=4, axis=-1), 64 * 32 // 2 + 32 * 4),
        (dict(bits=4, axis=None), 64 * 32 // 2 + 4),
        (dict(bits=8, axis=0), 64 * 32 + 64 * 4),
        (dict(bits=4, axis=-1, symmetric=False), 64 * 32 // 2 + 32 * 4 * 2),
        (dict(bits=4, axis=-1, group_size=16), 64 * 32 // 2 + 4 * 32 * 4),
        (dict(bits=2, axis=-1, scale_dtype=jnp.bfloat16), 64 * 32 // 4 + 32 * 2),
        (dict(bits=3, axis=None, scale_dtype=jnp.float16, symmetric=False), 64 * 12 + 2 + 2),
    ],
)
def test_nbytes_is_exact(options, expected):
    bits = options.pop("bits")
    q, _ = _one(_weight(), bits, **options)
    assert q.nbytes == expected
    assert jc.nbytes({"w": q}) == expected


def test_bf16_scales_are_stored_counted_and_used():
    weight = _weight()
    q, _ = _one(weight, 4, scale_dtype=jnp.bfloat16)
    assert q.scale.dtype == jnp.bfloat16 and q.scale.nbytes == 32 * 2
    codes = np.asarray(unpack(q.codes, 4, 32), np.float32)
    step = np.asarray(q.scale.astype(jnp.float32))
    np.testing.assert_array_equal(np.asarray(q.materialize()), (codes - 8) * step)


@pytest.mark.parametrize("value", [0.0, 3.0, -3.0, 0.375])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("layout", [dict(axis=None), dict(axis=-1), dict(group_size=4)])
def test_constant_tensors_are_exact(value, symmetric, layout):
    weight = jnp.full((8, 4), value, jnp.float32)
    q, stats = _one(weight, 2, symmetric=symmetric, **layout)
    np.testing.assert_array_equal(q.materialize(), weight)
    assert float(stats["relative_error"]) == 0.0 and float(stats["max_abs_error"]) == 0.0


def test_constant_groups_are_exact_inside_a_varied_tensor():
    weight = jnp.concatenate([jnp.zeros((4, 3)), _weight((4, 3))], axis=0)
    q, _ = _one(weight, 3, axis=0, symmetric=False)
    np.testing.assert_array_equal(q.materialize()[:4], 0.0)


def test_preserves_bfloat16_dtype():
    weight = _weight().astype(jnp.bfloat16)
    q, _ = _one(weight, 8)
    assert q.materialize().dtype == jnp.bfloat16 and q.dtype == jnp.bfloat16


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("calibration", ["percentile", "mse"])
def test_clipping_calibrations_beat_absmax_on_heavy_tails(bits, symmetric, calibration):
    rng = np.random.default_rng(3)
    weight = jnp.asarray(rng.standard_t(3, size=(4096, 16)), jnp.float32)

    def mse(name):
        q, _ = _one(weight, bits, symmetric=symmetric, calibration=name, percentile=99.9)
        return float(jnp.mean(jnp.square(q.materialize() - weight)))

    assert mse(calibration) < 0.9 * mse("absmax")


def test_mse_calibration_never_loses_to_absmax_per_group():
    weight = _weight((256, 8), seed=5)
    for bits in (2, 8):
        absmax, _ = _one(weight, bits, calibration="absmax")
        best, _ = _one(weight, bits, calibration="mse")
        per_channel = lambda q: jnp.sum(jnp.square(q.materialize() - weight), axis=0)  # noqa: E731
        assert bool(jnp.all(per_channel(best) <= per_channel(absmax) * (1 + 1e-6)))


@pytest.mark.bitwise
@pytest.mark.parametrize(
    "options", [dict(), dict(group_size=8, symmetric=False, calibration="mse")]
)
def test_jit_matches_eager(options):
    params = {"a": {"kernel": _weight((40, 24)), "bias": jnp.ones(24)}}
    tx = jc.quantize(4, **options)
    eager, eager_stats = tx(params)
    jitted, jit_stats = jax.jit(tx)(params)
    np.testing.assert_array_equal(jitted["a"]["kernel"].codes, eager["a"]["kernel"].codes)
    np.testing.assert_array_equal(jitted["a"]["kernel"].scale, eager["a"]["kernel"].scale)
    assert jitted["a"]["bias"] is not None and not jc.is_compressed(jitted["a"]["bias"])
    # Eager runs the fused quantizer, which sums the errors per group first: the same
    # stat within float32 rounding, not bit for bit (the leaves are, above and below).
    np.testing.assert_allclose(
        jit_stats["a/kernel"]["relative_error"],
        eager_stats["a/kernel"]["relative_error"],
        rtol=1e-6,
    )
    dense = jax.jit(jc.materialize)(jitted)
    np.testing.assert_array_equal(dense["a"]["kernel"], jc.materialize(eager)["a"]["kernel"])


def test_linen_cnn_under_jit_keeps_output_close():
    model = LeNet5()
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 1)), jnp.float32)
    params = model.init(jax.random.key(0), x)["params"]
    quantized, stats = jax.jit(jc.quantize(8, group_size=None))(params)
    assert all(path.endswith("kernel") for path in stats) and len(stats) >= 3
    assert any(
        q.ndim == 4
        for q in jax.tree.leaves(quantized, is_leaf=jc.is_compressed)
        if jc.is_compressed(q)
    )
    before = model.apply({"params": params}, x)
    after = model.apply({"params": jc.materialize(quantized)}, x)
    np.testing.assert_allclose(after, before, atol=0.05 * float(jnp.max(jnp.abs(before))) + 1e-3)
    assert jc.nbytes(quantized) < jc.nbytes(params) / 3


def test_nnx_state_round_trip_under_jit():
    model = LeNet300100NNX(rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    quantized, stats = jax.jit(jc.quantize(4, group_size=4))(params)
    assert set(stats) == {"dense1/kernel", "dense2/kernel", "dense3/kernel"}
    kernel = quantized["dense1"]["kernel"].get_value()
    assert isinstance(kernel, jc.Quantized) and kernel.nbytes == 64 * 300 // 2 + 16 * 300 * 4
    restored = nnx.merge(graphdef, jc.materialize(quantized), rest)
    original = np.asarray(model.dense1.kernel.get_value())
    np.testing.assert_allclose(restored.dense1.kernel.get_value(), original, atol=0.1)
    assert restored(jnp.ones((2, 64))).shape == (2, 10)


@pytest.mark.parametrize(
    ("spec", "options"),
    [
        (P("data", "model"), dict(axis=-1)),
        (P("data", None), dict(axis=None, symmetric=False, calibration="absmax")),
        (P(None, ("data", "model")), dict(group_size=16, calibration="mse")),
    ],
)
@pytest.mark.bitwise
def test_sharded_inputs_equal_unsharded(mesh8, spec, options):
    options = dict(options)
    params = {"a": {"kernel": _weight((64, 128))}, "b": {"kernel": _weight((32, 16), 1)}}
    sharded = jax.device_put(params, NamedSharding(mesh8, spec))
    tx = jc.quantize(4, calibration=options.pop("calibration", "percentile"), **options)
    want, _ = tx(params)
    got, _ = tx(sharded)
    for name in ("a", "b"):
        q = got[name]["kernel"]
        np.testing.assert_array_equal(q.codes, want[name]["kernel"].codes)
        np.testing.assert_array_equal(q.scale, want[name]["kernel"].scale)
        # Codes are laid out like the weight, so they keep its row sharding.
        assert q.codes.sharding.spec[0] == spec[0]
        dense = jc.materialize(got)[name]["kernel"]
        np.testing.assert_array_equal(dense, jc.materialize(want)[name]["kernel"])
    jitted = jax.jit(jc.materialize)(got)
    np.testing.assert_array_equal(jitted["a"]["kernel"], jc.materialize(want)["a"]["kernel"])


@pytest.mark.bitwise
@pytest.mark.parametrize(
    "options",
    [dict(bits=8), dict(bits=4, group_size=128), dict(bits=4, calibration="mse")],
)
def test_jitted_quantize_on_a_sharded_weight_never_gathers_it(mesh8, options):
    # 512 x 1024 over a 4 x 2 mesh: a full-size all-gather would show as f32[512,1024]
    # (or its 524288-element flattening) in the compiled program.
    weight = _weight((512, 1024))
    sharded = jax.device_put({"w": weight}, NamedSharding(mesh8, P("data", "model")))
    tx = jc.quantize(**options)
    compiled = jax.jit(tx).lower(sharded).compile().as_text()
    gathers = [line for line in compiled.splitlines() if "all-gather(" in line]
    assert not [line for line in gathers if "[512,1024]" in line or "[524288]" in line]
    got, _ = jax.jit(tx)(sharded)
    want, _ = tx({"w": weight})
    np.testing.assert_array_equal(got["w"].codes, want["w"].codes)
    np.testing.assert_array_equal(got["w"].scale, want["w"].scale)


@pytest.mark.parametrize("options", [dict(axis=None), dict(group_size=128), dict(axis=-1)])
def test_prune_then_quantize_keeps_zeros_exact(options):
    weight = _weight()
    compressed, (_, stats) = jc.chain(jc.prune(0.5), jc.quantize(4, **options))({"w": weight})
    sparse = compressed["w"]
    assert isinstance(sparse, jc.Sparse) and isinstance(sparse.values, jc.Quantized)
    assert sparse.values.shape == (1024,) and sparse.values.axis is None
    assert sparse.nbytes == 1024 // 2 + 4 * (1024 // options.get("group_size", 1024)) + 64 * 4
    dense = np.asarray(jc.materialize(compressed)["w"])
    pruned = np.asarray(jc.materialize(jc.prune(0.5)({"w": weight})[0])["w"])
    # Zeros stay exact; 4-bit values of |w| far from 0 never round to zero.
    assert (dense == 0).sum() == 1024 and np.all((dense == 0) == (pruned == 0))
    step = float(sparse.values.scale.max())
    assert np.abs(dense - pruned).max() <= step / 2 * (1 + 1e-5)
    assert 0 < float(stats["w"]["relative_error"]) < 0.2


def test_sparse_with_group_size_not_dividing_values_pads_the_last_group():
    # 1024 kept values in groups of 100: ten of 100 and one of 24.
    tx = jc.chain(jc.prune(0.5), jc.quantize(4, group_size=100, where="w"))
    compressed, _ = tx({"w": _weight()})
    values = compressed["w"].values
    assert values.scale.shape == (11, 1)
    assert compressed["w"].nbytes == 1024 // 2 + 4 * 11 + 64 * 4
    kept = np.asarray(jc.materialize(jc.prune(0.5)({"w": _weight()})[0])["w"])
    kept = kept[kept != 0]  # row-major, as Sparse keeps them
    dense = np.asarray(values.materialize())
    last = np.abs(kept[1000:]).max()
    # The last group's step comes from its own 24 entries.
    assert abs(float(values.scale[10, 0])) <= last / 7 * (1 + 1e-6)
    assert np.abs(dense[1000:] - kept[1000:]).max() <= abs(float(values.scale[10, 0])) / 2 * 1.0001


@pytest.mark.parametrize("bits", [1, 9, 4.5, 0, True, "4"])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match="bits"):
        jc.quantize(bits)


@pytest.mark.parametrize(
    ("options", "name"),
    [
        (dict(calibration="minmax"), "calibration"),
        (dict(group_size=0), "group_size"),
        (dict(group_size=2.5), "group_size"),
        (dict(axis=1.0), "axis"),
        (dict(percentile=20.0), "percentile"),
        (dict(percentile=101), "percentile"),
        (dict(scale_dtype=jnp.int8), "scale_dtype"),
    ],
)
def test_bad_options_name_the_argument(options, name):
    with pytest.raises(ValueError, match=name):
        jc.quantize(4, **options)


@pytest.mark.parametrize(
    ("options", "name"),
    # group_size=5 of 8 rows fits now (groups of 5 and 3): see tests/test_padding.py.
    [(dict(axis=2), "axis=2"), (dict(axis=-3), "axis=-3")],
)
def test_leaf_that_does_not_fit_names_path_and_argument(options, name):
    params = {"enc": {"kernel": _weight((8, 4))}, "bias": jnp.ones(4)}
    tx = jc.quantize(4, where="kernel", **options)
    with pytest.raises(ValueError, match=rf"{name}.*'enc/kernel'"):
        tx(params)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_name_the_path(bad):
    params = {"layer": {"kernel": _weight((4, 4)).at[1, 2].set(bad)}}
    with pytest.raises(ValueError, match="layer/kernel.*NaN or Inf"):
        jc.quantize(4)(params)


def test_integer_and_compressed_leaves_are_refused():
    with pytest.raises(TypeError, match="'w'"):
        jc.quantize(4, where="w")({"w": jnp.ones((4, 4), jnp.int32)})
    quantized, _ = _one(_weight(), 4)
    with pytest.raises(TypeError, match="'w'.*already compressed"):
        jc.quantize(4, where="w")({"w": quantized})


@settings(max_examples=8, deadline=None)
@given(
    weight=hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=2, max_dims=3, min_side=1, max_side=6),
        elements=st.floats(-1e3, 1e3, width=32, allow_subnormal=False),
    ),
    bits=st.integers(2, 8),
    symmetric=st.booleans(),
    per_channel=st.booleans(),
)
def test_property_error_bound(weight, bits, symmetric, per_channel):
    axis = -1 if per_channel else None
    weight = jnp.asarray(weight)
    q, _ = _one(weight, bits, axis=axis, symmetric=symmetric)
    dense = np.asarray(q.materialize())
    step = _per_entry(q.scale, weight.shape, axis, None)
    scale_of_values = np.abs(np.asarray(weight)).max() + 1.0
    assert np.all(
        np.abs(dense - np.asarray(weight)) <= np.abs(step) / 2 * (1 + 1e-5) + 1e-6 * scale_of_values
    )
    codes = np.asarray(unpack(q.codes, bits, weight.shape[-1]))
    assert codes.max() < 2**bits


@pytest.mark.bitwise
@pytest.mark.parametrize(
    "options",
    [
        dict(bits=4),
        dict(bits=3, axis=None),
        dict(bits=8, group_size=16),
        dict(bits=4, symmetric=False),
    ],
)
def test_eager_and_jit_store_identical_scales_and_codes(options):
    # QAT trains under jit and users often convert eagerly: the two must agree bit for bit.
    rng = np.random.default_rng(7)
    tx = jc.quantize(**options)
    for _ in range(10):
        params = {"w": jnp.asarray(rng.normal(size=(64, 48)), jnp.float32)}
        eager, jitted = tx(params)[0]["w"], jax.jit(tx)(params)[0]["w"]
        np.testing.assert_array_equal(eager.scale, jitted.scale)
        np.testing.assert_array_equal(eager.codes, jitted.codes)
