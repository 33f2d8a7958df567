"""N:M semi-structured sparsity: in every run of M inputs of an output, N are kept.

The runs lie along the contracted axis of the weight's matrix view ``(K, N_out)``
(all axes but the last flattened row-major: a Dense kernel's ``in`` axis, a conv
kernel's ``h * w * in`` patch), which is the layout sparse tensor cores (2:4 on NVIDIA
Ampere and later) accelerate. The result is an ordinary :class:`~jaxcompress.Sparse`
leaf holding exactly ``size * N / M`` values.

With ``importance="sparsegpt"`` the runs are chosen during SparseGPT's sweep over the
input rows (:func:`jaxcompress.numerics.sparsegpt.sparsegpt` with ``nm=``): the kept weights
are updated to make up for the pruned ones, so the leaf's values differ from the
dense weight's.
"""

from __future__ import annotations

import functools
import math
import re

import jax
import jax.numpy as jnp

from jaxcompress.arrays import Sparse
from jaxcompress.arrays.leading import from_leading, leading_shape, to_leading
from jaxcompress.calibration.lookup import leaf_gram, require_data
from jaxcompress.core.mesh import unsharded
from jaxcompress.methods.prune import sparse_from_mask
from jaxcompress.numerics.obs import check_block_size, check_damp, check_factorized, mesh_scope
from jaxcompress.numerics.select import nm_keep_mask
from jaxcompress.numerics.sparsegpt import sparsegpt
from jaxcompress.numerics.wanda import wanda_scores
from jaxcompress.transforms.base import Transform
from jaxcompress.transforms.engine import Unfit, per_leaf
from jaxcompress.transforms.filters import Filter, kernels
from jaxcompress.transforms.stats import NMStats

__all__ = ["nm_keep_mask", "prune_nm"]

_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
_IMPORTANCES = ("magnitude", "wanda", "sparsegpt")


def _parse(pattern: str) -> tuple[int, int]:
    match = _PATTERN.match(pattern) if isinstance(pattern, str) else None
    if match is None:
        raise ValueError(f"prune_nm: pattern must look like '2:4', got {pattern!r}")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ValueError(f"prune_nm: pattern {pattern!r} needs 0 < N < M")
    return n, m


@functools.partial(jax.jit, static_argnames=("nm", "block_size"))
def _sparsegpt_leaf(weight, gram, damp, *, nm, block_size):
    """``(values, keep, stats)`` of one leaf under N:M SparseGPT, as one program."""
    shape = tuple(weight.shape)
    matrix = unsharded(weight).reshape(math.prod(shape[:-1]), shape[-1])
    with mesh_scope(matrix):
        values, keep, stats = sparsegpt(
            matrix, unsharded(gram), None, damp=damp, block_size=block_size, nm=nm
        )
    return values.astype(weight.dtype).reshape(shape), keep.reshape(shape), stats


def prune_nm(
    pattern: str = "2:4",
    *,
    importance: str = "magnitude",
    damp: float = 0.01,
    block_size: int = 128,
    where: Filter = kernels,
    progress: bool = False,
) -> Transform:
    """N:M sparsity along the contracted axis (``"2:4"``: 2 of every 4 inputs kept).

    The runs of ``M`` lie along a weight's inputs, the layout sparse tensor cores
    take: the leading axes of a linen ``(in, out)`` or ``(h, w, in, out)`` kernel (all
    but the last, flattened row-major), and the trailing axes of a weight stored
    output first, an equinox ``Linear``'s ``(out, in)`` or ``Conv``'s
    ``(out, in, h, w)`` (told by the module in the tree, or by statistics in
    ``data=``): such a weight is pruned seen inputs first, bit for bit as its ``W.T``
    in the linen layout, and stored in its own layout.

    NaN and Inf: an eager call raises. Under ``jax.jit`` a NaN or Inf ranks above
    every finite magnitude in its run of ``M``, so it is kept as it is, in one of the
    run's ``N`` slots. ``importance="sparsegpt"`` is not covered: wrap it in
    :func:`jaxcompress.checked` to raise instead.

    Args:
        pattern: ``"N:M"`` with ``0 < N < M``.
        importance: ``"magnitude"`` (``|w|``), ``"wanda"`` (``|w| · ‖x‖``) or
            ``"sparsegpt"``; the last two need ``data=`` from
            :func:`jaxcompress.calibrate`. SparseGPT (Frantar & Alistarh 2023) sweeps
            the input rows with error feedback (see :mod:`jaxcompress.numerics.obs`):
            when it reaches the first row of a run of ``M``, each output keeps the
            ``N`` rows of the run with the largest OBS saliency ``w² / [H⁻¹]_ii``
            (``H`` the damped Gram, on the current, error-updated weights), and the
            pruned rows' error is fed into the rows not yet swept, so the kept values
            change and the output error ``‖X W − X Ŵ‖`` drops.
        damp: SparseGPT's damping, relative to the mean diagonal of the Gram (ignored
            by the other importances, as in :func:`jaxcompress.prune`).
        block_size: SparseGPT's rows per block of lazy updates (the result does not
            depend on it beyond float rounding).
        where: which leaves; by default floating leaves with ndim >= 2. Under the
            default filter, a leaf whose contracted size is not a multiple of ``M``
            (a first conv layer with 1 or 3 input channels) is skipped (left dense,
            stats ``{"skipped": reason}``, one warning per call); a filter of your
            own that selects such a leaf raises.

        progress: show a bar on stderr, by leaf and bytes, while it runs (not under
            ``jit``).
    Returns:
        A transform returning ``(compressed, stats)``: each selected leaf becomes a
        :class:`~jaxcompress.Sparse` leaf; stats give ``pruned``, ``size``, ``n`` and
        ``m`` per leaf, and with SparseGPT also ``damp``, ``damping`` (the ``λ``
        added), ``factorized`` and ``relative_output_error``
        (``√(tr(Eᵀ G E) / tr(Wᵀ G W))``). It runs under ``jit``.

    Raises:
        ValueError: a malformed pattern, an unknown importance, a bad ``damp`` or
            ``block_size``, a leaf your own ``where`` selects whose contracted size
            is not a multiple of ``M`` (named) or (``wanda``, ``sparsegpt``) whose
            statistics are contracted over fewer axes than all but its last,
            ``wanda`` or ``sparsegpt`` without matching ``data=``,
            or (outside ``jit``) a Gram not positive definite after damping.

    Example:
        >>> import jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> w = jnp.arange(1.0, 17.0).reshape(8, 2)
        >>> sparse, stats = jc.prune_nm("2:4")({"w": w})
        >>> jc.materialize(sparse)["w"][:, 0].tolist()
        [0.0, 0.0, 5.0, 7.0, 0.0, 0.0, 13.0, 15.0]
        >>> stats["w"]["pruned"], sparse["w"].nnz
        (8, 8)

        An equinox ``Linear`` stores ``(out, in)``: each output row keeps 2 of every 4 inputs.

        >>> import jax, equinox as eqx
        >>> layer = eqx.nn.Linear(8, 2, key=jax.random.key(0))
        >>> pruned, _ = jc.prune_nm("2:4", where="weight")(layer)
        >>> (jc.materialize(pruned.weight).reshape(2, 2, 4) != 0).sum(-1).tolist()
        [[2, 2], [2, 2]]

        SparseGPT with statistics of the inputs (:func:`jaxcompress.calibrate` gives them):

        >>> x = jnp.arange(24.0).reshape(3, 8) % 5
        >>> data = {"w": jc.InputStats(jnp.float32(3), x.mean(0), x.T @ x / 3, None, None)}
        >>> sparse, stats = jc.prune_nm("2:4", importance="sparsegpt")({"w": w}, data=data)
        >>> sparse["w"].nnz, bool(stats["w"]["relative_output_error"] < 0.5)
        (8, True)
    """
    n, m = _parse(pattern)
    if importance not in _IMPORTANCES:
        raise ValueError(f"prune_nm: importance must be one of {_IMPORTANCES}, got {importance!r}")
    damp_value = check_damp("prune_nm", damp)
    block = check_block_size("prune_nm", block_size)
    name = f"prune_nm({pattern!r}, importance={importance})"
    option = f"importance={importance!r}"

    def prepare(key, data):
        del key  # deterministic
        return require_data(name, option, data) if importance != "magnitude" else {}

    def check(entry, weight, by_path):
        """``(gram, trailing inputs)`` (gram with data-aware importances), runs of ``M`` checked.

        A weight stored output first (an equinox layer's ``(out, in)``, told by the tree
        or by statistics of its trailing axes) has its runs along its trailing input
        axes: it is pruned seen inputs first.
        """
        shape = tuple(weight.shape)
        found = None
        trailing = entry.trailing_inputs or None
        if importance != "magnitude":
            found = leaf_gram(name, option, entry.path, by_path, shape)
            trailing = found.fan_in if found.trailing else None
        if trailing is not None:
            shape = leading_shape(shape, trailing)
        rows = math.prod(shape[:-1])
        if rows % m:
            raise Unfit(
                f"{name}: leaf {entry.path!r} of shape {tuple(weight.shape)} contracts "
                f"{rows} inputs, not a multiple of M={m}"
            )
        if found is None:
            return None, trailing
        if found.fan_in != len(shape) - 1:
            side = ("last", "first") if found.trailing else ("first", "last")
            raise Unfit(
                f"{name}: leaf {entry.path!r} is contracted over its {side[0]} {found.fan_in} "
                f"axes; N:M runs need every axis but the {side[1]}"
            )
        return found.gram, found.fan_in if found.trailing else None

    def step(item, key) -> tuple[Sparse, NMStats]:
        del key
        (gram, trailing), weight = item.plan, item.weight
        if trailing is not None:
            weight = to_leading(weight, trailing)
        shape = tuple(weight.shape)
        size = math.prod(shape)
        leaf_stats: NMStats = {"pruned": size - size * n // m, "size": size, "n": n, "m": m}
        values = weight
        if importance == "sparsegpt":
            values, keep, extra = _sparsegpt_leaf(
                weight, gram, jnp.float32(damp_value), nm=(n, m), block_size=block
            )
            check_factorized(name, item.entry.path, extra, damp)
            leaf_stats.update({"damp": damp_value, **extra})
        else:
            matrix = unsharded(weight).reshape(math.prod(shape[:-1]), shape[-1])
            if importance == "wanda":
                scores = wanda_scores(matrix, unsharded(gram))
            else:
                scores = jnp.abs(matrix.astype(jnp.float32))
            keep = nm_keep_mask(scores, n, m).reshape(shape)
        sparse = sparse_from_mask(values, keep, size * n // m)
        return (sparse if trailing is None else from_leading(sparse, trailing)), leaf_stats

    return per_leaf(
        name,
        where,
        prepare=prepare,
        check=check,
        step=step,
        progress=progress,
        default_where=kernels,
    )
