"""Eager round-to-nearest runs one cached program per (shape, dtype, options): the same
leaves, bit for bit, as quantizing op by op (stats within float32 rounding), and no
compile for a leaf whose shape was seen before."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxcompress as jc
from jaxcompress.methods.quantize import quantize_array
from jaxcompress.numerics.uniform import fused_layout, quantize_codes, quantize_with_errors

# Adversarial entries: ±0, the smallest normals, huge magnitudes, subnormals (XLA:CPU
# flushes them), exact halves of a step and plain values.
_SPECIAL = [0.0, -0.0, 1e-38, -1e-38, 1e-45, 3e38, -3e38, 1e30, 0.5, -0.5, 1.5, 2.5, 1.0, -7.0]
_SHAPES = [(8, 6), (4, 3, 8), (24,)]


def _reference(weight, *, bits, axis, group_size, **options):
    """The leaf and stats as computed before the fused program: quantizer, packing,
    decoding and error sums each dispatched on their own."""
    quantized = quantize_array(weight, bits=bits, axis=axis, group_size=group_size, **options)
    w = weight.astype(jnp.float32)
    diff = quantized.materialize().astype(jnp.float32) - w
    norm = jnp.sqrt(jnp.sum(jnp.square(w)))
    safe = jnp.where(norm > 0, norm, jnp.ones_like(norm))
    relative = jnp.where(norm > 0, jnp.sqrt(jnp.sum(jnp.square(diff))) / safe, 0.0)
    return quantized, {
        "bits": bits,
        "relative_error": relative,
        "max_abs_error": jnp.max(jnp.abs(diff)),
    }


def _bits_of(x):
    x = np.asarray(x)
    return x.dtype, x.shape, x.tobytes()


@st.composite
def _cases(draw):
    shape = draw(st.sampled_from(_SHAPES))
    size = int(np.prod(shape))
    kind = draw(st.sampled_from(["normal", "special", "constant", "wide"]))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    if kind == "normal":
        values = rng.standard_normal(size)
    elif kind == "special":
        values = rng.choice(np.array(_SPECIAL), size)
    elif kind == "constant":
        values = np.full(size, draw(st.sampled_from(_SPECIAL)))
        values[: draw(st.integers(0, 2))] = rng.standard_normal()  # nearly constant
    else:
        values = rng.standard_normal(size) * 10.0 ** rng.integers(-30, 30, size)
    dtype = draw(st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16]))
    with np.errstate(over="ignore"):
        weight = np.asarray(values, np.float32).reshape(shape)
    weight = jnp.asarray(weight).astype(dtype)
    if not bool(jnp.isfinite(weight).all()):  # float16 overflows the huge entries
        weight = jnp.where(jnp.isfinite(weight), weight, jnp.zeros_like(weight))
    axis = draw(st.sampled_from([-1, 0, None]))
    channels = 1 if axis is None else shape[axis]
    group_size = draw(st.sampled_from([None, 2, 4]))
    if group_size is not None and (size // channels) % group_size:
        group_size = None
    options = dict(
        bits=draw(st.sampled_from([2, 3, 4, 8])),
        axis=axis,
        group_size=group_size,
        symmetric=draw(st.booleans()),
        calibration=draw(st.sampled_from(["absmax", "percentile", "mse"])),
        scale_dtype=draw(st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16])),
    )
    return weight, options


@pytest.mark.slow
@pytest.mark.bitwise
@settings(max_examples=60, deadline=None)
@given(_cases())
def test_fused_program_matches_op_by_op(case):
    weight, options = case
    compressed, stats = jc.quantize(**options, where="w")({"w": weight})
    axis = None if options["axis"] is None else options["axis"] % weight.ndim
    expected, expected_stats = _reference(
        weight,
        **{**options, "axis": axis},
        percentile=99.9,
    )
    got = compressed["w"]
    assert repr(got) == repr(expected)
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        assert _bits_of(a) == _bits_of(b)
    assert stats["w"].keys() == expected_stats.keys()
    assert stats["w"]["bits"] == options["bits"] and isinstance(stats["w"]["bits"], int)
    # The stats are summed in the one program, where XLA may fuse or reassociate (and
    # LLVM contract the decoding into an fma): within float32 rounding of the op-by-op
    # values, not bit for bit.
    largest = float(jnp.max(jnp.abs(weight.astype(jnp.float32))))
    np.testing.assert_allclose(
        stats["w"]["max_abs_error"], expected_stats["max_abs_error"], rtol=0, atol=4e-7 * largest
    )
    np.testing.assert_allclose(
        stats["w"]["relative_error"], expected_stats["relative_error"], rtol=1e-5, atol=1e-7
    )


class _Compiles(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.names = []

    def emit(self, record):
        message = record.getMessage()
        if message.startswith("Finished XLA compilation of "):
            self.names.append(message.split()[4])


def _compiles(fn):
    counter = _Compiles()
    logger = logging.getLogger("jax._src.dispatch")
    logger.addHandler(counter)
    try:
        with jax.log_compiles():
            jax.block_until_ready(fn())
    finally:
        logger.removeHandler(counter)
    return counter.names


@pytest.mark.parametrize("group_size", [None, 8])
def test_one_program_per_shape_across_leaves(group_size):
    # Shapes no other test uses, so that nothing is compiled before.
    shapes = [(72, 27 + (group_size or 0)), (88, 43 + (group_size or 0))]
    keys = iter(jax.random.split(jax.random.key(0), 12))
    tree = {f"layer{i}": {"kernel": jax.random.normal(next(keys), shapes[i % 2])} for i in range(6)}
    tx = jc.quantize(4, group_size=group_size)
    first = _compiles(lambda: tx(tree))
    # One quantizer program per shape, however many leaves share it.
    assert sorted(first).count("jit(_rtn_array)") == 2, first
    again = {
        k: {"kernel": jax.random.normal(next(keys), v["kernel"].shape)} for k, v in tree.items()
    }
    assert _compiles(lambda: tx(again)) == []


@pytest.mark.bitwise
@pytest.mark.parametrize(
    ("shape", "axis", "group_size", "bits", "scale_dtype"),
    [
        ((131072, 4), 1, None, 8, jnp.float32),  # two blocks per channel
        ((1024, 6), None, 256, 4, jnp.bfloat16),  # one block of 4 groups per tensor
        ((64, 3, 5), 2, 8, 3, jnp.float16),
    ],
)
def test_fused_quantizer_matches_quantize_codes(shape, axis, group_size, bits, scale_dtype):
    rng = np.random.default_rng(len(shape) + bits)
    values = rng.standard_normal(shape).astype(np.float32)
    values[..., 0] = 0.25  # a constant channel
    values.reshape(-1)[:3] = [0.5, 1.5, -2.5]  # exact halves of some steps
    weight = jnp.asarray(values)
    options = dict(bits=bits, axis=axis, group_size=group_size, scale_dtype=scale_dtype)
    layout = dict(axis=axis, group_size=group_size, symmetric=True, calibration="absmax")
    assert fused_layout(shape, weight.dtype, **layout)
    fused = jax.jit(quantize_with_errors, static_argnames=tuple(options))
    codes, scale, stats = fused(weight, **options)
    expected = quantize_codes(
        weight, symmetric=True, calibration="absmax", percentile=99.9, **options
    )
    assert _bits_of(codes) == _bits_of(expected[0])
    assert _bits_of(scale) == _bits_of(expected[1])
    _, expected_stats = _reference(
        weight, symmetric=True, calibration="absmax", percentile=99.9, **options
    )
    for name in ("relative_error", "max_abs_error"):
        np.testing.assert_allclose(stats[name], expected_stats[name], rtol=1e-5, atol=1e-7)


def test_fused_layout_refuses_what_it_does_not_compute():
    base = dict(axis=1, group_size=None, symmetric=True, calibration="absmax")
    assert fused_layout((8, 4), jnp.float32, **base)
    assert not fused_layout((8, 4), jnp.bfloat16, **base)  # stats of the cast leaf
    assert not fused_layout((8, 4), jnp.float32, **{**base, "axis": 0})  # a transpose
    assert not fused_layout((8, 4), jnp.float32, **{**base, "group_size": 3})  # ragged
    assert not fused_layout((8, 4), jnp.float32, **{**base, "symmetric": False})
    assert not fused_layout((8, 4), jnp.float32, **{**base, "calibration": "mse"})
