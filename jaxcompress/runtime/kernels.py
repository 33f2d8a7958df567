"""Matrix products ``x @ W`` with a compressed ``W``, without a dense ``W`` in memory.

Every kernel takes a 2-D activation ``x`` of shape ``(M, K)`` and returns ``(M, N)``
in float32. The ways to run one, by name:

- ``"int8"``: the activation is quantized per row to int8 on the fly (its scale
  is ``max|x_row| / 127``) and multiplied with the int8 codes in an integer dot
  (int32 accumulation); scales are applied to the ``(M, N)`` result. It is an
  approximation of the float product: besides the weight's own quantization, each
  activation is rounded to 1/254 of its row's largest magnitude.
- ``"blocked"``: a loop over blocks of output channels dequantizes one
  ``(block, K)`` slice at a time and multiplies it in float32, so the dense matrix
  never exists; the result equals the materialized product up to float rounding.
- ``"dequantize"``: the whole matrix is dequantized inside the traced function and
  multiplied (XLA may fuse the dequantization into the product on GPU).
- ``"factored"``: a :class:`~jaxcompress.LowRank` weight applied as ``(x @ u) @ v``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxcompress.arrays.lowrank import LowRank
from jaxcompress.arrays.serving import (
    ClusteredMatrix,
    QuantizedMatrix,
    grouped_rows,
    lookup,
    unpack_nibbles,
)

__all__ = [
    "BLOCK",
    "blocked_clustered",
    "blocked_quantized",
    "dequantized",
    "factored",
    "int8_clustered",
    "int8_quantized",
    "int8_row_error",
    "quantize_rows",
]

# Output channels per block of the blocked kernels: 256 rows of a 4096-wide float32
# matrix are 4 MiB; on this project's CPU 256 was the fastest of 32 to 512.
BLOCK = 256

_NT = (((1,), (1,)), ((), ()))  # contract the last axis of both operands


def quantize_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(codes, scale)``: each row of ``x`` as int8 with ``x ≈ codes * scale``.

    Example:
        >>> import jax.numpy as jnp
        >>> codes, scale = quantize_rows(jnp.array([[1.0, -0.5], [0.0, 0.0]]))
        >>> codes.tolist(), scale[:, 0].tolist()
        ([[127, -64], [0, 0]], [0.007874015718698502, 1.0])
    """
    x = x.astype(jnp.float32)
    peak = jnp.max(jnp.abs(x), axis=1, keepdims=True)
    scale = jnp.where(peak > 0, peak / 127.0, jnp.ones_like(peak))
    codes = jnp.clip(jnp.round(x / scale), -127, 127).astype(jnp.int8)
    return codes, scale


def int8_row_error(x: jax.Array) -> jax.Array:
    """The largest relative error of :func:`quantize_rows` over the rows of ``x``.

    ``max_m ||x_m - codes_m * scale_m|| / ||x_m||`` (L2 norms; an all-zero row counts
    0), a float32 scalar: what the ``int8`` route's rounding of the activations costs,
    measured in ``O(M K)``. A row of Gaussian values of any length up to 4096 scores
    about 0.007 to 0.012; 1024 of them with one 1000 times larger, about 0.03 (the
    others round to 0). An outlier that dominates the row's norm hides the others'
    error: ``[1000, 0.1, 0.2, -0.3]`` scores 0.0004. A NaN or infinite entry gives
    NaN (no tolerance admits it).

    Example:
        >>> import jax.numpy as jnp
        >>> float(int8_row_error(jnp.array([[1.0, -0.5], [0.0, 0.0]])))  # -64 for -63.5
        0.0035...
        >>> float(int8_row_error(jnp.array([[1000.0, 0.1, 0.2, -0.3]]))) < 0.001
        True
    """
    x = x.astype(jnp.float32)
    codes, scale = quantize_rows(x)
    error = jnp.linalg.norm(x - codes.astype(jnp.float32) * scale, axis=1)
    norm = jnp.linalg.norm(x, axis=1)
    ratio = jnp.where(norm > 0, error / jnp.where(norm > 0, norm, 1.0), 0.0)
    # A NaN or infinite entry makes the norms non-finite: report NaN, never 0.
    ratio = jnp.where(jnp.isfinite(norm), ratio, jnp.nan)
    return jnp.max(ratio, initial=0.0)


def _int_dot(x_codes: jax.Array, w_codes: jax.Array) -> jax.Array:
    return lax.dot_general(x_codes, w_codes, _NT, preferred_element_type=jnp.int32)


def _offset_term(x: jax.Array, leaf: QuantizedMatrix, offset: jax.Array) -> jax.Array:
    """``sum_g (sum of x over group g) * offset[g] * scale[g]``, the zero-point share."""
    # A short last group's padding holds zeros: it adds nothing to its sum.
    sums = grouped_rows(x.astype(jnp.float32), leaf.groups, leaf.group).sum(axis=2)
    return sums @ (offset * leaf.scale)


def _pad_rows(x: jax.Array, rows: int) -> jax.Array:
    return x if x.shape[0] >= rows else jnp.pad(x, ((0, rows - x.shape[0]), (0, 0)))


def int8_quantized(x: jax.Array, leaf: QuantizedMatrix, *, min_rows: int = 1) -> jax.Array:
    """Integer product of int8 activations and the codes of a one-group matrix.

    ``min_rows`` pads the activation with zero rows first: XLA's CPU integer
    matrix-vector product is slow, while 8 rows run at full speed.

    Example:
        >>> import jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> from jaxcompress.arrays.serving import to_serving
        >>> w = jnp.linspace(-1.0, 1.0, 32).reshape(8, 4)
        >>> leaf = to_serving(jc.quantize(bits=8, axis=-1)({"w": w})[0]["w"])
        >>> x = jnp.linspace(-2.0, 2.0, 16).reshape(2, 8)
        >>> bool(jnp.allclose(int8_quantized(x, leaf), x @ w, atol=0.05))
        True
    """
    if leaf.groups != 1:
        raise ValueError("the int8 kernel takes one scale group per channel")
    rows = x.shape[0]
    x = _pad_rows(x, min_rows)
    x_codes, x_scale = quantize_rows(x)
    if leaf.packed:
        low, high = unpack_nibbles(leaf.codes)
        # The two nibbles hold the two halves of the inputs: no interleaving.
        half = low.shape[1]
        acc = _int_dot(x_codes[:, :half], low) + _int_dot(x_codes[:, half:], high)
    else:
        acc = _int_dot(x_codes, leaf.codes)
    y = acc.astype(jnp.float32) * x_scale * leaf.scale
    if leaf.offset is not None:
        # With the rounded activations, as the codes' share has them: then the result
        # is the product of the rounded activations and W itself, so the rounding costs
        # at most half a step times sum |W|, not times the larger sum |codes * scale|.
        y = y - _offset_term(x_codes.astype(jnp.float32) * x_scale, leaf, leaf.offset)
    return y[:rows]


def int8_clustered(x: jax.Array, leaf: ClusteredMatrix, *, min_rows: int = 1) -> jax.Array:
    """Integer product after rounding the codebook to an int8 grid (``min_rows`` as above).

    The codebook (shared, or per output channel) is scaled by ``max|c| / 127`` and
    rounded, so each weight moves by at most half a grid step, as with int8
    quantization; the int8 weights are then looked up and multiplied as in
    :func:`int8_quantized`.

    Example:
        >>> import jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> from jaxcompress.arrays.serving import to_serving
        >>> w = jnp.linspace(-1.0, 1.0, 32).reshape(8, 4)
        >>> leaf = to_serving(jc.cluster(k=16)({"w": w})[0]["w"])
        >>> x = jnp.linspace(-2.0, 2.0, 16).reshape(2, 8)
        >>> bool(jnp.allclose(int8_clustered(x, leaf), x @ leaf.materialize(), atol=0.05))
        True
    """
    codebook = leaf.codebook.astype(jnp.float32)
    peak = jnp.max(jnp.abs(codebook), axis=-1, keepdims=True)
    grid = jnp.where(peak > 0, peak / 127.0, jnp.ones_like(peak))
    table = jnp.clip(jnp.round(codebook / grid), -127, 127).astype(jnp.int8)
    w_codes = lookup(table, leaf.indices)
    rows = x.shape[0]
    x_codes, x_scale = quantize_rows(_pad_rows(x, min_rows))
    acc = _int_dot(x_codes, w_codes).astype(jnp.float32)
    column_scale = grid.reshape(1, -1) if codebook.ndim == 2 else grid.reshape(1, 1)
    return (acc * x_scale * column_scale)[:rows]


def _row_block(n: int) -> int:
    """Output channels per block: the largest divisor of ``n`` that is at most ``BLOCK``."""
    return max(d for d in range(1, min(n, BLOCK) + 1) if n % d == 0)


def _map_row_blocks(x: jax.Array, n: int, block_product) -> jax.Array:
    """``(M, N)`` from ``block_product(b) -> (block, M)`` over blocks of output channels.

    Each block's weights are decoded to float32 in cache and multiplied as the
    left operand (``W_b @ x.T``), the layout XLA runs fastest for few rows.
    """
    block = _row_block(n)
    blocks = lax.map(block_product, jnp.arange(n // block))
    return blocks.reshape(n, x.shape[0]).T


def _decode_rows(leaf: QuantizedMatrix, start: jax.Array, block: int) -> jax.Array:
    """Dequantized float32 rows ``[start, start + block)`` of the ``(N, K)`` matrix."""
    k, _ = leaf.matrix_shape
    raw = lax.dynamic_slice_in_dim(leaf.codes, start, block, axis=0)
    if leaf.packed:
        raw = jnp.concatenate(unpack_nibbles(raw), axis=1)
    if leaf.groups == 1 and leaf.offset is None:
        return raw.astype(jnp.float32)  # the per-channel scale is applied to the result
    codes = grouped_rows(raw.astype(jnp.float32), leaf.groups, leaf.group)
    scale = lax.dynamic_slice_in_dim(leaf.scale, start, block, axis=1).T[:, :, None]
    if leaf.offset is not None:
        offset = lax.dynamic_slice_in_dim(leaf.offset, start, block, axis=1).T[:, :, None]
        codes = codes - offset
    # A short last group's padding is dropped before the product.
    return (codes * scale).reshape(block, -1)[:, :k]


def blocked_quantized(x: jax.Array, leaf: QuantizedMatrix) -> jax.Array:
    """Float product, dequantizing one block of output channels at a time.

    Example:
        >>> import jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> from jaxcompress.arrays.serving import to_serving
        >>> w = jnp.linspace(-1.0, 1.0, 32).reshape(8, 4)
        >>> leaf = to_serving(jc.quantize(bits=4, axis=-1, group_size=4)({"w": w})[0]["w"])
        >>> x = jnp.ones((1, 8))
        >>> bool(jnp.allclose(blocked_quantized(x, leaf), x @ leaf.materialize(), atol=1e-5))
        True
    """
    _, n = leaf.matrix_shape
    block = _row_block(n)
    x = x.astype(jnp.float32)

    def product(index):
        weights = _decode_rows(leaf, index * block, block)
        return lax.dot_general(weights, x, _NT)

    total = _map_row_blocks(x, n, product)
    if leaf.groups == 1 and leaf.offset is None:
        return total * leaf.scale
    return total


def blocked_clustered(x: jax.Array, leaf: ClusteredMatrix) -> jax.Array:
    """Float product, looking up one block of output channels at a time.

    Example:
        >>> import jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> from jaxcompress.arrays.serving import to_serving
        >>> w = jnp.linspace(-1.0, 1.0, 32).reshape(8, 4)
        >>> leaf = to_serving(jc.cluster(k=4)({"w": w})[0]["w"])
        >>> x = jnp.ones((1, 8))
        >>> bool(jnp.allclose(blocked_clustered(x, leaf), x @ leaf.materialize(), atol=1e-5))
        True
    """
    _, n = leaf.matrix_shape
    block = _row_block(n)
    codebook = leaf.codebook.astype(jnp.float32)
    x = x.astype(jnp.float32)

    def product(index):
        start = index * block
        indices = lax.dynamic_slice_in_dim(leaf.indices, start, block, axis=0)
        table = codebook
        if codebook.ndim == 2:
            table = lax.dynamic_slice_in_dim(codebook, start, block, axis=0)
        return lax.dot_general(lookup(table, indices), x, _NT)

    return _map_row_blocks(x, n, product)


def dequantized(x: jax.Array, leaf: QuantizedMatrix | ClusteredMatrix) -> jax.Array:
    """Float product with the whole ``(N, K)`` matrix dequantized in the trace.

    Example:
        >>> import jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> from jaxcompress.arrays.serving import to_serving
        >>> w = jnp.linspace(-1.0, 1.0, 32).reshape(8, 4)
        >>> leaf = to_serving(jc.quantize(bits=8, axis=-1)({"w": w})[0]["w"])
        >>> bool(jnp.allclose(dequantized(jnp.ones((1, 8)), leaf), jnp.ones((1, 8)) @ w,
        ...                   atol=0.05))
        True
    """
    k, n = leaf.matrix_shape
    if isinstance(leaf, ClusteredMatrix):
        weights = lookup(leaf.codebook.astype(jnp.float32), leaf.indices)
    else:
        codes = grouped_rows(leaf.signed_codes().astype(jnp.float32), leaf.groups, leaf.group)
        if leaf.offset is not None:
            codes = codes - leaf.offset.T[:, :, None]
        weights = (codes * leaf.scale.T[:, :, None]).reshape(n, -1)[:, :k]
    return lax.dot_general(x.astype(jnp.float32), weights, _NT)


def factored(x: jax.Array, leaf: LowRank, *, precision=None, transposed: bool = False) -> jax.Array:
    """``(x @ u) @ v`` for a :class:`~jaxcompress.LowRank` matrix ``u v``.

    With ``transposed``, ``x @ (u v)ᵀ = (x @ vᵀ) @ uᵀ``: the product of a weight
    stored output first, as equinox's ``(out, in)`` used as ``x @ W.T``.

    Example:
        >>> import jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> leaf = jc.LowRank(u=jnp.ones((4, 1)), v=jnp.ones((1, 3)), shape=(4, 3),
        ...                   dtype=jnp.float32, fan_in_axes=1)
        >>> factored(jnp.ones((2, 4)), leaf).tolist()
        [[4.0, 4.0, 4.0], [4.0, 4.0, 4.0]]
        >>> factored(jnp.ones((1, 3)), leaf, transposed=True).tolist()
        [[3.0, 3.0, 3.0, 3.0]]
    """
    dtype = jnp.promote_types(x.dtype, leaf.u.dtype)
    first, second = (leaf.v.T, leaf.u.T) if transposed else (leaf.u, leaf.v)
    inner = jnp.matmul(x.astype(dtype), first.astype(dtype), precision=precision)
    return jnp.matmul(inner, second.astype(dtype), precision=precision).astype(jnp.float32)
