"""The per-leaf stats every transform returns, one ``TypedDict`` per family.

A transform's stats map each selected leaf's path to one of these dicts. The same
figure has the same key everywhere:

* ``relative_error``: ``‖W − Ŵ‖ / ‖W‖`` of the weight (for ``pca``/``lda``, the
  estimated relative RMS output error, the figure they have);
* ``relative_output_error``: ``√(tr(Eᵀ G E) / tr(Wᵀ G W))`` on calibration data;
* ``rank``: the rank of a factorization. ``k`` in the ``pca``/``lda`` stats is its
  old name, kept as an alias (``k`` in the ``cluster`` stats is the codebook size).

Keys that only some options produce are optional (``total=False`` bases). Values
are Python numbers outside ``jit`` where the transform knows them statically and
scalar arrays otherwise.

Example:
    >>> import jax.numpy as jnp
    >>> import jaxcompress as jc
    >>> _, stats = jc.prune(0.5)({"w": jnp.ones((2, 2))})
    >>> sorted(stats["w"]) == sorted(PruneStats.__required_keys__)
    True
"""

from __future__ import annotations

from typing import Any, TypedDict

import jax

__all__ = [
    "BlockStats",
    "ClusterStats",
    "LowRankStats",
    "NMStats",
    "ProjectionStats",
    "PruneStats",
    "QuantizeStats",
    "SkippedStats",
]

Number = int | float | jax.Array


class SkippedStats(TypedDict):
    """A leaf the default filter selected but the method cannot take, left as it is.

    ``skipped`` is the reason (``True`` under ``jit``, which returns no strings); see
    :class:`jaxcompress.transforms.engine.Unfit`.
    """

    skipped: str | bool


class _ObsStats(TypedDict, total=False):
    """What a GPTQ / SparseGPT sweep adds: its damping and whether it factorized."""

    damp: float
    damping: Number
    factorized: bool | jax.Array
    relative_output_error: Number


class PruneStats(_ObsStats):
    """:func:`jaxcompress.prune`: entries zeroed out of ``size``."""

    pruned: int
    size: int


class NMStats(PruneStats):
    """:func:`jaxcompress.prune_nm`: also the ``n`` of every ``m`` kept."""

    n: int
    m: int


class BlockStats(TypedDict):
    """:func:`jaxcompress.prune_blocks`: entries and whole tiles zeroed."""

    pruned: int
    size: int
    blocks_pruned: int
    blocks: int
    block: tuple[int, int]


class _QuantizeOptional(_ObsStats, total=False):
    alpha: Number
    clip_ratio: Number
    rtn_relative_output_error: Number


class QuantizeStats(_QuantizeOptional):
    """:func:`jaxcompress.quantize`: code width and weight error (GPTQ/AWQ add theirs)."""

    bits: int
    relative_error: Number
    max_abs_error: Number


class _ClusterOptional(_ObsStats, total=False):
    note: str
    weighted_relative_error: Number


class ClusterStats(_ClusterOptional):
    """:func:`jaxcompress.cluster`: codebook size, fit and weight error."""

    k: int
    inertia: Number
    relative_error: Number
    iterations: Number
    distinct: Number


class _LowRankOptional(TypedDict, total=False):
    relative_error: Number
    relative_output_error: Number
    skipped: str | bool


class LowRankStats(_LowRankOptional):
    """:func:`jaxcompress.low_rank`: rank, matrix view and bytes (errors unless skipped)."""

    rank: int | None
    m: int
    n: int
    bytes_before: int
    bytes_after: int


class _ProjectionOptional(TypedDict, total=False):
    explained_variance: Number
    explained_ratio: Number
    relative_error: Number
    bias_folded: bool
    offset_norm: Number


class ProjectionStats(_ProjectionOptional):
    """:func:`jaxcompress.pca` and :func:`jaxcompress.lda`: ``rank`` (alias ``k``), view."""

    rank: Any
    k: Any
    m: int
    n: int
    skipped: bool
