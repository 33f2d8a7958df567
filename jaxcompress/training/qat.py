"""Quantization-aware training: fake quantization with straight-through rounding.

:func:`fake_quant` runs the very quantizer of :func:`jaxcompress.quantize`
(:func:`jaxcompress.numerics.uniform.quantize_codes` and
:func:`jaxcompress.arrays.quantized.decode`), so after training, converting with the
same options reproduces the trained forward pass exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.arrays import Sparse
from jaxcompress.arrays.checks import check_values_to_compress
from jaxcompress.arrays.quantized import decode
from jaxcompress.core.checks import is_traced
from jaxcompress.methods.quantize import check_options, leaf_layout
from jaxcompress.numerics.uniform import quantize_codes
from jaxcompress.transforms.base import select_leaves
from jaxcompress.transforms.filters import Filter, kernels


def _fake_quant_array(weight: jax.Array, *, axis: int | None, group_size: int | None, **options):
    """Dequantized-quantized ``weight`` with a straight-through gradient."""

    def forward(w):
        codes, scale, zero, inside = quantize_codes(w, axis=axis, group_size=group_size, **options)
        dense = decode(
            codes,
            scale,
            zero,
            shape=tuple(w.shape),
            axis=axis,
            group_size=group_size,
            bits=options["bits"],
            dtype=w.dtype,
        )
        if is_traced(w):
            # A float output can hold NaN and Inf: they pass through as they are.
            dense = jnp.where(jnp.isfinite(w), dense, w)
        return dense, inside

    @jax.custom_vjp
    def straight_through(w):
        return forward(w)[0]

    def fwd(w):
        return forward(w)

    def bwd(inside, g):
        # Rounding counts as the identity; a clipped entry gets no gradient. Scales and
        # zero points are treated as constants (no gradient through calibration).
        return (jnp.where(inside, g, jnp.zeros_like(g)),)

    straight_through.defvjp(fwd, bwd)
    return straight_through(weight)


def fake_quant(
    bits: int = 8,
    *,
    axis: int | None = -1,
    group_size: int | None = None,
    symmetric: bool = True,
    calibration: str = "absmax",
    percentile: float = 99.9,
    scale_dtype=jnp.float32,
    where: Filter = kernels,
) -> Callable[[Any], Any]:
    """Fake quantization for quantization-aware training (straight-through rounding).

    Returns a function ``params -> params`` to call inside the loss. Each selected
    leaf comes back dense (same shape and dtype) but snapped to the grid that
    :func:`jaxcompress.quantize` with the same options would store: the forward value
    is exactly ``jc.materialize(jc.quantize(...)(params)[0])``. The backward pass is
    the straight-through estimator: the identity for entries whose code needed no
    clipping, zero for clipped entries; scales and zero points are recomputed from the
    current weights each call but get no gradient. Unselected leaves pass through.
    A selected :class:`~jaxcompress.Sparse` leaf stays ``Sparse`` with its kept values
    fake-quantized per tensor (or in groups), as :func:`jaxcompress.quantize` does;
    :func:`jaxcompress.materialize` it in the loss as usual.

    It is a plain function rather than a :class:`~jaxcompress.Transform` because it
    returns only the parameters (no stats) and is meant to run on every step, under
    ``jit`` and ``grad``. The optimizer is any optax optimizer, unwrapped; after
    training, ``jc.quantize`` with the same options converts with no drift.

    NaN and Inf: an eager call raises. Under ``jit`` each NaN or Inf comes back as it
    is (with zero gradient) and every other entry is quantized with scales from the
    finite entries alone (a non-finite entry counts as its group's smallest finite
    value, which changes no absmax scale). :func:`jaxcompress.quantize` stores the
    same finite entries but makes the whole scale group NaN, so there the two differ.

    Args:
        bits: bits per code, an integer from 2 to 8.
        axis: ``None`` for one scale per tensor, or the channel axis (see
            :func:`jaxcompress.quantize`).
        group_size: entries per group along the contracted dimension, or ``None``.
        symmetric: symmetric (exact zero) or asymmetric (zero point) grid.
        calibration: ``"absmax"``, ``"percentile"`` or ``"mse"``.
        percentile: the percentile for ``calibration="percentile"``, in ``(50, 100]``.
        scale_dtype: float32, float16 or bfloat16 scales.
        where: which leaves to fake-quantize; by default
            :func:`jaxcompress.filters.kernels`.

    Returns:
        A function from a parameter pytree to the same structure, fake-quantized.

    Raises:
        ValueError: a bad option, or (when called) an axis or group size that does not
            fit a selected leaf, or a scalar, empty or non-finite selected leaf.
        TypeError: (when called) a selected integer or non-sparse compressed leaf.

    Example:
        >>> import jax
        >>> import jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> params = {"kernel": jnp.array([[0.6, -0.5], [0.4, 1.0]]), "bias": jnp.zeros(2)}
        >>> fq = jc.training.fake_quant(2, axis=None)  # scale -0.5: levels 1, 0.5, 0, -0.5
        >>> fq(params)["kernel"].tolist()
        [[0.5, -0.5], [0.5, 1.0]]
        >>> converted = jc.materialize(jc.quantize(2, axis=None)(params)[0])
        >>> bool((converted["kernel"] == fq(params)["kernel"]).all())
        True
        >>> jax.grad(lambda p: fq(p)["kernel"].sum())(params)["kernel"].tolist()
        [[1.0, 1.0], [1.0, 1.0]]
    """
    options = check_options(
        "fake_quant",
        bits=bits,
        axis=axis,
        group_size=group_size,
        symmetric=symmetric,
        calibration=calibration,
        percentile=percentile,
        scale_dtype=scale_dtype,
    )
    axis, group_size = options.pop("axis"), options.pop("group_size")
    name = f"fake_quant({options['bits']}, axis={axis}, group_size={group_size})"

    def apply(params: Any) -> Any:
        selected, entries, treedef = select_leaves(params, where, name=name)
        leaves = [entry.leaf for entry in entries]
        for entry in selected:
            values = check_values_to_compress(name, entry.path, entry.leaf)
            # A Sparse leaf's kept values are flat: per-tensor or grouped along them.
            sparse = isinstance(entry.leaf, Sparse)
            leaf_axis = leaf_layout(
                name,
                entry.path,
                values.shape,
                None if sparse else axis,
                group_size,
                trailing_inputs=entry.trailing_inputs,
            )
            fake = _fake_quant_array(values, axis=leaf_axis, group_size=group_size, **options)
            if sparse:
                fake = Sparse(fake, entry.leaf.mask, entry.leaf.shape, np.dtype(entry.leaf.dtype))
            leaves[entry.index] = fake
        return jax.tree_util.tree_unflatten(treedef, leaves)

    return apply
