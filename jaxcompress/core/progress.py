"""Progress over the leaves of a long transform: a bar on stderr, by leaf and by bytes.

Data-aware transforms (GPTQ, AWQ, SparseGPT, weighted k-means) take seconds per layer
on a big model; ``progress=True`` on them shows which leaf they are on and how many of
the selected bytes are done. The bar is transient (it disappears when the transform
ends), writes to stderr, and prints nothing when stderr is not a terminal or when the
transform is being traced under ``jit``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np

__all__ = ["leaf_bytes", "over_leaves", "over_steps"]

T = TypeVar("T")


def leaf_bytes(leaf: Any) -> int:
    """Dense bytes of an array-like leaf (its size times its item size).

    Example:
        >>> import numpy as np
        >>> leaf_bytes(np.zeros((3, 4), np.float32))
        48
    """
    return math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize


def over_leaves(
    items: Iterable[T], *, sizes: Sequence[int], description: str, enabled: bool
) -> Iterator[T]:
    """Yields ``items``, advancing a bar by one leaf and its bytes after each.

    Args:
        items: one item per leaf.
        sizes: the bytes of each leaf (shown as done / total).
        description: the bar's label, such as the transform's name.
        enabled: whether to show a bar at all.

    Example:
        >>> list(over_leaves(["a", "b"], sizes=[4, 8], description="demo", enabled=False))
        ['a', 'b']
    """
    if not enabled:
        yield from items
        return
    # rich loads only when a bar is shown: it is not part of `import jaxcompress`.
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    if not console.is_terminal:
        # rich would still end a bar with a newline on a pipe or file: show nothing.
        for item, _ in zip(items, sizes, strict=True):
            yield item
        return
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )
    leaves = bar.add_task(description, total=sum(sizes))
    with bar:
        done = 0
        for index, (item, size) in enumerate(zip(items, sizes, strict=True)):
            bar.update(leaves, description=f"{description} [{index + 1}/{len(sizes)}]")
            yield item
            done += size
            bar.update(leaves, completed=done)


def over_steps(items: Iterable[T], *, total: int, description: str, enabled: bool) -> Iterator[T]:
    """Yields ``items``, advancing a transient step bar (``i/total`` and elapsed time) after each.

    Like :func:`over_leaves` it writes to stderr, loads rich only when shown, and shows
    nothing when stderr is not a terminal.

    Example:
        >>> list(over_steps(range(3), total=3, description="train", enabled=False))
        [0, 1, 2]
    """
    if not enabled:
        yield from items
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    if not console.is_terminal:
        yield from items
        return
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )
    task = bar.add_task(description, total=total)
    with bar:
        for item in items:
            yield item
            bar.advance(task)
