"""Pallas kernels (runtime.pallas): interpreter parity, lowering without hardware, refusals.

Parity: every kernel body (GPU's Triton one and TPU's Mosaic one) runs in Pallas's
interpreter and equals ``x @ materialize(leaf)`` within its stated tolerance: for
float32 activations ``1e-5 * max(|x| @ |W|)``; for bfloat16 ones ``1e-2`` of that
(the output, and for codebooks the weights, are rounded to bfloat16). Shapes are tiny
and cover multiples and non-multiples of every tile size. Lowering: ``jax.export``
for ``cuda`` and ``tpu`` holds the kernel's custom call. The Mosaic GPU body (cuda's
first choice for weight-only int8/int4 with 16-bit activations) has its own tests in
test_pallas_mosaic_gpu.py.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcompress as jc
from jaxcompress.arrays.serving import ClusteredMatrix, QuantizedMatrix, to_serving
from jaxcompress.runtime import pallas

PLATFORMS = ("cuda", "tpu")  # one GPU and one TPU body each
# Float32 activations take Triton on cuda; 16-bit ones take Mosaic GPU there, so the
# Triton body runs for them under rocm.
BF16_PLATFORMS = ("cuda", "rocm", "tpu")


def _quantized(k, n, *, bits, group_size=None, symmetric=True, axis=-1, seed=0):
    """A random serving leaf built directly (``jc.quantize`` compiles for seconds)."""
    rng = np.random.default_rng(seed)
    groups = 1 if group_size is None else -(-k // group_size)
    packed = bits <= 4 and k % 2 == 0
    if packed:
        codes = rng.integers(0, 256, (n, k // 2), dtype=np.uint8)
    else:
        half = 2 ** (bits - 1)
        codes = rng.integers(-half, half, (n, k), dtype=np.int8)
    scale = rng.uniform(0.01, 0.1, (groups, n)).astype(np.float32)
    offset = None if symmetric else rng.uniform(-2, 2, (groups, n)).astype(np.float32)
    short = group_size is not None and groups * group_size != k
    return QuantizedMatrix(
        jnp.asarray(codes),
        jnp.asarray(scale),
        None if offset is None else jnp.asarray(offset),
        (k, n) if axis == -1 else (n, k),
        jnp.dtype(jnp.float32),
        bits,
        packed,
        outputs_first=axis == 0,
        group_size=group_size if short else None,
    )


def _clustered(k, n, *, entries, per_channel, seed=0):
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, entries, (n, k), dtype=np.uint8)
    book_shape = (n, entries) if per_channel else (entries,)
    codebook = rng.normal(size=book_shape).astype(np.float32)
    bits = (entries - 1).bit_length()
    return ClusteredMatrix(
        jnp.asarray(indices), jnp.asarray(codebook), (k, n), jnp.dtype(jnp.float32), bits
    )


@pytest.fixture(scope="module")
def raw_leaf():
    """A ``Quantized`` leaf straight from ``jc.quantize``: 300 inputs in groups of 64."""
    w = jax.random.normal(jax.random.PRNGKey(0), (300, 8))
    return jc.quantize(bits=8, axis=-1, group_size=64)({"w": w})[0]["w"]


def _matrix(leaf):
    """The leaf's dense ``(K, N)`` view, float32."""
    k, n = leaf.matrix_shape
    dense = leaf.materialize().astype(jnp.float32)
    if getattr(leaf, "outputs_first", False):
        return dense.reshape(n, k).T
    return dense.reshape(k, n)


@jax.jit
def _reference(x, leaf):
    x32, w = x.astype(jnp.float32), _matrix(leaf)
    return x32 @ w, jnp.max(jnp.abs(x32) @ jnp.abs(w))


def _check(leaf, rows, platform, *, dtype=jnp.float32):
    k, _ = leaf.matrix_shape
    x = jax.random.normal(jax.random.PRNGKey(1), (rows, k)).astype(dtype)
    run = jax.jit(lambda x, leaf: pallas.matmul(x, leaf, platform=platform, interpret=True))
    y = run(x, leaf)
    assert y.dtype == x.dtype
    want, size = _reference(x, leaf)
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(y, np.float32), want, rtol=0, atol=tol * float(size))


# (K, N, rows, bits, group_size, symmetric, axis): tile multiples and not, every group size.
QUANTIZED_CASES = [
    (128, 128, 16, 8, None, True, -1),  # multiples of the GPU tiles
    (96, 40, 3, 4, None, False, -1),  # int4 per channel, zero points, nothing aligned
    (128, 40, 5, 4, 32, True, -1),  # int4 g32 (several groups per TPU tile)
    (300, 130, 9, 8, 64, False, -1),  # int8 g64, a short last group, zero points
    (256, 136, 2, 4, 128, True, -1),  # int4 g128
    (64, 48, 4, 8, None, True, 0),  # an output-first (out, in) weight
]


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("case", QUANTIZED_CASES, ids=lambda c: f"K{c[0]}N{c[1]}b{c[3]}g{c[4]}")
def test_quantized_kernels_equal_the_materialized_product(case, platform):
    k, n, rows, bits, group_size, symmetric, axis = case
    leaf = _quantized(k, n, bits=bits, group_size=group_size, symmetric=symmetric, axis=axis)
    _check(leaf, rows, platform)


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize(
    "entries,per_channel,k,n,rows", [(16, False, 96, 40, 3), (8, True, 300, 130, 9)]
)
def test_clustered_kernels_equal_the_materialized_product(
    entries, per_channel, k, n, rows, platform
):
    leaf = _clustered(k, n, entries=entries, per_channel=per_channel)
    _check(leaf, rows, platform)


@pytest.mark.parametrize("platform", BF16_PLATFORMS)
def test_bfloat16_activations_give_bfloat16_within_tolerance(platform):
    _check(
        _quantized(128, 64, bits=4, group_size=64, symmetric=False), 8, platform, dtype=jnp.bfloat16
    )
    _check(_clustered(64, 48, entries=16, per_channel=True), 8, platform, dtype=jnp.bfloat16)


def test_an_index_past_the_codebook_takes_its_last_entry_as_lookup_does():
    leaf = _clustered(32, 16, entries=4, per_channel=False)
    leaf = dataclasses.replace(leaf, indices=leaf.indices.at[0, 0].set(9))
    _check(leaf, 2, "tpu")


# By the kernel name's suffix: Mosaic GPU, Triton, Mosaic TPU.
CUSTOM_CALL = {"mgpu": "mosaic_gpu_v2", "gpu": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}


@pytest.mark.parametrize("platform", PLATFORMS)
def test_kernels_lower_for_their_platform_without_the_hardware(platform):
    leaves = [
        _quantized(256, 256, bits=4, group_size=128),
        _quantized(128, 256, bits=8, symmetric=False),
        _clustered(128, 256, entries=16, per_channel=True),
    ]
    for leaf in leaves:
        name, _ = pallas.kernel_for(leaf, 8, platform)
        x = jax.ShapeDtypeStruct((8, leaf.matrix_shape[0]), jnp.bfloat16)
        fn = jax.jit(lambda x, leaf: pallas.matmul(x, leaf, platform=platform))
        exported = jax.export.export(
            fn, platforms=(platform,), disabled_checks=pallas.export_disabled_checks(platform)
        )(x, leaf)
        text = exported.mlir_module()
        assert name is not None
        assert set(re.findall(r"custom_call @([\w$.]+)", text)) == {
            CUSTOM_CALL[name.rsplit("_", 1)[1]]
        }
        assert name.rsplit("_", 1)[1] in (("mgpu", "gpu") if platform == "cuda" else ("tpu",))


def test_triton_needs_its_safety_check_disabled_to_export():
    leaf = _quantized(64, 64, bits=8)  # float32 activations: Triton, not Mosaic GPU
    fn = jax.jit(lambda x, leaf: pallas.matmul(x, leaf, platform="cuda"))
    x = jax.ShapeDtypeStruct((4, 64), jnp.float32)
    with pytest.raises(ValueError, match="custom calls whose targets"):
        jax.export.export(fn, platforms=("cuda",))(x, leaf)


def test_kernel_for_names_the_kernel_and_says_why_not(raw_leaf):
    g128 = _quantized(256, 64, bits=4, group_size=128)
    assert pallas.kernel_for(g128, 1, "cuda")[0] == "pallas_int4_g128_mgpu"
    assert pallas.kernel_for(g128, 1, "cuda", dtype=jnp.float32)[0] == "pallas_int4_g128_gpu"
    assert pallas.kernel_for(g128, 1, "rocm")[0] == "pallas_int4_g128_gpu"
    assert pallas.kernel_for(g128, 1, "tpu")[0] == "pallas_int4_g128_tpu"
    int8 = _quantized(64, 32, bits=8)
    assert pallas.kernel_for(int8, 300, "cuda")[0] == "pallas_int8_pc_mgpu"
    assert pallas.kernel_for(int8, 300, "rocm")[0] == "pallas_int8_pc_gpu"
    assert pallas.kernel_for(_clustered(64, 32, entries=8, per_channel=False), 1, "tpu")[0] == (
        "pallas_kmeans3_shared_tpu"
    )
    name, why = pallas.kernel_for(int8, 4, "cpu")
    assert name is None and "platform cpu" in why

    assert pallas.kernel_for(raw_leaf, 4, "cuda") == (
        None,
        "not in the serving layout (prepare the tree first)",
    )
    awq = dataclasses.replace(raw_leaf, input_scale=jnp.ones((300,)))
    assert "AWQ" in pallas.kernel_for(awq, 4, "cuda")[1]
    # Group size 40 has no power-of-two tile of 16 on GPU, and does not split 128 on TPU.
    odd = _quantized(120, 32, bits=8, group_size=40)
    assert "group size 40" in pallas.kernel_for(odd, 4, "cuda")[1]
    assert "group size 40" in pallas.kernel_for(odd, 4, "tpu")[1]
    # Packed nibbles: the high half starts mid-group when K/2 is no multiple of g.
    shifted = _quantized(192, 32, bits=4, group_size=64)
    name, why = pallas.kernel_for(shifted, 4, "tpu")
    assert name is None and "do not line up" in why
    big = _clustered(64, 32, entries=32, per_channel=False)
    assert "32 entries" in pallas.kernel_for(big, 4, "cuda")[1]
    assert pallas.kernel_for(jnp.ones((4, 4)), 4, "cuda")[0] is None
    with pytest.raises(ValueError, match="rows"):
        pallas.kernel_for(int8, 0, "cuda")


def test_bad_inputs_raise_clear_errors():
    leaf = _quantized(64, 32, bits=8)
    with pytest.raises(ValueError, match="64 columns|x has 48 columns"):
        pallas.matmul(jnp.ones((2, 48)), leaf, platform="tpu", interpret=True)
    with pytest.raises(ValueError, match="2-D floating"):
        pallas.matmul(jnp.ones((2, 64), jnp.int32), leaf, platform="tpu", interpret=True)
    with pytest.raises(ValueError, match="2-D floating"):
        pallas.matmul(jnp.ones((1, 2, 64)), leaf, platform="tpu", interpret=True)
    with pytest.raises(ValueError, match="platform cpu"):
        pallas.matmul(jnp.ones((2, 64)), leaf, platform="cpu", interpret=True)
    with pytest.raises(ValueError, match="do not line up"):
        pallas.matmul(
            jnp.ones((2, 192)),
            _quantized(192, 32, bits=4, group_size=64),
            platform="cuda",
            interpret=True,
        )
    with pytest.raises(TypeError, match="QuantizedMatrix or ClusteredMatrix"):
        pallas.matmul(jnp.ones((2, 4)), jnp.ones((4, 4)), platform="tpu")
    assert isinstance(leaf, QuantizedMatrix) and not isinstance(leaf, ClusteredMatrix)


def test_to_serving_keeps_a_group_size_that_does_not_divide_k(raw_leaf):
    # 300 inputs in groups of 64: five groups, the last of 44, though 5 divides 300.
    serving = to_serving(raw_leaf)
    assert serving.group == 64
    np.testing.assert_array_equal(serving.materialize(), raw_leaf.materialize())
    _check(serving, 3, "tpu")
