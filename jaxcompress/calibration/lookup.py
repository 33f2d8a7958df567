"""The calibration statistics of each leaf in ``data=``, checked against the leaf.

Data-aware methods (Wanda, SparseGPT, GPTQ, codebook GPTQ) read the input Gram of
each weight they compress from a :func:`jaxcompress.calibrate` pytree; these lookups
raise errors that name the transform, the option and the leaf.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxcompress.arrays.lowrank import matrix_shape
from jaxcompress.calibration.calibrate import InputStats, stats_by_path
from jaxcompress.core.checks import is_traced


def require_data(name: str, option: str, data: Any) -> dict[str, InputStats]:
    """The calibration stats of ``data`` keyed by path; raises when ``data`` is missing.

    Example:
        >>> import jax.numpy as jnp
        >>> s = InputStats(jnp.float32(1), jnp.zeros(2), jnp.eye(2), None, None)
        >>> list(require_data("prune", "importance='wanda'", {"w": s}))
        ['w']
    """
    if data is None:
        raise ValueError(
            f"{name}: {option} needs data=, a calibration pytree of InputStats laid out like "
            "the params (see jaxcompress.calibrate)"
        )
    return stats_by_path(data)


def refuse_trailing(name: str, option: str, path: str, stats: InputStats) -> None:
    """Raises for statistics of a weight contracted over its trailing axes.

    The data-aware methods work on the ``(fan-in, outputs)`` matrix view of a weight
    stored inputs first; an ``(out, in)`` weight (equinox) would be read transposed.

    Example:
        >>> import jax.numpy as jnp
        >>> s = InputStats(jnp.float32(1), jnp.zeros(2), jnp.eye(2), None, None)
        >>> refuse_trailing("prune", "importance='wanda'", "w", s)  # leading: fine
    """
    if stats.trailing:
        raise ValueError(
            f"{name}: {option} reads a weight's inputs off its leading axes (a linen "
            f"(in, out) kernel), but leaf {path!r} is stored output first and contracted "
            "over its trailing axes (an equinox (out, in) weight); exclude it with where="
        )


def leaf_gram(
    name: str, option: str, path: str, by_path: dict, shape: tuple[int, ...]
) -> tuple[jax.Array, int, int, int]:
    """The Gram matrix of leaf ``path`` and its matrix view ``(gram, fan_in_axes, m, n)``.

    The fan-in is read off the statistics: the leading axes of ``shape`` whose product
    is the number of features ``m`` calibration saw (``calibrate`` only accepts weights
    contracted over their leading axes).

    Raises:
        ValueError: naming the transform and the leaf, when ``by_path`` has no
            statistics for it, when their feature size matches no leading axes of
            ``shape`` (or leaves no output axis), or when the Gram has NaN or Inf.

    Example:
        >>> import jax.numpy as jnp
        >>> s = InputStats(jnp.float32(1), jnp.zeros(18), jnp.eye(18), None, None)
        >>> leaf_gram("prune", "importance='wanda'", "w", {"w": s}, (3, 3, 2, 4))[1:]
        (3, 18, 4)
    """
    stats = by_path.get(path)
    if stats is None:
        raise ValueError(
            f"{name}: {option} but data= has no InputStats for leaf {path!r}; calibrate that "
            "weight or exclude it with where="
        )
    refuse_trailing(name, option, path, stats)
    gram = stats.gram
    gram_shape = tuple(getattr(gram, "shape", ()))
    m = gram_shape[0] if len(gram_shape) == 2 and gram_shape[0] == gram_shape[1] else None
    fans = [] if m is None else [k for k in range(1, len(shape)) if math.prod(shape[:k]) == m]
    if not fans:
        raise ValueError(
            f"{name}: the InputStats of leaf {path!r} have a gram of shape {gram_shape}, which "
            f"fits no fan-in of the leaf's shape {tuple(shape)} (it needs (m, m) with m the "
            "product of the leading input axes, e.g. in for a Dense (in, out) kernel or "
            "h * w * in for a conv kernel); were the statistics calibrated on these params?"
        )
    if not is_traced(gram) and not bool(jnp.isfinite(gram).all()):
        raise ValueError(f"{name}: the InputStats gram of leaf {path!r} has NaN or Inf values")
    fan_in = fans[-1]
    rows, cols = matrix_shape(tuple(shape), fan_in)
    return gram, fan_in, rows, cols
