"""Data-aware pruning and quantization: Wanda, SparseGPT and GPTQ on a layer's Gram matrix.

Every algorithm here works on a weight's ``(m, n)`` matrix view ``W`` (see
:func:`~jaxcompress.arrays.lowrank.matrix_shape`): rows are the ``m`` input features
the weight contracts (a Dense ``(in, out)`` kernel's ``in``; a conv kernel
``(h, w, in, out)``'s ``h * w * in`` im2col features), columns are its ``n`` outputs.
``G = E[x xᵀ]`` is the uncentered second moment of those inputs, the ``gram`` of
:class:`~jaxcompress.InputStats` from :func:`jaxcompress.calibrate`. For the
``N`` calibration rows ``X``, the layer's output error is
``‖X W − X Ŵ‖_F² = N tr((W − Ŵ)ᵀ G (W − Ŵ))``, which is what the algorithms reduce.

* **Wanda** (Sun et al. 2023): the score of ``W_ij`` is ``|W_ij| · √G_ii`` (the
  weight's magnitude times its input's RMS), see :func:`wanda_scores`.
* **OBS sweep** (SparseGPT, Frantar & Alistarh 2023; GPTQ, Frantar et al. 2022): the
  rows of ``W`` are replaced one at a time (pruned or rounded), and each row's error is
  fed into the rows not yet processed so that the layer's output changes least. With
  ``H = G + λ I`` (``λ = damp · mean(diag G)``) and ``U`` the upper Cholesky factor of
  ``H⁻¹`` (``H⁻¹ = Uᵀ U``), row ``i`` replaced by ``q`` changes the later rows by
  ``W[j] -= U[i, j] · (W[i] − q) / U[i, i]`` for ``j > i``. Rows are processed in
  blocks of ``block_size``; inside a block only an error matrix is kept and the rows
  after the block get one matrix product per block (GPTQ's "lazy batch updates"),
  so the work is ``O(m² n)`` and the memory one layer's ``W`` and ``U``.

An input feature that calibration never saw (``G_ii = 0``, so its row and column of
``G`` are zero) has its diagonal set to the mean of the others before damping (1 if
all are zero); such a row affects no other row, and SparseGPT prunes it first (its
output cost is zero).

Everything runs under :func:`jax.jit` (one compiled program per layer shape and set of
options, with :func:`jax.lax.fori_loop` over blocks and rows), in float32.
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
from fractions import Fraction
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AxisType

from jaxcompress.arrays.lowrank import matrix_shape
from jaxcompress.calibration.calibrate import InputStats, stats_by_path
from jaxcompress.core.checks import is_traced

_HIGHEST = lax.Precision.HIGHEST


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.dot(a, b, precision=_HIGHEST)


def mesh_scope(x: jax.Array) -> contextlib.AbstractContextManager:
    """A context in which new arrays share ``x``'s explicit mesh (a null context otherwise).

    The sweeps write rows into buffers (``dynamic_update_slice``, loop carries), which
    need operands on the same mesh: with ``Explicit`` mesh axes, a weight (even once
    replicated) carries its mesh, and buffers made inside the trace must carry it too.

    Example:
        >>> import jax.numpy as jnp
        >>> with mesh_scope(jnp.ones(2)):
        ...     jnp.zeros(2).shape
        (2,)
    """
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or mesh.empty or not any(t == AxisType.Explicit for t in mesh.axis_types):
        return contextlib.nullcontext()
    return jax.sharding.use_abstract_mesh(mesh)


def _int_dtype():
    return jnp.int64 if jax.config.x64_enabled else jnp.int32


# ---------------------------------------------------------------- validation


def check_damp(name: str, damp: object) -> float:
    """``damp`` as a float, or a ``ValueError`` naming ``name``.

    Example:
        >>> check_damp("quantize", 0.01)
        0.01
    """
    if isinstance(damp, bool) or not isinstance(damp, numbers.Real):
        raise ValueError(f"{name}: damp must be a non-negative real number, got {damp!r}")
    value = float(damp)
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"{name}: damp must be a finite number >= 0, got {damp!r}")
    return value


def check_block_size(name: str, block_size: object) -> int:
    """``block_size`` as an int, or a ``ValueError`` naming ``name``.

    Example:
        >>> check_block_size("prune", 128)
        128
    """
    if (
        isinstance(block_size, bool)
        or not isinstance(block_size, numbers.Integral)
        or block_size < 1
    ):
        raise ValueError(f"{name}: block_size must be a positive integer, got {block_size!r}")
    return int(block_size)


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


def prefix_counts(sparsity: Fraction, row_counts: list[int], n: int) -> list[int]:
    """Prune counts per chunk of rows that add up to exactly ``floor(sparsity * m * n)``.

    Chunk ``k`` (``row_counts[k]`` rows of ``n`` entries) prunes
    ``floor(s · R_{k+1} · n) − floor(s · R_k · n)`` where ``R_k`` is the number of rows
    before it, so every chunk prunes ``floor`` or ``ceil`` of its own share.

    Example:
        >>> prefix_counts(Fraction(1, 2), [3, 3], 1), prefix_counts(Fraction(1, 2), [1] * 4, 3)
        ([1, 2], [1, 2, 1, 2])
    """
    counts, before, done = [], 0, 0
    for rows in row_counts:
        done += rows
        total = math.floor(sparsity * done * n)
        counts.append(total - before)
        before = total
    return counts


# ---------------------------------------------------------------- the numerics


def wanda_scores(matrix: jax.Array, gram: jax.Array) -> jax.Array:
    """Wanda's importance ``|W_ij| · √G_ii`` of an ``(m, n)`` matrix view, in float32.

    With unit activation norms (``diag G = 1``) the scores are exactly ``|W|``.

    Example:
        >>> import jax.numpy as jnp
        >>> w = jnp.array([[1.0, -2.0], [3.0, 1.0]])
        >>> wanda_scores(w, jnp.diag(jnp.array([4.0, 1.0]))).tolist()
        [[2.0, 4.0], [3.0, 1.0]]
    """
    norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram).astype(jnp.float32), 0.0))
    return jnp.abs(matrix.astype(jnp.float32)) * norms[:, None]


def _rank_keep(scores: jax.Array, count: jax.Array | int, axis: int | None = None) -> jax.Array:
    """Keeps all but the ``count`` lowest scores (stable: ties pruned in index order).

    ``axis=None`` ranks the flattened array (row-major); an axis ranks along it, with
    ``count`` broadcasting against the other axes.
    """
    if axis is None:
        flat = scores.reshape(-1)
        order = jnp.argsort(flat, stable=True)
        index = jnp.arange(flat.shape[0], dtype=_int_dtype())
        rank = jnp.zeros(flat.shape, _int_dtype()).at[order].set(index)
        return (rank >= jnp.asarray(count, _int_dtype())).reshape(scores.shape)
    order = jnp.argsort(scores, axis=axis, stable=True)
    rank = jnp.argsort(order, axis=axis, stable=True).astype(_int_dtype())
    return rank >= jnp.asarray(count, _int_dtype())


def wanda_keep(
    matrix: jax.Array, gram: jax.Array, counts: jax.Array | int, *, comparison: str
) -> jax.Array:
    """Wanda's keep-mask of an ``(m, n)`` matrix view; works under ``jit``.

    ``comparison="layer"`` prunes the ``counts`` (a scalar) lowest scores of the whole
    matrix; ``"output"`` prunes ``counts[j]`` lowest scores in each output column ``j``.
    Ties are pruned in index order (row-major, or down the column).

    Example:
        >>> import jax.numpy as jnp
        >>> w = jnp.array([[1.0, -2.0], [3.0, 1.0]])
        >>> wanda_keep(w, jnp.eye(2), 2, comparison="layer").tolist()
        [[False, True], [True, False]]
        >>> wanda_keep(w, jnp.diag(jnp.array([16.0, 1.0])), jnp.array([1, 1]),
        ...            comparison="output").tolist()
        [[True, True], [False, False]]
    """
    scores = wanda_scores(matrix, gram)
    if comparison == "layer":
        return _rank_keep(scores, counts)
    return _rank_keep(scores, jnp.asarray(counts)[None, :], axis=0)


def _damped_inverse_factor(
    gram: jax.Array, damp: float | jax.Array, padded: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(U, λ, dead)``: the upper Cholesky factor of ``(G + λ I)⁻¹`` padded to ``padded``.

    Dead features (``G_ii <= 0``) get the mean live diagonal first; the padding is an
    identity block, which couples to no real row.
    """
    m = gram.shape[0]
    h = gram.astype(jnp.float32)
    h = (h + h.T) * 0.5
    diagonal = jnp.diagonal(h)
    dead = diagonal <= 0
    live = jnp.sum(jnp.where(dead, 0, 1).astype(jnp.float32))
    live_mean = jnp.sum(jnp.where(dead, 0.0, diagonal)) / jnp.maximum(live, 1.0)
    fill = jnp.where(live > 0, live_mean, 1.0)
    h = h + jnp.diag(jnp.where(dead, fill, 0.0))
    damping = jnp.asarray(damp, jnp.float32) * jnp.mean(jnp.diagonal(h))
    h = h + damping * jnp.eye(m, dtype=jnp.float32)
    if padded > m:
        h = jnp.eye(padded, dtype=jnp.float32).at[:m, :m].set(h)
    # With J the order reversal and J H J = L Lᵀ, H = R Rᵀ for the upper triangular
    # R = J L J, so H⁻¹ = (R⁻¹)ᵀ R⁻¹: U = R⁻¹ = J L⁻¹ J, one Cholesky and one solve.
    lower = jnp.linalg.cholesky(h[::-1, ::-1])
    identity = jnp.eye(padded, dtype=jnp.float32)
    upper = jax.scipy.linalg.solve_triangular(lower, identity, lower=True)[::-1, ::-1]
    return upper, damping, dead


def _sweep(w, upper, block_size: int, row_fn, carry, block_fn=None):
    """The OBS sweep over the rows of ``w`` (``(m_pad, n)``, ``m_pad`` a multiple of the block).

    ``row_fn(r, w_row, err, u_block, w, carry) -> (q_row, carry)`` replaces row ``r``
    (its current value ``w_row``); ``err`` holds the block's scaled errors so far (zero
    for rows not yet done), so the current value of any later row ``j`` is
    ``w[j] - u_block[:, j] @ err``. ``block_fn(start, w, carry)`` runs at each block start,
    when ``w``'s rows from ``start`` on are current.
    """
    padded, n = w.shape
    diagonal = jnp.diagonal(upper)
    column = jnp.arange(padded)

    def block_body(b, state):
        w, carry = state
        start = b * block_size
        u_block = lax.dynamic_slice_in_dim(upper, start, block_size, axis=0)
        if block_fn is not None:
            carry = block_fn(start, w, carry)

        def row_body(i, inner):
            err, carry = inner
            r = start + i
            u_column = lax.dynamic_index_in_dim(u_block, r, axis=1, keepdims=False)
            w_row = lax.dynamic_index_in_dim(w, r, axis=0, keepdims=False) - _dot(u_column, err)
            q_row, carry = row_fn(r, w_row, err, u_block, w, carry)
            scaled = (w_row - q_row) / diagonal[r]
            return lax.dynamic_update_index_in_dim(err, scaled, i, axis=0), carry

        err = jnp.zeros((block_size, n), jnp.float32)
        err, carry = lax.fori_loop(0, block_size, row_body, (err, carry))
        later = jnp.where((column >= start + block_size)[None, :], u_block, 0.0)
        return w - _dot(later.T, err), carry

    _, carry = lax.fori_loop(0, padded // block_size, block_body, (w, carry))
    return carry


def _padding(m: int, block_size: int) -> tuple[int, int]:
    """``(block, padded rows)``: the block is at most ``m`` rows, the rows a multiple of it."""
    block = min(block_size, m)
    return block, -(-m // block) * block


def _relative_output_error(w: jax.Array, q: jax.Array, gram: jax.Array) -> jax.Array:
    """``√(tr(Eᵀ G E) / tr(Wᵀ G W))`` with ``E = W − Q``, the relative output error."""
    g = gram.astype(jnp.float32)
    error = w - q
    numerator = jnp.sum(error * _dot(g, error))
    denominator = jnp.sum(w * _dot(g, w))
    safe = jnp.where(denominator > 0, denominator, jnp.ones_like(denominator))
    return jnp.where(denominator > 0, jnp.sqrt(jnp.maximum(numerator, 0.0) / safe), 0.0)


@functools.partial(jax.jit, static_argnames=("block_size", "nm"))
def sparsegpt(
    matrix: jax.Array,
    gram: jax.Array,
    block_counts: jax.Array | None,
    *,
    damp: float | jax.Array,
    block_size: int,
    nm: tuple[int, int] | None = None,
) -> tuple[jax.Array, jax.Array, dict]:
    """SparseGPT on an ``(m, n)`` matrix view: ``(values, keep, stats)``.

    Rows are swept in blocks of ``min(block_size, m)`` (the last block padded).
    When block ``k`` starts, its ``block_counts[k]`` entries with the lowest
    ``W_ij² / U_ii²`` (the OBS saliency, ``U_ii² = [H⁻¹]_ii`` after the earlier
    rows; dead inputs score 0) are chosen for pruning, over all its rows and outputs,
    ties in row-major order. Then each row is pruned and its error fed forward.

    With ``nm=(N, M)`` (``M`` dividing ``m``) the mask is N:M along the rows instead,
    as SparseGPT does for semi-structured sparsity: when the sweep reaches the first
    row of each run of ``M`` rows, each output column keeps the ``N`` of those rows
    with the highest saliency, scored on the current, error-updated weights (ties
    keep the lower row); ``block_counts`` is then unused (pass ``None``).

    Returns:
        ``values``: the updated weights (float32, zero where pruned); ``keep``: the
        boolean mask; ``stats``: ``{"damping", "factorized", "relative_output_error"}``
        (``λ`` added to the diagonal, whether the Cholesky factors are finite).

    Example:
        >>> import jax.numpy as jnp
        >>> w = jnp.array([[1.0, -2.0], [3.0, 0.5]])
        >>> values, keep, _ = sparsegpt(w, jnp.eye(2), jnp.array([2]), damp=0.0, block_size=128)
        >>> keep.tolist(), values.tolist()
        ([[False, True], [True, False]], [[0.0, -2.0], [3.0, 0.0]])
        >>> _, keep, _ = sparsegpt(w, jnp.eye(2), None, damp=0.0, block_size=128, nm=(1, 2))
        >>> keep.tolist()
        [[False, True], [True, False]]
    """
    w = matrix.astype(jnp.float32)
    m, n = w.shape
    block, padded = _padding(m, block_size)
    upper, damping, dead = _damped_inverse_factor(gram, damp, padded)
    w_padded = jnp.zeros((padded, n), jnp.float32).at[:m].set(w)
    dead_padded = jnp.zeros((padded,), bool).at[:m].set(dead)
    real = jnp.arange(padded) < m
    diagonal = jnp.diagonal(upper)
    counts = None if nm is not None else jnp.asarray(block_counts)

    def block_fn(start, w, carry):
        values, keep = carry
        rows = lax.dynamic_slice_in_dim(w, start, block, axis=0)
        d = lax.dynamic_slice_in_dim(diagonal, start, block)
        is_real = lax.dynamic_slice_in_dim(real, start, block)
        is_dead = lax.dynamic_slice_in_dim(dead_padded, start, block)
        score = jnp.square(rows) / jnp.square(d)[:, None]
        score = jnp.where(is_dead[:, None], 0.0, score)
        score = jnp.where(is_real[:, None], score, jnp.inf)
        chosen = _rank_keep(score, counts[start // block])
        return values, lax.dynamic_update_slice_in_dim(keep, chosen, start, axis=0)

    def choose_run(args):
        # Imported here: nm imports this module.
        from jaxcompress.methods.nm import nm_keep_mask

        kept, run = nm
        r, err, u_block, w, keep = args
        rows = lax.dynamic_slice_in_dim(w, r, run, axis=0)
        rows = rows - _dot(lax.dynamic_slice_in_dim(u_block, r, run, axis=1).T, err)
        d = lax.dynamic_slice_in_dim(diagonal, r, run)
        score = jnp.square(rows) / jnp.square(d)[:, None]
        score = jnp.where(lax.dynamic_slice_in_dim(dead_padded, r, run)[:, None], 0.0, score)
        return lax.dynamic_update_slice_in_dim(keep, nm_keep_mask(score, kept, run), r, axis=0)

    def row_fn(r, w_row, err, u_block, w, carry):
        values, keep = carry
        if nm is not None:
            starts = (r % nm[1] == 0) & (r < m)
            keep = lax.cond(starts, choose_run, lambda args: args[-1], (r, err, u_block, w, keep))
        q = jnp.where(lax.dynamic_index_in_dim(keep, r, axis=0, keepdims=False), w_row, 0.0)
        return q, (lax.dynamic_update_index_in_dim(values, q, r, axis=0), keep)

    start = (jnp.zeros((padded, n), jnp.float32), jnp.ones((padded, n), bool))
    chooser = None if nm is not None else block_fn
    values, keep = _sweep(w_padded, upper, block, row_fn, start, chooser)
    values, keep = values[:m], keep[:m]
    stats = {
        "damping": damping,
        "factorized": jnp.all(jnp.isfinite(upper)),
        "relative_output_error": _relative_output_error(w, values, gram),
    }
    return values, keep, stats


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
) -> tuple[jax.Array, jax.Array, jax.Array | None, dict]:
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
        group_size: rows per scale group (``None``: one group).
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
    # Imported here: quantize imports this module.
    from jaxcompress.methods.quantize import _decode, _encode, quantize_view

    if act_order and dynamic_groups:
        raise ValueError("gptq: act_order needs static group scales (dynamic_groups=False)")
    w = matrix.astype(jnp.float32)
    m, n = w.shape
    groups, channels = scale.shape
    size = m if group_size is None else group_size
    block, padded = _padding(m, block_size)
    h = gram.astype(jnp.float32)
    order = None
    if act_order:
        order = jnp.argsort(-jnp.diagonal(h), stable=True)
        w, h = w[order], h[order][:, order]
        group_of_row = order // size
    else:
        group_of_row = jnp.arange(m) // size
    upper, damping, _ = _damped_inverse_factor(h, damp, padded)
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
        rows = lax.dynamic_slice_in_dim(w, r, size, axis=0)
        u_rows = lax.dynamic_slice_in_dim(u_block, r, size, axis=1)
        rows = rows - _dot(u_rows.T, err)
        _, s, z, _ = quantize_view(rows, (0,), **options)
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
        row_codes, _ = _encode(w_row, s, z, bits)
        q = _decode(row_codes, s, z, bits)
        codes = lax.dynamic_update_index_in_dim(codes, row_codes.astype(jnp.uint8), r, axis=0)
        return q, (codes, scales, zeros)

    start = (jnp.zeros((padded, n), jnp.uint8), scales, zeros)
    codes, scales, zeros = _sweep(w_padded, upper, block, row_fn, start)
    codes = codes[:m]
    if order is not None:
        codes = codes[jnp.argsort(order)]
    scale_out = scales[:groups].astype(scale_dtype)
    zero_out = None if symmetric else zeros[:groups].astype(scale_dtype)
    # The dequantized weights, for the output error.
    rows = jnp.arange(m) // size
    row_scale = scale_out.astype(jnp.float32)[rows]
    row_zero = None if symmetric else zero_out.astype(jnp.float32)[rows]
    restored = _decode(codes.astype(jnp.float32), row_scale, row_zero, bits)
    stats = {
        "damping": damping,
        "factorized": jnp.all(jnp.isfinite(upper)),
        "relative_output_error": _relative_output_error(matrix.astype(jnp.float32), restored, gram),
    }
    return codes, scale_out, zero_out, restored, stats
