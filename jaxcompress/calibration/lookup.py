"""The calibration statistics of each leaf in ``data=``, checked against the leaf.

Data-aware methods (Wanda, SparseGPT, GPTQ, codebook GPTQ) read the input Gram of
each weight they compress from a :func:`jaxcompress.calibrate` pytree; these lookups
raise errors that name the transform, the option and the leaf.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

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

    ``pca`` and ``lda`` project a weight's leading input axes and fold the change into
    its sibling bias; an ``(out, in)`` weight (equinox) would be read transposed.

    Example:
        >>> import jax.numpy as jnp
        >>> s = InputStats(jnp.float32(1), jnp.zeros(2), jnp.eye(2), None, None)
        >>> refuse_trailing("pca", "data=", "w", s)  # leading: fine
    """
    if stats.trailing:
        raise ValueError(
            f"{name}: {option} reads a weight's inputs off its leading axes (a linen "
            f"(in, out) kernel), but leaf {path!r} is stored output first and contracted "
            "over its trailing axes (an equinox (out, in) weight); exclude it with where="
        )


class LeafGram(NamedTuple):
    """A leaf's calibration Gram and the matrix view it belongs to.

    ``fan_in``, ``rows`` and ``cols`` describe the weight in its leading layout (inputs
    first): the weight itself, or for ``trailing`` statistics (a weight stored output
    first, as equinox's ``(out, in)``) :func:`jaxcompress.arrays.leading.to_leading`
    of it, whose ``fan_in`` leading axes are the weight's trailing ones.
    """

    gram: jax.Array
    fan_in: int
    rows: int
    cols: int
    trailing: bool


def leaf_gram(name: str, option: str, path: str, by_path: dict, shape: tuple[int, ...]) -> LeafGram:
    """The Gram matrix of leaf ``path`` and the matrix view it fits, as a :class:`LeafGram`.

    The fan-in is read off the statistics: the leading axes of ``shape`` (trailing
    ones for ``trailing`` statistics) whose product is the number of features ``m``
    calibration saw.

    Raises:
        ValueError: naming the transform and the leaf, when ``by_path`` has no
            statistics for it, when their feature size matches no input axes of
            ``shape`` (or leaves no output axis), or when the Gram has NaN or Inf.

    Example:
        >>> import jax.numpy as jnp
        >>> s = InputStats(jnp.float32(1), jnp.zeros(18), jnp.eye(18), None, None)
        >>> leaf_gram("prune", "importance='wanda'", "w", {"w": s}, (3, 3, 2, 4))[1:]
        (3, 18, 4, False)
        >>> s = InputStats(jnp.float32(1), jnp.zeros(18), jnp.eye(18), None, None, True)
        >>> leaf_gram("prune", "importance='wanda'", "w", {"w": s}, (4, 2, 3, 3))[1:]
        (3, 18, 4, True)
    """
    stats = by_path.get(path)
    if stats is None:
        raise ValueError(
            f"{name}: {option} but data= has no InputStats for leaf {path!r}; calibrate that "
            "weight or exclude it with where="
        )
    if stats.stacked is not None:
        raise ValueError(
            f"{name}: the InputStats of leaf {path!r} are stacked (one per scan iteration, "
            f"along its axis {stats.stacked}); compress stacked layers with "
            "jc.sequential(tx, apply_fn, batches), which calibrates and compresses each slice"
        )
    gram = stats.gram
    gram_shape = tuple(getattr(gram, "shape", ()))
    m = gram_shape[0] if len(gram_shape) == 2 and gram_shape[0] == gram_shape[1] else None
    inputs = (lambda k: shape[len(shape) - k :]) if stats.trailing else (lambda k: shape[:k])
    fans = [] if m is None else [k for k in range(1, len(shape)) if math.prod(inputs(k)) == m]
    if not fans:
        where = "trailing" if stats.trailing else "leading"
        raise ValueError(
            f"{name}: the InputStats of leaf {path!r} have a gram of shape {gram_shape}, which "
            f"fits no fan-in of the leaf's shape {tuple(shape)} (it needs (m, m) with m the "
            f"product of its {where} input axes, e.g. in for a Dense (in, out) kernel or "
            "h * w * in for a conv kernel); were the statistics calibrated on these params?"
        )
    if not is_traced(gram) and not bool(jnp.isfinite(gram).all()):
        raise ValueError(f"{name}: the InputStats gram of leaf {path!r} has NaN or Inf values")
    fan_in = fans[-1]
    rows = math.prod(inputs(fan_in))
    return LeafGram(gram, fan_in, rows, math.prod(shape) // rows, bool(stats.trailing))
