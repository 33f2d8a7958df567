"""Linear (uniform) quantization into :class:`~jaxcompress.Quantized` leaves.

The grid and its arithmetic are those of :mod:`jaxcompress.numerics.uniform`; this
module checks the options and the data, and builds the leaves.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from jaxcompress.arrays import Quantized, Sparse
from jaxcompress.arrays.leading import (
    from_leading,
    groups_transpose,
    leading_axis,
    leading_shape,
    to_leading,
)
from jaxcompress.arrays.quantized import decode
from jaxcompress.calibration.lookup import leaf_gram, require_data
from jaxcompress.core.bitpack import pack
from jaxcompress.core.checks import is_traced
from jaxcompress.core.mesh import input_scale_spec, named_sharding_of, place_like, unsharded
from jaxcompress.numerics.awq import awq_search
from jaxcompress.numerics.gptq import gptq
from jaxcompress.numerics.obs import check_block_size, check_damp, check_factorized, mesh_scope
from jaxcompress.numerics.uniform import fused_layout, quantize_codes, quantize_with_errors
from jaxcompress.transforms.base import Transform
from jaxcompress.transforms.engine import per_leaf
from jaxcompress.transforms.filters import Filter, kernels
from jaxcompress.transforms.stats import QuantizeStats

_CALIBRATIONS = ("absmax", "percentile", "mse")
_METHODS = ("rtn", "gptq", "awq")
_SCALE_DTYPES = (np.dtype(jnp.float32), np.dtype(jnp.float16), np.dtype(jnp.bfloat16))


def _is_int(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


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
        poison=True,
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


@functools.partial(jax.jit, static_argnames=("axis", "group_size", "options"))
def _rtn_array(weight, *, axis, group_size, options) -> tuple[Quantized, dict]:
    """One leaf rounded to nearest, packed, decoded and measured, as one program.

    What an eager ``quantize`` runs per unsharded leaf: one compiled program per
    (shape, dtype, options), reused across leaves and calls, in place of the quantizer's
    program plus a dozen op-by-op programs (packing, decoding, error sums), each
    compiled on first use. ``options`` is a tuple of ``(name, value)`` (hashable).
    Returns ``(Quantized, {"relative_error", "max_abs_error"})``.
    """
    options = dict(options)
    if fused_layout(
        weight.shape,
        weight.dtype,
        axis=axis,
        group_size=group_size,
        symmetric=options["symmetric"],
        calibration=options["calibration"],
    ):
        # The leaf has been checked finite: the quantizer with its error stats in fewer
        # passes, and no unpacking of the packed codes to measure them.
        bits = options["bits"]
        codes, scale, errors = quantize_with_errors(
            weight, bits=bits, axis=axis, group_size=group_size, scale_dtype=options["scale_dtype"]
        )
        quantized = Quantized(
            codes=pack(codes, bits),
            scale=scale,
            zero_point=None,
            shape=tuple(weight.shape),
            dtype=np.dtype(weight.dtype),
            bits=bits,
            axis=axis,
            group_size=group_size,
        )
        return quantized, errors
    quantized = quantize_array(weight, axis=axis, group_size=group_size, **options)
    # The leaf is bit for bit the op-by-op one; the error stats, fused with decoding here,
    # may differ from op-by-op sums in their last bits (XLA may reassociate or fuse).
    errors = _error_stats(weight, quantized.materialize(), options["bits"])
    del errors["bits"]  # a Python int, not a program output
    return quantized, errors


def leaf_layout(
    name: str, path: str, shape, axis, group_size, *, trailing_inputs: int = 0
) -> int | None:
    """The normalized axis for a leaf of ``shape``; raises naming the path if it cannot fit.

    Any positive ``group_size`` fits: one that does not divide the entries per channel
    leaves a shorter last group, and one larger than them makes a single group (see
    :func:`~jaxcompress.arrays.quantized.group_layout`). ``axis=-1`` is the output
    channel: the last axis, or for a weight stored output first whose
    ``trailing_inputs`` axes are its inputs (an equinox ``(out, in)`` weight) axis 0.

    Example:
        >>> leaf_layout("quantize", "w", (4, 6), -1, None)  # group_size=4 would fit as well
        1
        >>> leaf_layout("quantize", "w", (4, 6), -1, None, trailing_inputs=1)
        0
    """
    del group_size  # every positive size fits (checked by check_options)
    if axis == -1 and trailing_inputs and len(shape) == trailing_inputs + 1:
        return 0
    if axis is not None:
        if not -len(shape) <= axis < len(shape):
            raise ValueError(
                f"{name}: axis={axis} is out of range for leaf {path!r} of shape {tuple(shape)}"
            )
        axis = axis % len(shape)
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


def _gptq_layout(name: str, path: str, shape, axis, group_size, fan_in: int) -> None:
    """Raises unless the leaf's scale layout lines up with its matrix view's rows."""
    if axis is None and group_size is None:
        return
    if axis == len(shape) - 1 and fan_in == len(shape) - 1:
        return
    raise ValueError(
        f"{name}: method='gptq' quantizes the rows of the matrix view (the {fan_in} leading "
        f"input axes of leaf {path!r} of shape {tuple(shape)}, from its calibration "
        "statistics) one at a time, so the scales must be per output channel of a kernel "
        "whose inputs are all its axes but the last (axis=-1, with or without group_size) "
        f"or per tensor (axis=None without group_size); got axis={axis}, "
        f"group_size={group_size}"
    )


@functools.partial(jax.jit, static_argnames=("axis", "group_size", "gptq_options", "options"))
def _gptq_array(weight, gram, damp, *, axis, group_size, gptq_options, options) -> tuple:
    """One leaf quantized by GPTQ, as one program: ``(Quantized, stats)``.

    ``gptq_options`` and ``options`` are tuples of ``(name, value)`` (hashable).
    """
    gptq_options, options = dict(gptq_options), dict(options)
    original = weight
    shape = tuple(weight.shape)
    weight = unsharded(weight)
    m = gram.shape[0]
    # Starting scales: those of round-to-nearest on the original weights. They are
    # kept per channel / per tensor and, with act_order, as static groups; otherwise
    # each group's scale is recomputed from the error-updated rows.
    _, scale, zero, _ = quantize_codes(weight, axis=axis, group_size=group_size, **options)
    dynamic = group_size is not None and not gptq_options["act_order"]
    with mesh_scope(weight):
        codes, scale, zero, restored, extra = gptq(
            weight.reshape(m, -1),
            unsharded(gram),
            scale,
            zero,
            group_size=group_size,
            dynamic_groups=dynamic,
            damp=damp,
            **gptq_options,
            **options,
        )
    quantized = Quantized(
        codes=pack(codes.reshape(shape), options["bits"]),
        scale=scale,
        zero_point=zero,
        shape=shape,
        dtype=np.dtype(weight.dtype),
        bits=options["bits"],
        axis=axis,
        group_size=group_size,
    )
    restored = restored.astype(original.dtype).reshape(shape)  # what materialize() gives
    errors = _error_stats(original, restored, options["bits"])
    return quantized, {**errors, **extra}


@functools.partial(
    jax.jit, static_argnames=("axis", "group_size", "fan_in", "grid", "clip_grid", "options")
)
def _awq_array(weight, gram, *, axis, group_size, fan_in, grid, clip_grid, options) -> tuple:
    """One leaf quantized by AWQ, as one program: ``(Quantized, stats)``.

    ``options`` is a tuple of ``(name, value)`` (hashable).
    """
    options = dict(options)
    original = weight
    shape = tuple(weight.shape)
    weight = unsharded(weight)
    layout = dict(shape=shape, axis=axis, group_size=group_size, bits=options["bits"])

    def quantizer(scaled):
        codes, scale, zero, _ = quantize_codes(scaled, axis=axis, group_size=group_size, **options)
        return codes, scale, zero

    def decoder(codes, scale, zero):
        # The search also decodes some output columns only: the shape is the codes'.
        return decode(codes, scale, zero, dtype=jnp.float32, **{**layout, "shape": codes.shape})

    with mesh_scope(weight):
        (codes, scale, zero, input_scale), extra = awq_search(
            weight,
            unsharded(gram),
            fan_in=fan_in,
            axis=axis,
            group_size=group_size,
            symmetric=options["symmetric"],
            grid=grid,
            clip_grid=clip_grid,
            scale_dtype=options["scale_dtype"],
            quantize=quantizer,
            decode=decoder,
        )
    quantized = Quantized(
        codes=pack(codes, options["bits"]),
        scale=scale,
        zero_point=zero,
        shape=shape,
        dtype=np.dtype(weight.dtype),
        bits=options["bits"],
        axis=axis,
        group_size=group_size,
        input_scale=input_scale,
    )
    errors = _error_stats(original, quantized.materialize(), options["bits"])
    return quantized, {**errors, **extra}


def quantize(
    bits: int = 8,
    *,
    axis: int | None = -1,
    group_size: int | None = None,
    symmetric: bool = True,
    calibration: str = "absmax",
    percentile: float = 99.9,
    scale_dtype=jnp.float32,
    method: str = "rtn",
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    awq_grid: int = 20,
    awq_clip_grid: int = 11,
    where: Filter = kernels,
    progress: bool = False,
) -> Transform:
    """Linear quantization of each selected leaf to ``bits``-bit codes.

    Each selected leaf becomes a :class:`~jaxcompress.Quantized` leaf: unsigned codes
    bit-packed along the last axis (so 4-bit codes take half a byte each) plus one
    scale (and, if asymmetric, one zero point) per channel or group. A selected
    :class:`~jaxcompress.Sparse` leaf keeps its mask and gets its kept values
    quantized per tensor (or in groups of ``group_size`` along the values; ``axis``
    is ignored there), so pruned zeros stay exact (``method="rtn"`` only).

    With ``method="gptq"`` (Frantar et al. 2022) the codes are chosen against the
    weight's calibration inputs (``data=`` from :func:`jaxcompress.calibrate`): the
    rows of its ``(m, n)`` matrix view (the ``m`` input features it contracts; ``in``
    of a Dense ``(in, out)`` kernel, ``h * w * in`` of a conv kernel) are rounded one
    at a time, and each row's rounding error is fed into the rows not yet rounded
    through the upper Cholesky factor of the damped inverse Gram
    ``(G + damp · mean(diag G) · I)⁻¹``, which lowers the layer's output error
    ``‖X W − X Ŵ‖`` (not the weight error). The result has exactly the layout of
    round-to-nearest (same scale shapes, same ``nbytes``); its codes decode with its
    stored scales. With an identity Gram and ``damp=0`` it *is* round-to-nearest.
    See :mod:`jaxcompress.numerics.obs`.

    With ``method="awq"`` (activation-aware weight quantization, Lin et al. 2023; also
    with ``data=``) each row ``i`` of the matrix view is multiplied by a scale
    ``s_i = a_i ** alpha`` (normalised by ``√(max s · min s)``) before the usual
    quantizer (same ``bits``, ``axis``, ``group_size``, ``symmetric``, ``calibration``)
    rounds it, and divided by it again on decoding: ``Ŵ = diag(s)⁻¹ Q(diag(s) W)``.
    (What is stored is ``r = 1 / s`` in ``scale_dtype``: the quantizer rounds the
    float32 quotient ``W / r`` and decoding multiplies by ``r``, a correctly rounded
    float32 product on every backend, so ``Ŵ = diag(r) Q(diag(r)⁻¹ W)``.)
    ``a_i`` is input ``i``'s RMS ``√G_ii`` from the calibration Gram (AWQ's paper uses
    its mean ``|x_i|``, which the statistics do not keep). ``alpha`` is chosen per leaf
    from ``awq_grid`` even steps on ``[0, 1]``, then (with per-output-channel scales,
    grouped or not) a clipping ratio per group from ``awq_clip_grid`` even steps on
    ``[1, 0.5]`` (AWQ's auto-clip), both for the least output error on the calibration
    data, read from the Gram's diagonal blocks of up to 128 inputs (each group's own
    output error); the full output error ``tr(Eᵀ G E)``, ``E = Ŵ − W``, then picks
    between the result, the unclipped one and round-to-nearest (``alpha = 0``), so
    AWQ's output error is never above round-to-nearest's. The scales are *stored*, not folded into
    the preceding op: the leaf is a :class:`~jaxcompress.Quantized` with an
    ``input_scale`` child (``r``) shaped like the weight's input axes (``in`` of a
    Dense kernel, ``(h, w, in)`` of a conv kernel; counted by ``nbytes``, saved by
    :func:`jaxcompress.save`), and it materializes to ``Ŵ``.
    :func:`jaxcompress.accelerate` serves such a leaf dense (its ``materialize``
    route). See :mod:`jaxcompress.awq`.

    NaN and Inf: an eager call raises. A traced one (under ``jax.jit``) cannot, and
    never stores a finite value for them: each scale group's scale comes from its
    finite entries, and a group holding a NaN or Inf gets a NaN scale (integer codes
    cannot hold NaN), so exactly that group (a column per channel, one group of
    ``group_size``, or the whole leaf per tensor) materializes to NaN; every other
    group is as without them. The data-aware ``method="gptq"`` and ``"awq"`` spread a
    non-finite value through their error updates: wrap them in
    :func:`jaxcompress.checked` to raise instead.

    Args:
        bits: bits per code, an integer from 2 to 8.
        axis: ``None`` for one scale per tensor; an axis index for one scale per index
            along it (``-1``: output channel of a Dense ``(in, out)`` or conv
            ``(h, w, in, out)`` kernel). An equinox ``Linear`` or ``Conv`` weight is
            stored output first, ``(out, in)`` / ``(out, in, *kernel)``: there
            ``axis=-1`` (the default) means its output channel, axis 0, as it does on
            a linen kernel (the layout :func:`jaxcompress.accelerate` serves fast);
            other axes are taken as given. With GPTQ or AWQ and statistics of a
            weight's trailing axes (such a weight), the weight is compressed through
            its inputs-first view and stored in its own layout (AWQ's
            ``input_scale`` as ``(1, in)``).
        group_size: split each channel's other entries (flattened row-major) into
            contiguous groups of this size, one scale per (channel, group). With
            ``axis=None`` the whole flattened tensor is grouped. It need not divide
            the entries per channel: the last group is then shorter, and its scale
            comes from its own entries alone (no padding value takes part in it or is
            stored). A size at least the entries per channel is one group, as per
            channel, though the leaf keeps the ``group_size`` asked for.
        symmetric: ``True`` for ``2**bits`` levels, ``-2**(bits-1)`` to
            ``2**(bits-1) - 1`` steps, with an exact zero; the scale's sign puts the
            extra level on the side of each group's largest magnitude (see
            :class:`~jaxcompress.Quantized`). ``False`` for ``2**bits`` levels with a
            per-scale zero point.
        calibration: how the clipping range is chosen per scale: ``"absmax"`` (full
            range, never clipped; symmetric, a group keeps the ``2**bits - 1``-level
            step ``max|w| / (2**(bits-1) - 1)`` of earlier versions where that rounds
            it better, so no group's error is above that grid's), ``"percentile"``
            (the lower and upper ``percentile``-th percentiles) or ``"mse"`` (the
            clipping ratio of 100 in ``(0, 1]`` with the least squared
            reconstruction error).
        percentile: the percentile for ``calibration="percentile"``, in ``(50, 100]``.
        scale_dtype: float32, float16 or bfloat16; scales (and zero points) are
            stored, counted and decoded in it.
        method: ``"rtn"`` (round to nearest), ``"gptq"`` or ``"awq"`` (both need
            ``data=``). AWQ takes every layout round-to-nearest does. GPTQ
            supports ``axis=-1`` (with or without ``group_size``) on a kernel whose
            calibrated inputs are all its axes but the last (Dense, conv), and
            ``axis=None`` without ``group_size`` on any calibrated kernel; per-channel
            and per-tensor scales are those of round-to-nearest on the original
            weights, and a group's scale is computed (with ``calibration``) from the
            current, error-updated weights when the sweep reaches the group.
        damp: GPTQ's damping, relative to the mean diagonal of the Gram; the absolute
            ``λ`` added is reported in the stats. ``0`` needs a positive definite Gram.
        block_size: GPTQ's rows per block of lazy updates (the result does not depend
            on it beyond float rounding).
        act_order: GPTQ only: round the rows in order of decreasing ``diag(G)`` (the
            most active inputs first), then put the codes back in place. With
            ``group_size`` the group scales are static: computed from the original
            weights, as AutoGPTQ's ``static_groups``, so the stored groups stay
            contiguous.
        awq_grid: AWQ only: how many values of ``alpha``, evenly spaced on ``[0, 1]``
            (``1``: only ``alpha = 0``, round-to-nearest with unit input scales).
        awq_clip_grid: AWQ only: how many clipping ratios per group, evenly spaced on
            ``[1, 0.5]`` (``1``: no clipping; the default 11 steps by 0.05, as AWQ's
            auto-clip).
        where: which leaves to quantize; by default :func:`jaxcompress.filters.kernels`.
        progress: show a bar on stderr, by leaf and bytes, while it runs (not under
            ``jit``).
    Returns:
        A transform ``tx(params, *, key=None, data=None)`` returning
        ``(compressed, stats)``, where ``stats`` maps each quantized leaf path to
        ``{"bits", "relative_error", "max_abs_error"}`` (the errors as scalar arrays, so
        it works under ``jit``); with GPTQ also ``"damp"``, ``"damping"`` (the ``λ``
        added to the Gram's diagonal), ``"factorized"`` (whether the Cholesky factors
        were finite) and ``"relative_output_error"`` (``√(tr(Eᵀ G E) / tr(Wᵀ G W))``);
        with AWQ also ``"alpha"`` (the chosen exponent), ``"clip_ratio"`` (the mean
        clipping ratio), ``"relative_output_error"``
        (AWQ's) and ``"rtn_relative_output_error"`` (round-to-nearest's, ``alpha = 0``).

    Raises:
        ValueError: bad ``bits``, ``axis``, ``group_size``, ``calibration``,
            ``percentile``, ``scale_dtype``, ``method``, ``damp``, ``block_size``,
            ``awq_grid``, ``awq_clip_grid``; ``act_order`` without GPTQ; ``awq_grid``
            or ``awq_clip_grid`` without AWQ; a
            selected scalar, zero-size or non-finite leaf; an axis that does not fit
            a leaf; GPTQ or AWQ without ``data=``, without statistics for
            a leaf, with statistics whose feature size fits no fan-in of the leaf
            (or, outside ``jit``, a Gram with NaN or Inf); GPTQ with a scale layout it
            does not support, or (outside ``jit``) with a Gram not positive definite
            after damping.
        TypeError: a selected integer, boolean or (non-sparse) compressed leaf; a
            ``Sparse`` leaf with GPTQ or AWQ.

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

        GPTQ with calibration statistics of a small model:

        >>> from jaxcompress.examples.models import LeNet300100
        >>> model = LeNet300100()
        >>> x = jax.random.normal(jax.random.key(0), (64, 64))
        >>> params = model.init(jax.random.key(1), x)["params"]
        >>> data = jc.calibrate(lambda p, x: model.apply({"params": p}, x), params, [x])
        >>> tx = jc.quantize(4, group_size=4, method="gptq")
        >>> compressed, stats = jax.jit(tx)(params, data=data)
        >>> compressed["dense1"]["kernel"]
        Quantized(shape=(64, 300), dtype=float32, bits=4, axis=1, group_size=4)
        >>> rtn, rtn_stats = jc.quantize(4, group_size=4)(params)
        >>> compressed["dense1"]["kernel"].nbytes == rtn["dense1"]["kernel"].nbytes
        True

        AWQ: the same codes and scales plus one stored scale per input feature:

        >>> tx = jc.quantize(4, group_size=4, method="awq", where="dense1/kernel")
        >>> awq, awq_stats = tx(params, data=data)
        >>> awq["dense1"]["kernel"]
        Quantized(shape=(64, 300), dtype=float32, bits=4, axis=1, group_size=4, input_scale=(64,))
        >>> awq["dense1"]["kernel"].nbytes - rtn["dense1"]["kernel"].nbytes  # 64 float32
        256
        >>> s = awq_stats["dense1/kernel"]
        >>> bool(s["relative_output_error"] <= s["rtn_relative_output_error"])
        True
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
    if method not in _METHODS:
        raise ValueError(f"quantize: method must be one of {_METHODS}, got {method!r}")
    if not isinstance(act_order, bool | np.bool_):
        raise ValueError(f"quantize: act_order must be a bool, got {act_order!r}")
    if act_order and method != "gptq":
        raise ValueError("quantize: act_order=True only applies to method='gptq'")
    if isinstance(awq_grid, bool) or not isinstance(awq_grid, numbers.Integral) or awq_grid < 1:
        raise ValueError(f"quantize: awq_grid must be a positive integer, got {awq_grid!r}")
    if awq_grid != 20 and method != "awq":
        raise ValueError(f"quantize: awq_grid={awq_grid} only applies to method='awq'")
    if not _is_int(awq_clip_grid) or awq_clip_grid < 1:
        raise ValueError(
            f"quantize: awq_clip_grid must be a positive integer, got {awq_clip_grid!r}"
        )
    if awq_clip_grid != 11 and method != "awq":
        raise ValueError(f"quantize: awq_clip_grid={awq_clip_grid} only applies to method='awq'")
    damp_value = check_damp("quantize", damp)
    gptq_options = {
        "block_size": check_block_size("quantize", block_size),
        "act_order": bool(act_order),
    }
    bits, group_size = options["bits"], options.pop("group_size")
    options.pop("axis")
    name = f"quantize({bits}, axis={axis}, group_size={group_size}, symmetric={bool(symmetric)})"
    if method == "gptq":
        name = name[:-1] + f", method=gptq{', act_order=True' if act_order else ''})"
    if method == "awq":
        name = name[:-1] + f", method=awq, awq_grid={int(awq_grid)}"
        name += f", awq_clip_grid={int(awq_clip_grid)})"
    data_aware = method in ("gptq", "awq")
    option = f"method={method!r}"

    def prepare(key, data):
        del key  # deterministic
        return require_data(name, option, data) if data_aware else {}

    def check(entry, values, by_path):
        """``(axis, gram, fan_in)`` of one leaf, its layout checked."""
        if data_aware and isinstance(entry.leaf, Sparse):
            raise TypeError(
                f"{name}: leaf {entry.path!r} is Sparse; {method.upper()} needs the dense "
                "matrix (its kept values have no row layout): use method='rtn' for it "
                "(exclude it with where=) or quantize before pruning"
            )
        # A Sparse leaf's kept values are flat: per-tensor or grouped along them.
        leaf_axis = None if isinstance(entry.leaf, Sparse) else axis
        shape = tuple(values.shape)
        if not data_aware:
            layout = leaf_layout(
                name,
                entry.path,
                shape,
                leaf_axis,
                group_size,
                trailing_inputs=entry.trailing_inputs,
            )
            return layout, None, None, False
        found = leaf_gram(name, option, entry.path, by_path, shape)
        if found.trailing and leaf_axis == -1:
            # -1 is the output channel, as on a linen kernel: an (out, in) weight's axis 0.
            leaf_axis = len(shape) - found.fan_in - 1
        layout = leaf_layout(name, entry.path, shape, leaf_axis, group_size)
        if found.trailing:
            # The methods run on the weight seen inputs first (see arrays/leading.py).
            if layout is not None:
                layout = leading_axis(layout, len(shape), found.fan_in)
            if not groups_transpose(shape, found.fan_in, layout, group_size):
                raise ValueError(
                    f"{name}: leaf {entry.path!r} of shape {shape} is contracted over its "
                    f"trailing axes, and scale groups of axis={axis}, group_size={group_size} "
                    "would run over its axes in another order than over its inputs-first "
                    "view; use per-output-channel scales (axis=-1) or no group_size"
                )
            if method == "gptq" and not (
                (layout is None and group_size is None)
                or (layout == len(shape) - 1 and found.fan_in == len(shape) - 1)
            ):
                raise ValueError(
                    f"{name}: method='gptq' quantizes leaf {entry.path!r} of shape {shape}, "
                    f"contracted over its trailing {found.fan_in} axes (an (out, in) weight), "
                    "one input at a time, so its scales must be per output channel "
                    "(axis=-1 or 0, with or without group_size) or per tensor (axis=None "
                    f"without group_size); got axis={axis}, group_size={group_size}"
                )
            shape = leading_shape(shape, found.fan_in)
        elif method == "gptq":
            _gptq_layout(name, entry.path, shape, layout, group_size, found.fan_in)
        return layout, found.gram, found.fan_in, found.trailing

    def step(item, key) -> tuple[Quantized, QuantizeStats]:
        del key
        weight, (leaf_axis, gram, fan_in, trailing) = item.weight, item.plan
        if gram is None:
            if not is_traced(weight) and named_sharding_of(weight) is None:
                quantized, errors = _rtn_array(
                    weight,
                    axis=leaf_axis,
                    group_size=group_size,
                    options=tuple(sorted(options.items())),
                )
                return quantized, {"bits": bits, **errors}
            quantized = quantize_array(weight, axis=leaf_axis, group_size=group_size, **options)
            # The error is that of the codes as placed, as the caller will decode them.
            quantized = _place_quantized(quantized, named_sharding_of(weight))
            return quantized, _error_stats(weight, quantized.materialize(), bits)
        view = to_leading(weight, fan_in) if trailing else weight
        quantized, extra = data_aware_step(view, leaf_axis, gram, fan_in)
        if method == "gptq":
            check_factorized(name, item.entry.path, extra, damp)
        return (from_leading(quantized, fan_in) if trailing else quantized), extra

    def data_aware_step(weight, leaf_axis, gram, fan_in) -> tuple[Quantized, QuantizeStats]:
        """GPTQ or AWQ on a weight whose ``fan_in`` leading axes are its inputs."""
        if method == "awq":
            return _awq_array(
                weight,
                gram,
                axis=leaf_axis,
                group_size=group_size,
                fan_in=fan_in,
                grid=int(awq_grid),
                clip_grid=int(awq_clip_grid),
                options=tuple(sorted(options.items())),
            )
        quantized, extra = _gptq_array(
            weight,
            gram,
            jnp.float32(damp_value),
            axis=leaf_axis,
            group_size=group_size,
            gptq_options=tuple(sorted(gptq_options.items())),
            options=tuple(sorted(options.items())),
        )
        return quantized, {**extra, "bits": bits, "damp": damp_value}

    return per_leaf(
        name,
        where,
        prepare=prepare,
        check=check,
        step=step,
        place=_place_quantized,
        progress=progress,
        nests_in_sparse=True,
        default_where=kernels,
    )


def _place_quantized(quantized: Quantized, reference) -> Quantized:
    """Codes and scales laid out like the weight; AWQ's input scales like its input axes."""
    if reference is None:
        return quantized
    quantized = jax.tree.map(functools.partial(place_like, reference=reference), quantized)
    if quantized.input_scale is not None:
        spec = input_scale_spec(tuple(quantized.input_scale.shape), reference)
        inputs = place_like(quantized.input_scale, NamedSharding(reference.mesh, spec))
        quantized = dataclasses.replace(quantized, input_scale=inputs)
    return quantized
