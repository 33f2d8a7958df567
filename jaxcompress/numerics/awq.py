"""AWQ (Lin et al. 2023): per-input-channel scales and per-group clipping, searched
against the layer's output error on the calibration data.

A weight's ``(m, n)`` matrix view ``W`` (rows: the ``m`` input features it contracts,
see :func:`~jaxcompress.arrays.lowrank.matrix_shape`) is quantized as
``Ŵ = diag(s)⁻¹ Q(clip(diag(s) W))``: rows whose inputs are large get a larger scale
``s_i`` before the (unchanged) quantizer ``Q`` rounds them, so their relative rounding
error shrinks, at the expense of rows whose inputs are small; ``clip`` narrows each
quantization group's range (AWQ's "auto-clip"), trading a few clipped entries for a
finer grid. Since ``X Ŵ = (X diag(s)⁻¹) Q(...)``, the scales fold into whatever
produces ``X`` or, as here, are stored next to the codes:
:class:`~jaxcompress.Quantized`'s ``input_scale`` holds ``r = 1 / s`` (rounded to the
scale dtype), so decoding is a multiplication, exact on every backend.

The scales are ``s_i = a_i ** alpha``, normalised by ``√(max s · min s)`` as AWQ does,
with ``a_i`` the input's magnitude. AWQ's paper (and Qwix) use the mean ``|x_i|``;
calibration statistics (:class:`~jaxcompress.InputStats`) keep the Gram ``G = E[x xᵀ]``
but not ``E|x|``, so ``a_i = √G_ii``, the input's RMS, is used instead (proportional to
the mean ``|x_i|`` for Gaussian inputs; an input never seen, ``G_ii = 0``, takes the
mean of the others' ``a``, and every ``a_i`` is floored at ``1e-4 · max a``).

**The objective** is the output error on the calibration data,
``‖X W − X Ŵ‖_F² = N tr(Eᵀ G E)`` (``E = Ŵ − W``, ``N`` calibration rows), which the
Gram alone gives. Evaluating it costs an ``(m, m) @ (m, n)`` product, so the search
reads only its block-diagonal part: for blocks of ``B <= 128`` consecutive inputs
(dividing the quantization group), ``Σ_b tr(E_bᵀ G_bb E_b)``, each block's own
contribution to the output error, ``O(B m n)`` per candidate. That is exactly AWQ's
auto-clip objective for a group (the output error its inputs cause), and what makes
the clipping ratios separable by group. The search:

1. ``alpha`` over an even grid on ``[0, 1]``, by the block objective summed (where
   each output column is quantized on its own, over at most 512 evenly spread output
   columns: the objective is a sum over columns, and ``alpha`` one number for all);
2. at that ``alpha``, a clipping ratio per group and output column from an even grid on
   ``[1, 0.5]``, by the group's block objective (only where the groups are runs of one
   output column's inputs: per output channel, with or without a ``group_size`` that divides
   the inputs; elsewhere no clipping), coarse to fine: every other ratio of the grid (and its
   last, 0.5), then each group's two grid neighbours of its best coarse ratio (8
   candidates for 11 ratios; ratio 1 first and strict ``<``, so ties keep the larger
   ratio);
3. the full objective ``tr(Eᵀ G E)`` of step 2's result and of round to nearest
   (``alpha = 0``, no clipping: every scale exactly 1); the lesser wins, so the result
   is never worse than round to nearest on the calibration objective, and the reported
   errors are exact (three ``(m, m) @ (m, n)`` products, with ``tr(Wᵀ G W)``).

A leaf costs ``O(grid · B m min(n, 512) + clip_grid · B m n + m² n)``, not
``O(grid · m² n)``. Where each output column is quantized on its own, every step
evaluates its candidate on 512 columns at a time (:func:`chunk_width`): the three
steps are one ``fori_loop`` over one candidate body, compiled once whatever ``n`` and
the grids, with the full products only in step 3's iterations.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxcompress.arrays.quantized import scale_inputs

__all__ = [
    "awq_search",
    "block_losses",
    "block_size",
    "chunk_width",
    "clip_groups",
    "clip_ratios",
    "gram_blocks",
    "input_magnitudes",
    "inverse_scales",
]

_HIGHEST = lax.Precision.HIGHEST
_BLOCK = 128  # the search's Gram blocks: O(128 m n) per candidate
_CHUNK = 512  # output columns a search step reads


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


def gram_blocks(gram: jax.Array, block: int) -> jax.Array:
    """The ``(m / block, block, block)`` diagonal blocks of an ``(m, m)`` Gram, float32.

    Example:
        >>> import jax.numpy as jnp
        >>> gram_blocks(jnp.arange(16.0).reshape(4, 4), 2)[1].tolist()
        [[10.0, 11.0], [14.0, 15.0]]
    """
    m = gram.shape[0]
    if block < 1 or m % block:
        raise ValueError(f"gram_blocks: block {block} must divide the Gram's size {m}")
    k = m // block
    g = gram.astype(jnp.float32).reshape(k, block, k, block)
    index = jnp.arange(k)
    return g[index, :, index, :]


def block_losses(error: jax.Array, blocks: jax.Array) -> jax.Array:
    """``eᵀ G_bb e`` for each diagonal block ``b`` and column: ``(k, n)``, float32.

    ``error`` is an ``(m, n)`` error ``E = Ŵ − W`` of the matrix view; ``blocks`` the
    Gram's diagonal blocks (:func:`gram_blocks`). Entry ``(b, j)`` is the squared output
    error that block ``b``'s inputs alone cause in output ``j`` on the calibration data
    (per calibration row), the part of ``tr(Eᵀ G E)`` that depends on block ``b`` only.

    Example:
        >>> import jax.numpy as jnp
        >>> block_losses(jnp.array([[1.0], [2.0]]), jnp.array([[[2.0]], [[3.0]]])).tolist()
        [[2.0], [12.0]]
    """
    k, b, _ = blocks.shape
    e = error.astype(jnp.float32).reshape(k, b, -1)
    ge = jnp.einsum("kab,kbn->kan", blocks, e, precision=_HIGHEST)
    return jnp.sum(e * ge, axis=1)


def block_size(m: int, group: int, *, largest: int = _BLOCK) -> int:
    """The largest divisor of ``gcd(m, group)`` not above ``largest``.

    Example:
        >>> block_size(4096, 128), block_size(4096, 4096), block_size(36, 36), block_size(7, 7)
        (128, 128, 36, 7)
    """
    common = math.gcd(m, group)
    return max(d for d in range(1, min(common, largest) + 1) if common % d == 0)


def clip_groups(scaled: jax.Array, ratio: jax.Array, *, group: int, symmetric: bool) -> jax.Array:
    """An ``(m, n)`` matrix clipped, per group of ``group`` rows in a column, to ``ratio``.

    ``ratio`` is ``(m / group, n)``. Symmetric: into ``±ratio · max |v|``; asymmetric:
    the range ``[min, max]`` narrowed about its centre. A ratio of 1 leaves the group
    exactly as it was.

    Example:
        >>> import jax.numpy as jnp
        >>> clip_groups(jnp.array([[4.0], [-1.0]]), jnp.array([[0.5]]), group=2,
        ...     symmetric=True).tolist()
        [[2.0], [-1.0]]
    """
    m, n = scaled.shape
    v = scaled.reshape(m // group, group, n)
    rho = ratio[:, None, :].astype(v.dtype)
    if symmetric:
        top = jnp.max(jnp.abs(v), axis=1, keepdims=True) * rho
        low = -top
    else:
        high, lowest = jnp.max(v, axis=1, keepdims=True), jnp.min(v, axis=1, keepdims=True)
        centre, half = (high + lowest) * 0.5, (high - lowest) * 0.5
        low, top = centre - rho * half, centre + rho * half
    clipped = jnp.clip(v, low, top)
    return jnp.where(rho < 1, clipped, v).reshape(m, n)


def _relative(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    safe = jnp.where(denominator > 0, denominator, jnp.ones_like(denominator))
    return jnp.where(denominator > 0, jnp.sqrt(jnp.maximum(numerator, 0.0) / safe), 0.0)


def chunk_width(n: int, *, largest: int = _CHUNK) -> int:
    """The columns the search evaluates at once: the largest divisor of ``n`` not above
    ``largest``, or ``n`` itself where that divisor is below ``largest / 8``.

    Example:
        >>> chunk_width(4096), chunk_width(1000), chunk_width(300), chunk_width(1031)
        (512, 500, 300, 1031)
    """
    if n <= largest:
        return n
    best = max(d for d in range(1, largest + 1) if n % d == 0)
    return best if best * 8 >= largest else n


def clip_ratios(grid: int) -> jax.Array:
    """The clipping ratios searched: ``grid`` even steps from 1 down to 0.5 (1: only 1).

    Example:
        >>> clip_ratios(3).tolist(), clip_ratios(1).tolist()
        ([1.0, 0.75, 0.5], [1.0])
    """
    if grid == 1:
        return jnp.ones(1, jnp.float32)
    return jnp.linspace(1.0, 0.5, grid, dtype=jnp.float32)


def awq_search(
    weight: jax.Array,
    gram: jax.Array,
    *,
    fan_in: int,
    axis: int | None,
    group_size: int | None,
    symmetric: bool,
    grid: int,
    clip_grid: int,
    scale_dtype: Any,
    quantize: Callable[[jax.Array], tuple],
    decode: Callable[..., jax.Array],
) -> tuple[tuple, dict]:
    """The search of one weight (see the module docstring): the winner and its statistics.

    Runs under ``jit``; the search is one :func:`jax.lax.fori_loop` that keeps only
    losses and ratios, so memory is a few copies of the weight whatever the grids.

    Args:
        weight: the weight, any shape; its first ``fan_in`` axes are the inputs.
        gram: the ``(m, m)`` Gram of those inputs, ``m`` the product of their sizes.
        fan_in: how many leading axes of ``weight`` are inputs.
        axis: the quantizer's channel axis (``None``: per tensor).
        group_size: the quantizer's group size along the other axes (``None``: one group).
        symmetric: whether the quantizer's grid is symmetric (how a range is clipped).
        grid: how many values of ``alpha``, evenly spaced on ``[0, 1]`` (1: only 0).
        clip_grid: how many clipping ratios, evenly spaced on ``[1, 0.5]`` (1: none),
            searched coarse to fine (every other one, then the best's neighbours).
        scale_dtype: the dtype the scales are stored (and so used) in.
        quantize: ``quantize(scaled) -> (codes, scale, zero_point)``, the leaf's
            quantizer, applied to ``clip(diag(r)⁻¹ W)`` (float32, the weight's shape).
        decode: ``decode(codes, scale, zero_point)``, the float32 dense values of codes.

    Returns:
        ``((codes, scale, zero_point, r), stats)``: the winning quantizer outputs and
        input scales ``r = 1 / s`` (shaped ``weight.shape[:fan_in]``, in
        ``scale_dtype``), with ``decode(...) * r`` the quantized weight; stats
        ``{"alpha", "clip_ratio", "relative_output_error", "rtn_relative_output_error"}``:
        the winner's ``alpha`` and mean clipping ratio, and the relative output errors
        ``√(tr(Eᵀ G E) / tr(Wᵀ G W))`` of the winner and of round to nearest, the first
        never above the second.

    Example:
        >>> import jax.numpy as jnp
        >>> w = jnp.array([[0.1, -0.2], [3.0, 1.0]])
        >>> q = lambda v: (jnp.round(v * 4), None, None)
        >>> (_, _, _, r), stats = awq_search(w, jnp.diag(jnp.array([100.0, 1.0])), fan_in=1,
        ...     axis=None, group_size=None, symmetric=True, grid=3, clip_grid=1,
        ...     scale_dtype=jnp.float32, quantize=q, decode=lambda c, s, z: c / 4)
        >>> float(stats["alpha"]), [round(v, 4) for v in r.tolist()]  # s = √10 and 1/√10
        (1.0, [0.3162, 3.1623])
        >>> bool(stats["relative_output_error"] < stats["rtn_relative_output_error"])
        True
    """
    shape = tuple(weight.shape)
    m = math.prod(shape[:fan_in])
    w = weight.astype(jnp.float32)
    matrix = w.reshape(m, -1)
    n = matrix.shape[1]
    g = gram.astype(jnp.float32)
    magnitudes = input_magnitudes(g)
    alphas = jnp.linspace(0.0, 1.0, grid, dtype=jnp.float32) if grid > 1 else jnp.zeros(1)
    # Clipping is per quantization group; it is searched where a group is a run of one
    # output column's inputs, so that its loss is a sum of the column's block losses.
    # A shorter last group (a group size that does not divide ``m``) is not clipped: the
    # block objective needs whole groups, so such a layout keeps the full range.
    whole = m % min(group_size or m, m) == 0
    columns = (
        whole
        and axis is not None
        and fan_in == len(shape) - 1
        and axis % len(shape) == len(shape) - 1
    )
    group = min(group_size or m, m) if columns else m
    block = block_size(m, group)
    blocks = gram_blocks(g, block)
    clip = columns and clip_grid > 1
    ratios = clip_ratios(clip_grid if clip else 1)
    groups = m // group
    # Where each output column is quantized on its own, every candidate is evaluated on
    # `width` columns at a time: one compiled body for the whole search, whatever n.
    width = chunk_width(n) if columns else n
    chunks = n // width
    view = (shape[:-1] + (width,)) if columns else shape
    # sources[0]: evenly spread columns for alpha (one number for all columns, and the
    # objective a sum over them); sources[1 + j]: the j-th chunk of columns.
    spread = matrix[:, (jnp.arange(width) * n) // width]
    sources = jnp.concatenate([spread[None], matrix.reshape(m, chunks, width).transpose(1, 0, 2)])

    def inverse(alpha):
        return inverse_scales(magnitudes, alpha, scale_dtype)

    def candidate(alpha, ratio, base):
        """``Ŵ − W`` (m, width) of one candidate on ``base`` (m, width) columns."""
        r = inverse(alpha)
        scaled = base / r.astype(jnp.float32)[:, None]
        if clip:  # a ratio of 1 leaves a group exactly as it was
            scaled = clip_groups(scaled, ratio, group=group, symmetric=symmetric)
        codes, scale, zero = quantize(scaled.reshape(view))
        # What Quantized.materialize gives, in the weight's dtype.
        restored = scale_inputs(decode(codes, scale, zero), r.reshape(shape[:fan_in]))
        restored = restored.astype(weight.dtype).astype(jnp.float32).reshape(m, width)
        return restored - base, (codes, scale, zero)

    # The steps: `alpha_steps` alphas on sources[0]; then each clipping ratio on each
    # chunk; then round to nearest and the search's pick on each chunk, by the full
    # objective. Strict < everywhere: ties keep the earlier (smaller alpha, larger
    # ratio, round to nearest).
    alpha_steps = grid if grid > 1 else 0
    # Clipping, coarse to fine: every other ratio of the grid (and its last), then each
    # group's two grid neighbours of its best so far.
    count = ratios.shape[0]
    coarse = jnp.asarray(sorted(set(range(0, count, 2)) | {count - 1}), jnp.int32)
    trials = coarse.shape[0] + (2 if count > 2 else 0)
    clip_steps = trials * chunks if clip else 0
    final_start = alpha_steps + clip_steps

    # Step 3 keeps both options' quantizer outputs, chunk by chunk along their last
    # axis (the output columns' where there are several chunks): no second quantizer.
    whole = jax.eval_shape(quantize, jax.ShapeDtypeStruct(shape, jnp.float32))
    kept = jax.tree.map(lambda x: jnp.zeros((2, *x.shape), x.dtype), whole)

    def keep(buffer, value, option, start, write):
        index = (option,) + (0,) * (value.ndim - 1) + (start,)
        old = lax.dynamic_slice(buffer, index, (1, *value.shape))
        return lax.dynamic_update_slice(buffer, jnp.where(write, value[None], old), index)

    def step(t, state):
        alpha_loss, best_alpha, best_loss, best_ratio, totals, kept = state
        in_alpha, in_final = t < alpha_steps, t >= final_start
        k = jnp.where(in_final, t - final_start, t - alpha_steps)
        option, chunk = k // chunks, k % chunks  # option: a ratio, or 0 (RTN) / 1 (pick)
        start = chunk * width
        rtn = in_final & (option == 0)
        alpha = jnp.where(in_alpha, alphas[jnp.minimum(t, grid - 1)], best_alpha)
        alpha = jnp.where(rtn, 0.0, alpha)
        chosen = lax.dynamic_slice_in_dim(best_ratio, start, width, axis=1)
        # Which grid index each group tries: a coarse one, or a neighbour of its best.
        best_index = jnp.round((1.0 - chosen) * (count - 1) * 2.0).astype(jnp.int32)
        # The second neighbour is the coarse best's, whether or not the first one won.
        on_coarse = (best_index % 2 == 0) | (best_index == count - 1)
        centre = jnp.where((option == coarse.shape[0]) | on_coarse, best_index, best_index + 1)
        shift = jnp.where(option == coarse.shape[0], -1, 1)
        index = jnp.where(
            option < coarse.shape[0],
            coarse[jnp.clip(option, 0, coarse.shape[0] - 1)],
            jnp.clip(centre + shift, 0, count - 1),
        )
        trial = ratios[index]
        ratio = jnp.where(in_final, jnp.where(rtn, 1.0, chosen), trial)
        base = sources[jnp.where(in_alpha, 0, 1 + chunk)]
        error, payload = candidate(alpha, ratio, base)
        where = jnp.clip(option, 0, 1)
        kept = jax.tree.map(lambda b, v: keep(b, v, where, start, in_final), kept, payload)
        losses = block_losses(error, blocks).reshape(groups, group // block, width).sum(axis=1)
        # 1. alpha by the block objective on the spread columns.
        better = in_alpha & (jnp.sum(losses) < alpha_loss)
        alpha_loss = jnp.where(better, jnp.sum(losses), alpha_loss)
        best_alpha = jnp.where(better, alpha, best_alpha)
        # 2. a ratio per group and column, by the group's block objective.
        old = lax.dynamic_slice_in_dim(best_loss, start, width, axis=1)
        wins = (~in_alpha & ~in_final) & (losses < old)
        best_loss = lax.dynamic_update_slice_in_dim(
            best_loss, jnp.where(wins, losses, old), start, axis=1
        )
        best_ratio = lax.dynamic_update_slice_in_dim(
            best_ratio, jnp.where(wins, ratio, chosen), start, axis=1
        )
        # 3. the full objective tr(Eᵀ G E), an (m, m) @ (m, width) product: final steps only.
        full = lax.cond(
            in_final,
            lambda e: jnp.sum(e * jnp.dot(g, e, precision=_HIGHEST)),
            lambda e: jnp.float32(0.0),
            error,
        )
        totals = totals.at[where].add(jnp.where(in_final, full, 0.0))
        return alpha_loss, best_alpha, best_loss, best_ratio, totals, kept

    unclipped = jnp.ones((groups, n), jnp.float32)
    state = (
        jnp.float32(jnp.inf),
        jnp.float32(0.0),
        jnp.full((groups, n), jnp.inf),
        unclipped,
        jnp.zeros(2, jnp.float32),
        kept,
    )
    _, best_alpha, _, chosen_ratio, totals, kept = lax.fori_loop(
        0, final_start + 2 * chunks, step, state
    )
    denominator = jnp.sum(matrix * jnp.dot(g, matrix, precision=_HIGHEST))
    # Strict: a tie keeps round to nearest.
    won = totals[1] < totals[0]
    alpha = jnp.where(won, best_alpha, 0.0)
    ratio = jnp.where(won, chosen_ratio, 1.0)
    r = inverse(alpha)
    codes, scale, zero = jax.tree.map(lambda b: jnp.where(won, b[1], b[0]), kept)
    stats = {
        "alpha": alpha,
        "clip_ratio": jnp.mean(ratio),
        "relative_output_error": _relative(jnp.where(won, totals[1], totals[0]), denominator),
        "rtn_relative_output_error": _relative(totals[0], denominator),
    }
    return (codes, scale, zero, r.reshape(shape[:fan_in])), stats
