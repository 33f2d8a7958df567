"""Regenerate ``digits.npz`` from scikit-learn's bundled copy of the UCI digits.

This script documents the provenance of the embedded data set and is not imported at
runtime (the runtime never imports scikit-learn). Run it from the repository root::

    python jaxcompress/data/make_digits.py

Source: UCI ML hand-written digits (E. Alpaydin and C. Kaynak, 1998), CC BY 4.0,
https://archive.ics.uci.edu/dataset/80, as bundled by ``sklearn.datasets.load_digits``.
"""

from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

SEED = 0
TEST_SIZE = 0.2


def main() -> None:
    digits = load_digits()
    x = digits.data.astype(np.uint8)  # pixel counts are integers 0..16
    y = digits.target.astype(np.uint8)
    idx_train, idx_test = train_test_split(
        np.arange(len(y)), test_size=TEST_SIZE, stratify=y, random_state=SEED
    )
    # Sorting keeps the original sample order inside each split; the split itself is fixed.
    idx_train, idx_test = np.sort(idx_train), np.sort(idx_test)
    out = Path(__file__).with_name("digits.npz")
    np.savez_compressed(
        out,
        x_train=x[idx_train],
        y_train=y[idx_train],
        x_test=x[idx_test],
        y_test=y[idx_test],
    )
    print(
        f"wrote {out} ({out.stat().st_size} bytes): {len(idx_train)} train / {len(idx_test)} test"
    )


if __name__ == "__main__":
    main()
