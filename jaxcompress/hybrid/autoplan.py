"""The plan :func:`jaxcompress.auto` returns: each weight's format, the totals, the frontier."""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxcompress.hybrid.budget import Budget

__all__ = ["AutoPlan", "AutoRow"]


def _cell(text: str) -> str:
    return text.replace("|", r"\|")


@dataclasses.dataclass(frozen=True)
class AutoRow:
    """One weight of an :class:`AutoPlan`.

    Attributes:
        path: the leaf path (``a/b/kernel``).
        format: the chosen candidate's name (``"dense"``: left as it is).
        bytes: its compressed bytes (:func:`jaxcompress.nbytes`).
        dense_bytes: its bytes as given.
        loss: the metric measured with this weight alone in this format and every other
            weight dense; it is also the weight's share of the predicted total, which
            adds these up (``0`` for dense).

    Example:
        >>> AutoRow("l1/kernel", "int8", 640, 2048, 0.001).format
        'int8'
    """

    path: str
    format: str
    bytes: int
    dense_bytes: int
    loss: float


@dataclasses.dataclass(frozen=True)
class AutoPlan:
    """What :func:`jaxcompress.auto` chose, and what it measured to choose it.

    Attributes:
        rows: one :class:`AutoRow` per selected weight, in tree order.
        budget: the :class:`~jaxcompress.hybrid.budget.Budget` asked for.
        metric: the metric's name.
        bytes: :func:`jaxcompress.nbytes` of the whole compressed tree.
        dense_bytes: :func:`jaxcompress.nbytes` of the tree as given.
        predicted_loss: the sum of the rows' losses (what the choice minimised).
        measured_loss: the metric of the whole compressed tree, measured.
        frontier: ``(bytes, predicted loss)`` of every Pareto-optimal choice, whole-tree
            bytes increasing and loss falling: the best predicted loss at each budget.
        measurements: per weight path, per candidate name available for it,
            ``(bytes, loss)`` as measured.

    Example:
        >>> import jaxcompress as jc
        >>> from jaxcompress.hybrid.autoplan import AutoPlan, AutoRow
        >>> plan = AutoPlan(
        ...     rows=(AutoRow("a", "int8", 10, 40, 0.01), AutoRow("b", "dense", 40, 40, 0.0)),
        ...     budget=jc.budget(bytes=50), metric="cosine", bytes=50, dense_bytes=80,
        ...     predicted_loss=0.01, measured_loss=0.0101,
        ...     frontier=((20, 0.3), (50, 0.01), (80, 0.0)), measurements={})
        >>> plan.formats
        {'a': 'int8', 'b': 'dense'}
        >>> print(plan)
        | weight | format | bytes | dense bytes | cosine loss alone |
        |:--|:--|--:|--:|--:|
        | a | int8 | 10 | 40 | 0.01 |
        | b | dense | 40 | 40 | 0 |
        | **total** (budget 50 bytes) | | 50 | 80 | predicted 0.01, measured 0.0101 |
    """

    rows: tuple[AutoRow, ...]
    budget: Budget
    metric: str
    bytes: int
    dense_bytes: int
    predicted_loss: float
    measured_loss: float
    frontier: tuple[tuple[int, float], ...]
    measurements: dict[str, dict[str, tuple[int, float]]]

    @property
    def formats(self) -> dict[str, str]:
        """Weight path → chosen format name."""
        return {row.path: row.format for row in self.rows}

    def table(self) -> str:
        """A markdown table: each weight's format, bytes and loss, then the totals.

        Example:
            >>> import jaxcompress as jc
            >>> from jaxcompress.hybrid.autoplan import AutoPlan, AutoRow
            >>> plan = AutoPlan((AutoRow("w", "kmeans4", 8, 64, 0.125),), jc.budget(ratio=8),
            ...                 "mse", 8, 64, 0.125, 0.125, ((8, 0.125), (64, 0.0)), {})
            >>> print(plan.table().splitlines()[-1].replace(" than float32", ""))
            | **total** (budget 8x fewer bytes) | | 8 | 64 | predicted 0.125, measured 0.125 |
        """
        lines = [
            f"| weight | format | bytes | dense bytes | {self.metric} loss alone |",
            "|:--|:--|--:|--:|--:|",
        ]
        for row in self.rows:
            lines.append(
                f"| {_cell(row.path)} | {_cell(row.format)} | {row.bytes:,} | "
                f"{row.dense_bytes:,} | {row.loss:.4g} |"
            )
        lines.append(
            f"| **total** (budget {self.budget}) | | {self.bytes:,} | {self.dense_bytes:,} | "
            f"predicted {self.predicted_loss:.4g}, measured {self.measured_loss:.4g} |"
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def _repr_markdown_(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return (
            f"AutoPlan({len(self.rows)} weights, {self.bytes:,} of {self.dense_bytes:,} bytes, "
            f"predicted {self.metric} loss {self.predicted_loss:.4g}, "
            f"measured {self.measured_loss:.4g})"
        )

    def plot(self, *, ax: Any = None) -> Any:
        """Predicted loss against whole-tree bytes: the frontier, and the point chosen.

        Needs matplotlib (imported only here).

        Args:
            ax: a matplotlib ``Axes`` to draw on; by default a new figure.

        Returns:
            The matplotlib ``Figure``.

        Raises:
            ImportError: if matplotlib is not installed.

        Example:
            >>> import matplotlib
            >>> matplotlib.use("Agg")
            >>> import matplotlib.pyplot as plt
            >>> import jaxcompress as jc
            >>> from jaxcompress.hybrid.autoplan import AutoPlan, AutoRow
            >>> plan = AutoPlan((AutoRow("w", "int8", 16, 64, 0.01),), jc.budget(bytes=20),
            ...                 "cosine", 16, 64, 0.01, 0.01, ((16, 0.01), (64, 0.0)), {})
            >>> figure = plan.plot()
            >>> [line.get_label() for line in figure.axes[0].get_lines()]
            ['frontier (predicted)', 'chosen (predicted)', 'chosen (measured)', 'budget']
            >>> plt.close(figure)
        """
        try:
            import matplotlib.pyplot as plt
        except ImportError as error:
            raise ImportError(
                "AutoPlan.plot needs matplotlib; install it with `pip install matplotlib`"
            ) from error
        if ax is None:
            _, ax = plt.subplots(figsize=(6.4, 4.0))
        sizes = [size for size, _ in self.frontier]
        losses = [loss for _, loss in self.frontier]
        ax.plot(sizes, losses, drawstyle="steps-post", marker=".", label="frontier (predicted)")
        ax.plot([self.bytes], [self.predicted_loss], "o", label="chosen (predicted)")
        ax.plot([self.bytes], [self.measured_loss], "x", label="chosen (measured)")
        if self.budget.bytes is not None:
            ax.axvline(
                self.budget.bytes, linestyle="--", color="gray", linewidth=1.0, label="budget"
            )
        ax.set_xlabel("bytes of the whole tree")
        ax.set_ylabel(f"{self.metric} loss")
        ax.set_title("auto: predicted loss against size")
        ax.legend(fontsize="small")
        return ax.figure
