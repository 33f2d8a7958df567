"""The plan :func:`jaxcompress.auto` returns: each weight's format, the totals, the frontier."""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxcompress.hybrid.budget import Budget

__all__ = ["AutoPlan", "AutoRow"]


def _cell(text: str) -> str:
    return text.replace("|", r"\|")


def _micro(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e6:.4g}"


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
        latency: seconds its uses took in this format, each rebuilt alone and served
            by ``accelerate`` (``None`` without a latency budget; ``0`` where not
            modelled: see :attr:`AutoPlan.latency_notes`).
        dense_latency: seconds its uses took dense, likewise.

    Example:
        >>> AutoRow("l1/kernel", "int8", 640, 2048, 0.001).format
        'int8'
    """

    path: str
    format: str
    bytes: int
    dense_bytes: int
    loss: float
    latency: float | None = None
    dense_latency: float | None = None


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
        dense_latency: seconds per call of the dense model (``jax.jit(apply_fn)`` on
            the first batch), or ``None`` without a latency budget.
        predicted_latency: ``dense_latency`` less the rows' dense use times plus
            their chosen ones: what the choice kept within the budget.
        measured_latency: seconds per call of the chosen tree, prepared and run by
            ``jax.jit(jaxcompress.accelerate(apply_fn))`` on the first batch.
        latency_exceeded: whether ``measured_latency`` is over the budget's
            latency (the prediction held it, the measurement did not; ``auto``
            warns).
        latency_frontier: ``(predicted seconds, predicted loss)`` of every
            Pareto-optimal choice by latency alone.
        latencies: per weight path, per candidate name, its uses' seconds.
        latency_notes: weight path → why its latency is not modelled (it then
            counts the same in every format, inside the dense model's time).

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
    dense_latency: float | None = None
    predicted_latency: float | None = None
    measured_latency: float | None = None
    latency_exceeded: bool = False
    latency_frontier: tuple[tuple[float, float], ...] = ()
    latencies: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    latency_notes: dict[str, str] = dataclasses.field(default_factory=dict)

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
        timed = self.predicted_latency is not None
        lines = [
            f"| weight | format | bytes | dense bytes | {self.metric} loss alone |"
            + (" use µs (dense) |" if timed else ""),
            "|:--|:--|--:|--:|--:|" + ("--:|" if timed else ""),
        ]
        for row in self.rows:
            line = (
                f"| {_cell(row.path)} | {_cell(row.format)} | {row.bytes:,} | "
                f"{row.dense_bytes:,} | {row.loss:.4g} |"
            )
            if timed:
                line += f" {_micro(row.latency)} ({_micro(row.dense_latency)}) |"
            lines.append(line)
        total = (
            f"| **total** (budget {self.budget}) | | {self.bytes:,} | {self.dense_bytes:,} | "
            f"predicted {self.predicted_loss:.4g}, measured {self.measured_loss:.4g} |"
        )
        if timed:
            over = " **over budget**" if self.latency_exceeded else ""
            total += (
                f" model: predicted {_micro(self.predicted_latency)}, measured "
                f"{_micro(self.measured_latency)}{over} ({_micro(self.dense_latency)}) |"
            )
        lines.append(total)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def _repr_markdown_(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        latency = ""
        if self.predicted_latency is not None:
            latency = (
                f", latency predicted {_micro(self.predicted_latency)} µs, measured "
                f"{_micro(self.measured_latency)} µs"
            )
        return (
            f"AutoPlan({len(self.rows)} weights, {self.bytes:,} of {self.dense_bytes:,} bytes, "
            f"predicted {self.metric} loss {self.predicted_loss:.4g}, "
            f"measured {self.measured_loss:.4g}{latency})"
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
