"""The formats :func:`jaxcompress.auto` tries on each weight by default.

Each candidate is a transform applied to the selected weights only (``None`` is
"dense": the weight left as it is). Every one here works leaf by leaf, so a weight's
result does not depend on which other weights share its format; that is what lets
``auto`` measure each format in one pass over all weights and then apply it to a
subset.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from jaxcompress.methods.cluster import cluster
from jaxcompress.methods.lowrank import low_rank
from jaxcompress.methods.prune import prune
from jaxcompress.methods.quantize import quantize
from jaxcompress.transforms.base import Transform, chain

__all__ = ["DENSE", "default_candidates", "resolve_candidates"]

DENSE = "dense"


def default_candidates() -> dict[str, Transform | None]:
    """The default formats, by name: dense, int8, int4, GPTQ int4, k-means, pruning, low rank.

    ``"int8"`` has one scale per output channel; ``"int4-g128"`` and the data-aware
    ``"gptq4-g128"`` one per 128 inputs of an output channel (one group when fewer);
    ``"kmeans5"``/``"kmeans4"``/``"kmeans3"`` share 32/16/8 values per weight;
    ``"prune50+int8"``/``"prune75+int8"`` keep the largest half/quarter of the weights as
    int8; ``"lowrank-e90"``/``"lowrank-e75"`` keep the smallest rank holding 90 %/75 % of
    the squared singular values (unavailable where that saves no bytes).

    Example:
        >>> from jaxcompress.hybrid.candidates import default_candidates
        >>> list(default_candidates())[:4]
        ['dense', 'int8', 'int4-g128', 'gptq4-g128']
    """
    return {
        DENSE: None,
        "int8": quantize(8),
        "int4-g128": quantize(4, group_size=128),
        "gptq4-g128": quantize(4, group_size=128, method="gptq"),
        "kmeans5": cluster(bits=5),
        "kmeans4": cluster(bits=4),
        "kmeans3": cluster(bits=3),
        "prune50+int8": chain(prune(0.5), quantize(8)),
        "prune75+int8": chain(prune(0.75), quantize(8)),
        "lowrank-e90": low_rank(energy=0.9),
        "lowrank-e75": low_rank(energy=0.75),
    }


def resolve_candidates(candidates: Any) -> dict[str, Transform | None]:
    """``candidates`` as a checked name → transform dict.

    ``None`` gives :func:`default_candidates`; a sequence of names picks among them;
    a mapping is taken as it is, ``None`` values meaning dense. The name ``"dense"``
    is kept for leaving a weight as it is.

    Example:
        >>> from jaxcompress.hybrid.candidates import resolve_candidates
        >>> list(resolve_candidates(["dense", "int8"]))
        ['dense', 'int8']
    """
    if candidates is None:
        return default_candidates()
    if isinstance(candidates, Sequence) and not isinstance(candidates, str):
        defaults = default_candidates()
        unknown = [name for name in candidates if name not in defaults]
        if unknown:
            raise ValueError(
                f"auto: candidates names {unknown} are not default candidates; the defaults "
                f"are {list(defaults)} (or pass a mapping name -> transform)"
            )
        if len(set(candidates)) != len(candidates):
            raise ValueError(f"auto: candidates repeats a name: {list(candidates)}")
        return {name: defaults[name] for name in candidates}
    if not isinstance(candidates, Mapping):
        raise TypeError(
            "auto: candidates must be a mapping name -> transform (None for dense) or a "
            f"sequence of default candidate names, got {type(candidates).__name__}"
        )
    resolved: dict[str, Transform | None] = {}
    for name, tx in candidates.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"auto: candidate names must be non-empty strings, got {name!r}")
        if tx is not None and not callable(tx):
            raise TypeError(
                f"auto: candidate {name!r} must be a transform (or None for dense), got "
                f"{type(tx).__name__}"
            )
        if name == DENSE and tx is not None:
            raise ValueError(
                f"auto: the candidate name {DENSE!r} is kept for leaving a weight as it is; "
                f"map it to None or name your transform otherwise"
            )
        resolved[name] = tx
    if not resolved:
        raise ValueError("auto: candidates is empty; give at least one format")
    return resolved
