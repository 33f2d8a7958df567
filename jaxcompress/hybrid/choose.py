"""The exact choice behind :func:`jaxcompress.auto`: one format per weight within the limits.

Each weight's formats are points ``(bytes, loss)``, with a latency (integer
nanoseconds of the weight's uses) when a latency budget is given. With the losses
and latencies taken as additive, the least total loss is found exactly:

- bytes only, or latency only: the one-size Pareto frontier
  (:func:`jaxcompress.numerics.knapsack.pareto_frontier`), its largest point within
  the limit;
- both: the two-size search :func:`jaxcompress.numerics.knapsack.solve2`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from jaxcompress.hybrid.latency import UNITS_PER_SECOND
from jaxcompress.numerics.knapsack import pareto_frontier, solve2

__all__ = ["Choice", "Option", "choose"]


@dataclasses.dataclass(frozen=True)
class Option:
    """One format of one weight, as measured.

    Attributes:
        bytes: the weight's bytes in this format.
        loss: the metric with only this weight in this format.
        latency: its uses' time in this format, integer nanoseconds (``0`` when the
            weight's latency is not modelled), or ``None`` without a latency budget.
    """

    bytes: int
    loss: float
    latency: int | None = None


@dataclasses.dataclass(frozen=True)
class Choice:
    """The chosen format per weight and its totals over the selected weights.

    Attributes:
        formats: weight path → format name.
        bytes: the chosen formats' bytes, summed.
        loss: the chosen losses, summed (what was minimised).
        latency: the chosen latencies, summed (nanoseconds), or ``None``.
    """

    formats: dict[str, str]
    bytes: int
    loss: float
    latency: int | None


def _seconds(units: int) -> str:
    return f"{units / UNITS_PER_SECOND:.4g} s"


def choose(
    options: Mapping[str, Mapping[str, Option]],
    *,
    byte_limit: int | None,
    latency_limit: int | None,
    unselected: int = 0,
    latency_base: int = 0,
    what: str = "budget",
) -> Choice:
    """The least-loss format per weight with the bytes and the latency within their limits.

    Args:
        options: weight path → format name → :class:`Option`; in tree order.
        byte_limit: the most bytes the selected weights may take, or ``None``.
        latency_limit: the most nanoseconds their uses may take together, or
            ``None`` (then ``Option.latency`` is not read).
        unselected: bytes of the other leaves, only to word an error in whole-tree
            bytes.
        latency_base: the model's time outside the modelled uses (nanoseconds), only
            to word an error as a model latency.
        what: the budget as the error should name it.

    Returns:
        A :class:`Choice`; among equal least losses, the smaller one.

    Raises:
        ValueError: when no choice fits, naming the smallest reachable bytes or latency.

    Example:
        >>> options = {"a": {"dense": Option(40, 0.0, 9), "int8": Option(10, 0.1, 4)},
        ...            "b": {"dense": Option(40, 0.0, 9), "int8": Option(10, 0.3, 2)}}
        >>> choose(options, byte_limit=50, latency_limit=None).formats
        {'a': 'int8', 'b': 'dense'}
        >>> choose(options, byte_limit=None, latency_limit=12).formats
        {'a': 'dense', 'b': 'int8'}
        >>> both = choose(options, byte_limit=50, latency_limit=10)
        >>> both.formats, both.bytes, both.latency
        ({'a': 'int8', 'b': 'int8'}, 20, 6)
    """
    if byte_limit is None and latency_limit is None:
        raise ValueError("choose: give byte_limit, latency_limit or both")
    paths = list(options)
    names = {path: list(options[path]) for path in paths}
    rows = [[options[path][name] for name in names[path]] for path in paths]

    def latency_of(option: Option) -> int:
        if option.latency is None:
            raise ValueError("choose: a latency limit needs every option's latency")
        return option.latency

    by_bytes = [[(o.bytes, o.loss) for o in row] for row in rows]
    if latency_limit is None:
        assert byte_limit is not None
        picks = _one(by_bytes, byte_limit, lambda least: _bytes_error(least, unselected, what))
    else:
        by_latency = [[(latency_of(o), o.loss) for o in row] for row in rows]
        if byte_limit is None:
            picks = _one(
                by_latency,
                latency_limit,
                lambda least: _latency_error(least, latency_base, what),
            )
        else:
            # Each limit alone first: its error names what cannot be reached.
            _one(by_bytes, byte_limit, lambda least: _bytes_error(least, unselected, what))
            _one(
                by_latency,
                latency_limit,
                lambda least: _latency_error(least, latency_base, what),
            )
            both = [[(o.bytes, latency_of(o), o.loss) for o in row] for row in rows]
            found = solve2(both, (byte_limit, latency_limit))
            if found is None:
                raise ValueError(
                    f"auto: {what} cannot be met: each limit can be met alone, but no "
                    "choice of formats meets both"
                )
            picks = found.choices
    chosen = [row[pick] for row, pick in zip(rows, picks, strict=True)]
    return Choice(
        formats={path: names[path][pick] for path, pick in zip(paths, picks, strict=True)},
        bytes=sum(o.bytes for o in chosen),
        loss=float(sum(o.loss for o in chosen)),
        latency=None if latency_limit is None else sum(latency_of(o) for o in chosen),
    )


def _one(
    options: Sequence[Sequence[tuple[int, float]]], limit: int, error: Callable[[int], ValueError]
) -> tuple[int, ...]:
    """The best choice within one limit, off the Pareto frontier; ``error(least)`` if none."""
    frontier = pareto_frontier(options)
    fits = np.flatnonzero(frontier.sizes <= limit)
    if len(fits) == 0:
        raise error(int(frontier.sizes[0]))
    # Losses fall along the frontier: the largest point that fits is the best.
    return frontier.choices(int(fits[-1]))


def _bytes_error(least: int, unselected: int, what: str) -> ValueError:
    return ValueError(
        f"auto: {what} cannot be met: the smallest reachable size is {least + unselected:,} "
        f"bytes for the whole tree ({least:,} for the selected weights)"
    )


def _latency_error(least: int, base: int, what: str) -> ValueError:
    return ValueError(
        f"auto: {what} cannot be met: the smallest predicted latency is "
        f"{_seconds(least + base)} per call"
    )
