"""A group_size that does not divide the grouped axis: the last group is shorter.

Checked against a slow numpy reference that quantizes each group on its own (the last
one with fewer entries), against the library's own unpadded paths on the two parts of
the weight, and through jit, sharding, GPTQ/AWQ, Sparse nesting, files and accelerate.
"""

import math

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxcompress as jc
from jaxcompress.arrays.serving import to_serving
from jaxcompress.runtime import kernels


def _reference(w: np.ndarray, bits: int, group_size: int, symmetric: bool) -> np.ndarray:
    """Slow numpy absmax quantization of a ``(K, C)`` weight, group by group, column by column.

    Each group is its own list of entries (the last has ``K % g`` when that is not 0);
    nothing is padded. Returns the dequantized weight.
    """
    k, c = w.shape
    out = np.zeros_like(w)
    f32 = np.float32
    for col in range(c):
        for start in range(0, k, group_size):
            v = w[start : start + group_size, col].astype(f32)
            out[start : start + group_size, col] = _one_group(v, bits, symmetric)
    return out


def _one_group(v: np.ndarray, bits: int, symmetric: bool) -> np.ndarray:
    f32 = np.float32
    lo, hi = v.min(), v.max()
    if lo == hi:  # a constant group decodes exactly
        return v.copy()
    if not symmetric:
        scale = f32((hi - lo) * f32(1.0 / (2**bits - 1)))
        zero = f32(-lo / scale)
        codes = np.clip(np.round(v / scale + zero), 0, 2**bits - 1)
        return ((codes - zero) * scale).astype(f32)
    half = 2 ** (bits - 1)
    low, high = min(lo, f32(0)), max(hi, f32(0))
    # The short side ends up to half a step past its extreme level.
    long_side, short_side = f32(1.0 / half), f32(1.0 / (half - 0.5))
    negative_long = max(-low * long_side, high * short_side)
    positive_long = max(high * long_side, -low * short_side)
    scale = negative_long if negative_long <= positive_long else -positive_long
    new = (np.clip(np.round(v / scale), -half, half - 1) * scale).astype(f32)
    old_scale = f32(max(-low, high) * f32(1.0 / (half - 1)))
    old = (np.clip(np.round(v / old_scale), -half, half - 1) * old_scale).astype(f32)
    # The library keeps the old 2**b - 1-level step where it rounds the group better.
    return old if np.sum((old - v) ** 2) < np.sum((new - v) ** 2) else new


def _groups_close(got: np.ndarray, w: np.ndarray, bits: int, g: int, symmetric: bool) -> None:
    want = _reference(w, bits, g, symmetric)
    for col in range(w.shape[1]):
        for start in range(0, w.shape[0], g):
            a = got[start : start + g, col]
            b = want[start : start + g, col]
            v = w[start : start + g, col]
            if np.array_equal(a, b):
                continue
            # Float sums in another order may flip a near-tie between the two grids:
            # then both must round the group equally well.
            e_got, e_want = np.sum((a - v) ** 2), np.sum((b - v) ** 2)
            span = float(np.abs(v).max())
            assert math.isclose(e_got, e_want, rel_tol=1e-4, abs_tol=1e-12 * span**2), (
                start,
                col,
                a,
                b,
                v,
            )


_SCALES = st.sampled_from([1.0, 1e-30, 1e30, 3.0])
_VALUE = st.one_of(
    st.floats(-4, 4, width=32, allow_subnormal=False),
    st.sampled_from([0.0, 1.0, -1.0, 0.5]),
)


@st.composite
def _ragged_weight(draw):
    k = draw(st.integers(2, 13))
    c = draw(st.integers(1, 3))
    g = draw(st.integers(1, k + 2))
    values = draw(st.lists(_VALUE, min_size=k * c, max_size=k * c))
    w = np.asarray(values, np.float32).reshape(k, c) * np.float32(draw(_SCALES))
    if draw(st.booleans()):  # a constant (maybe zero) last group
        w[(k - 1) // g * g :, :] = w[-1, 0]
    return w, g


@pytest.mark.slow  # about 100 compiles, one per drawn shape: 50-100 s on 2 shared cores
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_ragged_weight(), st.sampled_from([2, 4, 8]), st.booleans())
def test_each_group_matches_the_numpy_reference(case, bits, symmetric):
    w, g = case
    q = jc.quantize(bits, group_size=g, symmetric=symmetric, where="w")({"w": jnp.asarray(w)})[0]
    q = q["w"]
    assert q.scale.shape == (math.ceil(w.shape[0] / g), w.shape[1])
    got = np.asarray(q.materialize())
    assert got.shape == w.shape and np.isfinite(got).all()
    _groups_close(got, w, bits, min(g, w.shape[0]), symmetric)


def _parts(w, g, **options):
    """The ragged leaf's values, and those of its full groups and its tail quantized apart."""
    k = w.shape[0]
    cut = k // g * g
    tx = jc.quantize(4, group_size=g, where="w", **options)
    ragged = tx({"w": w})[0]["w"]
    head = tx({"w": w[:cut]})[0]["w"]
    tail = jc.quantize(4, where="w", **options)({"w": w[cut:]})[0]["w"]
    return ragged, head, tail


@pytest.mark.bitwise
@pytest.mark.parametrize("calibration", ["absmax", "mse", "percentile"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_the_last_group_is_quantized_as_if_it_stood_alone(calibration, symmetric):
    rng = np.random.default_rng(0)
    w = rng.standard_t(2, size=(11, 5)).astype(np.float32)
    w[8:, 0] = 0.0  # a zero tail
    w[8:, 1] = -2.5  # a constant tail
    w[8:, 2] *= 1e-20  # a tiny tail beside large full groups
    options = dict(calibration=calibration, symmetric=symmetric, percentile=90.0)
    ragged, head, tail = _parts(jnp.asarray(w), 4, **options)
    np.testing.assert_array_equal(ragged.scale[:2], head.scale)
    np.testing.assert_array_equal(ragged.scale[2:], tail.scale)
    dense = np.asarray(ragged.materialize())
    np.testing.assert_array_equal(dense[:8], head.materialize())
    np.testing.assert_array_equal(dense[8:], tail.materialize())
    np.testing.assert_array_equal(dense[8:, :2], w[8:, :2])
    # The same under jit.
    jitted = jax.jit(jc.quantize(4, group_size=4, where="w", **options))({"w": w})[0]["w"]
    np.testing.assert_array_equal(jitted.materialize(), dense)


@pytest.mark.bitwise
def test_layout_nbytes_and_options():
    w = jnp.asarray(np.random.default_rng(1).normal(size=(3, 3, 5, 6)), jnp.float32)
    q = jc.quantize(4, group_size=8, where="w")({"w": w})[0]["w"]  # K = 45: 5 x 8 + 5
    assert q.scale.shape == (6, 6)
    # Codes are stored for the real entries only: no padded code is stored.
    assert q.nbytes == 3 * 3 * 5 * 3 + 6 * 6 * 4
    one = jc.quantize(4, group_size=1000, where="w")({"w": w})[0]["w"]
    per_channel = jc.quantize(4, where="w")({"w": w})[0]["w"]
    assert one.group_size == 1000 and one.scale.shape == (1, 6)
    np.testing.assert_array_equal(one.materialize(), per_channel.materialize())
    for bad in (0, -3):
        with pytest.raises(ValueError, match="group_size"):
            jc.quantize(4, group_size=bad)


def test_nonfinite_under_jit_poisons_only_its_group():
    w = np.random.default_rng(2).normal(size=(10, 2)).astype(np.float32)
    w[9, 1] = np.nan
    q = jax.jit(jc.quantize(4, group_size=4, where="w"))({"w": w})[0]["w"]
    dense = np.asarray(q.materialize())
    assert np.isnan(dense[8:, 1]).all() and np.isfinite(np.delete(dense, 1, axis=1)).all()
    assert np.isfinite(dense[:8]).all()


@pytest.mark.bitwise
def test_sharded_weight_gives_the_unsharded_leaf(mesh8):
    w = jnp.asarray(np.random.default_rng(3).normal(size=(20, 8)), jnp.float32)
    tx = jc.quantize(4, group_size=6, where="w", symmetric=False)
    plain = tx({"w": w})[0]["w"]
    placed = jax.device_put(w, NamedSharding(mesh8, P("data", "model")))
    for sharded in (tx({"w": placed})[0]["w"], jax.jit(tx)({"w": placed})[0]["w"]):
        np.testing.assert_array_equal(sharded.scale, plain.scale)
        np.testing.assert_array_equal(sharded.materialize(), plain.materialize())
        np.testing.assert_array_equal(jax.jit(jc.materialize)(sharded), plain.materialize())


def test_file_round_trip(tmp_path):
    w = jnp.asarray(np.random.default_rng(4).normal(size=(10, 6)), jnp.float32)
    tree = jc.quantize(4, group_size=4, symmetric=False, where="w")({"w": w})[0]
    path = tmp_path / "ragged.jcz"
    jc.save(path, tree)
    back = jc.load(path)["w"]
    assert back.group_size == 4 and back.scale.shape == (3, 6)
    np.testing.assert_array_equal(back.materialize(), tree["w"].materialize())


def _calibrated():
    model = nn.Dense(6)
    x = jax.random.normal(jax.random.key(0), (64, 10))
    params = model.init(jax.random.key(1), x)["params"]
    data = jc.calibrate(lambda p, x: model.apply({"params": p}, x), params, [x])
    return params, data


@pytest.mark.bitwise
@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_with_identity_gram_is_round_to_nearest(symmetric):
    from jaxcompress.numerics.gptq import gptq
    from jaxcompress.numerics.uniform import quantize_codes

    w = jax.random.normal(jax.random.key(2), (10, 6))
    opts = dict(bits=4, symmetric=symmetric, calibration="absmax", percentile=99.9)
    opts["scale_dtype"] = jnp.float32
    codes, scale, zero, _ = quantize_codes(w, axis=1, group_size=4, **opts)
    # Block 5: the last group (rows 8, 9) runs past the padded rows (10).
    got = gptq(w, jnp.eye(10), scale, zero, group_size=4, dynamic_groups=True,
               act_order=False, damp=0.0, block_size=5, **opts)  # fmt: skip
    np.testing.assert_array_equal(got[0], codes)
    np.testing.assert_array_equal(got[1], scale)


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_data_aware_methods_take_a_ragged_layout(method):
    params, data = _calibrated()
    rtn, rtn_stats = jc.quantize(4, group_size=4)(params)
    out, stats = jc.quantize(4, group_size=4, method=method)(params, data=data)
    leaf = out["kernel"]
    assert leaf.scale.shape == rtn["kernel"].scale.shape == (3, 6)
    assert np.isfinite(np.asarray(leaf.materialize())).all()
    s = stats["kernel"]
    if method == "awq":
        assert s["relative_output_error"] <= s["rtn_relative_output_error"]
    else:
        assert s["relative_output_error"] <= 1.05 * float(rtn_stats["kernel"]["relative_error"])


def test_sparse_values_and_fake_quant():
    w = jnp.asarray(np.random.default_rng(5).normal(size=(9, 7)), jnp.float32)
    out, _ = jc.chain(jc.prune(0.3), jc.quantize(4, group_size=10))({"kernel": w})
    sparse = out["kernel"]
    nnz = sparse.values.shape[0]
    assert sparse.values.scale.shape == (math.ceil(nnz / 10), 1)
    dense = np.asarray(sparse.materialize())
    pruned = np.asarray(jc.prune(0.3)({"kernel": w})[0]["kernel"].materialize())
    assert np.all((dense == 0) == (pruned == 0))
    kept = pruned[pruned != 0]
    np.testing.assert_allclose(dense[pruned != 0], _reference(kept[:, None], 4, 10, True)[:, 0])


class _Eqx(eqx.Module):
    layer: eqx.nn.Linear

    def __call__(self, x):
        return jax.vmap(self.layer)(x)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
def test_accelerate_linen_matches_materialize_then_dense(bits, symmetric):
    model = nn.Dense(5)
    x = jax.random.normal(jax.random.key(6), (3, 11))
    params = model.init(jax.random.key(7), x)["params"]
    q, _ = jc.quantize(bits, group_size=4, symmetric=symmetric)(params)

    def apply(p, x):
        return model.apply({"params": p}, x)

    want = np.asarray(apply(jc.materialize(q), x), np.float64)
    scale = np.abs(np.asarray(x)) @ np.abs(np.asarray(jc.materialize(q)["kernel"]))
    fast = jc.accelerate(apply)
    prepared = fast.prepare(q)
    assert prepared["kernel"].group_size == 4
    # Asymmetric codes decode as (q - offset) * scale there: within a float32 rounding.
    np.testing.assert_allclose(prepared["kernel"].materialize(), q["kernel"].materialize(),
                               rtol=1e-6, atol=1e-30)  # fmt: skip
    for route in ("auto", "blocked", "dequantize", "int8"):
        forced = jc.accelerate(apply, route=route)
        got = np.asarray(jax.jit(forced)(prepared, x))
        assert np.all(np.abs(got - want) <= 1e-5 * (scale + 1e-6)), route
    assert fast.explain(prepared, x).routes()["kernel"] == "blocked"
    # The zero-point term of the int8 kernel sums a short last group too.
    leaf = prepared["kernel"]
    np.testing.assert_allclose(
        kernels.dequantized(x, leaf), kernels.blocked_quantized(x, leaf), rtol=1e-5, atol=1e-5
    )


def test_accelerate_equinox_outputs_first():
    module = _Eqx(eqx.nn.Linear(10, 4, key=jax.random.key(8)))
    q, _ = jc.quantize(4, axis=0, group_size=3, where=lambda p, leaf: p.endswith("weight"))(module)
    leaf = q.layer.weight
    assert leaf.scale.shape == (4, 4)
    serving = to_serving(leaf)
    assert serving.outputs_first and serving.group == 3
    np.testing.assert_array_equal(serving.materialize(), leaf.materialize())
    x = jax.random.normal(jax.random.key(9), (2, 10))
    want = np.asarray(jc.materialize(q)(x))
    fast = jc.accelerate(lambda m, x: m(x))
    got = np.asarray(jax.jit(fast)(fast.prepare(q), x))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
