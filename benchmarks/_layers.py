"""The two test layers the quantizer comparisons share (``peers_jax.py``, ``awq_vs_qwix.py``).

A linen ``Dense`` kernel ``W`` of shape ``(n, n)`` (inputs first) with its calibration and
held-out inputs, drawn from one seed:

- **plain**: ``W`` and the inputs are i.i.d. Gaussian, every channel alike;
- **outliers**: 1 % of the input channels carry activations 20x the others (as the
  "massive activation" channels of language models do), and a different 1 % of the
  weight's input rows hold weights 8x the others, so that a per-column or per-group scale
  is set by a few large entries.

The error every comparison reports is the relative output error on the held-out
inputs, ``‖X W − X Ŵ‖_F / ‖X W‖_F``, in float64.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

KINDS = ("plain", "outliers")


class Layer(NamedTuple):
    """One test layer: the kernel, calibration inputs and held-out inputs (float32)."""

    kind: str
    kernel: np.ndarray  # (n, n), inputs first
    calibration: np.ndarray  # (calibration_rows, n)
    held_out: np.ndarray  # (held_out_rows, n)


def make_layer(
    kind: str,
    *,
    n: int = 4096,
    calibration_rows: int = 512,
    held_out_rows: int = 512,
    seed: int = 0,
) -> Layer:
    """The ``kind`` layer (``"plain"`` or ``"outliers"``) of width ``n``.

    Example:
        >>> layer = make_layer("outliers", n=256, calibration_rows=8, held_out_rows=4)
        >>> layer.kernel.shape, layer.calibration.shape, layer.held_out.shape
        ((256, 256), (8, 256), (4, 256))
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    rng = np.random.default_rng(seed)
    kernel = rng.standard_normal((n, n), dtype=np.float32) / np.float32(np.sqrt(n))
    inputs = rng.standard_normal((calibration_rows + held_out_rows, n), dtype=np.float32)
    if kind == "outliers":
        count = max(1, n // 100)
        channels = rng.permutation(n)
        inputs[:, channels[:count]] *= 20.0
        kernel[channels[count : 2 * count], :] *= 8.0
    return Layer(kind, kernel, inputs[:calibration_rows], inputs[calibration_rows:])


def relative_output_error(layer: Layer, restored: np.ndarray) -> float:
    """``‖X W − X Ŵ‖_F / ‖X W‖_F`` on the held-out inputs, for a restored ``(n, n)`` kernel.

    Example:
        >>> layer = make_layer("plain", n=64, calibration_rows=4, held_out_rows=4)
        >>> relative_output_error(layer, layer.kernel)
        0.0
    """
    x = layer.held_out.astype(np.float64)
    w = layer.kernel.astype(np.float64)
    reference = x @ w
    error = x @ (np.asarray(restored, np.float64) - w)
    return float(np.linalg.norm(error) / np.linalg.norm(reference))
