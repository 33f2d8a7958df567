"""Size and error reports comparing an original pytree with its compressed version."""

from __future__ import annotations

import dataclasses
import io
from typing import TYPE_CHECKING, Any, cast

import jax.numpy as jnp

from jaxcompress.arrays import as_dense, is_compressed, leaf_nbytes
from jaxcompress.arrays.tree import is_array_leaf
from jaxcompress.core.mesh import unsharded
from jaxcompress.transforms.base import flatten_leaves

if TYPE_CHECKING:
    from rich.console import JustifyMethod
    from rich.table import Table


@dataclasses.dataclass(frozen=True)
class LeafReport:
    """One row of a :class:`Report`.

    Attributes:
        path: the leaf path, ``a/b/kernel``.
        shape: the dense shape.
        kind: ``"dense"`` for an untouched leaf, else the compressed leaf's kind.
        original_bytes: bytes of the original leaf.
        compressed_bytes: true storage bytes of the compressed leaf.
        ratio: ``original_bytes / compressed_bytes``.
        density: fraction of nonzero entries after compression.
        relative_error: ``||W - W_hat|| / ||W||`` (Frobenius), 0 for an exact copy.

    Example:
        >>> import jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> params = {"w": jnp.ones((8, 8))}
        >>> row = jc.summarize(params, jc.prune(0.75)(params)[0]).rows[0]
        >>> row.kind, row.original_bytes, row.compressed_bytes, row.density
        ('sparse', 256, 72, 0.25)
    """

    path: str
    shape: tuple[int, ...]
    kind: str
    original_bytes: int
    compressed_bytes: int
    ratio: float
    density: float
    relative_error: float


def _ratio(original_bytes: int, compressed_bytes: int) -> float:
    # An empty tree is not compressed at all: 1.0, never a NaN or inf in the JSON.
    if compressed_bytes == 0:
        return 1.0 if original_bytes == 0 else float("inf")
    return original_bytes / compressed_bytes


def human_bytes(count: float) -> str:
    """``count`` bytes for people: B, KiB, MiB or GiB.

    Example:
        >>> human_bytes(512), human_bytes(3 * 1024 * 1024)
        ('512 B', '3.0 MiB')
    """
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


@dataclasses.dataclass(frozen=True)
class Report:
    """What compression did to each leaf, and in total.

    Print it for a table, or call :meth:`to_dict` for JSON.

    Attributes:
        rows: one :class:`LeafReport` per leaf, in pytree order.

    Example:
        >>> import jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> params = {"w": jnp.ones((8, 8)), "b": jnp.ones(8)}
        >>> report = jc.summarize(params, jc.prune(0.75)(params)[0])
        >>> report
        Report(2 leaves, 288 B -> 104 B, 2.77x)
        >>> print(report)  # doctest: +ELLIPSIS
        Compression summary
        ...
    """

    rows: tuple[LeafReport, ...]

    @property
    def original_bytes(self) -> int:
        """Total bytes before compression."""
        return sum(row.original_bytes for row in self.rows)

    @property
    def compressed_bytes(self) -> int:
        """Total true storage bytes after compression."""
        return sum(row.compressed_bytes for row in self.rows)

    @property
    def ratio(self) -> float:
        """``original_bytes / compressed_bytes`` over the whole tree."""
        return _ratio(self.original_bytes, self.compressed_bytes)

    def to_dict(self) -> dict[str, Any]:
        """The report as plain Python values, ready for ``json.dumps``.

        Example:
            >>> import jax.numpy as jnp
            >>> import jaxcompress as jc
            >>> params = {"w": jnp.ones((8, 8))}
            >>> jc.summarize(params, jc.prune(0.5)(params)[0]).to_dict()["compressed_bytes"]
            136
        """
        return {
            "original_bytes": self.original_bytes,
            "compressed_bytes": self.compressed_bytes,
            "ratio": self.ratio,
            "leaves": [{**dataclasses.asdict(row), "shape": list(row.shape)} for row in self.rows],
        }

    def table(self, *, title: str | None = "Compression summary") -> Table:
        """The report as a ``rich`` table."""
        from rich import box  # rich loads on first use, not with `import jaxcompress`
        from rich.table import Table

        table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
        longest_path = max((len(row.path) for row in self.rows), default=4)
        for column, justify in (
            ("leaf", "left"),
            ("shape", "left"),
            ("kind", "left"),
            ("before", "right"),
            ("after", "right"),
            ("ratio", "right"),
            ("density", "right"),
            ("rel. err", "right"),
        ):
            # Paths may fold onto two lines; numbers never wrap.
            table.add_column(
                column,
                justify=cast("JustifyMethod", justify),
                no_wrap=column != "leaf",
                overflow="fold",
                min_width=min(longest_path, 40) if column == "leaf" else None,
            )
        for row in self.rows:
            table.add_row(
                row.path,
                "x".join(map(str, row.shape)) or "()",
                row.kind,
                human_bytes(row.original_bytes),
                human_bytes(row.compressed_bytes),
                f"{row.ratio:.1f}x",
                f"{row.density:.1%}",
                f"{row.relative_error:.1e}",
            )
        table.add_section()
        table.add_row(
            "total",
            "",
            "",
            human_bytes(self.original_bytes),
            human_bytes(self.compressed_bytes),
            f"{self.ratio:.2f}x",
            "",
            "",
        )
        return table

    def __rich__(self) -> Table:
        return self.table()

    def __str__(self) -> str:
        from rich.console import Console

        buffer = io.StringIO()
        Console(file=buffer, width=120, color_system=None).print(self.table())
        return buffer.getvalue()

    def __repr__(self) -> str:
        return (
            f"Report({len(self.rows)} leaves, {human_bytes(self.original_bytes)} -> "
            f"{human_bytes(self.compressed_bytes)}, {self.ratio:.2f}x)"
        )

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(str(self))


def _leaf_row(path: str, original: Any, compressed: Any) -> LeafReport:
    reference = unsharded(jnp.asarray(original, dtype=jnp.float32))
    approximation = unsharded(jnp.asarray(as_dense(compressed), dtype=jnp.float32))
    if reference.shape != approximation.shape:
        raise ValueError(
            f"summarize: leaf {path!r} has shape {reference.shape} in original but "
            f"{approximation.shape} in compressed"
        )
    norm = float(jnp.linalg.norm(reference.reshape(-1)))
    error = float(jnp.linalg.norm((reference - approximation).reshape(-1)))
    relative_error = error / norm if norm else (0.0 if error == 0 else float("inf"))
    size = reference.size
    density = float(jnp.count_nonzero(approximation)) / size if size else 0.0
    original_bytes = leaf_nbytes(original)
    compressed_bytes = leaf_nbytes(compressed)
    return LeafReport(
        path=path,
        shape=tuple(reference.shape),
        kind=compressed.kind if is_compressed(compressed) else "dense",
        original_bytes=original_bytes,
        compressed_bytes=compressed_bytes,
        ratio=_ratio(original_bytes, compressed_bytes),
        density=density,
        relative_error=relative_error,
    )


def summarize(original: Any, compressed: Any) -> Report:
    """Compares a pytree with its compressed version, leaf by leaf.

    Leaves that are not arrays (an equinox module's activation function, Python
    numbers) hold no weights and get no row.

    Args:
        original: the dense pytree (a params dict, an ``nnx.State``, an equinox module).
        compressed: the output of a transform on ``original`` (same structure).

    Returns:
        A :class:`Report` with per-leaf rows and totals.

    Raises:
        ValueError: if the two trees do not have the same structure or shapes.

    Example:
        >>> import jax.numpy as jnp
        >>> import jaxcompress as jc
        >>> params = {"w": jnp.arange(1.0, 65.0).reshape(8, 8), "b": jnp.ones(8)}
        >>> report = jc.summarize(params, jc.prune(0.5)(params)[0])
        >>> report.original_bytes, report.compressed_bytes, round(report.ratio, 3)
        (288, 168, 1.714)
        >>> report.rows[1].density
        0.5
    """
    original_entries, original_def = flatten_leaves(original)
    compressed_entries, compressed_def = flatten_leaves(compressed)
    if original_def != compressed_def:
        raise ValueError(
            "summarize: original and compressed have different pytree structures "
            f"({len(original_entries)} vs {len(compressed_entries)} leaves)"
        )
    # Non-array leaves (an equinox module's activation, ints) hold no weights.
    rows = tuple(
        _leaf_row(before.path, before.leaf, after.leaf)
        for before, after in zip(original_entries, compressed_entries, strict=True)
        if is_array_leaf(before.leaf)
    )
    return Report(rows)
