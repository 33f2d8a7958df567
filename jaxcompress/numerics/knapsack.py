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

import bisect
import dataclasses
import math
from collections.abc import Sequence

import numpy as np

__all__ = ["Frontier", "Solution2", "nondominated", "pareto_frontier", "solve", "solve2"]


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


# Two sizes: (bytes, latency) both limited, one cost.


@dataclasses.dataclass(frozen=True)
class Solution2:
    """The optimum of :func:`solve2`: the option per item and its totals.

    Attributes:
        choices: the option index of each item.
        sizes: the two total sizes.
        cost: the total cost.
        points: the most partial combinations kept after any one item (the work done).
    """

    choices: tuple[int, ...]
    sizes: tuple[int, int]
    cost: float
    points: int


def _check_options2(
    options: Sequence[Sequence[tuple[int, int, float]]],
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    items = []
    for position, item in enumerate(options):
        triples = list(item)
        if not triples:
            raise ValueError(f"knapsack: item {position} has no option")
        first = np.array([t[0] for t in triples])
        second = np.array([t[1] for t in triples])
        costs = np.array([t[2] for t in triples], dtype=np.float64)
        for sizes in (first, second):
            if not np.issubdtype(sizes.dtype, np.integer) or np.any(sizes < 0):
                raise ValueError(
                    f"knapsack: item {position} sizes must be non-negative integers, got "
                    f"{sizes.tolist()}"
                )
        if not np.all(np.isfinite(costs)):
            raise ValueError(
                f"knapsack: item {position} costs must be finite, got {costs.tolist()}"
            )
        items.append((first.astype(np.int64), second.astype(np.int64), costs))
    return items


def nondominated(first: np.ndarray, second: np.ndarray, costs: np.ndarray) -> np.ndarray:
    """Indices of the points no other point matches or beats in all three values.

    Of equal points the first (after sorting by ``first``, ``second``, ``cost``) is
    kept. One sweep in ``first`` order over a staircase of ``(second, cost)`` minima:
    ``O(n log n)`` comparisons.

    Args:
        first, second: integer sizes, one per point.
        costs: the points' costs.

    Returns:
        The kept indices, sorted by ``(first, second, cost)``.

    Example:
        >>> import numpy as np
        >>> nondominated(np.array([1, 2, 2, 3]), np.array([5, 1, 6, 1]),
        ...              np.array([0.0, 0.0, 9.0, 1.0])).tolist()
        [0, 1]
    """
    order = np.lexsort((costs, second, first))
    stair_sizes: list[int] = []  # second sizes, increasing
    stair_costs: list[float] = []  # their least costs, strictly decreasing
    kept = []
    for index, b, c in zip(
        order.tolist(), second[order].tolist(), costs[order].tolist(), strict=True
    ):
        at = bisect.bisect_right(stair_sizes, b) - 1
        if at >= 0 and stair_costs[at] <= c:
            continue  # an earlier point has first, second and cost no larger
        kept.append(index)
        start = bisect.bisect_left(stair_sizes, b)
        stop = start
        while stop < len(stair_costs) and stair_costs[stop] >= c:
            stop += 1
        stair_sizes[start:stop] = [b]
        stair_costs[start:stop] = [c]
    return np.asarray(kept, dtype=np.int64)


def _padded(
    items: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The options as ``(items, most options)`` arrays; missing ones cost ``inf``."""
    width = max(len(a) for a, _, _ in items)
    sizes_a = np.zeros((len(items), width))
    sizes_b = np.zeros((len(items), width))
    costs = np.full((len(items), width), np.inf)
    for row, (a, b, c) in enumerate(items):
        sizes_a[row, : len(a)], sizes_b[row, : len(b)], costs[row, : len(c)] = a, b, c
    return sizes_a, sizes_b, costs


def _lagrangian(
    padded: tuple[np.ndarray, np.ndarray, np.ndarray], weights: tuple[float, float]
) -> np.ndarray:
    """``rest[k]``: the sum over items ``k..`` of each item's least ``cost + w·sizes``."""
    sizes_a, sizes_b, costs = padded
    least = np.min(costs + weights[0] * sizes_a + weights[1] * sizes_b, axis=1)
    return np.concatenate([np.cumsum(least[::-1])[::-1], [0.0]])


def _dual(
    padded: tuple[np.ndarray, np.ndarray, np.ndarray],
    capacities: tuple[int, int],
    free: tuple[bool, bool],
) -> tuple[float, float]:
    """Multipliers ``(w_a, w_b) >= 0`` with a large Lagrangian lower bound (any are valid).

    The dual ``L(w) = rest(w)[0] - w·capacities`` is concave, so it is unimodal along
    each coordinate, also on a log scale: a few rounds of ternary search per
    coordinate (``free`` says which may move).
    """
    costs = padded[2]
    top = max(
        float(
            np.sum(
                np.max(np.where(np.isfinite(costs), costs, -np.inf), axis=1) - np.min(costs, axis=1)
            )
        ),
        1e-300,
    )
    weights = [0.0, 0.0]

    def value(w: list[float]) -> float:
        return (
            float(_lagrangian(padded, (w[0], w[1]))[0])
            - w[0] * capacities[0]
            - w[1] * capacities[1]
        )

    for _ in range(3):
        for axis in (0, 1):
            if not free[axis]:
                continue
            low, high = math.log(top) - 60.0, math.log(top)  # sizes are integers: slopes <= top
            for _ in range(40):
                left, right = low + (high - low) / 3, high - (high - low) / 3
                trial_l, trial_r = list(weights), list(weights)
                trial_l[axis], trial_r[axis] = math.exp(left), math.exp(right)
                if value(trial_l) < value(trial_r):
                    low = left
                else:
                    high = right
            best = list(weights)
            best[axis] = math.exp((low + high) / 2)
            if value(best) > value(weights):
                weights = best
    return weights[0], weights[1]


def _merge2(
    items: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    capacities: tuple[int, int],
    least: tuple[np.ndarray, np.ndarray],
    bounds: list[tuple[tuple[float, float], np.ndarray]],
    incumbent: float,
    beam: int | None,
) -> Solution2 | None:
    """The item-by-item merge of :func:`solve2`; ``beam`` keeps only that many points."""
    cap_a, cap_b = capacities
    first = np.zeros(1, np.int64)
    second = np.zeros(1, np.int64)
    costs = np.zeros(1, np.float64)
    parents: list[np.ndarray] = []
    picks: list[np.ndarray] = []
    largest = 1
    for position, (item_a, item_b, item_c) in enumerate(items):
        count = len(item_a)
        all_a = (first[:, None] + item_a[None, :]).reshape(-1)
        all_b = (second[:, None] + item_b[None, :]).reshape(-1)
        all_c = (costs[:, None] + item_c[None, :]).reshape(-1)
        parent = np.repeat(np.arange(len(first)), count)
        pick = np.tile(np.arange(count), len(first))
        # Every bound is a lower bound on the completed cost of a point, for any
        # completion within both capacities: w·sizes <= w·capacities there.
        fits = (all_a + least[0][position + 1] <= cap_a) & (all_b + least[1][position + 1] <= cap_b)
        for (w_a, w_b), rest in bounds:
            low = all_c + rest[position + 1] - w_a * (cap_a - all_a) - w_b * (cap_b - all_b)
            # Float rounding of the terms must never drop the optimum: a relative slack.
            slack = 1e-9 * (abs(incumbent) + abs(rest[0]) + w_a * cap_a + w_b * cap_b + 1e-300)
            fits &= low <= incumbent + slack
        all_a, all_b, all_c = all_a[fits], all_b[fits], all_c[fits]
        parent, pick = parent[fits], pick[fits]
        if len(all_a) == 0:
            return None
        keep = nondominated(all_a, all_b, all_c)
        if beam is not None and len(keep) > beam:
            (w_a, w_b), rest = bounds[-1]
            score = all_c[keep] + w_a * all_a[keep] + w_b * all_b[keep]
            keep = keep[np.argsort(score, kind="stable")[:beam]]
        first, second, costs = all_a[keep], all_b[keep], all_c[keep]
        parents.append(parent[keep].astype(np.int32))
        picks.append(pick[keep].astype(np.int32 if count > 2**15 else np.int16))
        largest = max(largest, len(first))
    best = int(np.lexsort((second, first, costs))[0])
    point = best
    chosen = []
    for parent, pick in zip(reversed(parents), reversed(picks), strict=True):
        chosen.append(int(pick[point]))
        point = int(parent[point])
    return Solution2(
        tuple(reversed(chosen)), (int(first[best]), int(second[best])), float(costs[best]), largest
    )


# The first pass's width: enough for a near-optimal incumbent, small enough to be quick.
_BEAM = 256


def solve2(
    options: Sequence[Sequence[tuple[int, int, float]]],
    capacities: tuple[int, int],
    *,
    incumbent: Sequence[int] | None = None,
) -> Solution2 | None:
    """The least-cost choice of one option per item within two capacities, exactly.

    Each option is ``(first size, second size, cost)`` (bytes, latency, loss). The
    items are merged one at a time as in :func:`pareto_frontier`, keeping only
    partial combinations that no other matches or beats in both sizes and the cost
    (:func:`nondominated`): replacing a dominated partial combination by the one
    dominating it keeps every completion within both capacities and no costlier, so
    no optimum is lost. Partial combinations are also dropped by exact bounds:

    - one that even the remaining items' smallest options would take over a
      capacity (the lower bound with multipliers on the sizes alone);
    - one whose Lagrangian lower bound, ``cost + Σ_rest min(c + w·s) - w·(capacity -
      sizes)`` for multipliers ``w >= 0`` (true of any completion within both
      capacities), exceeds the cost of a known feasible choice. That choice is the
      cheapest of ``incumbent``, the optimum for each capacity alone when it fits
      both, and a first pass that keeps only the best few thousand points (by
      ``cost + w·sizes``) after each item; ``w`` maximise the Lagrangian dual.

    The bounds only remove points that cannot complete to a choice better than one
    already known, so the result is the exact optimum; they keep the number of
    points small (a few thousand on 40 items of 10 options, where the frontier
    alone holds a hundred thousand).

    Args:
        options: per item, its ``(first, second, cost)`` options (sizes
            non-negative integers, costs finite).
        capacities: the largest total first and second sizes allowed.
        incumbent: an option index per item believed feasible, to prune against.

    Returns:
        A :class:`Solution2` (among equal least costs, the one sorted first by sizes),
        or ``None`` when no choice fits both capacities.

    Raises:
        ValueError: for an item with no option, a negative or non-integer size, a
            non-finite cost, or an incumbent of the wrong length.

    Example:
        >>> options = [[(4, 1, 0.0), (1, 3, 1.0), (2, 2, 2.0)], [(3, 3, 0.0), (1, 1, 4.0)]]
        >>> found = solve2(options, (5, 4))
        >>> found.choices, found.sizes, found.cost
        ((0, 1), (5, 2), 4.0)
        >>> solve2(options, (1, 1)) is None
        True
    """
    items = _check_options2(options)
    caps = (int(capacities[0]), int(capacities[1]))
    # Infinite multipliers on the sizes: the smallest remaining options must fit.
    least_a = np.concatenate([np.cumsum([int(a.min()) for a, _, _ in items][::-1])[::-1], [0]])
    least_b = np.concatenate([np.cumsum([int(b.min()) for _, b, _ in items][::-1])[::-1], [0]])
    if least_a[0] > caps[0] or least_b[0] > caps[1]:
        return None
    guesses = [list(incumbent)] if incumbent is not None else []
    for which in (0, 1):
        pairs = [list(zip(item[which].tolist(), item[2].tolist(), strict=True)) for item in items]
        single = solve(pairs, caps[which])
        if single is None:
            return None
        guesses.append(list(single[0]))
    bound = math.inf
    for guess in guesses:
        if len(guess) != len(items):
            raise ValueError(f"knapsack: incumbent has {len(guess)} choices for {len(items)} items")
        picked = [
            (int(a[g]), int(b[g]), float(c[g])) for (a, b, c), g in zip(items, guess, strict=True)
        ]
        if sum(p[0] for p in picked) <= caps[0] and sum(p[1] for p in picked) <= caps[1]:
            bound = min(bound, sum(p[2] for p in picked))
    padded = _padded(items)
    weights = {(0.0, 0.0), _dual(padded, caps, (True, False)), _dual(padded, caps, (False, True))}
    weights.add(_dual(padded, caps, (True, True)))
    bounds = [(w, _lagrangian(padded, w)) for w in sorted(weights)]
    # Last: the pair with the best dual value, which also scores the beam.
    bounds.sort(key=lambda b: float(b[1][0]) - b[0][0] * caps[0] - b[0][1] * caps[1])
    least = (least_a, least_b)
    quick = _merge2(items, caps, least, bounds, bound, beam=_BEAM)
    if quick is not None:
        bound = min(bound, quick.cost)
    return _merge2(items, caps, least, bounds, bound, beam=None)
