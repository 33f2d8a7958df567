"""GPTQ (Frantar et al. 2022): round the rows of a matrix view with error feedback.

See :mod:`jaxcompress.numerics.obs` for the sweep; each row is rounded on the uniform
grid of :mod:`jaxcompress.numerics.uniform`, its group's scale fixed or computed when
the sweep reaches the group.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxcompress.numerics import uniform
from jaxcompress.numerics.obs import (
    block_padding,
    damped_inverse_factor,
    dot,
    relative_output_error,
    sweep,
)

_GPTQ_STATIC = (
    "bits",
    "symmetric",
    "calibration",
    "percentile",
    "scale_dtype",
    "group_size",
    "dynamic_groups",
    "act_order",
    "block_size",
)


@functools.partial(jax.jit, static_argnames=_GPTQ_STATIC)
def gptq(
    matrix: jax.Array,
    gram: jax.Array,
    scale: jax.Array,
    zero_point: jax.Array | None,
    *,
    bits: int,
    symmetric: bool,
    calibration: str,
    percentile: float,
    scale_dtype: Any,
    group_size: int | None,
    dynamic_groups: bool,
    act_order: bool,
    damp: float | jax.Array,
    block_size: int,
) -> tuple[jax.Array, jax.Array, jax.Array | None, jax.Array, dict[str, jax.Array]]:
    """GPTQ on an ``(m, n)`` matrix view: ``(codes, scale, zero_point, restored, stats)``.

    Row ``i`` (input feature ``i``) is rounded with its group's scale, and its error
    ``(w_i − q_i) / U_ii`` is fed into the later rows through ``U``'s row ``i``.

    Args:
        matrix: the ``(m, n)`` weights.
        gram: the ``(m, m)`` second moment of the inputs.
        scale: the starting ``(G, C)`` scales (``C`` is ``n`` or 1), used as they are
            unless ``dynamic_groups``; in the stored ``scale_dtype``.
        zero_point: likewise, or ``None`` when symmetric.
        bits, symmetric, calibration, percentile, scale_dtype: as for
            :func:`jaxcompress.quantize`.
        group_size: rows per scale group (``None``: one group); when it does not
            divide ``m`` the last group is shorter, ``G = ceil(m / group_size)``.
        dynamic_groups: compute each group's scale (with ``calibration``) from the
            current, error-updated rows when the sweep reaches the group, as GPTQ does.
        act_order: sweep the rows in order of decreasing ``G_ii`` (codes are put back
            in the natural order; the scales stay those given, "static groups").
        damp: ``λ = damp · mean(diag G)`` is added to the diagonal.
        block_size: rows per lazy-update block.

    Returns:
        ``codes``: uint8 ``(m, n)``; ``scale`` and ``zero_point``: ``(G, C)`` in
        ``scale_dtype``; ``restored``: the decoded ``(m, n)`` weights (float32, as
        ``Quantized.materialize`` computes them); ``stats``:
        ``{"damping", "factorized", "relative_output_error"}``.

    Example:
        >>> import jax.numpy as jnp
        >>> w = jnp.array([[0.9, -0.4], [0.2, 1.0]])
        >>> codes, scale, _, _, _ = gptq(w, jnp.eye(2), jnp.ones((1, 2)), None, bits=2,
        ...     symmetric=True, calibration="absmax", percentile=99.9, scale_dtype=jnp.float32,
        ...     group_size=None, dynamic_groups=False, act_order=False, damp=0.0, block_size=128)
        >>> codes.tolist()
        [[3, 2], [2, 3]]
    """
    if act_order and dynamic_groups:
        raise ValueError("gptq: act_order needs static group scales (dynamic_groups=False)")
    w = matrix.astype(jnp.float32)
    m, n = w.shape
    groups, channels = scale.shape
    size = m if group_size is None else min(group_size, m)
    # A size that does not divide m leaves a shorter last group (see group_layout).
    short_last = m % size != 0
    block, padded = block_padding(m, block_size)
    h = gram.astype(jnp.float32)
    order = None
    if act_order:
        order = jnp.argsort(-jnp.diagonal(h), stable=True)
        w, h = w[order], h[order][:, order]
        group_of_row = order // size
    else:
        group_of_row = jnp.arange(m) // size
    upper, damping, _ = damped_inverse_factor(h, damp, padded)
    w_padded = jnp.zeros((padded, n), jnp.float32).at[:m].set(w)
    # Padding rows use an extra scale slot, so nothing real is overwritten.
    group_of_row = jnp.full((padded,), groups, group_of_row.dtype).at[:m].set(group_of_row)
    ones = jnp.ones((1, channels), jnp.float32)
    scales = jnp.concatenate([scale.astype(jnp.float32), ones])
    zeros = jnp.concatenate([ones if zero_point is None else zero_point.astype(jnp.float32), ones])
    options = dict(
        bits=bits,
        symmetric=symmetric,
        calibration=calibration,
        percentile=percentile,
        scale_dtype=scale_dtype,
    )

    def fresh_scale(args):
        r, g, err, u_block, w, scales, zeros = args
        valid = None
        if short_last:
            # The last group's rows run past m (and maybe past the padded rows, where a
            # slice would be clamped): gather them, and leave the rows beyond m out.
            index = r + jnp.arange(size)
            valid = (index < m)[:, None]
            index = jnp.minimum(index, w.shape[0] - 1)
            rows, u_rows = w[index], u_block[:, index]
        else:
            rows = lax.dynamic_slice_in_dim(w, r, size, axis=0)
            u_rows = lax.dynamic_slice_in_dim(u_block, r, size, axis=1)
        rows = rows - dot(u_rows.T, err)
        _, s, z, _ = uniform.quantize_view(rows, (0,), valid=valid, **options)
        scales = lax.dynamic_update_slice_in_dim(scales, s.astype(jnp.float32), g, axis=0)
        if z is not None:
            zeros = lax.dynamic_update_slice_in_dim(zeros, z.astype(jnp.float32), g, axis=0)
        return scales, zeros

    def row_fn(r, w_row, err, u_block, w, carry):
        codes, scales, zeros = carry
        g = group_of_row[r]
        if dynamic_groups:
            starts = (r % size == 0) & (r < m)
            scales, zeros = lax.cond(
                starts,
                fresh_scale,
                lambda args: (args[-2], args[-1]),
                (r, g, err, u_block, w, scales, zeros),
            )
        s = scales[g]
        z = None if symmetric else zeros[g]
        row_codes, _ = uniform.encode(w_row, s, z, bits)
        q = uniform.decode(row_codes, s, z, bits)
        codes = lax.dynamic_update_index_in_dim(codes, row_codes.astype(jnp.uint8), r, axis=0)
        return q, (codes, scales, zeros)

    start = (jnp.zeros((padded, n), jnp.uint8), scales, zeros)
    codes, scales, zeros = sweep(w_padded, upper, block, row_fn, start)
    codes = codes[:m]
    if order is not None:
        codes = codes[jnp.argsort(order)]
    scale_out = scales[:groups].astype(scale_dtype)
    zero_out = None if symmetric else zeros[:groups].astype(scale_dtype)
    # The dequantized weights, for the output error.
    rows = jnp.arange(m) // size
    row_scale = scale_out.astype(jnp.float32)[rows]
    row_zero = None if zero_out is None else zero_out.astype(jnp.float32)[rows]
    restored = uniform.decode(codes.astype(jnp.float32), row_scale, row_zero, bits)
    stats = {
        "damping": damping,
        "factorized": jnp.all(jnp.isfinite(upper)),
        "relative_output_error": relative_output_error(matrix.astype(jnp.float32), restored, gram),
    }
    return codes, scale_out, zero_out, restored, stats
