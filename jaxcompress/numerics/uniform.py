"""The one uniform quantizer: codes, scales and zero points of an array.

For ``b`` bits:

* **symmetric**: ``q = clip(round(w / s), -2**(b-1), 2**(b-1) - 1)``, stored as the
  unsigned code ``q + 2**(b-1)`` and decoded as ``(code - 2**(b-1)) * s``: all ``2**b``
  levels, with code ``2**(b-1)`` an exact zero. The grid has one more level on the
  negative side of ``q``, and the scale's sign puts it on the side of the group's
  largest magnitude: ``s = -w_max / 2**(b-1)`` when that entry is positive, so it is
  code 0 exactly. The scale is the smallest ``|s|`` whose grid holds the clipping range
  ``[low, high]`` (which always contains 0) to within half a step: the long side ends
  on its extreme level, ``2**(b-1)`` steps out, and the short side's end may lie up to
  ``2**(b-1) - 1/2`` steps out, where it rounds to its extreme level with at most
  half a step's error, as every other entry does; with ``calibration="absmax"`` a
  group keeps the older ``2**b - 1``-level step ``max|w| / (2**(b-1) - 1)`` where that
  rounds it with less squared error, so no group is worse than on that grid
  (``calibration="mse"`` weighs that step against its searched ones too). (Files
  written before this grid never use code 0 and have positive scales: they decode as
  they always did.)
* **asymmetric**: ``code = clip(round(w / s + z), 0, 2**b - 1)`` with a per-scale zero
  point ``z``; decoded as ``(code - z) * s``. ``2**b`` levels. The zero point is stored
  as a float in the scale dtype, so the grid may sit "midrise" (no level at zero),
  as the best uniform quantizer of a symmetric distribution does.

Codes are computed with the stored (rounded) scale and zero point, so the round-trip
error is at most ``|s| / 2`` per entry inside the clipping range for the stored ``s``.
An entry counts as clipped (and gets no gradient in quantization-aware training) only
where it lies more than half a step past the extreme level (see :func:`encode`):
rounding to the extreme level is rounding, not clipping.
A constant group (zero range) gets ``s = |c|`` (or 1 for ``c == 0``) and decodes
exactly; nothing is ever divided by zero.

Non-finite entries reach the quantizer only under ``jit`` (eager callers refuse them).
There each group's scale and zero point come from its finite entries (a NaN or Inf
counts as the group's smallest finite value), the entry gets no gradient, and with
``poison=True`` the scale of every group holding one is NaN, since no integer code can
stand for NaN. :func:`jaxcompress.quantize`, GPTQ and
:func:`jaxcompress.training.fake_quant` all round with it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.arrays.quantized import from_groups, group_layout, group_mask, ragged, to_groups
from jaxcompress.core.checks import is_traced
from jaxcompress.core.mesh import unsharded

# Clipping ratios searched by calibration="mse", largest first so ties keep more range.
_MSE_RATIOS = np.linspace(1.0, 0.01, 100, dtype=np.float32)


def encode(v, scale, zero, bits: int, *, scale_dtype=np.float32):
    """Unsigned codes (as float32) of ``v``, and where rounding needed no clipping.

    ``zero=None`` is the symmetric grid, else ``zero`` is the zero point. An entry needs
    no clipping when it lies at most half a step past the grid's extreme level (so it
    rounds to that level as an entry inside rounds to its nearest one), give or take
    the rounding of a scale (and zero point) stored in ``scale_dtype``: a margin of
    ``eps(scale_dtype)`` per level from zero, so the end of a range whose unrounded
    scale put it exactly half a step out still counts.

    Example:
        >>> import jax.numpy as jnp
        >>> codes, inside = encode(jnp.array([-2.0, 0.4, 1.5, 5.0]), 1.0, None, 2)
        >>> codes.tolist(), inside.tolist()
        ([0.0, 2.0, 3.0, 3.0], [True, True, True, False])
    """
    eps = float(jnp.finfo(scale_dtype).eps)
    if zero is None:
        half = 2 ** (bits - 1)
        steps = v / scale
        clipped = jnp.clip(jnp.round(steps), -half, half - 1)
        return clipped + half, jnp.abs(steps - clipped) <= 0.5 + half * eps
    steps = v / scale + zero
    clipped = jnp.clip(jnp.round(steps), 0, 2**bits - 1)
    return clipped, jnp.abs(steps - clipped) <= 0.5 + 2**bits * eps


def decode(codes, scale, zero, bits: int):
    """The values that :func:`encode`'s ``codes`` stand for (``zero=None``: symmetric).

    Example:
        >>> import jax.numpy as jnp
        >>> decode(jnp.array([1.0, 2.0, 3.0]), 0.5, None, 2).tolist()
        [-0.5, 0.0, 0.5]
    """
    offset = 2 ** (bits - 1) if zero is None else zero
    return (codes - offset) * scale


def _signed_scale(low, high, *, bits: int):
    """The symmetric grid's scale for a range ``low <= 0 <= high``, held to half a step.

    The grid spans ``[-2**(b-1), 2**(b-1) - 1]`` steps; a negative scale mirrors it, so
    the longer side covers the range's larger end. The long side's end sits on its
    extreme level (``2**(b-1)`` steps); the short side's may sit ``2**(b-1) - 1/2``
    steps out, half a step past its extreme level, where it rounds to that level with
    no more error than any entry inside. Of the two orientations, the one with the
    smaller step (the positive one on a tie: ``max|w| / (2**(b-1) - 1/2)`` for a range
    symmetric about 0).
    """
    # Multiplying by 1/levels (not dividing) gives the same float eagerly and under jit,
    # where XLA rewrites a division by a constant; QAT then converts with no drift.
    long_side = np.float32(1.0 / 2 ** (bits - 1))
    short_side = np.float32(1.0 / (2 ** (bits - 1) - 0.5))
    negative_long = jnp.maximum(-low * long_side, high * short_side)
    positive_long = jnp.maximum(high * long_side, -low * short_side)
    return jnp.where(negative_long <= positive_long, negative_long, -positive_long)


def _scale_zero(low, high, *, bits: int, symmetric: bool, scale_dtype):
    """Stored (rounded to ``scale_dtype``) scale and zero point for a clipping range."""
    if symmetric:
        scale = _signed_scale(low, high, bits=bits)
    else:
        scale = (high - low) * np.float32(1.0 / (2**bits - 1))
    scale = scale.astype(scale_dtype).astype(jnp.float32)
    # A zero scale only arises for a zero range; the caller overrides those groups.
    scale = jnp.where(scale != 0, scale, jnp.ones_like(scale))
    if symmetric:
        return scale, None
    zero = (-low / scale).astype(scale_dtype).astype(jnp.float32)
    return scale, zero


def _clip_range(v, axes, *, symmetric: bool, calibration: str, percentile: float):
    """``(low, high)`` clipping range per group; a symmetric one always holds 0."""
    if calibration == "percentile":
        low = jnp.percentile(v, 100.0 - percentile, axis=axes, keepdims=True)
        high = jnp.percentile(v, percentile, axis=axes, keepdims=True)
    else:
        low = jnp.min(v, axis=axes, keepdims=True)
        high = jnp.max(v, axis=axes, keepdims=True)
    if symmetric:
        return jnp.minimum(low, 0.0), jnp.maximum(high, 0.0)
    return low, high


def _shrink(low, high, ratio, *, symmetric: bool):
    """The range ``[low, high]`` narrowed by ``ratio``: about 0 if symmetric, else its centre."""
    if symmetric:
        return ratio * low, ratio * high
    center, half = (low + high) / 2, (high - low) / 2
    return center - ratio * half, center + ratio * half


def _squared_error(v, axes, scale, zero, bits: int, valid=None):
    """Per group, the squared error of rounding ``v`` to the grid of ``scale`` and ``zero``.

    Entries where ``valid`` is false (padding of a short last group) count nothing.
    """
    codes = encode(v, scale, zero, bits)[0]
    error = jnp.square(decode(codes, scale, zero, bits) - v)
    if valid is not None:
        error = jnp.where(valid, error, 0.0)
    return jnp.sum(error, axis=axes, keepdims=True)


def _old_step(low, high, *, bits: int, scale_dtype):
    """The ``2**b - 1``-level grid's stored step ``max|w| / (2**(b-1) - 1)`` (never 0)."""
    old = jnp.maximum(-low, high) * np.float32(1.0 / (2 ** (bits - 1) - 1))
    old = old.astype(scale_dtype).astype(jnp.float32)
    return jnp.where(old != 0, old, jnp.ones_like(old))


def _never_above_old_grid(v, axes, scale, low, high, *, bits: int, scale_dtype, valid=None):
    """``scale``, or per group the old grid's ``max|w| / (2**(b-1) - 1)`` where that rounds better.

    The old step leaves the range unclipped. The finer step of ``scale`` almost always wins, but
    not for every group (at 8 bits the steps differ by under 1 %), and keeping the
    better of the two makes no group's error exceed the 2**b - 1-level grid's.
    """
    old = _old_step(low, high, bits=bits, scale_dtype=scale_dtype)
    worse = _squared_error(v, axes, old, None, bits, valid) < _squared_error(
        v, axes, scale, None, bits, valid
    )
    return jnp.where(worse, old, scale)


def _mse_ratio(v, axes, low, high, *, bits: int, symmetric: bool, scale_dtype, valid=None):
    """Per group, the clipping ratio in ``_MSE_RATIOS`` with the least squared error."""

    def error(ratio):
        scale, zero = _scale_zero(
            *_shrink(low, high, ratio, symmetric=symmetric),
            bits=bits,
            symmetric=symmetric,
            scale_dtype=scale_dtype,
        )
        return _squared_error(v, axes, scale, zero, bits, valid)

    ratios = jnp.asarray(_MSE_RATIOS)

    # A running best per group: memory stays a few copies of the weight, and the
    # carry is shaped like the scales, so it shards like them (lax.map's stacked
    # errors do not, under Explicit mesh axes).
    def consider(i, best):
        best_error, best_ratio = best
        candidate = error(ratios[i])
        better = candidate < best_error  # strict: ties keep the larger ratio
        return jnp.where(better, candidate, best_error), jnp.where(better, ratios[i], best_ratio)

    first = error(ratios[0])
    start = (first, jnp.full(first.shape, ratios[0], first.dtype))
    return jax.lax.fori_loop(1, ratios.shape[0], consider, start)[1]


def _stand_in(v: jax.Array, axes: tuple[int, ...], usable: jax.Array) -> jax.Array:
    """``v`` with each entry not ``usable`` replaced by its group's smallest usable value.

    That value changes no group's minimum, maximum or constancy; a group with no
    usable entry gets zeros.
    """
    low = jnp.min(jnp.where(usable, v, jnp.inf), axis=axes, keepdims=True)
    low = jnp.where(jnp.isfinite(low), low, jnp.zeros_like(low))
    return jnp.where(usable, v, low)


def quantize_view(
    v: jax.Array,
    axes: tuple[int, ...],
    *,
    bits: int,
    symmetric: bool,
    calibration: str,
    percentile: float,
    scale_dtype,
    poison: bool = False,
    valid: jax.Array | np.ndarray | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array | None, jax.Array]:
    """Quantizes ``v`` with one scale per slice reduced over ``axes``.

    Under ``jit`` a NaN or Inf is left out of its group's scale (see the module
    docstring); ``poison=True`` makes that group's scale NaN. ``valid`` (broadcasting
    against ``v``) marks the real entries of a padded view: the others (the padding
    of a short last group) take no part in any scale, zero point or error, and their
    codes mean nothing.

    Returns:
        ``(codes, scale, zero_point, inside)``: uint8 codes shaped like ``v``; scale (in
        ``scale_dtype``) and zero point (``None`` if symmetric) with ``axes`` kept as 1;
        and where rounding needed no clipping (where quantization-aware training lets
        the gradient through).

    Example:
        >>> import jax.numpy as jnp
        >>> codes, scale, zero, inside = quantize_view(jnp.array([[-1.0, 0.5, 1.0]]), (0, 1),
        ...     bits=2, symmetric=True, calibration="absmax", percentile=99.9,
        ...     scale_dtype=jnp.float32)
        >>> codes.tolist(), scale.tolist(), zero, bool(inside.all())
        ([[1, 2, 3]], [[1.0]], None, True)
    """
    v = v.astype(jnp.float32)
    # Eager callers have refused non-finite leaves already; only traced ones can hold any.
    finite = None
    if is_traced(v):
        finite = jnp.isfinite(v)
        if valid is not None:
            finite = finite | ~valid  # padding is never a non-finite entry
    usable = finite if valid is None else valid if finite is None else finite & valid
    if usable is not None:
        v = _stand_in(v, axes, jnp.asarray(usable))
    if calibration == "percentile":
        # Quantiles sort across each group, which Explicit mesh axes refuse when sharded.
        v = unsharded(v)
    if calibration == "percentile" and valid is not None:
        # Padding stands for no entry: the quantiles of each group's real entries.
        masked = jnp.where(valid, v, jnp.nan)
        low = jnp.nanpercentile(masked, 100.0 - percentile, axis=axes, keepdims=True)
        high = jnp.nanpercentile(masked, percentile, axis=axes, keepdims=True)
        if symmetric:
            low, high = jnp.minimum(low, 0.0), jnp.maximum(high, 0.0)
    else:
        low, high = _clip_range(
            v, axes, symmetric=symmetric, calibration=calibration, percentile=percentile
        )
    full_low, full_high = low, high
    if calibration == "mse":
        ratio = _mse_ratio(
            v,
            axes,
            low,
            high,
            bits=bits,
            symmetric=symmetric,
            scale_dtype=scale_dtype,
            valid=valid,
        )
        low, high = _shrink(low, high, ratio, symmetric=symmetric)
    scale, zero = _scale_zero(low, high, bits=bits, symmetric=symmetric, scale_dtype=scale_dtype)
    if symmetric and calibration in ("absmax", "mse"):
        # mse considers the old grid's step too, so it never loses to absmax.
        scale = _never_above_old_grid(
            v,
            axes,
            scale,
            full_low,
            full_high,
            bits=bits,
            scale_dtype=scale_dtype,
            valid=valid,
        )
    if calibration == "percentile":
        # A percentile can be zero for a mostly-zero group; then use the full range.
        full_low, full_high = _clip_range(
            v, axes, symmetric=symmetric, calibration="absmax", percentile=percentile
        )
        full_scale, full_zero = _scale_zero(
            full_low, full_high, bits=bits, symmetric=symmetric, scale_dtype=scale_dtype
        )
        narrow = high - low <= 0
        scale = jnp.where(narrow, full_scale, scale)
        zero = None if symmetric else jnp.where(narrow, full_zero, zero)
    # A constant group decodes exactly as code offset +-1 (or 0) times s = |c|.
    minimum = jnp.min(v, axis=axes, keepdims=True)
    constant = minimum == jnp.max(v, axis=axes, keepdims=True)
    exact_scale = jnp.where(minimum != 0, jnp.abs(minimum), jnp.ones_like(minimum))
    scale = jnp.where(constant, exact_scale.astype(scale_dtype).astype(jnp.float32), scale)
    if not symmetric:
        exact_zero = jnp.where(minimum < 0, jnp.ones_like(minimum), jnp.zeros_like(minimum))
        zero = jnp.where(constant, exact_zero, zero)
    codes, inside = encode(v, scale, zero, bits, scale_dtype=scale_dtype)
    if finite is not None:
        inside = inside & finite
        if poison:
            holds_non_finite = ~jnp.all(finite, axis=axes, keepdims=True)
            scale = jnp.where(holds_non_finite, jnp.nan, scale)
    zero = None if zero is None else zero.astype(scale_dtype)
    return codes.astype(jnp.uint8), scale.astype(scale_dtype), zero, inside


def quantize_codes(
    weight: jax.Array,
    *,
    bits: int,
    axis: int | None,
    group_size: int | None,
    symmetric: bool,
    calibration: str,
    percentile: float,
    scale_dtype,
    poison: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array | None, jax.Array]:
    """The one quantizer: unpacked codes, scales and zero points of one array.

    Both :func:`quantize` (which packs the codes) and
    :func:`jaxcompress.training.fake_quant` (which decodes them straight away) call
    this, so a model trained with fake quantization converts without drift.
    ``poison=True`` gives a NaN scale to each group holding a NaN or Inf under ``jit``
    (see the module docstring).

    Returns:
        ``(codes, scale, zero_point, inside)``: uint8 codes shaped like ``weight``;
        scale and zero point (``None`` if symmetric) shaped ``(G, C)`` (see
        :func:`~jaxcompress.arrays.quantized.group_layout`; when ``group_size`` does
        not divide the entries per channel, the last group's scale comes from its
        fewer entries alone); and a boolean mask, shaped
        like ``weight``, of the entries whose rounded code needed no clipping.

    Example:
        >>> import jax.numpy as jnp
        >>> codes, scale, zero, inside = quantize_codes(jnp.array([[-1.0, 0.5], [1.0, 0.0]]),
        ...     bits=2, axis=None, group_size=None, symmetric=True, calibration="absmax",
        ...     percentile=99.9, scale_dtype=jnp.float32)
        >>> codes.tolist(), scale.tolist(), zero, bool(inside.all())
        ([[1, 2], [3, 2]], [[1.0]], None, True)
    """
    if not is_traced(weight):
        # One compiled program per shape and options, reused across leaves and calls,
        # instead of dozens of op-by-op dispatches per leaf.
        return _quantize_codes_compiled(
            weight,
            bits=bits,
            axis=axis,
            group_size=group_size,
            symmetric=symmetric,
            calibration=calibration,
            percentile=percentile,
            scale_dtype=scale_dtype,
            poison=poison,
        )
    shape = tuple(weight.shape)
    groups, _, channels = group_layout(shape, axis, group_size)
    options = dict(
        bits=bits,
        symmetric=symmetric,
        calibration=calibration,
        percentile=percentile,
        scale_dtype=scale_dtype,
        poison=poison,
    )
    if groups == 1:
        # Reduce in place over every axis but the channel one: no reshape of the weight.
        axes = tuple(d for d in range(len(shape)) if d != axis)
        codes, scale, zero, inside = quantize_view(weight, axes, **options)
    else:
        view = to_groups(weight, axis, group_size)
        # A short last group is padded; its scale comes from its real entries only.
        valid = group_mask(shape, axis, group_size) if ragged(shape, axis, group_size) else None
        codes, scale, zero, inside = quantize_view(view, (1,), valid=valid, **options)
        codes = from_groups(codes, shape, axis)
        inside = from_groups(inside, shape, axis)
    scale = scale.reshape(groups, channels)
    zero = None if zero is None else zero.reshape(groups, channels)
    return codes, scale, zero, inside


_quantize_codes_compiled = jax.jit(
    quantize_codes,
    static_argnames=(
        "bits",
        "axis",
        "group_size",
        "symmetric",
        "calibration",
        "percentile",
        "scale_dtype",
        "poison",
    ),
)


# Entries per block of quantize_with_errors' error pass (a 1 MiB float32 block).
_BLOCK_ENTRIES = 256 * 1024


def fused_layout(shape, dtype, *, axis, group_size, symmetric, calibration) -> bool:
    """Whether :func:`quantize_with_errors` takes a leaf: see there.

    Example:
        >>> fused_layout((8, 4), jnp.float32, axis=1, group_size=None, symmetric=True,
        ...     calibration="absmax")
        True
    """
    shape = tuple(shape)
    return (
        symmetric
        and calibration == "absmax"
        and np.dtype(dtype) == np.float32
        and len(shape) > 0
        and (axis is None or axis == len(shape) - 1)
        and not ragged(shape, axis, group_size)
    )


def quantize_with_errors(
    weight: jax.Array, *, bits: int, axis: int | None, group_size: int | None, scale_dtype
) -> tuple[jax.Array, jax.Array, dict]:
    """Symmetric absmax codes and scales of a finite float32 array, with their error stats.

    The codes and scales are :func:`quantize_codes`' bit for bit (``symmetric=True``,
    ``calibration="absmax"``), computed in fewer passes over the weight: one for the
    ranges, one (blockwise) for both candidate grids' errors, one for the codes. The
    error stats come from that same pass (the chosen grid's squared and largest error)
    instead of decoding the result again. Only for layouts :func:`fused_layout` accepts
    (channel axis last or none, no short last group) and for finite entries (the caller
    has checked them); use it inside ``jit``.

    Returns:
        ``(codes, scale, stats)``: uint8 codes shaped like ``weight``; ``(G, C)`` scales
        in ``scale_dtype``; ``{"relative_error", "max_abs_error"}`` of the decoded codes
        against ``weight`` (float32 scalars, within float32 rounding of summing the
        differences elementwise).

    Example:
        >>> import jax.numpy as jnp
        >>> codes, scale, stats = quantize_with_errors(jnp.array([[-1.0, 0.5], [1.0, 0.0]]),
        ...     bits=2, axis=None, group_size=None, scale_dtype=jnp.float32)
        >>> codes.tolist(), scale.tolist(), round(float(stats["relative_error"]), 4)
        ([[1, 2], [3, 2]], [[1.0]], 0.3333)
    """
    shape = tuple(weight.shape)
    groups, size, channels = group_layout(shape, axis, group_size)
    v = weight.astype(jnp.float32).reshape(groups, size, channels)
    low = jnp.minimum(jnp.min(v, axis=1, keepdims=True), 0.0)
    high = jnp.maximum(jnp.max(v, axis=1, keepdims=True), 0.0)
    scale, _ = _scale_zero(low, high, bits=bits, symmetric=True, scale_dtype=scale_dtype)
    old = _old_step(low, high, bits=bits, scale_dtype=scale_dtype)

    # Blocks of whole groups, or of rows of one group: (steps, rows, C) slabs, so that
    # each block's temporaries stay small (XLA:CPU does not fuse an elementwise producer
    # into a reduction: a whole-leaf pass would write, and page in, leaf-sized buffers).
    rows = max(1, min(size, _BLOCK_ENTRIES // channels))
    while size % rows:
        rows -= 1
    per_group = size // rows
    slabs = v.reshape(groups * per_group, rows, channels)
    candidates = jnp.repeat(jnp.concatenate([scale, old], axis=1), per_group, axis=0)

    def errors(_, slab_and_scales):
        slab, scales = slab_and_scales
        out = []
        for s in (scales[:1], scales[1:]):
            diff = decode(encode(slab, s, None, bits)[0], s, None, bits) - slab
            out += [jnp.sum(jnp.square(diff), axis=0), jnp.max(jnp.abs(diff), axis=0)]
        return None, tuple(out)

    _, (new_sq, new_max, old_sq, old_max) = jax.lax.scan(errors, None, (slabs, candidates))

    def by_group(x, reduce):
        return reduce(x.reshape(groups, per_group, channels), axis=1, keepdims=True)

    new_sq, old_sq = by_group(new_sq, jnp.sum), by_group(old_sq, jnp.sum)
    new_max, old_max = by_group(new_max, jnp.max), by_group(old_max, jnp.max)
    worse = old_sq < new_sq  # as _never_above_old_grid
    scale = jnp.where(worse, old, scale)
    group_sq = jnp.where(worse, old_sq, new_sq)
    group_max = jnp.where(worse, old_max, new_max)
    # A constant group decodes as code offset +-1 (or 0) times s = |c| (as quantize_view).
    minimum = jnp.min(v, axis=1, keepdims=True)
    constant = minimum == jnp.max(v, axis=1, keepdims=True)
    exact = jnp.where(minimum != 0, jnp.abs(minimum), jnp.ones_like(minimum))
    exact = exact.astype(scale_dtype).astype(jnp.float32)
    scale = jnp.where(constant, exact, scale)
    exact_error = jnp.abs(
        decode(encode(minimum, exact, None, bits)[0], exact, None, bits) - minimum
    )
    group_sq = jnp.where(constant, size * jnp.square(exact_error), group_sq)
    group_max = jnp.where(constant, exact_error, group_max)
    codes = encode(v, scale, None, bits)[0].astype(jnp.uint8).reshape(shape)
    norm = jnp.sqrt(jnp.sum(jnp.square(v)))  # one reduction straight off the weight
    safe = jnp.where(norm > 0, norm, jnp.ones_like(norm))
    relative = jnp.where(norm > 0, jnp.sqrt(jnp.sum(group_sq)) / safe, 0.0)
    stats = {"relative_error": relative, "max_abs_error": jnp.max(group_max)}
    return codes, scale.reshape(groups, channels).astype(scale_dtype), stats
