"""AWQ (Lin et al. 2023): per-input-channel scales searched against the layer's output error.

A weight's ``(m, n)`` matrix view ``W`` (rows: the ``m`` input features it contracts,
see :func:`~jaxcompress.arrays.lowrank.matrix_shape`) is quantized as
``Ŵ = diag(s)⁻¹ Q(diag(s) W)``: rows whose inputs are large get a larger scale ``s_i``
before the (unchanged) quantizer ``Q`` rounds them, so their relative rounding error
shrinks, at the expense of rows whose inputs are small. Since ``X Ŵ = (X diag(s)⁻¹)
Q(diag(s) W)``, the scales fold into whatever produces ``X`` or, as here, are stored
next to the codes: :class:`~jaxcompress.Quantized`'s ``input_scale`` holds
``r = 1 / s`` (rounded to the scale dtype), so decoding is a multiplication, exact on
every backend, and ``Ŵ = diag(r) Q(diag(r)⁻¹ W)`` for the stored ``r``.

The scales are ``s_i = a_i ** alpha``, normalised by ``√(max s · min s)`` as AWQ does,
with ``a_i`` the input's magnitude. AWQ's paper uses the mean ``|x_i|``; calibration
statistics (:class:`~jaxcompress.InputStats`) keep the Gram ``G = E[x xᵀ]``
but not ``E|x|``, so ``a_i = √G_ii``, the input's RMS, is used instead (an input never
seen, ``G_ii = 0``, takes the mean of the others' ``a``, as in
:mod:`jaxcompress.numerics.obs`, and every ``a_i`` is floored at ``1e-4 · max a``).
``alpha`` is searched over an even grid on
``[0, 1]`` for the least output error ``tr(Eᵀ G E)``, ``E = Ŵ − W``, which the Gram
alone gives (``‖X W − X Ŵ‖_F² = N tr(Eᵀ G E)`` for the ``N`` calibration rows). At
``alpha = 0`` every scale is exactly 1, so that candidate is round-to-nearest itself
and the chosen one is never worse. Each candidate costs one quantization and one
``(m, m) @ (m, n)`` product, so a leaf costs ``O(grid · m² n)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxcompress.arrays.quantized import scale_inputs

__all__ = ["awq_search", "input_magnitudes", "inverse_scales"]

_HIGHEST = lax.Precision.HIGHEST


def input_magnitudes(gram: jax.Array) -> jax.Array:
    """Each input feature's RMS ``√G_ii`` (float32), floored at ``1e-4`` of the largest.

    An unseen input (``G_ii = 0``) gets the mean of the others. The floor (AWQ clamps
    its scales at ``1e-4`` likewise) keeps ``max a / min a <= 1e4``, so ``1 / s`` stays
    within ``[1e-2, 1e2]`` (finite in float16) and a nearly silent input's row is not
    blown up by a huge ``1 / s`` that only its near-zero Gram entry would excuse.

    Example:
        >>> import jax.numpy as jnp
        >>> input_magnitudes(jnp.diag(jnp.array([4.0, 0.0, 16.0]))).tolist()
        [2.0, 3.0, 4.0]
        >>> [round(a, 6) for a in input_magnitudes(jnp.diag(jnp.array([1e4, 1e-20]))).tolist()]
        [100.0, 0.01]
    """
    diagonal = jnp.diagonal(gram.astype(jnp.float32))
    a = jnp.sqrt(jnp.maximum(diagonal, 0.0))
    dead = a <= 0
    live = jnp.sum(jnp.where(dead, 0.0, 1.0))
    mean = jnp.sum(jnp.where(dead, 0.0, a)) / jnp.maximum(live, 1.0)
    a = jnp.where(dead, jnp.where(live > 0, mean, 1.0), a)
    return jnp.maximum(a, jnp.max(a) * 1e-4)


def inverse_scales(magnitudes: jax.Array, alpha: jax.Array | float, scale_dtype: Any) -> jax.Array:
    """``r = 1 / s`` for AWQ's scales ``s = a ** alpha / √(max · min)``, in ``scale_dtype``.

    Computed in log space as ``exp(-log s)`` (no overflow, no division); ``alpha = 0``
    gives exactly 1 everywhere.

    Example:
        >>> import jax.numpy as jnp
        >>> inverse_scales(jnp.array([1.0, 4.0]), 1.0, jnp.float32).tolist()  # s = 1/2, 2
        [2.0, 0.5]
        >>> inverse_scales(jnp.array([1.0, 4.0]), 0.0, jnp.float32).tolist()
        [1.0, 1.0]
    """
    logs = jnp.asarray(alpha, jnp.float32) * jnp.log(magnitudes.astype(jnp.float32))
    logs = logs - (jnp.max(logs) + jnp.min(logs)) * 0.5
    return jnp.exp(-logs).astype(scale_dtype)


def _relative(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    safe = jnp.where(denominator > 0, denominator, jnp.ones_like(denominator))
    return jnp.where(denominator > 0, jnp.sqrt(jnp.maximum(numerator, 0.0) / safe), 0.0)


def awq_search(
    weight: jax.Array,
    gram: jax.Array,
    *,
    fan_in: int,
    grid: int,
    scale_dtype: Any,
    quantize: Callable[[jax.Array], tuple],
    decode: Callable[..., jax.Array],
) -> tuple[tuple, dict]:
    """The grid search of one weight: the best candidate and its statistics.

    Runs under ``jit`` (a :func:`jax.lax.fori_loop` over the grid, keeping the best
    candidate so far, so memory is a few copies of the weight whatever the grid).

    Args:
        weight: the weight, any shape; its first ``fan_in`` axes are the inputs.
        gram: the ``(m, m)`` Gram of those inputs, ``m`` the product of their sizes.
        fan_in: how many leading axes of ``weight`` are inputs.
        grid: how many values of ``alpha``, evenly spaced on ``[0, 1]`` (1: only 0).
        scale_dtype: the dtype the scales are stored (and so used) in.
        quantize: ``quantize(scaled) -> (codes, scale, zero_point)``, the leaf's
            quantizer, applied to ``diag(r)⁻¹ W`` (float32, the weight's shape).
        decode: ``decode(codes, scale, zero_point)``, the float32 dense values of codes.

    Returns:
        ``((codes, scale, zero_point, r), stats)``: the winning quantizer outputs and
        input scales ``r = 1 / s`` (shaped ``weight.shape[:fan_in]``, in
        ``scale_dtype``), with ``decode(...) * r`` the quantized weight; stats
        ``{"alpha", "relative_output_error", "rtn_relative_output_error"}`` with the
        relative output errors ``√(tr(Eᵀ G E) / tr(Wᵀ G W))`` of the chosen and the
        ``alpha = 0`` (round-to-nearest) candidate, the first never above the second.

    Example:
        >>> import jax.numpy as jnp
        >>> w = jnp.array([[0.1, -0.2], [3.0, 1.0]])
        >>> q = lambda v: (jnp.round(v * 4), None, None)
        >>> (_, _, _, r), stats = awq_search(w, jnp.diag(jnp.array([100.0, 1.0])), fan_in=1,
        ...     grid=3, scale_dtype=jnp.float32, quantize=q, decode=lambda c, s, z: c / 4)
        >>> float(stats["alpha"]), [round(v, 4) for v in r.tolist()]  # s = √10 and 1/√10
        (1.0, [0.3162, 3.1623])
        >>> bool(stats["relative_output_error"] < stats["rtn_relative_output_error"])
        True
    """
    shape = tuple(weight.shape)
    m = math.prod(shape[:fan_in])
    w = weight.astype(jnp.float32)
    matrix = w.reshape(m, -1)
    g = gram.astype(jnp.float32)
    magnitudes = input_magnitudes(g)
    alphas = jnp.linspace(0.0, 1.0, grid, dtype=jnp.float32) if grid > 1 else jnp.zeros(1)
    broadcast = shape[:fan_in] + (1,) * (len(shape) - fan_in)

    def candidate(alpha):
        r = inverse_scales(magnitudes, alpha, scale_dtype).reshape(shape[:fan_in])
        codes, scale, zero = quantize(w / r.astype(jnp.float32).reshape(broadcast))
        # What Quantized.materialize gives, in the weight's dtype.
        restored = scale_inputs(decode(codes, scale, zero), r)
        restored = restored.astype(weight.dtype).astype(jnp.float32)
        error = restored.reshape(m, -1) - matrix
        total = jnp.sum(error * jnp.dot(g, error, precision=_HIGHEST))
        return total, (codes, scale, zero, r)

    def step(i, carry):
        best, index, rtn, payload = carry
        total, found = candidate(alphas[i])
        better = (total < best) | (i == 0)  # strict: ties keep the smaller alpha
        payload = jax.tree.map(lambda new, old: jnp.where(better, new, old), found, payload)
        rtn = jnp.where(i == 0, total, rtn)
        return jnp.where(better, total, best), jnp.where(better, i, index), rtn, payload

    shapes = jax.eval_shape(candidate, alphas[0])[1]
    empty = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
    inf = jnp.float32(jnp.inf)
    start = (inf, jnp.int32(0), inf, empty)
    best, index, rtn, payload = lax.fori_loop(0, grid, step, start)
    denominator = jnp.sum(matrix * jnp.dot(g, matrix, precision=_HIGHEST))
    stats = {
        "alpha": alphas[index],
        "relative_output_error": _relative(best, denominator),
        "rtn_relative_output_error": _relative(rtn, denominator),
    }
    return payload, stats
