"""What :func:`jaxcompress.auto` may spend: a byte size, a ratio to float32, or a latency."""

from __future__ import annotations

import dataclasses
import math
import numbers

__all__ = ["Budget", "budget"]


def _positive(name: str, value: object, *, integer: bool) -> None:
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        what = "an integer" if integer else "a real number"
        raise TypeError(f"budget: {name} must be {what}, got {value!r}")
    if not (math.isfinite(float(value)) and value > 0):  # type: ignore[operator]
        raise ValueError(f"budget: {name} must be positive and finite, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Budget:
    """A limit on the compressed tree, built by :func:`budget`; every given limit holds.

    Attributes:
        bytes: the most :func:`jaxcompress.nbytes` of the whole compressed tree (every
            leaf, the unselected ones at their own size), or ``None``.
        ratio: the selected weights' float32 bytes (4 per entry, whatever their dtype)
            divided by their compressed bytes must be at least this, or ``None``.
        latency: seconds per call of the jitted accelerated model, or ``None``.

    Example:
        >>> import jaxcompress as jc
        >>> jc.budget(bytes=1000).limit(selected_float32=4096, unselected=200)
        800
        >>> jc.budget(ratio=8.0).limit(selected_float32=4096, unselected=200)
        512
    """

    bytes: int | None = None
    ratio: float | None = None
    latency: float | None = None

    def __post_init__(self) -> None:
        if self.bytes is None and self.ratio is None and self.latency is None:
            raise ValueError("budget: give at least one of bytes=, ratio= or latency=")
        if self.bytes is not None:
            _positive("bytes", self.bytes, integer=True)
            object.__setattr__(self, "bytes", int(self.bytes))
        if self.ratio is not None:
            _positive("ratio", self.ratio, integer=False)
            object.__setattr__(self, "ratio", float(self.ratio))
        if self.latency is not None:
            _positive("latency", self.latency, integer=False)
            object.__setattr__(self, "latency", float(self.latency))

    def limit(self, *, selected_float32: int, unselected: int) -> int | None:
        """The most bytes the selected weights may take together (``None``: no byte limit).

        Args:
            selected_float32: the selected weights' entries times 4.
            unselected: the bytes of every other leaf, counted against ``bytes``.

        Example:
            >>> import jaxcompress as jc
            >>> jc.budget(bytes=900, ratio=4).limit(selected_float32=4000, unselected=0)
            900
        """
        limits = []
        if self.bytes is not None:
            limits.append(self.bytes - unselected)
        if self.ratio is not None:
            limits.append(math.floor(selected_float32 / self.ratio))
        return min(limits) if limits else None

    def __str__(self) -> str:
        parts = []
        if self.bytes is not None:
            parts.append(f"{self.bytes:,} bytes")
        if self.ratio is not None:
            parts.append(f"{self.ratio:g}x fewer bytes than float32")
        if self.latency is not None:
            parts.append(f"{self.latency:g} s per call")
        return ", ".join(parts)


def budget(
    *, bytes: int | None = None, ratio: float | None = None, latency: float | None = None
) -> Budget:
    """A budget for :func:`jaxcompress.auto`; with several limits, all of them hold.

    Args:
        bytes: the most :func:`jaxcompress.nbytes` the whole compressed tree may take,
            leaves ``auto`` does not select included (at their own size).
        ratio: at least this many times fewer bytes for the selected weights than
            they take as float32 (``ratio=8.0``: an eighth of 4 bytes per entry).
        latency: seconds per call of ``jax.jit(jaxcompress.accelerate(apply_fn))``
            on the first calibration batch, on this machine: :func:`jaxcompress.auto`
            keeps its prediction within it and reports the measured value.

    Returns:
        A frozen :class:`Budget`.

    Raises:
        ValueError: no limit given, or one not positive and finite.
        TypeError: ``bytes`` not an integer, or ``ratio``/``latency`` not a number.

    Example:
        >>> import jaxcompress as jc
        >>> jc.budget(bytes=4096)
        Budget(bytes=4096, ratio=None, latency=None)
        >>> print(jc.budget(ratio=8))
        8x fewer bytes than float32
    """
    return Budget(bytes=bytes, ratio=ratio, latency=latency)
