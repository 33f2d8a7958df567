"""The Mosaic GPU (Hopper wgmma) weight-only int8/int4 kernel: parity, export, routing.

Parity runs the kernel in Pallas's Mosaic GPU interpreter on this CPU and compares it
with ``x @ materialize(leaf)`` in float32: within ``1e-2 * max(|x| @ |W|)`` (the
dequantized tile and the output are rounded to 16 bits). Export is the issue's
outside check: ``jax.export`` for ``cuda`` with no disabled safety checks. None of
this has run on a GPU.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress.arrays.serving import QuantizedMatrix
from jaxcompress.runtime import pallas
from jaxcompress.runtime.pallas.quantized_mgpu import (
    mosaic_quantized_matmul,
    plan_mosaic_quantized,
)


def _quantized(k, n, *, bits, group_size=None, symmetric=True, axis=-1, seed=0):
    """A random serving leaf built directly (``jc.quantize`` compiles for seconds)."""
    rng = np.random.default_rng(seed)
    groups = 1 if group_size is None else -(-k // group_size)
    packed = bits <= 4 and k % 2 == 0
    if packed:
        codes = rng.integers(0, 256, (n, k // 2), dtype=np.uint8)
    else:
        codes = rng.integers(-(2 ** (bits - 1)), 2 ** (bits - 1), (n, k), dtype=np.int8)
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


@jax.jit
def _reference(x, leaf):
    k, n = leaf.matrix_shape
    dense = leaf.materialize().astype(jnp.float32)
    w = dense.reshape(n, k).T if leaf.outputs_first else dense.reshape(k, n)
    x32 = x.astype(jnp.float32)
    return x32 @ w, jnp.max(jnp.abs(x32) @ jnp.abs(w))


def _custom_calls(exported: jax.export.Exported) -> set[str]:
    return set(re.findall(r"custom_call @([\w$.]+)", exported.mlir_module()))


# (K, N, rows, bits, group_size, symmetric, axis, dtype): tile multiples and not, every
# group size the kernel takes, zero points, an (out, in) weight, two row blocks.
CASES = [
    (128, 128, 16, 8, None, True, -1, jnp.bfloat16),  # multiples of the tiles
    (96, 40, 3, 4, None, False, -1, jnp.bfloat16),  # int4 per channel, zero points, unaligned
    (128, 40, 5, 4, 32, True, -1, jnp.float16),  # int4 g32, float16
    (300, 130, 9, 8, 64, False, -1, jnp.bfloat16),  # int8 g64, a short last group, 3 blocks of N
    (256, 136, 2, 4, 128, True, -1, jnp.bfloat16),  # int4 g128
    (64, 48, 130, 8, None, True, 0, jnp.bfloat16),  # (out, in) weight; two 128-row blocks
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"K{c[0]}N{c[1]}M{c[2]}b{c[3]}g{c[4]}")
def test_the_interpreted_kernel_equals_the_materialized_product(case):
    k, n, rows, bits, group_size, symmetric, axis, dtype = case
    leaf = _quantized(k, n, bits=bits, group_size=group_size, symmetric=symmetric, axis=axis)
    x = jax.random.normal(jax.random.PRNGKey(1), (rows, k)).astype(dtype)
    assert pallas.kernel_for(leaf, rows, "cuda", dtype=dtype)[0].endswith("_mgpu")
    run = jax.jit(lambda x, leaf: pallas.matmul(x, leaf, platform="cuda", interpret=True))
    y = run(x, leaf)
    assert y.shape == (rows, n) and y.dtype == dtype
    want, size = _reference(x, leaf)
    np.testing.assert_allclose(np.asarray(y, np.float32), want, rtol=0, atol=1e-2 * float(size))


@pytest.mark.parametrize(
    "leaf,name",
    [
        (_quantized(256, 256, bits=4, group_size=128), "pallas_int4_g128_mgpu"),
        (_quantized(128, 256, bits=8, symmetric=False), "pallas_int8_pc_mgpu"),
    ],
)
def test_it_exports_for_cuda_with_no_disabled_checks(leaf, name):
    assert pallas.kernel_for(leaf, 8, "cuda")[0] == name
    x = jax.ShapeDtypeStruct((8, leaf.matrix_shape[0]), jnp.bfloat16)
    fn = jax.jit(lambda x, leaf: pallas.matmul(x, leaf, platform="cuda"))
    exported = jax.export.export(fn, platforms=("cuda",))(x, leaf)
    assert _custom_calls(exported) == {"mosaic_gpu_v2"}
    assert exported.out_avals[0].shape == (8, leaf.matrix_shape[1])


def test_refusals_fall_back_to_triton_and_say_why():
    leaf = _quantized(128, 64, bits=8, group_size=16)
    assert "group size 16" in plan_mosaic_quantized(leaf, 4, "cuda")
    name, why = pallas.kernel_for(leaf, 4, "cuda")
    assert name == "pallas_int8_g16_gpu" and "not Mosaic GPU: group size 16" in why

    int8 = _quantized(64, 64, bits=8)
    name, why = pallas.kernel_for(int8, 4, "cuda", dtype=jnp.float32)
    assert name == "pallas_int8_pc_gpu" and "float32 activations" in why
    assert pallas.kernel_for(int8, 4, "rocm")[0] == "pallas_int8_pc_gpu"
    assert "cuda (Hopper) only" in plan_mosaic_quantized(int8, 4, "tpu")
    # Float32 activations on cuda take Triton, whose export needs its check disabled.
    x = jax.ShapeDtypeStruct((4, 64), jnp.float32)
    fn = jax.jit(lambda x, leaf: pallas.matmul(x, leaf, platform="cuda"))
    exported = jax.export.export(
        fn, platforms=("cuda",), disabled_checks=pallas.export_disabled_checks("cuda")
    )(x, int8)
    assert _custom_calls(exported) == {"__gpu$xla.gpu.triton"}

    # Packed nibbles whose halves split a scale group fit neither GPU kernel.
    shifted = _quantized(192, 32, bits=4, group_size=64)
    name, why = pallas.kernel_for(shifted, 4, "cuda")
    assert name is None and why.count("do not line up") == 2


def test_bad_inputs_raise_clear_errors():
    leaf = _quantized(64, 64, bits=8)
    with pytest.raises(ValueError, match="float32 activations"):
        mosaic_quantized_matmul(jnp.ones((2, 64)), leaf)
    with pytest.raises(ValueError, match="x has 48 columns"):
        mosaic_quantized_matmul(jnp.ones((2, 48), jnp.bfloat16), leaf)
    with pytest.raises(ValueError, match="2-D floating"):
        mosaic_quantized_matmul(jnp.ones((2, 64), jnp.int32), leaf)
    with pytest.raises(ValueError, match="cuda"):
        mosaic_quantized_matmul(jnp.ones((2, 64), jnp.bfloat16), leaf, platform="rocm")
