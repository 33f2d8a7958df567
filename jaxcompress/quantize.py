"""Linear (uniform) quantization into :class:`~jaxcompress.Quantized` leaves.

Layout and arithmetic, for ``b`` bits:

* **symmetric**: ``q = clip(round(w / s), -(2**(b-1) - 1), 2**(b-1) - 1)``, stored as the
  unsigned code ``q + 2**(b-1)`` (so code 0 is unused and zero is exact); decoded as
  ``(code - 2**(b-1)) * s``. ``2**b - 1`` levels.
* **asymmetric**: ``code = clip(round(w / s + z), 0, 2**b - 1)`` with a per-scale zero
  point ``z``; decoded as ``(code - z) * s``. ``2**b`` levels. The zero point is stored
  as a float in the scale dtype, so the grid may sit "midrise" (no level at zero),
  as the best uniform quantizer of a symmetric distribution does.

Codes are computed with the stored (rounded) scale and zero point, so the round-trip
error is at most ``s / 2`` per entry inside the clipping range for the stored ``s``.
A constant group (zero range) gets ``s = |c|`` (or 1 for ``c == 0``) and decodes
exactly; nothing is ever divided by zero.
"""

from __future__ import annotations

import functools
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress._validate import check_values_to_compress
from jaxcompress.arrays import Quantized, Sparse
from jaxcompress.arrays.quantized import from_groups, group_layout, to_groups
from jaxcompress.bitpack import pack
from jaxcompress.filters import Filter, kernels
from jaxcompress.sharding import named_sharding_of, place_like, unsharded
from jaxcompress.transforms import Transform, select_leaves

_CALIBRATIONS = ("absmax", "percentile", "mse")
_SCALE_DTYPES = (np.dtype(jnp.float32), np.dtype(jnp.float16), np.dtype(jnp.bfloat16))
# Clipping ratios searched by calibration="mse", largest first so ties keep more range.
_MSE_RATIOS = np.linspace(1.0, 0.01, 100, dtype=np.float32)


def _is_int(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _encode(v, scale, zero, bits: int):
    """Unsigned codes (as float32) of ``v``, and where rounding needed no clipping."""
    if zero is None:
        qmax = 2 ** (bits - 1) - 1
        raw = jnp.round(v / scale)
        clipped = jnp.clip(raw, -qmax, qmax)
        return clipped + 2 ** (bits - 1), raw == clipped
    raw = jnp.round(v / scale + zero)
    clipped = jnp.clip(raw, 0, 2**bits - 1)
    return clipped, raw == clipped


def _decode(codes, scale, zero, bits: int):
    offset = 2 ** (bits - 1) if zero is None else zero
    return (codes - offset) * scale


def _scale_zero(low, high, *, bits: int, symmetric: bool, scale_dtype):
    """Stored (rounded to ``scale_dtype``) scale and zero point for a clipping range."""
    levels = 2 ** (bits - 1) - 1 if symmetric else 2**bits - 1
    # Multiplying by 1/levels (not dividing) gives the same float eagerly and under jit,
    # where XLA rewrites a division by a constant; QAT then converts with no drift.
    inverse = np.float32(1.0 / levels)
    scale = high * inverse if symmetric else (high - low) * inverse
    scale = scale.astype(scale_dtype).astype(jnp.float32)
    # A zero scale only arises for a zero range; the caller overrides those groups.
    scale = jnp.where(scale > 0, scale, jnp.ones_like(scale))
    if symmetric:
        return scale, None
    zero = (-low / scale).astype(scale_dtype).astype(jnp.float32)
    return scale, zero


def _clip_range(v, axes, *, symmetric: bool, calibration: str, percentile: float):
    """``(low, high)`` clipping range per group (``low`` unused when symmetric)."""
    if calibration == "percentile":
        if symmetric:
            high = jnp.percentile(jnp.abs(v), percentile, axis=axes, keepdims=True)
            return -high, high
        low = jnp.percentile(v, 100.0 - percentile, axis=axes, keepdims=True)
        high = jnp.percentile(v, percentile, axis=axes, keepdims=True)
        return low, high
    low = jnp.min(v, axis=axes, keepdims=True)
    high = jnp.max(v, axis=axes, keepdims=True)
    if symmetric:
        high = jnp.maximum(-low, high)
        return -high, high
    return low, high


def _mse_ratio(v, axes, low, high, *, bits: int, symmetric: bool, scale_dtype):
    """Per group, the clipping ratio in ``_MSE_RATIOS`` with the least squared error."""
    center = (low + high) / 2
    half = (high - low) / 2

    def error(ratio):
        scale, zero = _scale_zero(
            center - ratio * half,
            center + ratio * half,
            bits=bits,
            symmetric=symmetric,
            scale_dtype=scale_dtype,
        )
        codes = _encode(v, scale, zero, bits)[0]
        return jnp.sum(jnp.square(_decode(codes, scale, zero, bits) - v), axis=axes, keepdims=True)

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


def quantize_view(
    v: jax.Array,
    axes: tuple[int, ...],
    *,
    bits: int,
    symmetric: bool,
    calibration: str,
    percentile: float,
    scale_dtype,
) -> tuple[jax.Array, jax.Array, jax.Array | None, jax.Array]:
    """Quantizes ``v`` with one scale per slice reduced over ``axes``.

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
    if calibration == "percentile":
        # Quantiles sort across each group, which Explicit mesh axes refuse when sharded.
        v = unsharded(v)
    low, high = _clip_range(
        v, axes, symmetric=symmetric, calibration=calibration, percentile=percentile
    )
    if calibration == "mse":
        ratio = _mse_ratio(
            v, axes, low, high, bits=bits, symmetric=symmetric, scale_dtype=scale_dtype
        )
        center, half = (low + high) / 2, (high - low) / 2
        low, high = center - ratio * half, center + ratio * half
    scale, zero = _scale_zero(low, high, bits=bits, symmetric=symmetric, scale_dtype=scale_dtype)
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
    codes, inside = _encode(v, scale, zero, bits)
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
) -> tuple[jax.Array, jax.Array, jax.Array | None, jax.Array]:
    """The one quantizer: unpacked codes, scales and zero points of one array.

    Both :func:`quantize` (which packs the codes) and
    :func:`jaxcompress.training.fake_quant` (which decodes them straight away) call
    this, so a model trained with fake quantization converts without drift.

    Returns:
        ``(codes, scale, zero_point, inside)``: uint8 codes shaped like ``weight``;
        scale and zero point (``None`` if symmetric) shaped ``(G, C)`` (see
        :func:`~jaxcompress.arrays.quantized.group_layout`); and a boolean mask, shaped
        like ``weight``, of the entries whose rounded code needed no clipping.

    Example:
        >>> import jax.numpy as jnp
        >>> codes, scale, zero, inside = quantize_codes(jnp.array([[-1.0, 0.5], [1.0, 0.0]]),
        ...     bits=2, axis=None, group_size=None, symmetric=True, calibration="absmax",
        ...     percentile=99.9, scale_dtype=jnp.float32)
        >>> codes.tolist(), scale.tolist(), zero, bool(inside.all())
        ([[1, 2], [3, 2]], [[1.0]], None, True)
    """
    shape = tuple(weight.shape)
    groups, _, channels = group_layout(shape, axis, group_size)
    options = dict(
        bits=bits,
        symmetric=symmetric,
        calibration=calibration,
        percentile=percentile,
        scale_dtype=scale_dtype,
    )
    if groups == 1:
        # Reduce in place over every axis but the channel one: no reshape of the weight.
        axes = tuple(d for d in range(len(shape)) if d != axis)
        codes, scale, zero, inside = quantize_view(weight, axes, **options)
    else:
        view = to_groups(weight, axis, group_size)
        codes, scale, zero, inside = quantize_view(view, (1,), **options)
        codes = from_groups(codes, shape, axis)
        inside = from_groups(inside, shape, axis)
    scale = scale.reshape(groups, channels)
    zero = None if zero is None else zero.reshape(groups, channels)
    return codes, scale, zero, inside


def quantize_array(
    weight: jax.Array,
    *,
    bits: int,
    axis: int | None,
    group_size: int | None,
    symmetric: bool,
    calibration: str,
    percentile: float,
    scale_dtype,
) -> Quantized:
    """Quantizes one array (``axis`` normalized, ``group_size`` already checked).

    Example:
        >>> import jax.numpy as jnp
        >>> q = quantize_array(jnp.array([[0.0, 1.0], [2.0, 3.0]]), bits=8, axis=None,
        ...     group_size=None, symmetric=False, calibration="absmax", percentile=99.9,
        ...     scale_dtype=jnp.float32)
        >>> [[round(v, 4) for v in row] for row in q.materialize().tolist()]
        [[0.0, 1.0], [2.0, 3.0]]
    """
    codes, scale, zero, _ = quantize_codes(
        weight,
        bits=bits,
        axis=axis,
        group_size=group_size,
        symmetric=symmetric,
        calibration=calibration,
        percentile=percentile,
        scale_dtype=scale_dtype,
    )
    return Quantized(
        codes=pack(codes, bits),
        scale=scale,
        zero_point=zero,
        shape=tuple(weight.shape),
        dtype=np.dtype(weight.dtype),
        bits=bits,
        axis=axis,
        group_size=group_size,
    )


def _leaf_layout(name: str, path: str, shape, axis, group_size) -> int | None:
    """The normalized axis for a leaf of ``shape``; raises naming the path if it cannot fit."""
    if axis is not None:
        if not -len(shape) <= axis < len(shape):
            raise ValueError(
                f"{name}: axis={axis} is out of range for leaf {path!r} of shape {tuple(shape)}"
            )
        axis = axis % len(shape)
    if group_size is not None:
        channels = 1 if axis is None else shape[axis]
        contracted = math.prod(shape) // channels
        if contracted % group_size:
            raise ValueError(
                f"{name}: group_size={group_size} does not divide the {contracted} entries per "
                f"channel of leaf {path!r} of shape {tuple(shape)} (axis={axis})"
            )
    return axis


def _error_stats(weight: jax.Array, restored: jax.Array, bits: int) -> dict:
    w = weight.astype(jnp.float32)
    diff = restored.astype(jnp.float32) - w
    norm = jnp.sqrt(jnp.sum(jnp.square(w)))
    safe = jnp.where(norm > 0, norm, jnp.ones_like(norm))
    return {
        "bits": bits,
        "relative_error": jnp.where(norm > 0, jnp.sqrt(jnp.sum(jnp.square(diff))) / safe, 0.0),
        "max_abs_error": jnp.max(jnp.abs(diff)),
    }


def check_options(
    name: str,
    *,
    bits,
    axis,
    group_size,
    symmetric,
    calibration,
    percentile,
    scale_dtype,
) -> dict:
    """Validated, normalized quantizer options (shared by quantize and fake_quant).

    Raises:
        ValueError: naming ``name``, for any option out of range.

    Example:
        >>> import jax.numpy as jnp
        >>> check_options("quantize", bits=4, axis=-1, group_size=None, symmetric=True,
        ...     calibration="absmax", percentile=99.9, scale_dtype=jnp.float32)["bits"]
        4
    """
    if not _is_int(bits) or not 2 <= bits <= 8:
        raise ValueError(f"{name}: bits must be an integer from 2 to 8, got {bits!r}")
    if axis is not None and not _is_int(axis):
        raise ValueError(f"{name}: axis must be an integer or None, got {axis!r}")
    if group_size is not None and (not _is_int(group_size) or group_size < 1):
        raise ValueError(f"{name}: group_size must be a positive integer, got {group_size!r}")
    if calibration not in _CALIBRATIONS:
        raise ValueError(f"{name}: calibration must be one of {_CALIBRATIONS}, got {calibration!r}")
    if (
        isinstance(percentile, bool)
        or not isinstance(percentile, numbers.Real)
        or not 50.0 < float(percentile) <= 100.0
    ):
        raise ValueError(f"{name}: percentile must be in (50, 100], got {percentile!r}")
    try:
        scale_dtype = np.dtype(scale_dtype)
    except TypeError:
        scale_dtype = None
    if scale_dtype not in _SCALE_DTYPES:
        raise ValueError(f"{name}: scale_dtype must be float32, float16 or bfloat16")
    bits, percentile = int(bits), float(percentile)
    group_size = None if group_size is None else int(group_size)
    return dict(
        bits=bits,
        axis=axis,
        group_size=group_size,
        symmetric=bool(symmetric),
        calibration=calibration,
        percentile=percentile,
        scale_dtype=scale_dtype,
    )


def quantize(
    bits: int = 8,
    *,
    axis: int | None = -1,
    group_size: int | None = None,
    symmetric: bool = True,
    calibration: str = "absmax",
    percentile: float = 99.9,
    scale_dtype=jnp.float32,
    where: Filter = kernels,
) -> Transform:
    """Linear quantization of each selected leaf to ``bits``-bit codes.

    Each selected leaf becomes a :class:`~jaxcompress.Quantized` leaf: unsigned codes
    bit-packed along the last axis (so 4-bit codes take half a byte each) plus one
    scale (and, if asymmetric, one zero point) per channel or group. A selected
    :class:`~jaxcompress.Sparse` leaf keeps its mask and gets its kept values
    quantized per tensor (or in groups of ``group_size`` along the values; ``axis``
    is ignored there), so pruned zeros stay exact.

    Args:
        bits: bits per code, an integer from 2 to 8.
        axis: ``None`` for one scale per tensor; an axis index for one scale per index
            along it (``-1``: output channel of a Dense ``(in, out)`` or conv
            ``(h, w, in, out)`` kernel).
        group_size: split each channel's other entries (flattened row-major) into
            contiguous groups of this size, one scale per (channel, group). With
            ``axis=None`` the whole flattened tensor is grouped. Must divide the
            entries per channel.
        symmetric: ``True`` for ``2**bits - 1`` levels centred on an exact zero;
            ``False`` for ``2**bits`` levels with a per-scale zero point.
        calibration: how the clipping range is chosen per scale: ``"absmax"`` (full
            range), ``"percentile"`` (the ``percentile``-th percentile of ``|w|``; the
            lower/upper percentiles if asymmetric) or ``"mse"`` (the clipping ratio of
            100 in ``(0, 1]`` with the least squared reconstruction error).
        percentile: the percentile for ``calibration="percentile"``, in ``(50, 100]``.
        scale_dtype: float32, float16 or bfloat16; scales (and zero points) are
            stored, counted and decoded in it.
        where: which leaves to quantize; by default :func:`jaxcompress.filters.kernels`.

    Returns:
        A transform returning ``(compressed, stats)``, where ``stats`` maps each
        quantized leaf path to ``{"bits", "relative_error", "max_abs_error"}``
        (the errors as scalar arrays, so it works under ``jit``).

    Raises:
        ValueError: bad ``bits``, ``axis``, ``group_size``, ``calibration``,
            ``percentile`` or ``scale_dtype``; a selected scalar, zero-size or
            non-finite leaf; an axis or group size that does not fit a leaf.
        TypeError: a selected integer, boolean or (non-sparse) compressed leaf.

    Example:
        >>> import jax
        >>> import jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> params = {"dense": {"kernel": jnp.ones((64, 32)), "bias": jnp.zeros(32)}}
        >>> compressed, stats = jax.jit(jc.quantize(4))(params)
        >>> compressed["dense"]["kernel"].nbytes  # 64 * 32 / 2 code bytes + 32 float32 scales
        1152
        >>> float(stats["dense/kernel"]["relative_error"])
        0.0
    """
    options = check_options(
        "quantize",
        bits=bits,
        axis=axis,
        group_size=group_size,
        symmetric=symmetric,
        calibration=calibration,
        percentile=percentile,
        scale_dtype=scale_dtype,
    )
    bits, group_size = options["bits"], options.pop("group_size")
    options.pop("axis")
    name = f"quantize({bits}, axis={axis}, group_size={group_size}, symmetric={bool(symmetric)})"

    def apply(params, *, key=None, data=None):
        selected, entries, treedef = select_leaves(params, where)
        # Every leaf is checked before anything is computed, so nothing is half done.
        plans = []
        for entry in selected:
            values = check_values_to_compress(name, entry.path, entry.leaf)
            # A Sparse leaf's kept values are flat: per-tensor or grouped along them.
            leaf_axis = None if isinstance(entry.leaf, Sparse) else axis
            layout = _leaf_layout(name, entry.path, values.shape, leaf_axis, group_size)
            plans.append((entry, values, layout))
        leaves = [entry.leaf for entry in entries]
        stats = {}
        for entry, weight, leaf_axis in plans:
            quantized = quantize_array(weight, axis=leaf_axis, group_size=group_size, **options)
            quantized = jax.tree.map(
                functools.partial(place_like, reference=named_sharding_of(weight)), quantized
            )
            stats[entry.path] = _error_stats(weight, quantized.materialize(), bits)
            if isinstance(entry.leaf, Sparse):
                quantized = Sparse(quantized, entry.leaf.mask, entry.leaf.shape, entry.leaf.dtype)
            leaves[entry.index] = quantized
        return jax.tree_util.tree_unflatten(treedef, leaves), stats

    return Transform(apply, name)
