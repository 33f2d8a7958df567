"""Embedded UCI 8x8 handwritten digits data set.

Source: UCI ML hand-written digits (E. Alpaydin and C. Kaynak, 1998), licensed CC BY 4.0,
as bundled by scikit-learn (``sklearn.datasets.load_digits``). The 1797 images ship inside
this package as ``digits.npz`` (uint8 pixels 0..16, uint8 labels) with a fixed stratified
train/test split (seed 0, 20% test: 1437 train / 360 test). Nothing is downloaded and
scikit-learn is not needed at runtime; ``make_digits.py`` documents how the file was made.
"""

from __future__ import annotations

import functools
from importlib import resources

import numpy as np

__all__ = ["load_digits"]

_SPLITS = ("train", "test")


@functools.lru_cache(maxsize=1)
def _load_npz() -> dict[str, np.ndarray]:
    # importlib.resources works from a source tree, an installed wheel, or a zip import.
    with resources.files(__name__).joinpath("digits.npz").open("rb") as f, np.load(f) as npz:
        return {k: npz[k] for k in npz.files}


def load_digits(*, split: str = "train", flatten: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Load the embedded 8x8 digits split as float32 images and int32 labels.

    Args:
        split: Which fixed split to return, ``"train"`` (1437 images) or ``"test"`` (360).
        flatten: If true, images are shaped ``(n, 64)``; otherwise ``(n, 8, 8, 1)`` (NHWC).

    Returns:
        ``(images, labels)``: float32 images scaled to ``[0, 1]`` and int32 labels in 0..9.
        Fresh arrays are returned on every call, so callers may modify them.

    Raises:
        ValueError: If ``split`` is not ``"train"`` or ``"test"``.

    Example:
        >>> from jaxcompress.examples.data import load_digits
        >>> x, y = load_digits(split="test", flatten=False)
        >>> x.shape, x.dtype, y.shape, y.dtype
        ((360, 8, 8, 1), dtype('float32'), (360,), dtype('int32'))
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    data = _load_npz()
    x = data[f"x_{split}"].astype(np.float32) / np.float32(16.0)  # pixel counts are 0..16
    y = data[f"y_{split}"].astype(np.int32)
    if not flatten:
        x = x.reshape(-1, 8, 8, 1)
    return x, y
