"""The OBS sweep shared by SparseGPT, GPTQ and codebook GPTQ, on a layer's Gram matrix.

Every algorithm here works on a weight's ``(m, n)`` matrix view ``W`` (see
:func:`~jaxcompress.arrays.lowrank.matrix_shape`): rows are the ``m`` input features
the weight contracts (a Dense ``(in, out)`` kernel's ``in``; a conv kernel
``(h, w, in, out)``'s ``h * w * in`` im2col features), columns are its ``n`` outputs.
``G = E[x xᵀ]`` is the uncentered second moment of those inputs, the ``gram`` of
:class:`~jaxcompress.InputStats` from :func:`jaxcompress.calibrate`. For the
``N`` calibration rows ``X``, the layer's output error is
``‖X W − X Ŵ‖_F² = N tr((W − Ŵ)ᵀ G (W − Ŵ))``, which is what the algorithms reduce.

The rows of ``W`` are replaced one at a time (pruned or rounded), and each row's error is
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
import math
import numbers

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AxisType

from jaxcompress.core.checks import is_traced

_HIGHEST = lax.Precision.HIGHEST


def dot(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b`` at full float32 precision (the sweeps' error feedback needs it).

    Example:
        >>> import jax.numpy as jnp
        >>> dot(jnp.array([1.0, 2.0]), jnp.array([3.0, 4.0])).tolist()
        11.0
    """
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


def damped_inverse_factor(
    gram: jax.Array, damp: float | jax.Array, padded: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(U, λ, dead)``: the upper Cholesky factor of ``(G + λ I)⁻¹`` padded to ``padded``.

    Dead features (``G_ii <= 0``) get the mean live diagonal first; the padding is an
    identity block, which couples to no real row.

    Example:
        >>> import jax.numpy as jnp
        >>> upper, damping, dead = damped_inverse_factor(jnp.diag(jnp.array([4.0, 0.0])), 0.0, 3)
        >>> jnp.diagonal(upper).tolist(), float(damping), dead.tolist()
        ([0.5, 0.5, 1.0], 0.0, [False, True])
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


def sweep(w, upper, block_size: int, row_fn, carry, block_fn=None):
    """The OBS sweep over the rows of ``w`` (``(m_pad, n)``, ``m_pad`` a multiple of the block).

    ``row_fn(r, w_row, err, u_block, w, carry) -> (q_row, carry)`` replaces row ``r``
    (its current value ``w_row``); ``err`` holds the block's scaled errors so far (zero
    for rows not yet done), so the current value of any later row ``j`` is
    ``w[j] - u_block[:, j] @ err``. ``block_fn(start, w, carry)`` runs at each block start,
    when ``w``'s rows from ``start`` on are current.

    Example:
        >>> import jax.numpy as jnp
        >>> w = jnp.array([[1.4], [0.0]])
        >>> upper, _, _ = damped_inverse_factor(jnp.array([[1.0, 0.5], [0.5, 1.0]]), 0.0, 2)
        >>> def round_row(r, w_row, err, u_block, w, rows):
        ...     q = jnp.round(w_row)
        ...     return q, rows.at[r].set(q)
        >>> sweep(w, upper, 2, round_row, jnp.zeros_like(w)).tolist()
        [[1.0], [0.0]]
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
            w_row = lax.dynamic_index_in_dim(w, r, axis=0, keepdims=False) - dot(u_column, err)
            q_row, carry = row_fn(r, w_row, err, u_block, w, carry)
            scaled = (w_row - q_row) / diagonal[r]
            return lax.dynamic_update_index_in_dim(err, scaled, i, axis=0), carry

        err = jnp.zeros((block_size, n), jnp.float32)
        err, carry = lax.fori_loop(0, block_size, row_body, (err, carry))
        later = jnp.where((column >= start + block_size)[None, :], u_block, 0.0)
        return w - dot(later.T, err), carry

    _, carry = lax.fori_loop(0, padded // block_size, block_body, (w, carry))
    return carry


def block_padding(m: int, block_size: int) -> tuple[int, int]:
    """``(block, padded rows)``: the block is at most ``m`` rows, the rows a multiple of it.

    Example:
        >>> block_padding(300, 128), block_padding(5, 128)
        ((128, 384), (5, 5))
    """
    block = min(block_size, m)
    return block, -(-m // block) * block


def relative_output_error(w: jax.Array, q: jax.Array, gram: jax.Array) -> jax.Array:
    """``√(tr(Eᵀ G E) / tr(Wᵀ G W))`` with ``E = W − Q``, the relative output error.

    Example:
        >>> import jax.numpy as jnp
        >>> w, gram = jnp.array([[2.0], [1.0]]), jnp.diag(jnp.array([1.0, 4.0]))
        >>> float(relative_output_error(w, jnp.array([[2.0], [0.0]]), gram))
        0.7071067690849304
    """
    g = gram.astype(jnp.float32)
    error = w - q
    numerator = jnp.sum(error * dot(g, error))
    denominator = jnp.sum(w * dot(g, w))
    safe = jnp.where(denominator > 0, denominator, jnp.ones_like(denominator))
    return jnp.where(denominator > 0, jnp.sqrt(jnp.maximum(numerator, 0.0) / safe), 0.0)


def check_factorized(name: str, path: str, stats: dict, damp: object) -> None:
    """Raises when a sweep over leaf ``path`` found its damped Gram not positive definite.

    ``stats["factorized"]`` is whether the Cholesky factor was finite; under ``jit``
    (a traced flag) nothing is checked.

    Raises:
        ValueError: naming the transform, the leaf and ``damp``, the fix.

    Example:
        >>> import jax.numpy as jnp
        >>> check_factorized("quantize", "w", {"factorized": jnp.bool_(True)}, 0.01)
        >>> check_factorized("quantize", "w", {"factorized": jnp.bool_(False)}, 0.0)
        Traceback (most recent call last):
        ...
        ValueError: quantize: the damped Gram matrix of leaf 'w' is not positive definite ...
    """
    factorized = stats["factorized"]
    if not is_traced(factorized) and not bool(factorized):
        raise ValueError(
            f"{name}: the damped Gram matrix of leaf {path!r} is not positive "
            f"definite (its Cholesky factor is not finite); raise damp= (now {damp})"
        )
