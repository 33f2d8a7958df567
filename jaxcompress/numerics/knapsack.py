"""The exact multiple-choice knapsack: one option per item, least total cost within a size.

Each item (a weight) has a few options (its formats), each with a size (bytes) and a
cost (a measured loss). :func:`pareto_frontier` merges the items one at a time,
keeping after each merge only the combinations no other combination beats in both
size and cost; a dominated partial combination can never become part of an optimum
(replacing it by the one dominating it keeps every completion feasible and no worse),
so the frontier is exact, with no rounding of sizes. :func:`solve` reads the optimum
for one capacity off it. Plain numpy; sizes are integers, costs floats.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

__all__ = ["Frontier", "pareto_frontier", "solve"]


@dataclasses.dataclass(frozen=True)
class Frontier:
    """Every Pareto-optimal combination: sizes strictly increasing, costs strictly falling.

    Attributes:
        sizes: the total size of each frontier point, ``int64``, strictly increasing.
        costs: its total cost, ``float64``, strictly decreasing.
        parents: per item, for each point of the frontier after that item, the index
            of the point it extends in the frontier before it.
        picks: per item, for each point of the frontier after that item, the option
            taken for that item.
    """

    sizes: np.ndarray
    costs: np.ndarray
    parents: tuple[np.ndarray, ...]
    picks: tuple[np.ndarray, ...]

    def choices(self, point: int) -> tuple[int, ...]:
        """The option of every item at frontier point ``point``, by backtracking.

        Example:
            >>> frontier = pareto_frontier([[(1, 5.0), (3, 1.0)], [(2, 2.0), (4, 0.0)]])
            >>> frontier.sizes.tolist(), frontier.choices(len(frontier.sizes) - 1)
            ([3, 5, 7], (1, 1))
        """
        chosen = []
        for parents, picks in zip(reversed(self.parents), reversed(self.picks), strict=True):
            chosen.append(int(picks[point]))
            point = int(parents[point])
        return tuple(reversed(chosen))


def _check_options(
    options: Sequence[Sequence[tuple[int, float]]],
) -> list[tuple[np.ndarray, np.ndarray]]:
    items = []
    for position, item in enumerate(options):
        pairs = list(item)
        if not pairs:
            raise ValueError(f"knapsack: item {position} has no option")
        sizes = np.array([size for size, _ in pairs])
        costs = np.array([cost for _, cost in pairs], dtype=np.float64)
        if not np.issubdtype(sizes.dtype, np.integer) or np.any(sizes < 0):
            raise ValueError(
                f"knapsack: item {position} sizes must be non-negative integers, got "
                f"{sizes.tolist()}"
            )
        if not np.all(np.isfinite(costs)):
            raise ValueError(
                f"knapsack: item {position} costs must be finite, got {costs.tolist()}"
            )
        items.append((sizes.astype(np.int64), costs))
    return items


def pareto_frontier(
    options: Sequence[Sequence[tuple[int, float]]], *, capacity: int | None = None
) -> Frontier:
    """The exact size/cost Pareto frontier of choosing one option per item.

    Args:
        options: per item, its options as ``(size, cost)`` pairs (sizes non-negative
            integers, costs finite).
        capacity: drop partial combinations above this size as they appear (sizes
            only grow, so no optimum within it is lost); ``None`` keeps the whole
            frontier.

    Returns:
        A :class:`Frontier`; empty (no point) when nothing fits ``capacity``.

    Raises:
        ValueError: for an item with no option, a negative or non-integer size, or a
            non-finite cost.

    Example:
        >>> frontier = pareto_frontier([[(1, 5.0), (3, 1.0)], [(2, 2.0), (4, 0.0)]])
        >>> frontier.sizes.tolist(), frontier.costs.tolist()
        ([3, 5, 7], [7.0, 3.0, 1.0])
    """
    items = _check_options(options)
    sizes = np.zeros(1, np.int64)
    costs = np.zeros(1, np.float64)
    parents: list[np.ndarray] = []
    picks: list[np.ndarray] = []
    for item_sizes, item_costs in items:
        all_sizes = (sizes[:, None] + item_sizes[None, :]).reshape(-1)
        all_costs = (costs[:, None] + item_costs[None, :]).reshape(-1)
        count = len(item_sizes)
        parent = np.repeat(np.arange(len(sizes)), count)
        pick = np.tile(np.arange(count), len(sizes))
        if capacity is not None:
            fits = all_sizes <= capacity
            all_sizes, all_costs = all_sizes[fits], all_costs[fits]
            parent, pick = parent[fits], pick[fits]
        # Sorted by size, then cost: a point stays only if it costs strictly less than
        # every smaller (or equal-size, cheaper-first) point before it.
        order = np.lexsort((all_costs, all_sizes))
        all_sizes, all_costs = all_sizes[order], all_costs[order]
        parent, pick = parent[order], pick[order]
        keep = np.ones(len(all_sizes), bool)
        if len(all_sizes) > 1:
            best_before = np.minimum.accumulate(all_costs)[:-1]
            keep[1:] = all_costs[1:] < best_before
        sizes, costs = all_sizes[keep], all_costs[keep]
        # Backpointers for every item: narrow integers keep a 200-layer frontier small.
        parents.append(parent[keep].astype(np.int32))
        picks.append(pick[keep].astype(np.int32 if count > 2**15 else np.int16))
    return Frontier(sizes, costs, tuple(parents), tuple(picks))


def solve(
    options: Sequence[Sequence[tuple[int, float]]], capacity: int
) -> tuple[tuple[int, ...], int, float] | None:
    """The least-cost choice of one option per item with total size at most ``capacity``.

    Exact (no rounding of sizes): see :func:`pareto_frontier`. Among choices of equal
    least cost the smallest is returned.

    Args:
        options: per item, its ``(size, cost)`` options.
        capacity: the largest total size allowed.

    Returns:
        ``(choices, size, cost)``: the option index per item and the totals; ``None``
        when no choice fits.

    Example:
        >>> solve([[(1, 5.0), (3, 1.0)], [(2, 2.0), (4, 0.0)]], capacity=6)
        ((1, 0), 5, 3.0)
        >>> solve([[(1, 5.0)]], capacity=0) is None
        True
    """
    frontier = pareto_frontier(options, capacity=capacity)
    if len(frontier.sizes) == 0:
        return None
    # Costs fall along the frontier, so the largest point that fits is the cheapest.
    point = len(frontier.sizes) - 1
    return frontier.choices(point), int(frontier.sizes[point]), float(frontier.costs[point])
